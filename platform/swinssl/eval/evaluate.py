"""Evaluate one fold: sliding-window inference over each validation study, predictions on the PET grid, Dice per
class and lesion detection. Runs as a Ray task (with a GPU when training used one), so the driver stays light."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .metrics import dice_per_class, lesion_metrics, mean_dice

LESION = 11


def study_metrics(prediction: np.ndarray, label: np.ndarray, spacing_xyz: tuple[float, float, float]) -> dict:
    """Everything reported for one study; recomputable from predictions/<id>.nii.gz and the study's label."""
    per_class = dice_per_class(prediction, label)
    lesions = lesion_metrics(prediction == LESION, label == LESION, tuple(spacing_xyz[::-1]))
    return {"dice": {str(c): v for c, v in per_class.items()}, "dice_mean": mean_dice(per_class), "lesion": lesions}


def evaluate_fold(checkpoint_dir: str, shards: list[str], cfg_dict: dict[str, Any], output_dir: str,
                  overlays: int = 0) -> list[dict]:
    """Load the fold's final weights, predict every validation study, write predictions (+ a few overlays)."""
    import torch

    from petct.shards import read_shard

    from ..config import FinetuneConfig, from_dict
    from ..tasks.segment import SegmentationTask
    from ..train.checkpoint import load_state
    from .infer import overlay_png, predict_volume, save_prediction

    cfg = from_dict(cfg_dict, FinetuneConfig)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.use_gpu else "cpu")
    model = SegmentationTask(cfg, None).build_model()
    model.load_state_dict(load_state(checkpoint_dir)["model"])
    model.to(device).eval()
    out = Path(output_dir)
    rows = []
    for index, path in enumerate(shards):
        study = read_shard(Path(path))
        prediction = predict_volume(model, torch.from_numpy(study.image), tuple(cfg.data.roi),
                                    num_classes=cfg.model.out_channels, sw_batch_size=cfg.eval.sw_batch_size,
                                    overlap=cfg.eval.overlap, mode=cfg.eval.mode,
                                    crop_to_body=cfg.eval.crop_to_body, device=device, amp=cfg.trainer.amp != "none")
        save_prediction(study, prediction, out / "predictions" / f"{study.study_id}.nii.gz")
        if index < overlays:
            overlay_png(study, prediction, out / "overlays" / f"{study.study_id}.png", title=study.study_id)
        rows.append({"study_id": study.study_id, **study_metrics(prediction, study.label, study.spacing)})
    return rows
