"""Ray Data pipeline: prepared shards -> random crops -> per-worker batches.

Design: the dataset's rows are shard paths; a task reads one study, decodes it once and cuts
`crops_per_study` crops right away, so rows that leave the read tasks are crops (a few MB), never volumes. Shuffle
is at the file level every epoch (block order) plus a local shuffle buffer on the consumer; no `random_shuffle()`
(an all-to-all of volumes through the object store). Memory is bounded by the in-flight tasks, not the cohort.

Two streams share that design: `crop_dataset` (image crops for pretraining) and `seg_crop_dataset` (paired
image/label crops, class-balanced, for segmentation fine-tuning on labelled studies).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable

import numpy as np

from petct.shards import read_shard_row

from .crops import sample_crops
from .seg_crops import sample_seg_crops

__all__ = ["read_shard_row", "crop_dataset", "seg_crop_dataset", "CropSampler", "SegCropSampler"]

CROP_COLUMNS = ("study_id", "shape", "image")
SEG_COLUMNS = ("study_id", "shape", "image", "label")


def decode_image(row: dict) -> np.ndarray:
    """A shard row's `image` bytes -> read-only float16 view (2, Z, Y, X), no copy."""
    return np.frombuffer(row["image"], np.float16).reshape((2, *(int(v) for v in row["shape"])))


def decode_label(row: dict, path: str) -> np.ndarray:
    """A shard row's `label` bytes -> read-only uint8 view (Z, Y, X); ValueError naming the shard when null."""
    if row["label"] is None:
        raise ValueError(f"shard {path} (study {row['study_id']!r}) has no label: segmentation crops need labelled "
                         f"studies (cohort 'labeled'), not unlabelled ones")
    return np.frombuffer(row["label"], np.uint8).reshape(tuple(int(v) for v in row["shape"]))


def study_rng(seed: int, study_id: str, draw: int | None = None) -> np.random.Generator:
    """A fresh generator per read: seed, study, process and clock (new crops every epoch, never reproducible); with
    `draw` (the reproducible stream's listing number) seed, study and draw only."""
    digest = int.from_bytes(hashlib.blake2b(study_id.encode(), digest_size=8).digest(), "little")
    if draw is not None:
        return np.random.default_rng([seed, digest, int(draw)])
    return np.random.default_rng([seed, digest, os.getpid(), time.monotonic_ns()])


def _draws(batch: dict[str, np.ndarray]) -> list[int | None]:
    """Per row: its `draw` (reproducible stream, see data.reproducible) or None (the Ray Data stream)."""
    return [int(d) for d in batch["draw"]] if "draw" in batch else [None] * len(batch["path"])


def epoch_repeats(num_shards: int, crops_per_study: int, min_crops_per_epoch: int) -> int:
    """How many times a pass lists every shard so that it yields >= min_crops_per_epoch crops (at least once)."""
    return max(1, math.ceil(min_crops_per_epoch / max(num_shards * crops_per_study, 1)))


class CropSampler:
    """Ray Data UDF: a batch of shard rows -> `k` crops per row, float16 (C, *roi).

    Crop positions are drawn fresh every time a study is read (new crops every epoch). In the Ray Data stream they
    are not bit-for-bit reproducible: Ray schedules reads dynamically, so which process cuts which study varies
    between runs (model initialisation and the pretext augmentations, on the trainer, are seeded). A `draw` column
    (the reproducible stream of `trainer.deterministic`, data.reproducible) seeds each read instead.
    """

    def __init__(self, roi: tuple[int, int, int], crops_per_study: int, seed: int, min_foreground: float):
        self.roi, self.k, self.seed, self.min_foreground = tuple(roi), crops_per_study, seed, min_foreground

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch["path"]: shard files; each is read (needed columns only), decoded once and cut k times."""
        crops = []
        for path, draw in zip(batch["path"], _draws(batch)):
            row = read_shard_row(path, CROP_COLUMNS)
            crops.append(sample_crops(decode_image(row), self.roi, self.k, study_rng(self.seed, row["study_id"], draw),
                                      self.min_foreground))
        return {"image": np.concatenate(crops)}


class SegCropSampler:
    """Ray Data UDF: a batch of labelled shard rows -> `k` paired crops per row.

    Output columns: `image` float16 (k, C, *roi), `label` uint8 (k, 1, *roi), the same windows. Positions are drawn
    fresh on every read (class-balanced by default, see `sample_seg_crops`); same reproducibility as CropSampler.
    `num_classes` is the label set's (a label value >= it fails the read, naming the shard); None: not checked.
    """

    def __init__(self, roi: tuple[int, int, int], crops_per_study: int, seed: int, class_balanced: bool = True,
                 background_prob: float = 0.1, num_classes: int | None = None):
        self.roi, self.k, self.seed = tuple(roi), crops_per_study, seed
        self.class_balanced, self.background_prob, self.num_classes = class_balanced, background_prob, num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch["path"]: shard files; each is read once, its image and label decoded once and cut k times."""
        images, labels = [], []
        for path, draw in zip(batch["path"], _draws(batch)):
            row = read_shard_row(path, SEG_COLUMNS)
            label = decode_label(row, str(path))
            try:
                image, label = sample_seg_crops(decode_image(row), label, self.roi, self.k,
                                                study_rng(self.seed, row["study_id"], draw), self.class_balanced,
                                                num_classes=self.num_classes, background_prob=self.background_prob)
            except ValueError as exc:
                raise ValueError(f"shard {path} (study {row['study_id']!r}): {exc}") from None
            images.append(image)
            labels.append(label)
        return {"image": np.concatenate(images), "label": np.concatenate(labels)}


def crop_dataset(shards: list[str], roi: tuple[int, int, int], crops_per_study: int, seed: int = 0,
                 min_foreground: float = 0.05, read_cpus: float = 1.0, min_crops_per_epoch: int = 0,
                 reproducible: bool = False):
    """A Ray Dataset of crops: one column `image`, float16 (C, *roi) (the trainer casts on its device).

    The dataset is a list of shard paths (one block each, block order randomised every epoch); a read task opens
    one shard, so a pass can list a small cohort several times (`min_crops_per_epoch`) without re-planning.
    `reproducible`: a `data.reproducible.ReproducibleStream` of the same crops instead (each worker reads its own).
    """
    sampler = CropSampler(roi, crops_per_study, seed, min_foreground)
    return _crop_stream(shards, crops_per_study, min_crops_per_epoch, sampler, read_cpus, reproducible)


def seg_crop_dataset(shards: list[str], roi: tuple[int, int, int], crops_per_study: int, seed: int = 0,
                     class_balanced: bool = True, read_cpus: float = 1.0, min_crops_per_epoch: int = 0,
                     background_prob: float = 0.1, num_classes: int | None = None, reproducible: bool = False):
    """A Ray Dataset of segmentation crops: `image` float16 (C, *roi) and `label` uint8 (1, *roi), same windows.

    Same design as `crop_dataset` (shard paths as rows, block order randomised every epoch, one read + decode per
    shard, fresh crops each read); a pass yields len(shards) * crops_per_study * epoch_repeats(...) rows. Every
    shard must carry a label: an unlabelled one fails the pass with a ValueError naming the shard and study (raised
    in the read task; the consumer sees Ray's RayTaskError(UserCodeException) carrying that message), and so does a
    label value outside the label set (`num_classes`, the set's number of classes).
    """
    sampler = SegCropSampler(roi, crops_per_study, seed, class_balanced, background_prob, num_classes)
    return _crop_stream(shards, crops_per_study, min_crops_per_epoch, sampler, read_cpus, reproducible)


def _crop_stream(shards: list[str], crops_per_study: int, min_crops_per_epoch: int,
                 sampler: CropSampler | SegCropSampler, read_cpus: float, reproducible: bool = False):
    """Shard paths (each listed epoch_repeats times, one block each, random block order) -> map_batches(sampler);
    with `reproducible` the worker-side stream of data.reproducible instead."""
    if reproducible:
        from .reproducible import ReproducibleStream

        return ReproducibleStream([str(s) for s in shards], sampler, crops_per_study, min_crops_per_epoch)
    import ray.data

    repeats = epoch_repeats(len(shards), crops_per_study, min_crops_per_epoch)
    files = [{"path": str(path)} for path in list(shards) * repeats]
    dataset = ray.data.from_items(files, override_num_blocks=len(files)).randomize_block_order()
    crops = dataset.map_batches(_as_task(sampler), batch_size=1, batch_format="numpy", num_cpus=read_cpus,
                                zero_copy_batch=True)
    # One map operator: Ray Data's per-operator resource reservation (half the budget) otherwise lets ~1 crop task
    # run at a time on small nodes (measured: +45-85 % crops/s without it on 2 CPUs). This dataset only.
    crops.context.op_resource_reservation_enabled = False
    return crops


def _as_task(sampler: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]):
    """A plain function (tasks, not actors: no idle actor pool) holding a per-process sampler."""

    def crop(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return sampler(batch)

    return crop
