"""Training-state checkpoints: one `state.pt` (tensors and plain values only: `torch.load(weights_only=True)`)
plus `meta.json` (step, model shape, active pretext heads: `launch.model_signature`) that the driver reads to refuse a
checkpoint of another model before anything starts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE, META_FILE = "state.pt", "meta.json"


def save_state(directory: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    return directory


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)


def load_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def signature_differences(meta: dict[str, Any], wanted: dict[str, Any],
                          legacy: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, wanted)} where a checkpoint's recorded model signature differs from `wanted`; a key the
    checkpoint does not record (written before it was) takes its `legacy` value (absent there: None)."""
    saved = {k: legacy.get(k) if meta.get(k) is None else meta[k] for k in wanted}
    return {k: (saved[k], wanted[k]) for k in wanted if saved[k] != wanted[k]}


def latest_checkpoint_dir(run_dir: str | Path) -> Path | None:
    """Newest `checkpoint_*` folder under a Ray Train run folder (by the step recorded in its meta)."""
    candidates = [p for p in Path(run_dir).glob("checkpoint_*") if (p / STATE_FILE).exists()]
    return max(candidates, key=lambda p: load_meta(p).get("step", -1), default=None)
