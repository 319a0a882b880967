"""Same seed, same numbers on CPU (`trainer.deterministic`): the reproducible crop stream (each worker reads its own
seeded crops) against its contract, and two real Ray Train pretrainings (2 DDP workers) and two fine-tunings with
the same seed that end bit-identical (without the flag, two such pretrainings differ by up to ~0.002 per weight)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swinssl.config import FinetuneConfig, PretrainConfig, load_config
from swinssl.data.pipeline import crop_dataset, seg_crop_dataset
from swinssl.data.reproducible import ReproducibleStream
from swinssl.data.studies import select_studies
from swinssl.tasks.pretrain import PretrainTask

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _stream(root: Path, seed: int = 0, **kw) -> ReproducibleStream:
    shards = [s.shard for s in select_studies(root, "all")]
    return crop_dataset(shards, (32, 32, 32), 2, seed, min_crops_per_epoch=12, reproducible=True, **kw)


def test_listings_split_every_epoch_evenly_and_differently(tiny_prepared):
    stream = _stream(tiny_prepared)
    assert isinstance(stream, ReproducibleStream)
    for epoch in (0, 1):
        ranks = [stream.listings(epoch, rank, 2) for rank in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 4  # 4 studies x 2 listings (>= 12 crops at 2 each), 2 ranks
        draws = [d for r in ranks for _, d in r]
        assert len(set(draws)) == len(draws)  # every listing once
        assert ranks == [stream.listings(epoch, rank, 2) for rank in (0, 1)]
    assert stream.listings(0, 0, 2) != stream.listings(1, 0, 2)
    with pytest.raises(ValueError, match="cannot feed 20 workers"):
        stream.listings(0, 0, 20)


def _epoch(stream: ReproducibleStream, epoch: int, rank: int = 0) -> list[dict]:
    return list(stream.batches(epoch, rank, 2, batch_size=2, shuffle_buffer=4))


def test_same_seed_same_batches_new_epoch_new_crops(tiny_prepared):
    first, again = _epoch(_stream(tiny_prepared), 0), _epoch(_stream(tiny_prepared), 0)
    assert len(first) == 4 and first[0]["image"].dtype == torch.float16  # 4 listings x 2 crops, batches of 2
    assert first[0]["image"].shape == (2, 2, 32, 32, 32)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0]["image"], _epoch(_stream(tiny_prepared), 1)[0]["image"])
    assert not torch.equal(first[0]["image"], _epoch(_stream(tiny_prepared, seed=1), 0)[0]["image"])


def test_segmentation_crops_keep_image_and_label_paired(tiny_prepared):
    shards = [s.shard for s in select_studies(tiny_prepared, "labeled")]
    make = lambda: seg_crop_dataset(shards, (32, 32, 32), 2, 0, num_classes=12, reproducible=True)  # noqa: E731
    one, two = list(make().batches(0, 0, 1, 2, 0)), list(make().batches(0, 0, 1, 2, 0))
    assert one[0]["label"].dtype == torch.uint8 and one[0]["label"].shape == (2, 1, 32, 32, 32)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def _pretrain(root: Path, out: Path, seed: int):
    from swinssl.train.launch import pretrain

    cfg = load_config(EXPERIMENTS / "pretrain_tiny.yaml", [
        f"data.root={root}", f"output_dir={out}", "trainer.steps=3", "trainer.checkpoint_every=3",
        "trainer.deterministic=true", f"trainer.seed={seed}", f"tracking.tracking_uri=sqlite:///{out}.db"],
        PretrainConfig)
    return pretrain(cfg)


@pytest.mark.e2e
def test_two_runs_with_the_same_seed_are_bit_identical(prepared, tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    from swinssl.train.finetune import finetune

    runs = [_pretrain(prepared[0], tmp_path / name, seed=0) for name in ("a", "b")]
    encoders = [torch.load(r.encoder, weights_only=True)["state_dict"] for r in runs]
    assert encoders[0].keys() == encoders[1].keys()
    assert all(torch.equal(encoders[0][k], encoders[1][k]) for k in encoders[0])
    torch.manual_seed(0)  # the workers' initialisation: training moved the weights (the equality is not vacuous)
    init = PretrainTask(load_config(runs[0].output_dir / "config.yaml", [], PretrainConfig)).build_model()
    init = {f"swinViT.{k}": v for k, v in init.swinViT.state_dict().items()}
    moved = [k for k in encoders[0] if k in init and not torch.equal(encoders[0][k], init[k])]
    assert len(moved) > len(init) // 2, moved
    losses = [[m.value for m in MlflowClient(r.tracking_uri).get_metric_history(r.run_id, "loss")] for r in runs]
    assert len(losses[0]) == 3 and losses[0] == losses[1]

    dice = []
    for name in ("ft_a", "ft_b"):
        cfg = load_config(EXPERIMENTS / "finetune_tiny.yaml", [
            f"data.root={prepared[0]}", f"output_dir={tmp_path / name}", f"encoder={runs[0].encoder}",
            "cv.fold=0", "trainer.steps=2", "trainer.checkpoint_every=2", "trainer.num_workers=1",
            "trainer.deterministic=true", "eval.overlays=0", f"tracking.tracking_uri=sqlite:///{tmp_path / name}.db"],
            FinetuneConfig)
        finetune(cfg)
        dice.append(json.loads((tmp_path / name / "metrics.json").read_text())["folds"]["0"]["metrics"])
    assert dice[0] == dice[1]
