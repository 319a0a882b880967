"""Pretext losses: pure tensor functions, one per file (rotation, contrastive, inpainting)."""
