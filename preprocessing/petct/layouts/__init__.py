"""Layout readers: how `prepare --input DIR` and `swinssl scan DIR` find studies without a hand-written CSV.

Each layout is a small reader with a documented contract (its class docstring: which files, what the label values
mean, where patient_id comes from), `detect(root)` and `discover(root) -> Discovery`. `discover(root)` tries the
tiers of `REGISTRY` in order and uses the one layout of the first tier that detects:

1. `csv`: an explicit cohort CSV (the input itself, or `cohort.csv` in the folder) always wins;
2. `nnunet-raw`, `autopet`, `study-folders`: folder structures; two of them matching the same folder is an error;
3. `dicom`: a DICOM tree, the fallback (a study folder's `ct/` DICOM series would otherwise also match).

A new layout is one module with one class, added to its tier here.
"""

from __future__ import annotations

from pathlib import Path

from .autopet import AutoPet
from .base import Discovery, Layout, safe_id, unique_ids
from .cohort_csv import CohortCsv, cohort_csv_text, sources_from_csv
from .dicom_tree import DicomTree
from .nnunet import NnUNetRaw
from .study_folders import StudyFolders

REGISTRY: tuple[tuple[Layout, ...], ...] = (
    (CohortCsv(),),
    (NnUNetRaw(), AutoPet(), StudyFolders()),
    (DicomTree(),),
)
"""Tiers of layouts, tried in order; see the module docstring."""

__all__ = ["REGISTRY", "Discovery", "Layout", "cohort_csv_text", "discover", "layouts", "safe_id",
           "sources_from_csv", "unique_ids"]


def layouts() -> list[Layout]:
    """Every registered layout, in the order they are tried."""
    return [layout for tier in REGISTRY for layout in tier]


def discover(root: Path | str) -> Discovery:
    """The studies under `root` (a folder or a cohort CSV) as the one matching layout finds them.

    Nothing matching: an empty Discovery whose `looked` names every layout tried and what it expects. Two layouts
    of one tier matching: ValueError naming them (rename or remove one, or give a cohort CSV).
    """
    root = Path(root).resolve()
    if not root.exists():
        raise FileNotFoundError(f"input not found: {root}")
    for tier in REGISTRY:
        matching = [layout for layout in tier if layout.detect(root)]
        if len(matching) > 1:
            raise ValueError(f"{root} matches several layouts: " + "; ".join(
                f"{m.name} ({m.expects})" for m in matching) + ": keep one, or give a cohort CSV (`swinssl scan`)")
        if matching:
            return matching[0].discover(root)
    tried = "; ".join(f"{layout.name}: {layout.expects}" for layout in layouts())
    return Discovery("", looked=f"layouts tried: {tried}")
