"""Deterministic, patient-grouped, lesion-stratified k-fold split of the labelled studies for cross-validation.

Algorithm of `kfold_split` (a pure function of its arguments; same inputs -> same folds on any
machine, NumPy's PCG64 streams being stable):

1. Studies are grouped by patient (`groups`; each study is its own patient when None). A patient has a lesion when
   any of its studies does. Patients are sorted by id, so the caller's order does not matter.
2. One generator `np.random.default_rng(seed)`; the lesion stratum (patients in sorted order) is
   permuted with `rng.permutation`, then the lesion-free stratum with the next draw.
3. Deal the permuted patients, lesion stratum first, each to the fold holding the fewest studies so far; ties go
   to the first such fold in cyclic order from (patients dealt so far) mod k. With one study per patient this is
   plain round-robin 0, 1, ..., k-1, 0, ...: every fold's size differs by at most 1, and so does its number of
   lesion studies (45 studies, 30 with lesions, 5 folds -> 9 studies and exactly 6 lesion studies per fold).
   A patient's studies always land in one fold, so no patient is in both training and validation (autoPET has
   several acquisitions per patient).
4. Each fold is returned sorted.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

__all__ = ["kfold_split", "fold_train_val"]


def kfold_split(study_ids: list[str], has_lesion: list[bool], folds: int = 5, seed: int = 0,
                groups: list[str] | None = None) -> list[list[str]]:
    """Split studies into `folds` disjoint, covering folds, grouped by patient and stratified on lesion presence.

    Args:
        study_ids: unique study identifiers (N,).
        has_lesion: (N,) whether each study's truth contains the lesion class, aligned with ids.
        folds: number of folds k, 2 <= k <= number of patients.
        seed: seed of `np.random.default_rng`; another seed gives (in general) other folds.
        groups: (N,) patient id of each study; None = every study is its own patient.

    Returns:
        k lists of ids, each sorted; with one study per patient, fold sizes differ by at most 1.

    Raises:
        ValueError: folds < 2, fewer patients than folds, mismatched lengths or duplicated ids.
    """
    ids = [str(s) for s in study_ids]
    flags = [bool(f) for f in has_lesion]
    patients = ids if groups is None else [str(g) for g in groups]
    if not len(ids) == len(flags) == len(patients):
        raise ValueError(f"study_ids has {len(ids)} entries, has_lesion {len(flags)}, groups {len(patients)}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    duplicated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicated:
        raise ValueError(f"{len(duplicated)} duplicated study id(s) among {len(ids)}: {duplicated[:10]}")
    members: dict[str, list[str]] = {}
    lesion: dict[str, bool] = {}
    for study, flag, patient in zip(ids, flags, patients):
        members.setdefault(patient, []).append(study)
        lesion[patient] = lesion.get(patient, False) or flag
    if len(members) < folds:
        unit = "studies" if groups is None else "patients"
        raise ValueError(f"cannot split {len(members)} {unit} into {folds} folds: need at least {folds} {unit}")
    rng = np.random.default_rng(seed)
    out: list[list[str]] = [[] for _ in range(folds)]
    dealt = 0
    for stratum_flag in (True, False):
        stratum = sorted(p for p in members if lesion[p] is stratum_flag)
        for index in rng.permutation(len(stratum)):
            start = dealt % folds
            target = min(range(folds), key=lambda j: (len(out[j]), (j - start) % folds))
            out[target].extend(members[stratum[int(index)]])
            dealt += 1
    return [sorted(fold) for fold in out]


def fold_train_val(folds: list[list[str]], k: int) -> tuple[list[str], list[str]]:
    """Training and validation ids of cross-validation round `k`.

    Args:
        folds: the output of `kfold_split`.
        k: index of the validation fold, 0 <= k < len(folds).

    Returns:
        (train_ids, val_ids): the union of the other folds and fold k, each sorted (fresh lists).

    Raises:
        ValueError: k out of range.
    """
    if not 0 <= k < len(folds):
        raise ValueError(f"fold index {k} out of range for {len(folds)} folds")
    val = sorted(folds[k])
    train = sorted(s for j, fold in enumerate(folds) if j != k for s in fold)
    return train, val
