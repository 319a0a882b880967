"""swinssl.eval.folds: deterministic, disjoint, covering, balanced and lesion-stratified folds."""

from __future__ import annotations

import pytest

from swinssl.eval.folds import fold_train_val, kfold_split


def _cohort() -> tuple[list[str], list[bool]]:
    """45 studies, 30 of them lesion-bearing, interleaved (every third study is lesion-free)."""
    ids = [f"study_{i:03d}" for i in range(45)]
    flags = [i % 3 != 0 for i in range(45)]
    assert sum(flags) == 30
    return ids, flags


def test_deterministic_and_seed_dependent() -> None:
    ids, flags = _cohort()
    a = kfold_split(ids, flags, folds=5, seed=0)
    assert a == kfold_split(ids, flags, folds=5, seed=0)
    assert a != kfold_split(ids, flags, folds=5, seed=1)


def test_input_order_does_not_matter() -> None:
    ids, flags = _cohort()
    rev = kfold_split(ids[::-1], flags[::-1], folds=5, seed=3)
    assert rev == kfold_split(ids, flags, folds=5, seed=3)


def test_disjoint_covering_balanced_sorted() -> None:
    ids, flags = _cohort()
    folds = kfold_split(ids, flags, folds=5, seed=0)
    assert len(folds) == 5
    flat = [s for fold in folds for s in fold]
    assert len(flat) == len(set(flat)) == 45  # disjoint
    assert set(flat) == set(ids)  # covering
    assert all(fold == sorted(fold) for fold in folds)
    assert [len(f) for f in folds] == [9] * 5


def test_lesion_studies_spread_exactly() -> None:
    ids, flags = _cohort()
    lesion = {i for i, f in zip(ids, flags) if f}
    for seed in range(5):
        folds = kfold_split(ids, flags, folds=5, seed=seed)
        assert [len(lesion.intersection(f)) for f in folds] == [6] * 5


def test_uneven_sizes_differ_by_at_most_one() -> None:
    ids = [f"s{i}" for i in range(23)]
    flags = [i < 7 for i in range(23)]  # 7 lesion, 16 without
    folds = kfold_split(ids, flags, folds=4, seed=2)
    sizes = [len(f) for f in folds]
    assert sum(sizes) == 23 and max(sizes) - min(sizes) <= 1
    counts = [sum(s in set(ids[:7]) for s in f) for f in folds]
    assert sorted(counts) == [1, 2, 2, 2]  # 7 lesion studies over 4 folds


def test_fold_train_val() -> None:
    ids, flags = _cohort()
    folds = kfold_split(ids, flags, folds=5, seed=0)
    for k in range(5):
        train, val = fold_train_val(folds, k)
        assert val == folds[k]
        assert len(train) == 36 and not set(train) & set(val)
        assert sorted(train + val) == sorted(ids)
        assert train == sorted(train)
    with pytest.raises(ValueError, match="out of range"):
        fold_train_val(folds, 5)
    with pytest.raises(ValueError, match="out of range"):
        fold_train_val(folds, -1)


def test_errors() -> None:
    with pytest.raises(ValueError, match="4 studies into 5 folds"):
        kfold_split(["a", "b", "c", "d"], [True, False, True, False], folds=5)
    with pytest.raises(ValueError, match="duplicated"):
        kfold_split(["a", "b", "a", "c", "d"], [True] * 5, folds=2)
    with pytest.raises(ValueError, match=">= 2"):
        kfold_split(["a", "b"], [True, False], folds=1)
    with pytest.raises(ValueError, match="has_lesion"):
        kfold_split(["a", "b", "c"], [True, False], folds=2)


# ------------------------------------------------------------------------ has-lesion flags from the label set


def _refs(tmp_path, voxels: list[dict | None]):
    """StudyRefs: with `label_voxels` from the manifest, or (None) with a real shard whose label holds class 2."""
    import numpy as np

    from petct.shards import PreparedStudy, write_shard
    from swinssl.data.studies import StudyRef

    refs = []
    for i, counts in enumerate(voxels):
        shard = tmp_path / f"s{i}.parquet"
        if counts is None:
            label = np.zeros((4, 4, 4), np.uint8)
            label[1, 1, 1] = 2
            study = PreparedStudy(f"s{i}", "labeled", i, np.zeros((2, 4, 4, 4), np.float32), label, (1.0,) * 3,
                                  (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))
            write_shard(shard, study, tmp_path / ".tmp")
        refs.append(StudyRef(f"s{i}", "labeled", i, str(shard), (4, 4, 4), True, counts))
    return refs


def test_make_folds_stratifies_on_the_label_sets_lesion_class(tmp_path) -> None:
    from petct.labels import LabelSet
    from swinssl.config import FinetuneConfig
    from swinssl.train.finetune import _has_lesion, make_folds

    two = LabelSet(("background", "organ", "tumour"), lesion=2)
    refs = _refs(tmp_path, [{"organ": 5, "tumour": 3}, {"organ": 9}, {"tumour": 1}, {"organ": 1}, None])
    assert [_has_lesion(r, two) for r in refs] == [True, False, True, False, True]  # the last from its shard
    cfg = FinetuneConfig()
    cfg.cv.folds, cfg.cv.seed = 2, 4
    ids = [r.study_id for r in refs]
    assert make_folds(cfg, refs, two) == kfold_split(ids, [True, False, True, False, True], 2, 4)
    # no lesion class: nothing to stratify on, a plain seeded k-fold (every study in one stratum)
    none = LabelSet(("background", "organ", "tumour"))
    assert not any(_has_lesion(r, none) for r in refs)
    assert make_folds(cfg, refs, none) == kfold_split(ids, [False] * 5, 2, 4)


def _grouped_cohort() -> tuple[list[str], list[bool], list[str]]:
    """30 studies of 17 patients: like autoPET, some patients have 2-3 acquisitions, lesions on some of them."""
    sizes = [1, 2, 3, 1, 2, 1, 1, 3, 2, 1, 2, 1, 3, 1, 2, 3, 1]
    ids, flags, groups = [], [], []
    for p, n in enumerate(sizes):
        for a in range(n):
            ids.append(f"PETCT_{p:02d}_acq{a}")
            flags.append((p + a) % 3 != 0)
            groups.append(f"PETCT_{p:02d}")
    return ids, flags, groups


@pytest.mark.parametrize("seed", range(6))
def test_patient_grouped_folds_never_split_a_patient(seed: int) -> None:
    ids, flags, groups = _grouped_cohort()
    folds = kfold_split(ids, flags, folds=5, seed=seed, groups=groups)
    patient = dict(zip(ids, groups))
    assert sorted(s for f in folds for s in f) == sorted(ids)  # disjoint and covering
    for k in range(5):
        train, val = fold_train_val(folds, k)
        assert not {patient[s] for s in train} & {patient[s] for s in val}
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 3  # balanced by study count up to one patient's studies
    assert all(any(flags[ids.index(s)] for s in f) for f in folds)  # lesion patients spread to every fold


def test_one_study_per_patient_groups_equal_ungrouped() -> None:
    ids, flags = _cohort()
    assert kfold_split(ids, flags, 5, 4, groups=[f"p-{i}" for i in ids]) == kfold_split(ids, flags, 5, 4)


def test_too_few_patients_is_named() -> None:
    ids = [f"s{i}" for i in range(6)]
    with pytest.raises(ValueError, match="cannot split 2 patients into 3 folds"):
        kfold_split(ids, [True] * 6, folds=3, groups=["a", "a", "a", "b", "b", "b"])


def test_finetune_folds_group_by_the_manifest_patient_id(tmp_path) -> None:
    """The fine-tune driver reads `patient_id` from the manifest and never splits a patient across folds."""
    import json

    from petct.labels import PSMA
    from swinssl.config import FinetuneConfig
    from swinssl.data.studies import select_studies
    from swinssl.train.finetune import make_folds

    ids, flags, groups = _grouped_cohort()
    (tmp_path / "shards").mkdir()
    rows = []
    for order, (sid, flag, patient) in enumerate(zip(ids, flags, groups)):
        (tmp_path / "shards" / f"{sid}.parquet").write_bytes(b"")
        rows.append({"order": order, "study_id": sid, "patient_id": patient, "cohort": "labeled", "status": "ok",
                     "shard": f"shards/{sid}.parquet", "shape": [8, 8, 8], "labeled": True,
                     "label_voxels": {"background": 10, PSMA.lesion_name: int(flag)}})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    studies = select_studies(tmp_path, "labeled")
    assert [s.patient_id for s in studies] == groups
    folds = make_folds(FinetuneConfig(), studies, PSMA)
    patient = dict(zip(ids, groups))
    seen = [{patient[s] for s in f} for f in folds]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
