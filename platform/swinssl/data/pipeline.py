"""Ray Data pipeline: prepared shards -> random crops -> per-worker batches.

Design (REFERENCE.md §5): the dataset's rows are shard paths; a task reads one study, decodes it once and cuts
`crops_per_study` crops right away, so rows that leave the read tasks are crops (a few MB), never volumes. Shuffle
is at the file level every epoch (block order) plus a local shuffle buffer on the consumer; no `random_shuffle()`
(an all-to-all of volumes through the object store). Memory is bounded by the in-flight tasks, not the cohort.
"""

from __future__ import annotations

import hashlib
import math
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
        """batch["path"]: shard files; each is read (two columns only), decoded once and cut k times."""
        import pyarrow.parquet as pq

        crops = []
        for path in batch["path"]:
            row = pq.read_table(str(path), columns=list(CROP_COLUMNS)).to_pylist()[0]
            volume = np.frombuffer(row["image"], np.float16).reshape((2, *(int(v) for v in row["shape"])))
            crops.append(sample_crops(volume, self.roi, self.k, self._rng(row["study_id"]), self.min_foreground))
        return {"image": np.concatenate(crops)}


def crop_dataset(shards: list[str], roi: tuple[int, int, int], crops_per_study: int, seed: int = 0,
                 min_foreground: float = 0.05, read_cpus: float = 1.0, min_crops_per_epoch: int = 0):
    """A Ray Dataset of crops: one column `image`, float16 (C, *roi) (the trainer casts on its device).

    The dataset is a list of shard paths (one block each, block order randomised every epoch); a read task opens
    one shard, so a pass can list a small cohort several times (`min_crops_per_epoch`) without re-planning.
    """
    import ray.data

    repeats = max(1, math.ceil(min_crops_per_epoch / max(len(shards) * crops_per_study, 1)))
    files = [{"path": str(path)} for path in list(shards) * repeats]
    dataset = ray.data.from_items(files, override_num_blocks=len(files)).randomize_block_order()
    return dataset.map_batches(
        _stateless(roi, crops_per_study, seed, min_foreground), batch_size=1, batch_format="numpy",
        num_cpus=read_cpus, zero_copy_batch=True)


def _stateless(roi, k, seed, min_foreground):
    """A plain function (tasks, not actors: no idle actor pool) holding a per-process sampler."""
    sampler = CropSampler(roi, k, seed, min_foreground)

    def crop(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return sampler(batch)

    return crop
