"""Evaluation of segmentation fine-tuning for any label set: metric families, cross-validation folds, inference and
the figures.

- `metrics`: per-study metrics: Dice as MONAI `DiceMetric`, lesion metrics as the autoPET scorer (18-connected
  components via cc3d), HD95 via MONAI.
- `families`: the registry of metric families; `study_metrics` returns `{family: {key: value}}` (see there for the
  families, their fold aggregation and MLflow names); `summary`: fold and cross-validation summaries of them.
- `folds`: the deterministic, patient-grouped, lesion-stratified k-fold split of the labelled studies.
- `infer`: sliding-window inference and prediction files; `plots`: overlays and Dice bars; `evaluate`: one fold
  with a built model; `tables`: the Dice table of `swinssl finetune` / `swinssl report`.

`eval` depends on no training or tuning code (train/finetune.py loads checkpoints and calls it).
"""
