"""Training: the task-agnostic loop, checkpoints and resume, Ray Train launch."""
