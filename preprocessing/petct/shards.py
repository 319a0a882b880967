"""Prepared-study Parquet shards: the I/O contract between `prepare` and every later stage.

One shard file per study, `OUT/shards/<study_id>.parquet`, holding one row:

| column      | type               | meaning                                                                  |
|-------------|--------------------|--------------------------------------------------------------------------|
| study_id    | string             | id from the cohort                                                       |
| cohort      | string             | e.g. `labeled`, `unlabeled`                                              |
| order       | int32              | curation order (input row index): "the first 450 unlabelled" uses it     |
| shape       | list<int32>        | (Z, Y, X), numpy order, = PET grid size reversed                         |
| spacing     | list<float64>      | (x, y, z) mm, ITK order, = PET spacing                                   |
| origin      | list<float64>      | (x, y, z) mm, = PET origin                                               |
| direction   | list<float64>      | 9 direction cosines, row-major, = PET direction                          |
| image       | binary             | float16 little-endian, C order, (2, Z, Y, X): channel 0 CT, 1 PET, [0,1] |
| label       | binary (nullable)  | uint8 (Z, Y, X), values of the cohort's `labels.json`; null: unlabelled  |

Readers: `ray.data.read_parquet(OUT/shards)` or `read_shard`. Writes are atomic (temp file in `OUT/.tmp`, then
rename), so a reader never sees a half-written shard.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import SimpleITK as sitk

IMAGE_DTYPE = np.dtype("<f2")
LABEL_DTYPE = np.dtype("u1")

SCHEMA = pa.schema([
    ("study_id", pa.string()),
    ("cohort", pa.string()),
    ("order", pa.int32()),
    ("shape", pa.list_(pa.int32())),
    ("spacing", pa.list_(pa.float64())),
    ("origin", pa.list_(pa.float64())),
    ("direction", pa.list_(pa.float64())),
    ("image", pa.binary()),
    ("label", pa.binary()),
])


@dataclass
class PreparedStudy:
    """A study as the model sees it: `image` (2, Z, Y, X) float32 in [0, 1], `label` (Z, Y, X) uint8 or None."""

    study_id: str
    cohort: str
    order: int
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """Wrap a (Z, Y, X) array in this study's PET-grid geometry."""
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def atomic_write_bytes(path: str | Path, data: bytes, tmp_dir: str | Path | None = None) -> None:
    """Write then rename: the target either has the old content or the whole new content, never a part.

    The temp file is hidden (`.NAME.<random>.tmp`) in `tmp_dir`, by default the target's own folder: the rename is
    only atomic within one filesystem, so a `tmp_dir` elsewhere must be on the target's filesystem. Both folders
    are created when missing; a failed write removes its temp file.
    """
    path = Path(path)
    tmp_dir = path.parent if tmp_dir is None else Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, tmp_dir: str | Path | None = None) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), tmp_dir)


def atomic_write_json(path: str | Path, data: object, tmp_dir: str | Path | None = None,
                      indent: int | None = 1) -> None:
    """`atomic_write_bytes` of `data` as JSON (one trailing newline). Serialisation errors leave the target as it
    was: the JSON is built before anything is written."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n", tmp_dir)


def write_shard(path: Path, study: PreparedStudy, tmp_dir: Path) -> int:
    """Write one study's shard atomically; returns its size in bytes."""
    if study.image.ndim != 4 or study.image.shape[0] != 2:
        raise ValueError(f"image must be (2, Z, Y, X), got {study.image.shape}")
    row = {
        "study_id": [study.study_id], "cohort": [study.cohort], "order": [study.order],
        "shape": [list(study.image.shape[1:])], "spacing": [list(study.spacing)],
        "origin": [list(study.origin)], "direction": [list(study.direction)],
        "image": [np.ascontiguousarray(study.image, IMAGE_DTYPE).tobytes()],
        "label": [None if study.label is None else np.ascontiguousarray(study.label, LABEL_DTYPE).tobytes()],
    }
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(row, schema=SCHEMA), sink, compression="zstd", compression_level=1)
    data = sink.getvalue().to_pybytes()
    atomic_write_bytes(path, data, tmp_dir)
    return len(data)


def decode_row(row: dict) -> PreparedStudy:
    """A shard row (as from pyarrow `to_pylist` or Ray Data) -> PreparedStudy with float32 image."""
    shape = tuple(int(v) for v in row["shape"])
    image = np.frombuffer(row["image"], IMAGE_DTYPE).reshape((2, *shape)).astype(np.float32)
    label = None if row.get("label") is None else np.frombuffer(row["label"], LABEL_DTYPE).reshape(shape)
    return PreparedStudy(
        study_id=row["study_id"], cohort=row["cohort"], order=int(row["order"]), image=image, label=label,
        spacing=tuple(row["spacing"]), origin=tuple(row["origin"]), direction=tuple(row["direction"]),
    )


def read_shard(path: Path) -> PreparedStudy:
    """Read a one-study shard written by `write_shard`."""
    return decode_row(read_shard_row(path, tuple(SCHEMA.names)))


def read_shard_row(path: str | Path, columns: tuple[str, ...]) -> dict:
    """The one row of a one-study shard, only `columns` (pyarrow reads nothing else): the one shard reader.

    Binary columns come back as zero-copy Arrow buffers (`to_pylist` would copy the whole volume into Python bytes:
    ~40 % of a read; `np.frombuffer` reads them as they are), null ones as None, the rest as Python values.
    """
    table = pq.read_table(str(path), columns=list(columns))
    if table.num_rows != 1:
        raise ValueError(f"{path}: expected one study per shard, found {table.num_rows}")
    row = {}
    for name in columns:
        scalar = table.column(name)[0]
        binary = pa.types.is_binary(scalar.type) and scalar.is_valid
        row[name] = scalar.as_buffer() if binary else scalar.as_py()
    return row
