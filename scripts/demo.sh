#!/usr/bin/env bash
# The synthetic end-to-end study behind `make demo`. Usage: scripts/demo.sh OUT_DIR
# synth -> prepare -> sweep (Ray Tune: each trial pretrains on 3 or 6 unlabelled studies, then fine-tunes with
# 2-fold CV; plus a scratch baseline) -> the comparison table and plots, read back from MLflow.
set -euo pipefail
OUT=$(mkdir -p "${1:-demo_out}" && cd "${1:-demo_out}" && pwd)
export RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1
# Ray's worker logs go to OUT/<step>.log; the command's own summary (stdout) is shown.
quiet() { local log="$OUT/$1.log"; shift; "$@" 2>"$log" || { tail -60 "$log" >&2; exit 1; }; }

echo "== 1/5 synth: a small synthetic PSMA PET/CT cohort (NIfTI) =="
swinssl synth --out "$OUT/cohort" --unlabeled 6 --labeled 4 --seed 0 --scale small

echo "== 2/5 prepare: register CT to PET, resample, normalise, shard (2 Ray workers) =="
swinssl prepare --input "$OUT/cohort/cohort.csv" --out "$OUT/prepared" --workers 2

echo "== 3/5 sweep: the dataset-size study (n=3 vs n=6 unlabelled + scratch), tiny SwinUNETR, Ray Tune =="
# a rerun of `make demo` continues the same sweep (finished trials are kept)
RESUME=$([ -f "$OUT/runs/dataset_size/trials.json" ] && echo --resume || true)
quiet sweep swinssl sweep experiments/dataset_size_tiny.yaml $RESUME data.root="$OUT/prepared" \
    output_dir="$OUT/runs/dataset_size" name=dataset_size_demo "search.grid={data.subset: ['3', '6']}" \
    pretrain_overrides.trainer.steps=10 pretrain_overrides.trainer.checkpoint_every=5 \
    finetune_overrides.trainer.steps=6 finetune_overrides.trainer.checkpoint_every=3 \
    | tee "$OUT/sweep.out" | { grep --line-buffered -F "[sweep] " || true; }  # progress: one line per trial event
grep -E "^(FINISHED|FAILED|KILLED) " "$OUT/sweep.out"

echo "== 4/5 report: Dice per setting and class, gain over scratch (a few CPU steps: a smoke test, not a result) =="
swinssl report --sweep dataset_size_demo --tracking-uri "sqlite:///$OUT/runs/mlflow.db" --out "$OUT/report"

echo "== 5/5 results out: segment a new patient (synthetic DICOM) with the best trial's folds; bundle; nnU-Net =="
BEST=$(python - "$OUT/runs/dataset_size/trials" <<'PY'
import json, sys
from pathlib import Path
runs = [(json.loads(p.read_text())["summary"]["dice"]["mean"]["mean"], p.parent)
        for p in Path(sys.argv[1]).glob("*/finetune/metrics.json")]
print(max(runs, key=lambda r: r[0])[1])
PY
)
[ -d "$OUT/new_patient" ] || swinssl synth --out "$OUT/new_patient" --unlabeled 1 --labeled 0 --seed 99 \
    --format dicom >/dev/null
quiet predict swinssl predict "$BEST" --input "$OUT/new_patient/unl_0000" --out "$OUT/predict" --ct-grid --quiet
rm -rf "$OUT/bundle" && quiet bundle swinssl bundle "$BEST" --out "$OUT/bundle"
quiet nnunet swinssl export-nnunet "$OUT/prepared" --out "$OUT/nnUNet_raw/Dataset501_PSMAdemo" --finetune "$BEST"
echo
echo "Predict: $OUT/predict/ (labels/, labels_ct/, dicom_seg/, overlays/, predict_run.json)"
echo "Bundle:  $OUT/bundle/   nnU-Net raw: $OUT/nnUNet_raw/Dataset501_PSMAdemo/ (with splits_final.json)"
echo "QC:      $OUT/prepared/qc/ (per-study PNGs, summary.md)"
echo "Trials:  $OUT/runs/dataset_size/trials/*/ (pretrain/encoder.pt, finetune/metrics.json, predictions/)"
echo "MLflow:  the links printed above (start the UI with the \`mlflow ui\` command; 'trial runs' lists the trials,"
echo "         best Dice first: Columns -> dice_mean, Group by -> setting pools the seeds)"
