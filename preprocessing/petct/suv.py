"""Standardised uptake value (body weight) from DICOM PET tags (DICOM PS3.3 PET Image and Isotope modules).

SUV = activity[Bq/mL] * weight[kg] * 1000 / (dose[Bq] * 2^(-dt/half_life)), dt = scan start - injection.
Every input comes from a tag; a missing one raises `SuvTagError` (the caller names the study): never a guess.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from pydicom.dataset import Dataset


class SuvTagError(ValueError):
    """A PET series cannot be converted to SUV; `missing` tells a missing tag from an unusable one."""

    def __init__(self, message: str, missing: bool):
        super().__init__(message)
        self.missing = missing


def _require(ds: Dataset, keyword: str, where: str = "PET header"):
    value = getattr(ds, keyword, None)
    if value is None or value == "":
        raise SuvTagError(f"missing DICOM tag {keyword} in {where}", missing=True)
    return value


def parse_dicom_time(value: str) -> dt.time:
    """DICOM TM ('HHMMSS.FFFFFF', 'HHMM', 'HH', optional colons) -> time."""
    text = str(value).strip().replace(":", "")
    whole, _, frac = text.partition(".")
    parts = [int(whole[i : i + 2]) for i in range(0, min(len(whole), 6), 2)]
    hh, mm, ss = (parts + [0, 0, 0])[:3]
    micro = int((frac + "000000")[:6]) if frac else 0
    return dt.time(hh, mm, ss, micro)


def parse_dicom_datetime(value: str) -> dt.datetime:
    """DICOM DT ('YYYYMMDDHHMMSS.FFFFFF&ZZXX'); the UTC offset is dropped: all times of a study share a zone."""
    text = re.split(r"[+-]", str(value).strip()[8:])[0]
    text = str(value).strip()[:8] + text
    date = dt.datetime.strptime(text[:8], "%Y%m%d")
    return dt.datetime.combine(date.date(), parse_dicom_time(text[8:]) if len(text) > 8 else dt.time())


def _combine(date: str, time: str) -> dt.datetime:
    return dt.datetime.combine(dt.datetime.strptime(str(date).strip(), "%Y%m%d").date(), parse_dicom_time(time))


def scan_start(slices: Sequence[Dataset]) -> dt.datetime:
    """SeriesDate+SeriesTime, unless SeriesTime is later than the earliest AcquisitionTime (then that one)."""
    first = slices[0]
    series = _combine(_require(first, "SeriesDate"), _require(first, "SeriesTime"))
    acquisitions = [
        _combine(getattr(s, "AcquisitionDate", None) or first.SeriesDate, s.AcquisitionTime)
        for s in slices
        if getattr(s, "AcquisitionTime", None)
    ]
    if acquisitions and min(acquisitions) < series:
        return min(acquisitions)
    return series


def injection_time(radio: Dataset, series_date: str) -> dt.datetime:
    """RadiopharmaceuticalStartDateTime when present, else SeriesDate + RadiopharmaceuticalStartTime."""
    if getattr(radio, "RadiopharmaceuticalStartDateTime", None):
        return parse_dicom_datetime(radio.RadiopharmaceuticalStartDateTime)
    return _combine(series_date, _require(radio, "RadiopharmaceuticalStartTime", "RadiopharmaceuticalInformation"))


def suv_factor(slices: Sequence[Dataset]) -> float:
    """Multiply activity concentration (Bq/mL, after each slice's rescale) by this to get SUVbw."""
    first = slices[0]
    units = str(_require(first, "Units")).upper()
    if units == "GML":  # already SUVbw
        return 1.0
    if units != "BQML":
        raise SuvTagError(f"Units is {units!r}; SUV needs BQML (or GML)", missing=False)
    weight = float(_require(first, "PatientWeight"))
    if weight <= 0:
        raise SuvTagError(f"PatientWeight is {weight} kg", missing=False)
    sequence = _require(first, "RadiopharmaceuticalInformationSequence")
    if len(sequence) == 0:
        raise SuvTagError("missing DICOM tag RadiopharmaceuticalInformationSequence (empty)", missing=True)
    radio = sequence[0]
    where = "RadiopharmaceuticalInformation"
    dose = float(_require(radio, "RadionuclideTotalDose", where))
    half_life = float(_require(radio, "RadionuclideHalfLife", where))
    if dose <= 0 or half_life <= 0:
        raise SuvTagError(f"RadionuclideTotalDose={dose}, RadionuclideHalfLife={half_life}", missing=False)
    correction = str(_require(first, "DecayCorrection")).upper()
    if correction == "ADMIN":  # images already decay-corrected to injection: no decay factor
        return weight * 1000.0 / dose
    if correction != "START":
        raise SuvTagError(f"DecayCorrection is {correction!r}; supported: START, ADMIN", missing=False)
    elapsed = (scan_start(slices) - injection_time(radio, first.SeriesDate)).total_seconds()
    if elapsed < 0:
        raise SuvTagError(f"scan starts {-elapsed:.0f} s before injection", missing=False)
    return weight * 1000.0 / (dose * 2.0 ** (-elapsed / half_life))
