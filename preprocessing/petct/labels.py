"""Label sets as data: the classes of a segmentation cohort (names, values, which one is "the lesion").

A `LabelSet` maps label values 0..K-1 (contiguous, 0 = background) to class names. `swinssl prepare --labels FILE`
reads one from YAML/JSON, checks every label volume against it, and writes it as `labels.json` next to the manifest
(and into `prepare_config.json`'s digest); every downstream stage reads it from there or from a run's config.

File format (YAML or JSON), either the plain mapping or the full form:

    {0: background, 1: lesion}

    classes: {0: background, 1: liver, 2: lesion}
    lesion: lesion        # optional: the class whose connected components are lesions (lesion metrics and
                          # "has lesion" fold stratification). Default: the class named "lesion", if any.

The default is the 12-class PSMA PET/CT label set (`PSMA`): the organs of PSMA-ligand uptake plus lesions, in the
order of the PSMA organ-segmentation work that this platform was first built for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS_FILE = "labels.json"
"""Name of the label-set file `prepare` writes next to `manifest.jsonl`."""


class LabelSetError(ValueError):
    """A label map that cannot define a class set (names the file or key and the problem)."""


@dataclass(frozen=True)
class LabelSet:
    """Class names by label value (index = value, 0 = background) and the optional lesion class."""

    names: tuple[str, ...]
    """Class name of each label value: `names[v]` is the class of value v; `names[0]` is the background."""
    lesion: int | None = None
    """Label value of the lesion class, or None when the set has none (lesion metrics are then not computed)."""

    def __post_init__(self) -> None:
        problems = []
        if len(self.names) < 2:
            problems.append(f"need background and at least one class, got {list(self.names)}")
        if any(not isinstance(n, str) or not n.strip() for n in self.names):
            problems.append(f"class names must be non-empty strings, got {list(self.names)}")
        duplicated = sorted({n for n in self.names if self.names.count(n) > 1})
        if duplicated:
            problems.append(f"duplicated class names {duplicated}")
        if self.lesion is not None and not 1 <= self.lesion < len(self.names):
            problems.append(f"lesion class {self.lesion} is not a foreground value 1..{len(self.names) - 1}")
        if problems:
            raise LabelSetError("; ".join(problems))

    @property
    def num_classes(self) -> int:
        """K, including background: the segmentation model's `out_channels`."""
        return len(self.names)

    @property
    def foreground(self) -> range:
        """Label values 1..K-1 (the scored classes)."""
        return range(1, len(self.names))

    @property
    def lesion_name(self) -> str | None:
        return None if self.lesion is None else self.names[self.lesion]

    def name(self, value: int) -> str:
        return self.names[int(value)]

    def value(self, name: str) -> int:
        if name not in self.names:
            raise LabelSetError(f"no class named {name!r}; classes: {list(self.names)}")
        return self.names.index(name)

    def describe(self) -> str:
        """`{0: background, 1: lesion}`: the label set as error messages show it."""
        return "{" + ", ".join(f"{v}: {n}" for v, n in enumerate(self.names)) + "}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form (string keys, as `labels.json` holds it); `from_dict` reads it back."""
        return {"classes": {str(v): n for v, n in enumerate(self.names)}, "lesion": self.lesion_name}

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "label map") -> LabelSet:
        """The plain mapping `{0: background, 1: lesion}` or `{classes: {...}, lesion: NAME}`."""
        if not isinstance(data, Mapping):
            raise LabelSetError(f"{source}: expected a mapping of label value -> class name, got {type(data).__name__}")
        full = "classes" in data
        classes = data["classes"] if full else data
        extra = sorted(set(data) - {"classes", "lesion"}) if full else []
        if extra:
            raise LabelSetError(f"{source}: unknown keys {extra}; valid: classes, lesion")
        if not isinstance(classes, Mapping) or not classes:
            raise LabelSetError(f"{source}: 'classes' must be a non-empty mapping of label value -> class name")
        values = _class_names(classes, source)
        if sorted(values) != list(range(len(values))):
            raise LabelSetError(f"{source}: label values must be 0..{len(values) - 1} without gaps (0 = background),"
                                f" got {sorted(values)}")
        names = tuple(values[v] for v in range(len(values)))
        lesion_name = data.get("lesion") if full else None
        if lesion_name is None:
            lesion = names.index("lesion") if "lesion" in names[1:] else None
        elif lesion_name not in names[1:]:
            raise LabelSetError(f"{source}: lesion {lesion_name!r} is not one of the classes {list(names[1:])}")
        else:
            lesion = names.index(lesion_name)
        try:
            return cls(names, lesion)
        except LabelSetError as exc:
            raise LabelSetError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> LabelSet:
        """Read a YAML or JSON label map file."""
        path = Path(path)
        if not path.is_file():
            raise LabelSetError(f"label map file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: say which file
            raise LabelSetError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                                f"{str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, str(path))


def _class_names(classes: Mapping, source: str) -> dict[int, str]:
    """{value: name} from a YAML/JSON mapping (keys may be strings: JSON has no integer keys); every bad entry named."""
    values, problems = {}, []
    for key, name in classes.items():
        text = str(key).strip()
        if isinstance(key, bool) or not (isinstance(key, int) or text.lstrip("-").isdigit()):
            problems.append(f"label value {key!r} is not an integer")
        elif not isinstance(name, str) or not name.strip():
            problems.append(f"label value {key}: class name must be a non-empty string, got {name!r}")
        elif int(text) in values:
            problems.append(f"label value {int(text)} is given twice")
        else:
            values[int(text)] = name.strip()
    if problems:
        raise LabelSetError(f"{source}: " + "; ".join(problems))
    return values


PSMA = LabelSet(
    names=(
        "background",
        "lacrimal_glands",
        "parotid_glands",
        "submandibular_glands",
        "tubarial_glands",
        "sublingual_gland",
        "kidneys",
        "spleen",
        "liver",
        "small_intestine",
        "bladder",
        "lesion",
    ),
    lesion=11,
)
"""The default: 12 classes of PSMA PET/CT (11 organs of physiological PSMA-ligand uptake + lesions)."""

# The synthetic phantom paints these classes (the PSMA set's); nothing else may read them: every other stage takes
# its classes from a prepared folder's labels.json or a run's config.
CLASSES: tuple[str, ...] = PSMA.names
LESION: int = PSMA.lesion  # type: ignore[assignment]
NUM_CLASSES: int = PSMA.num_classes


def write_label_set(labels: LabelSet, root: str | Path) -> Path:
    """`labels.json` in a prepared folder (atomic)."""
    from .shards import atomic_write_json

    path = Path(root) / LABELS_FILE
    atomic_write_json(path, labels.to_dict())
    return path


def read_label_set(root: str | Path) -> LabelSet:
    """The label set of a prepared folder. Folders prepared before label sets existed hold the PSMA classes."""
    path = Path(root) / LABELS_FILE
    if not path.exists():
        return PSMA
    return LabelSet.from_dict(json.loads(path.read_text()), str(path))
