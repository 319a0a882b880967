"""The reproducible crop stream (`trainer.deterministic`): the same crops in the same order on every run with the
same seed, in place of the Ray Data stream.

Ray Data schedules read tasks dynamically, so which process cuts which study, and in which order crops reach a
worker, varies between runs; crop positions are drawn from a clock-seeded generator for the same reason. Here each
Train worker reads its own studies in its own process instead:

* epoch e lists every shard `epoch_repeats` times, permuted by a generator seeded with (seed, e); rank r of w takes
  listings r, r + w, ... of the permutation, truncated to the same count on every rank (DDP needs equal steps);
* listing i of epoch e cuts its crops with a generator seeded by (seed, study, e * listings + i): new crops every
  epoch, the same ones on a rerun or a resumed epoch;
* crops pass through a local shuffle buffer (`data.shuffle_buffer`) seeded with (seed, e, r), batches are cut as
  `iter_torch_batches(drop_last=True)` would.

The cost is the loader's parallelism: reads happen in the training process, one study at a time (fine on CPU and for
checks; on a GPU node the Ray Data stream is the fast path).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .pipeline import CropSampler, SegCropSampler, epoch_repeats


@dataclass
class ReproducibleStream:
    """What a Train worker needs to make its own crops (travels in `train_loop_config`)."""

    shards: list[str]
    sampler: CropSampler | SegCropSampler
    """A batch of `path` and `draw` rows -> crops; its `seed` seeds the listing order and the shuffle too."""
    crops_per_study: int
    min_crops_per_epoch: int

    @property
    def seed(self) -> int:
        return self.sampler.seed

    def listings(self, epoch: int, rank: int, world: int) -> list[tuple[str, int]]:
        """(shard, draw) pairs rank `rank` reads in `epoch`, in order."""
        files = list(self.shards) * epoch_repeats(len(self.shards), self.crops_per_study, self.min_crops_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(files))
        per_rank = len(files) // world
        if per_rank == 0:
            raise ValueError(f"{len(files)} study listings cannot feed {world} workers: raise data."
                             f"min_crops_per_epoch or use fewer workers")
        mine = order[rank::world][:per_rank]
        return [(files[i], epoch * len(files) + int(i)) for i in mine]

    def batches(self, epoch: int, rank: int, world: int, batch_size: int, shuffle_buffer: int
                ) -> Iterator[dict[str, torch.Tensor]]:
        """The worker's batches of `epoch` (torch tensors of the crop dtypes, as iter_torch_batches gives)."""
        rng = np.random.default_rng([self.seed, epoch, rank])
        buffer: list[dict[str, np.ndarray]] = []
        for path, draw in self.listings(epoch, rank, world):
            crops = self.sampler({"path": np.array([path]), "draw": np.array([draw])})
            buffer += [{key: value[i] for key, value in crops.items()} for i in range(len(crops["image"]))]
            while len(buffer) >= max(shuffle_buffer, batch_size):
                yield _batch(buffer, rng, batch_size)
        while len(buffer) >= batch_size:
            yield _batch(buffer, rng, batch_size)


def _batch(buffer: list[dict[str, np.ndarray]], rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
    """Take `size` random rows out of `buffer` (in place) and stack them."""
    picked = sorted(rng.choice(len(buffer), size=size, replace=False).tolist(), reverse=True)
    rows = [buffer.pop(i) for i in picked]
    return {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]}
