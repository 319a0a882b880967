"""Downstream probe during pretraining: how useful is the encoder for segmentation *now*?

The pretext loss says little about downstream value, so every `probe.every` steps (and at the last step) rank 0
measures it directly, on a frozen copy of the encoder (the training model is not touched, nor any RNG the training
draws from):

1. Folds: data.root's labelled studies, split by `train.finetune.make_folds` with `probe.folds` / `probe.cv_seed`
   (the fine-tuning's split). The head trains on fold `probe.fold`'s training studies and is scored on its
   validation studies, so the probe never sees the studies it is scored on.
2. Head (`ProbeHead`): the encoder's five feature maps (SwinUNETR's `swinViT(x, normalize=True)`: 1/2 .. 1/32 of the
   input) are each projected to `probe.hidden` channels by a 1x1x1 conv, upsampled trilinearly to the input size and
   summed (a hypercolumn; projecting before upsampling is the same linear map, cheaper), then GELU and a 1x1x1 conv
   to the label set's classes. No decoder convolutions: what the probe can segment is what the features hold.
3. Training: `probe.crops_per_study` class-balanced crops of data.roi per training study (cut once per run with a
   seeded generator: every probe sees the same crops), `probe.steps` AdamW steps of DiceCE (the fine-tuning loss)
   on batches drawn by a seeded generator; a fresh head every probe, seeded by trainer.seed.
4. Score: sliding-window inference over each validation study (`eval.infer.predict_volume`), per-class Dice with
   `eval.metrics.dice_per_class` (MONAI `DiceMetric(include_background=False, ignore_empty=True)`), aggregated by
   `eval.metrics.aggregate`: per class the mean over the studies holding it, `dice_mean` the mean over classes.

Outputs under `<output_dir>/probe/`: `step_<step>.json` per probe (studies, per-study and per-class Dice, the head's
loss curve), `predictions/<study>.npz` (the latest probe's label volumes, key `label`), and with `export:
best_probe` `best.json` + `best_<step>/` (the weights of the best probe so far, a checkpoint `export_encoder` reads).
The best record is on disk, so a resumed run keeps comparing against it; a probe redone after a restart gives the
same value (deterministic on CPU) and does not replace it.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss
from torch import Tensor, nn
from torch.nn import functional as F

from petct.labels import LabelSet, LabelSetError, read_label_set
from petct.shards import atomic_write_json, read_shard

from ..config import CVConfig, FinetuneConfig, PretrainConfig
from ..data.seg_crops import sample_seg_crops
from ..data.studies import DataError, check_roi_fits, select_studies
from ..eval.folds import fold_train_val
from ..eval.infer import predict_volume
from ..eval.metrics import aggregate, dice_per_class
from .checkpoint import save_state

PROBE_DIR = "probe"
BEST_FILE = "best.json"
METRIC_PREFIX = "probe/"


class ProbeHead(nn.Module):
    """Multi-scale features -> per-voxel class logits at the input size (see the module docstring)."""

    def __init__(self, feature_size: int, num_classes: int, hidden: int = 32):
        super().__init__()
        widths = [feature_size * 2 ** i for i in range(5)]  # SwinUNETR's hidden states: F, 2F, 4F, 8F, 16F
        self.project = nn.ModuleList(nn.Conv3d(w, hidden, kernel_size=1) for w in widths)
        self.classify = nn.Conv3d(hidden, num_classes, kernel_size=1)

    def forward(self, features: list[Tensor], size: tuple[int, ...]) -> Tensor:
        mixed = sum(F.interpolate(project(f), size=size, mode="trilinear", align_corners=False)
                    for project, f in zip(self.project, features))
        return self.classify(F.gelu(mixed))


class ProbeNet(nn.Module):
    """Frozen encoder + probe head: (B, C, *roi) -> (B, classes, *roi), the model `predict_volume` expects."""

    def __init__(self, encoder: nn.Module, head: ProbeHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def features(self, x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return self.encoder(x.contiguous(), normalize=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x), tuple(x.shape[2:]))


def probe_folds(cfg: PretrainConfig, studies: list, labels: LabelSet) -> list[list[str]]:
    """The fine-tuning's folds of the labelled `studies` for the probe's folds and seed."""
    from .finetune import make_folds

    return make_folds(FinetuneConfig(cv=CVConfig(folds=cfg.probe.folds, seed=cfg.probe.cv_seed)), studies, labels)


def probe_problems(cfg: PretrainConfig) -> list[str]:
    """What data.root says about the probe config ("key: problem"); [] when the probe is off."""
    if cfg.probe.every <= 0 or not cfg.data.root:
        return []
    try:
        studies = select_studies(cfg.data.root, "labeled", "all")
        labels = read_label_set(cfg.data.root)
    except (DataError, LabelSetError) as exc:
        return [f"probe.every: the probe needs labelled studies in data.root ({exc})"]
    if len(studies) < cfg.probe.folds:
        return [f"probe.folds: {cfg.probe.folds} but data.root has only {len(studies)} prepared 'labeled' studies"]
    try:
        folds = probe_folds(cfg, studies, labels)
    except ValueError as exc:
        return [f"probe.folds: {exc}"]
    if cfg.probe.fold < len(folds) and not fold_train_val(folds, cfg.probe.fold)[0]:
        return [f"probe.fold: fold {cfg.probe.fold} leaves no training studies"]
    return []


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


class Prober:
    """Rank 0's probe: `due(step, final)` says when, `__call__(model, step)` runs one and returns its metrics."""

    def __init__(self, cfg: PretrainConfig, directory: str | Path, device: torch.device | str = "cpu",
                 root: str | Path | None = None):
        """`root`: the prepared data (default data.root), `directory`: where the probe writes (see module doc)."""
        self.cfg, self.dir, self.device = cfg, Path(directory), torch.device(device)
        root = root or cfg.data.root
        self.labels = read_label_set(root)
        studies = select_studies(root, "labeled", "all")
        train_ids, val_ids = fold_train_val(probe_folds(cfg, studies, self.labels), cfg.probe.fold)
        by_id = {s.study_id: s for s in studies}
        self.train = [by_id[i] for i in train_ids]
        self.val = [by_id[i] for i in val_ids]
        check_roi_fits(self.train, cfg.data.roi)
        self.crops: tuple[Tensor, Tensor] | None = None  # cut on the first probe, kept for the run

    def due(self, step: int, final: bool) -> bool:
        every = self.cfg.probe.every
        return every > 0 and (final or step % every == 0)

    def metric_names(self) -> list[str]:
        """Every key a probe reports (reports before the first probe carry them as NaN: Tune wants its metric in
        every result)."""
        return [f"{METRIC_PREFIX}dice_mean", *(f"{METRIC_PREFIX}dice/{self.labels.name(c)}"
                                               for c in self.labels.foreground)]

    def _training_crops(self) -> tuple[Tensor, Tensor]:
        if self.crops is None:
            images, labels = [], []
            for index, ref in enumerate(self.train):
                study = read_shard(Path(ref.shard))
                rng = np.random.default_rng([self.cfg.trainer.seed, self.cfg.probe.fold, index])
                image, label = sample_seg_crops(study.image, study.label, tuple(self.cfg.data.roi),
                                                self.cfg.probe.crops_per_study, rng,
                                                num_classes=self.labels.num_classes)
                images.append(torch.from_numpy(image.astype(np.float16)))  # half the memory; float per batch
                labels.append(torch.from_numpy(label))
            self.crops = torch.cat(images), torch.cat(labels)
        return self.crops

    def _features(self, net: ProbeNet, images: Tensor) -> list[Tensor]:
        """The frozen encoder's five feature maps of every training crop, computed once per probe (the encoder is
        most of the cost) and kept in half precision: (crops x ~0.15 x feature_size x prod(roi)) values."""
        parts = [net.features(images[i:i + self.cfg.probe.batch_size].to(self.device).float())
                 for i in range(0, len(images), self.cfg.probe.batch_size)]
        return [torch.cat([part[scale] for part in parts]).half() for scale in range(len(parts[0]))]

    def _train_head(self, net: ProbeNet) -> list[float]:
        """Fit `net.head` on the training crops; returns the loss of every step."""
        p = self.cfg.probe
        images, labels = self._training_crops()
        features = self._features(net, images)
        optimizer = torch.optim.AdamW(net.head.parameters(), lr=p.lr, weight_decay=0.0)
        dice, cross_entropy = DiceLoss(to_onehot_y=True, softmax=True), nn.CrossEntropyLoss()
        order = torch.Generator().manual_seed(self.cfg.trainer.seed * 1_000_003 + p.fold)
        losses = []
        net.head.train()
        for _ in range(p.steps):
            pick = torch.randint(len(images), (min(p.batch_size, len(images)),), generator=order)
            y = labels[pick].to(self.device).long()
            logits = net.head([f[pick.to(f.device)].float() for f in features], tuple(images.shape[2:]))
            loss = dice(logits, y) + cross_entropy(logits, y[:, 0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    def _score(self, net: ProbeNet) -> dict[str, dict[int, float]]:
        """Per-class Dice of every validation study; the latest predictions are written to predictions/."""
        out = self.dir / "predictions"
        out.mkdir(parents=True, exist_ok=True)
        per_study = {}
        for ref in self.val:
            study = read_shard(Path(ref.shard))
            prediction = predict_volume(net, torch.from_numpy(study.image), tuple(self.cfg.data.roi),
                                        num_classes=self.labels.num_classes, sw_batch_size=self.cfg.probe.sw_batch_size,
                                        device=self.device, amp=self.device.type == "cuda")
            np.savez_compressed(out / f"{study.study_id}.npz", label=prediction)
            per_study[study.study_id] = dice_per_class(prediction, study.label, self.labels.num_classes)
        return per_study

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        """Probe `model`'s encoder (`model.swinViT`, copied and frozen) at `step`; returns the `probe/*` metrics."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training's global RNG state is left as it was
            torch.manual_seed(self.cfg.trainer.seed)
            encoder = copy.deepcopy(model.swinViT).to(self.device).eval().requires_grad_(False)
            head = ProbeHead(self.cfg.model.feature_size, self.labels.num_classes, self.cfg.probe.hidden)
            net = ProbeNet(encoder, head.to(self.device))
            losses = self._train_head(net)
            per_study = self._score(net)
        summary = aggregate(list(per_study.values()))
        metrics = {f"{METRIC_PREFIX}dice_mean": summary["dice_mean"],
                   **{f"{METRIC_PREFIX}dice/{self.labels.name(c)}": v for c, v in summary["per_class"].items()
                      if not math.isnan(v)}}
        self._write(step, per_study, summary, losses)
        if self.cfg.export == "best_probe":
            record_best(self.dir, model, step, summary["dice_mean"])
        return metrics

    def _write(self, step: int, per_study: dict, summary: dict, losses: list[float]) -> None:
        name = self.labels.name
        atomic_write_json(self.dir / f"step_{step:08d}.json", {
            "step": step, "fold": self.cfg.probe.fold, "folds": self.cfg.probe.folds, "cv_seed": self.cfg.probe.cv_seed,
            "train_studies": [s.study_id for s in self.train], "val_studies": [s.study_id for s in self.val],
            "classes": [name(c) for c in self.labels.foreground], "num_classes": self.labels.num_classes,
            "dice_mean": _nan_to_none(summary["dice_mean"]),
            "per_class": {name(c): _nan_to_none(v) for c, v in summary["per_class"].items()},
            "per_study": {sid: {name(c): _nan_to_none(v) for c, v in d.items()} for sid, d in per_study.items()},
            "head_loss": losses})


def probe_records(directory: str | Path) -> list[dict]:
    """Every `step_*.json` of a probe folder, by step."""
    return sorted((json.loads(p.read_text()) for p in Path(directory).glob("step_*.json")), key=lambda r: r["step"])


def best_record(directory: str | Path) -> dict | None:
    """{"step", "dice_mean", "dir"} of the best probe so far (export=best_probe), None before any."""
    path = Path(directory) / BEST_FILE
    return json.loads(path.read_text()) if path.exists() else None


def record_best(directory: Path, model: nn.Module, step: int, dice_mean: float) -> bool:
    """Keep `model`'s weights when `dice_mean` beats the recorded best (strictly: ties keep the earlier step).

    Written as a new `best_<step>/` checkpoint, then `best.json` is replaced atomically to point at it, then older
    `best_*` folders are removed: a crash at any point leaves a complete best checkpoint behind."""
    best = best_record(directory)
    if math.isnan(dice_mean) or (best is not None and dice_mean <= best["dice_mean"]):
        return False
    name = f"best_{step:08d}"
    save_state(directory / name, {"model": model.state_dict(), "loop": {"step": step, "epoch": 0, "samples": 0}},
               {"step": step, "probe_dice_mean": dice_mean})
    atomic_write_json(directory / BEST_FILE, {"step": step, "dice_mean": dice_mean, "dir": name})
    for old in directory.glob("best_*"):
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return True


def best_checkpoint(output_dir: str | Path) -> Path:
    """The best probe's checkpoint folder of a run (export=best_probe); RuntimeError when no probe has run."""
    directory = Path(output_dir) / PROBE_DIR
    best = best_record(directory)
    if best is None:
        raise RuntimeError(f"export=best_probe but {directory} holds no probe result ({BEST_FILE}): no probe scored "
                           f"a Dice yet")
    return directory / best["dir"]
