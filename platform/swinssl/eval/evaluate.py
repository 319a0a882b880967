"""Evaluate one fold with a built model: sliding-window inference over each validation study, predictions on the PET
grid, the enabled metric families (see `families`) and a few overlays.

The model comes from the caller (train/finetune.py loads the fold's checkpoint inside a Ray task and calls
`evaluate_studies`), so evaluation depends on no training code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from petct.labels import LabelSet
from petct.shards import read_shard

from ..config import EvalConfig
from .families import study_metrics
from .infer import predict_volume, save_prediction
from .plots import overlay_png

__all__ = ["evaluate_studies", "study_metrics"]


def evaluate_studies(model: nn.Module, shards: Sequence[str], labels: LabelSet, roi: Sequence[int],
                     eval_cfg: EvalConfig, output_dir: str | Path, device: torch.device | str = "cpu",
                     amp: bool = False) -> list[dict]:
    """Predict every study, write `predictions/<id>.nii.gz` (+ `overlays/<id>.png` for the first `eval.overlays`).

    Returns:
        one row per study: {"study_id": id, "metrics": {family: {key: value}}} (families of `eval_cfg.metrics`).
    """
    out = Path(output_dir)
    model.eval()
    rows = []
    for index, path in enumerate(shards):
        study = read_shard(Path(path))
        if study.label is None:
            raise ValueError(f"shard {path} (study {study.study_id!r}) has no label: only labelled studies are scored")
        prediction = predict_volume(model, torch.from_numpy(study.image), tuple(roi), num_classes=labels.num_classes,
                                    sw_batch_size=eval_cfg.sw_batch_size, overlap=eval_cfg.overlap,
                                    mode=eval_cfg.mode, crop_to_body=eval_cfg.crop_to_body, device=device, amp=amp)
        save_prediction(study, prediction, out / "predictions" / f"{study.study_id}.nii.gz")
        if index < eval_cfg.overlays:
            overlay_png(study, prediction, out / "overlays" / f"{study.study_id}.png", labels, title=study.study_id)
        rows.append({"study_id": study.study_id,
                     "metrics": study_metrics(prediction, study.label, study.spacing, labels, eval_cfg.metrics)})
    return rows
