"""Studies: Ray Tune sweeps over pretraining settings, each trial pretrained then fine-tuned; reports."""
