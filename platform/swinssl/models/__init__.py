"""Networks: the 2-channel Swin encoder with pretext heads, and encoder checkpoint export for MONAI."""
