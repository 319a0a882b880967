"""Reading DICOM attribute values the one way every module here needs them."""

from __future__ import annotations

from pydicom.dataset import Dataset


def cs_values(ds: Dataset, keyword: str) -> list[str]:
    """A CS attribute's values, stripped and upper case, empties dropped ([] when absent); one-valued attributes read
    as a str in pydicom, and a header read with `specific_tags` may leave the backslash-joined text."""
    value = ds.get(keyword)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip().upper() for item in items for part in str(item).split("\\") if part.strip()]
