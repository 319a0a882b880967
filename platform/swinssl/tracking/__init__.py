"""Experiment tracking (MLflow) from rank 0."""
