"""Deterministic, lesion-stratified k-fold split of the labelled studies for cross-validation.

Algorithm of `kfold_split` (a pure function of its arguments; same inputs -> same folds on any
machine, NumPy's PCG64 streams being stable):

1. Sort the (id, has_lesion) pairs by id, so the caller's order does not matter.
2. One generator `np.random.default_rng(seed)`; the lesion stratum (ids in sorted order) is
   permuted with `rng.permutation`, then the lesion-free stratum with the next draw.
3. Deal the permuted lesion ids round-robin into folds 0, 1, ..., k-1, 0, ...; the lesion-free ids
   continue the round-robin from where the lesion ids stopped. Hence every fold's size differs
   by at most 1, and so does its number of lesion studies (45 studies, 30 with lesions, 5 folds
   -> 9 studies and exactly 6 lesion studies per fold).
4. Each fold is returned sorted.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

__all__ = ["kfold_split", "fold_train_val"]


def kfold_split(study_ids: list[str], has_lesion: list[bool], folds: int = 5, seed: int = 0) -> list[list[str]]:
    """Split studies into `folds` disjoint, covering folds, stratified on lesion presence.

    Args:
        study_ids: unique study identifiers (N,).
        has_lesion: (N,) whether each study's truth contains the lesion class, aligned with ids.
        folds: number of folds k, 2 <= k <= N.
        seed: seed of `np.random.default_rng`; another seed gives (in general) other folds.

    Returns:
        k lists of ids, each sorted; fold sizes differ by at most 1.

    Raises:
        ValueError: folds < 2, fewer studies than folds, mismatched lengths or duplicated ids.
    """
    ids = [str(s) for s in study_ids]
    flags = [bool(f) for f in has_lesion]
    if len(ids) != len(flags):
        raise ValueError(f"study_ids has {len(ids)} entries but has_lesion has {len(flags)}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if len(ids) < folds:
        raise ValueError(f"cannot split {len(ids)} studies into {folds} folds: need at least {folds} studies")
    duplicated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicated:
        raise ValueError(f"{len(duplicated)} duplicated study id(s) among {len(ids)}: {duplicated[:10]}")

    pairs = sorted(zip(ids, flags))
    rng = np.random.default_rng(seed)
    out: list[list[str]] = [[] for _ in range(folds)]
    position = 0
    for stratum_flag in (True, False):
        stratum = [i for i, f in pairs if f is stratum_flag]
        for index in rng.permutation(len(stratum)):
            out[position % folds].append(stratum[int(index)])
            position += 1
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
