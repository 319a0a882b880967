#!/usr/bin/env bash
# The synthetic end-to-end study behind `make demo`. Usage: scripts/demo.sh OUT_DIR
set -euo pipefail
OUT=${1:-demo_out}
mkdir -p "$OUT"

echo "== 1/2 synth: a small synthetic PSMA PET/CT cohort (NIfTI) =="
swinssl synth --out "$OUT/cohort" --unlabeled 6 --labeled 4 --seed 0 --scale small

echo "== 2/2 prepare: register CT to PET, resample, normalise, shard (2 Ray workers) =="
swinssl prepare --input "$OUT/cohort/cohort.csv" --out "$OUT/prepared" --workers 2

echo
echo "QC: per-study PNGs in $OUT/prepared/qc/, summary in $OUT/prepared/qc/summary.md"
