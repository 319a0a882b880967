"""Evaluation of the 12-class fine-tuning: per-class and lesion-wise metrics, cross-validation folds.

Pure NumPy/SciPy functions on integer label volumes (z, y, x); no torch, Ray or MLflow here.
`metrics` holds Dice, aggregation and autoPET-style lesion detection; `folds` the deterministic
lesion-stratified k-fold split of the labelled studies.
"""
