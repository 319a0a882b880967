"""swinssl: self-supervised SwinUNETR pretraining on PET/CT."""
__version__ = "0.1.0"
