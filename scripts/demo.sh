#!/usr/bin/env bash
# The synthetic end-to-end study behind `make demo`. Usage: scripts/demo.sh OUT_DIR
set -euo pipefail
OUT=$(mkdir -p "${1:-demo_out}" && cd "${1:-demo_out}" && pwd)
export RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1

echo "== 1/3 synth: a small synthetic PSMA PET/CT cohort (NIfTI) =="
swinssl synth --out "$OUT/cohort" --unlabeled 6 --labeled 4 --seed 0 --scale small

echo "== 2/3 prepare: register CT to PET, resample, normalise, shard (2 Ray workers) =="
swinssl prepare --input "$OUT/cohort/cohort.csv" --out "$OUT/prepared" --workers 2

echo "== 3/3 pretrain: tiny SwinUNETR encoder, 3 pretext tasks, 2 Ray Train workers =="
swinssl pretrain experiments/pretrain_tiny.yaml data.root="$OUT/prepared" output_dir="$OUT/runs/pretrain_tiny" \
    trainer.steps=10 trainer.checkpoint_every=5 2>"$OUT/pretrain.log" || { tail -50 "$OUT/pretrain.log"; exit 1; }

echo
echo "QC:      $OUT/prepared/qc/ (per-study PNGs, summary.md)"
echo "Encoder: $OUT/runs/pretrain_tiny/encoder.pt"
echo "MLflow:  mlflow ui --backend-store-uri sqlite:///$OUT/runs/mlflow.db --host 127.0.0.1"
