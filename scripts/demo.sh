#!/usr/bin/env bash
# The synthetic end-to-end study behind `make demo`. Usage: scripts/demo.sh OUT_DIR
# synth -> prepare -> pretrain (tiny) -> fine-tune from scratch and from the pretrained encoder -> Dice table.
set -euo pipefail
OUT=$(mkdir -p "${1:-demo_out}" && cd "${1:-demo_out}" && pwd)
export RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1
# Ray's worker logs go to OUT/<step>.log; the command's own summary (stdout) is shown.
quiet() { local log="$OUT/$1.log"; shift; "$@" 2>"$log" || { tail -60 "$log"; exit 1; }; }

echo "== 1/5 synth: a small synthetic PSMA PET/CT cohort (NIfTI) =="
swinssl synth --out "$OUT/cohort" --unlabeled 6 --labeled 4 --seed 0 --scale small

echo "== 2/5 prepare: register CT to PET, resample, normalise, shard (2 Ray workers) =="
swinssl prepare --input "$OUT/cohort/cohort.csv" --out "$OUT/prepared" --workers 2

echo "== 3/5 pretrain: tiny SwinUNETR encoder, 3 pretext tasks, 2 Ray Train workers =="
quiet pretrain swinssl pretrain experiments/pretrain_tiny.yaml data.root="$OUT/prepared" \
    output_dir="$OUT/runs/pretrain_tiny" trainer.steps=10 trainer.checkpoint_every=5

echo "== 4/5 finetune from scratch (2-fold CV) =="
quiet finetune_scratch swinssl finetune experiments/finetune_tiny.yaml data.root="$OUT/prepared" \
    output_dir="$OUT/runs/finetune_scratch" name=finetune_scratch encoder=""

echo "== 5/5 finetune from the pretrained encoder (2-fold CV) =="
quiet finetune_pretrained swinssl finetune experiments/finetune_tiny.yaml data.root="$OUT/prepared" \
    output_dir="$OUT/runs/finetune_pretrained" name=finetune_pretrained \
    encoder="$OUT/runs/pretrain_tiny/encoder.pt"

echo
echo "Dice per class, mean +- std over folds (a few CPU steps on synthetic data: a smoke test, not a result):"
swinssl report --runs scratch="$OUT/runs/finetune_scratch" pretrained="$OUT/runs/finetune_pretrained"
echo
echo "QC:      $OUT/prepared/qc/ (per-study PNGs, summary.md)"
echo "Outputs: $OUT/runs/*/ (encoder.pt, metrics.json, predictions/, overlays/, dice_per_class.png)"
echo "MLflow:  mlflow ui --backend-store-uri sqlite:///$OUT/runs/mlflow.db --host 127.0.0.1"
