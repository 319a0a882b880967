"""Segmentation fine-tuning data: class-balanced paired crops, the Ray Data crop stream, flips and intensity jitter."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from petct.shards import PreparedStudy, write_shard
from swinssl.data.pipeline import SegCropSampler, epoch_repeats, seg_crop_dataset
from swinssl.data.seg_crops import class_centres, pad_to_roi, sample_seg_crops
from swinssl.tasks.seg_augment import random_flip, random_intensity

TINY, BIG, MEDIUM = 11, 8, 6


@pytest.fixture(scope="module")
def ray_data(ray_session):
    """The session's Ray instance (tests/conftest.py): started on first use, shut down by the session, not here."""
    return ray_session


def _phantom(shape: tuple[int, int, int] = (64, 64, 64)) -> np.ndarray:
    """(Z, Y, X) uint8: a big block (BIG), a medium block (MEDIUM) and a 2x2x2 blob (TINY), apart from each other."""
    label = np.zeros(shape, np.uint8)
    label[4:36, 4:36, 4:36] = BIG
    label[40:50, 4:14, 40:50] = MEDIUM
    label[50:52, 50:52, 50:52] = TINY
    return label


def _coded_image(label: np.ndarray) -> np.ndarray:
    """(2, Z, Y, X) int64: channel 0 = 1 + position code z*10^6 + y*10^3 + x, channel 1 = 10 * label."""
    z, y, x = np.indices(label.shape)
    return np.stack([1 + z * 10**6 + y * 10**3 + x, 10 * label.astype(np.int64)])


def _starts(images: np.ndarray) -> np.ndarray:
    """(n, 3) window starts decoded from the position code of each crop's first voxel."""
    code = images[:, 0, 0, 0, 0] - 1
    return np.stack([code // 10**6, code // 10**3 % 10**3, code % 10**3], axis=1)


# ------------------------------------------------------------------------------------------------- numpy crops


def test_class_centres_lists_each_present_class_subsampled():
    label = _phantom()
    centres = class_centres(label, max_per_class=100)
    assert sorted(centres) == [0, MEDIUM, BIG, TINY]
    assert len(centres[TINY]) == 8 and len(centres[BIG]) == 100 and len(centres[0]) <= 100
    for cls, index in centres.items():
        assert index.shape[1] == 3 and index.dtype == np.int64
        assert (label[tuple(index.T)] == cls).all()
    assert 0 not in class_centres(label, include_background=False)
    with pytest.raises(ValueError, match="class 12"):
        class_centres(np.full((2, 2, 2), 12, np.uint8), num_classes=12)  # the label set's count bounds the values


@pytest.mark.parametrize("balanced", [True, False])
def test_crops_lie_inside_and_image_label_windows_match(balanced):
    label = _phantom((40, 48, 56))
    image = _coded_image(label)
    roi = (16, 12, 20)
    images, labels = sample_seg_crops(image, label, roi, 64, np.random.default_rng(0), class_balanced=balanced)
    assert images.shape == (64, 2, *roi) and images.dtype == image.dtype
    assert labels.shape == (64, 1, *roi) and labels.dtype == np.uint8
    starts = _starts(images)
    assert (starts >= 0).all() and (starts + roi <= label.shape).all()
    for crop, crop_label, (z, y, x) in zip(images, labels, starts):
        window = (slice(z, z + roi[0]), slice(y, y + roi[1]), slice(x, x + roi[2]))
        assert np.array_equal(crop, image[(slice(None), *window)])
        assert np.array_equal(crop_label[0], label[window]) and np.array_equal(crop[1], 10 * crop_label[0])


def test_class_balanced_crops_show_a_tiny_class_as_often_as_a_big_one():
    label, roi, n, background = _phantom(), (16, 16, 16), 600, 0.1
    image = label[None].astype(np.float16)
    share = {}
    for balanced in (True, False):
        _, labels = sample_seg_crops(image, label, roi, n, np.random.default_rng(1), balanced, 12, background)
        share[balanced] = {cls: (labels == cls).any(axis=(1, 2, 3, 4)).mean() for cls in (TINY, MEDIUM, BIG)}
    expected = (1 - background) / 3  # three foreground classes present
    assert expected - 0.08 < share[True][TINY] < expected + 0.12
    assert share[True][BIG] < 0.75  # no longer dominated by the big organ
    assert share[False][TINY] < 0.08 and share[False][BIG] > share[False][TINY] * 5


def test_background_only_label_and_zero_crops():
    label = np.zeros((20, 20, 20), np.uint8)
    images, labels = sample_seg_crops(label[None], label, (8, 8, 8), 5, np.random.default_rng(0))
    assert images.shape == (5, 1, 8, 8, 8) and not labels.any()
    images, labels = sample_seg_crops(label[None], label, (8, 8, 8), 0, np.random.default_rng(0))
    assert images.shape == (0, 1, 8, 8, 8) and labels.shape == (0, 1, 8, 8, 8)


def test_volume_smaller_than_roi_is_zero_padded_evenly():
    label = np.zeros((8, 20, 5), np.uint8)
    label[2:4, 5:7, 1:3] = TINY
    image = _coded_image(label)
    images, labels = sample_seg_crops(image, label, (16, 16, 16), 12, np.random.default_rng(0))
    assert images.shape == (12, 2, 16, 16, 16) and labels.shape == (12, 1, 16, 16, 16)
    inner = (slice(4, 12), slice(None), slice(5, 10))  # z pad (4, 4), y none, x pad (5, 6)
    for crop, crop_label in zip(images, labels):
        assert (crop[0][inner] > 0).all()
        outside = crop[0].copy()
        outside[inner] = 0
        assert not outside.any() and np.array_equal(crop[1], 10 * crop_label[0])
    padded_image, padded_label = pad_to_roi(image, label, (16, 16, 16))
    assert padded_image.shape == (2, 16, 20, 16) and padded_label.sum() == label.sum()
    assert pad_to_roi(image, label, (4, 4, 4))[0] is image


@pytest.mark.parametrize("image_shape, label_shape, roi", [
    ((2, 8, 8, 8), (8, 8, 9), (4, 4, 4)),
    ((8, 8, 8), (8, 8, 8), (4, 4, 4)),
    ((2, 8, 8, 8), (8, 8, 8), (4, 4)),
])
def test_shape_mismatch_raises(image_shape, label_shape, roi):
    with pytest.raises(ValueError):
        sample_seg_crops(np.zeros(image_shape), np.zeros(label_shape, np.uint8), roi, 2, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------- augmentations


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(b: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(b, 2, 4, 5, 6, generator=_gen(123))
    return image, (image[:, :1] > 0.5).to(torch.uint8)


def test_flip_prob_0_is_identity_and_prob_1_is_torch_flip():
    image, label = _batch()
    same = random_flip(image, label, _gen(0), prob=0.0)
    assert torch.equal(same[0], image) and torch.equal(same[1], label)
    full = random_flip(image, label, _gen(0), prob=1.0)
    assert torch.equal(full[0], torch.flip(image, (2, 3, 4))) and torch.equal(full[1], torch.flip(label, (2, 3, 4)))
    only_h = random_flip(image, label, _gen(0), prob=1.0, axes=(-2,))
    assert torch.equal(only_h[0], torch.flip(image, (3,)))


def test_flip_keeps_image_and_label_consistent_and_is_per_sample():
    image, label = _batch()
    flipped, flipped_label = random_flip(image, label, _gen(1))
    assert torch.equal(flipped_label, (flipped[:, :1] > 0.5).to(torch.uint8))
    combos = []
    for b in range(image.shape[0]):
        matches = [dims for r in range(4) for dims in itertools.combinations((1, 2, 3), r)
                   if torch.equal(torch.flip(image[b], dims), flipped[b])]
        assert len(matches) == 1
        assert torch.equal(torch.flip(label[b], matches[0]), flipped_label[b])
        combos.append(matches[0])
    assert len(set(combos)) > 2  # independent draws per sample and axis


def test_flip_is_reproducible_with_the_same_seed():
    image, label = _batch()
    first, second = random_flip(image, label, _gen(7)), random_flip(image, label, _gen(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    other = [random_flip(image, label, _gen(seed))[0] for seed in range(8, 12)]
    assert any(not torch.equal(first[0], o) for o in other)


def test_flip_rejects_bad_axes_and_shapes():
    image, label = _batch(2)
    with pytest.raises(ValueError, match="spatial"):
        random_flip(image, label, _gen(0), axes=(1,))
    with pytest.raises(ValueError, match="label"):
        random_flip(image, label[:, :, :3], _gen(0))


def test_intensity_within_scale_and_shift_bounds_per_sample_and_channel():
    scale, shift = 0.2, 0.05
    zeros, ones = torch.zeros(8, 2, 3, 3, 3), torch.ones(8, 2, 3, 3, 3)
    offset = random_intensity(zeros, _gen(3), scale, shift)  # same seed: same draws
    factor = random_intensity(ones, _gen(3), scale, shift) - offset
    assert offset.abs().max() <= shift and (factor - 1).abs().max() <= scale + 1e-6
    flat = factor.flatten(2)
    assert torch.equal(flat, flat[..., :1].expand_as(flat))  # constant per (sample, channel)
    assert flat[:, :, 0].unique().numel() == 16  # distinct per (sample, channel)
    assert torch.equal(random_intensity(ones, _gen(3), 0.0, 0.0), ones)
    assert random_intensity(ones.half(), _gen(3)).dtype == torch.float16
    assert torch.equal(random_intensity(ones, _gen(4)), random_intensity(ones, _gen(4)))


# ------------------------------------------------------------------------------------------------- Ray Data


def _write(folder: Path, study_id: str, shape: tuple[int, int, int], labelled: bool, seed: int) -> str:
    """One shard: channel 0 random, channel 1 = label / 16 (exact in float16), so crops can be checked for pairing."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 12, shape).astype(np.uint8)
    image = np.stack([rng.random(shape), label / 16]).astype(np.float32)
    study = PreparedStudy(study_id, "labeled" if labelled else "unlabeled", seed, image,
                          label if labelled else None, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = folder / f"{study_id}.parquet"
    write_shard(path, study, folder / ".tmp")
    return str(path)


def test_seg_crop_dataset_yields_paired_crops(ray_data, tmp_path):
    shards = [_write(tmp_path, "s0", (12, 10, 9), True, 0), _write(tmp_path, "s1", (10, 12, 6), True, 1)]
    roi, k = (8, 8, 8), 3
    assert epoch_repeats(2, k, 10) == 2
    rows = seg_crop_dataset(shards, roi, k, seed=0, min_crops_per_epoch=10).take_all()
    assert len(rows) == 2 * k * 2
    for row in rows:
        assert row["image"].shape == (2, *roi) and row["image"].dtype == np.float16
        assert row["label"].shape == (1, *roi) and row["label"].dtype == np.uint8
        assert np.array_equal(row["image"][1].astype(np.float32) * 16, row["label"][0])


def test_seg_crop_dataset_rejects_unlabelled_shard(ray_data, tmp_path):
    shard = _write(tmp_path, "unlabelled_study", (10, 10, 10), False, 2)
    with pytest.raises(ValueError, match="unlabelled_study.*no label"):  # the UDF itself, no Ray
        SegCropSampler((8, 8, 8), 2, 0)({"path": np.array([shard])})
    with pytest.raises(Exception, match="unlabelled_study.*no label"):  # Ray wraps it in RayTaskError(UserCode...)
        seg_crop_dataset([shard], (8, 8, 8), 2).take_all()


def test_seg_sampler_rejects_labels_outside_the_label_set(tmp_path):
    shard = _write(tmp_path, "twelve_classes", (10, 10, 10), True, 3)  # values 0..11
    images, labels = SegCropSampler((8, 8, 8), 2, 0, num_classes=12)({"path": np.array([shard])}).values()
    assert images.shape == (2, 2, 8, 8, 8) and labels.max() < 12
    with pytest.raises(ValueError, match="twelve_classes.*expected classes 0..1"):  # a 2-class label set
        SegCropSampler((8, 8, 8), 2, 0, num_classes=2)({"path": np.array([shard])})


def test_fast_float16_body_mask_matches_float_compare():
    from swinssl.data.crops import BODY_THRESHOLD, body_mask

    values = np.random.default_rng(0).uniform(-0.5, 1.5, (20, 30, 40)).astype(np.float16)
    values[0, 0, :3] = [np.nan, -0.0, np.float16(BODY_THRESHOLD)]
    np.testing.assert_array_equal(body_mask(values), values > BODY_THRESHOLD)
    np.testing.assert_array_equal(body_mask(values.astype(np.float32)), values.astype(np.float32) > BODY_THRESHOLD)
