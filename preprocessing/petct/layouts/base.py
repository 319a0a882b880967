"""What every layout reader shares: the `Discovery` it returns, the `Layout` protocol, study-id helpers."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..study import StudySource

NIFTI_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
"""File endings of single-file volumes a NIfTI-like layout accepts (read by SimpleITK)."""


@dataclass
class Discovery:
    """What a layout found under a root: sources in curation order, and everything it ignored with the reason.

    `pairing` describes, per study id, what was chosen (series or files, patient), for `swinssl scan` to print.
    `looked` says what was searched, for the "no studies found" message.
    """

    layout: str
    sources: list[StudySource] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every file, folder or series that is not part of a study."""
    pairing: dict[str, str] = field(default_factory=dict)
    looked: str = ""


class Layout(Protocol):
    """A reader of one on-disk layout. `detect` is cheap (a few stats); `discover` builds the sources."""

    name: str
    expects: str
    """One line: what the layout looks for (shown when nothing is found)."""

    def detect(self, root: Path) -> bool: ...

    def discover(self, root: Path) -> Discovery: ...


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(text: str, fallback: str = "study") -> str:
    """`text` as a study id: runs of characters outside [A-Za-z0-9._-] become '_', and it starts alphanumeric."""
    cleaned = _UNSAFE.sub("_", text.strip()).strip("._-")
    return cleaned or fallback


def unique_ids(wanted: Iterable[str]) -> list[str]:
    """Each wanted id, with `_2`, `_3`, ... appended to later repeats so that all are distinct."""
    seen: set[str] = set()
    out = []
    for base in wanted:
        candidate, n = base, 1
        while candidate in seen:
            n += 1
            candidate = f"{base}_{n}"
        seen.add(candidate)
        out.append(candidate)
    return out


def volume_file(folder: Path, stem: str) -> list[Path]:
    """Entries of `folder` named `stem` + a volume ending, or a folder `stem` (any letter case), sorted."""
    stem = stem.lower()
    found = []
    for entry in sorted(folder.iterdir()):
        name = entry.name.lower()
        if entry.is_dir() and name == stem:
            found.append(entry)
        elif entry.is_file() and any(name == stem + ending for ending in NIFTI_ENDINGS):
            found.append(entry)
    return found


def visible_dirs(root: Path) -> list[Path]:
    """Sub-folders of `root` that are not hidden, sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
