"""Ray Data pipeline: prepared shards -> random crops -> per-worker batches.

Design (REFERENCE.md §5): read one study per row, decode it once and cut `crops_per_study` crops right away, so
rows that leave the read tasks are crops (a few MB), never volumes; shuffle at the file level every epoch
(`shuffle="files"`) plus a local shuffle buffer on the consumer; no `random_shuffle()` (an all-to-all of volumes
through the object store). Memory is then bounded by the in-flight read tasks, not by the cohort size.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from .crops import sample_crops

CROP_COLUMNS = ("study_id", "shape", "image")


class CropSampler:
    """Ray Data UDF: a batch of shard rows -> `k` crops per row, float16 (C, *roi).

    Crop positions are drawn fresh every time a study is read (new crops every epoch). They are not bit-for-bit
    reproducible: Ray schedules reads dynamically, so which process cuts which study varies between runs. Model
    initialisation and the pretext augmentations (on the trainer) are seeded.
    """

    def __init__(self, roi: tuple[int, int, int], crops_per_study: int, seed: int, min_foreground: float):
        self.roi, self.k, self.seed, self.min_foreground = tuple(roi), crops_per_study, seed, min_foreground

    def _rng(self, study_id: str) -> np.random.Generator:
        digest = int.from_bytes(hashlib.blake2b(study_id.encode(), digest_size=8).digest(), "little")
        return np.random.default_rng([self.seed, digest, os.getpid(), time.monotonic_ns()])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        crops, ids = [], []
        for study_id, shape, blob in zip(batch["study_id"], batch["shape"], batch["image"]):
            volume = np.frombuffer(blob, np.float16).reshape((2, *(int(v) for v in shape)))
            crops.append(sample_crops(volume, self.roi, self.k, self._rng(str(study_id)), self.min_foreground))
            ids += [str(study_id)] * self.k
        return {"image": np.concatenate(crops), "study_id": np.asarray(ids)}


def crop_dataset(shards: list[str], roi: tuple[int, int, int], crops_per_study: int, seed: int = 0,
                 min_foreground: float = 0.05, read_cpus: float = 1.0):
    """A Ray Dataset of crops: columns `image` (float16, (C, *roi)) and `study_id`."""
    import ray.data

    dataset = ray.data.read_parquet(list(shards), columns=list(CROP_COLUMNS), shuffle="files",
                                    override_num_blocks=len(shards))
    return dataset.map_batches(
        _stateless(roi, crops_per_study, seed, min_foreground), batch_size=1, batch_format="numpy",
        num_cpus=read_cpus, zero_copy_batch=True)


def _stateless(roi, k, seed, min_foreground):
    """A plain function (tasks, not actors: no idle actor pool) holding a per-process sampler."""
    sampler = CropSampler(roi, k, seed, min_foreground)

    def crop(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return sampler(batch)

    return crop
