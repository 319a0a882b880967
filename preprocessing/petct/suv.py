"""Standardised uptake value (body weight) from DICOM PET tags (DICOM PS3.3 C.8.9.1 PET Series, C.8.9.2 PET Isotope).

SUV = activity[Bq/mL] * weight[kg] * 1000 / (dose[Bq] * 2^(-dt/half_life)), dt = scan start - injection.
Every input comes from a tag; a missing one raises `SuvTagError` (the caller names the study): never a guess. Values
no patient can have (a dose in MBq where DICOM requires Bq, a weight in grams, an uptake time of days for a
short-lived tracer) are refused too (`kind` implausible_value), and so is a series that is not attenuation and decay
corrected (`kind` not_corrected): SUV of such images means nothing.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from pydicom.dataset import Dataset

from .dicom_values import cs_values
from .radionuclides import HALF_LIFE_TOLERANCE, NuclideError, identify

DOSE_MIN_BQ, DOSE_MAX_BQ = 1e6, 5e10
"""Injected activity range: 1 MBq (below a small-animal dose) to 50 GBq (far above any diagnostic injection, e.g.
FDG 100-500 MBq, PSMA 100-300 MBq). A dose written in MBq (150) or kBq (150000) falls below; GBq-scale numbers above."""
WEIGHT_MIN_KG, WEIGHT_MAX_KG = 0.5, 350.0
"""PatientWeight (0010,1030) is in kg: below 0.5 kg (a preterm baby weighs more) or above 350 kg is refused; a weight
in grams (80000) falls above."""
LONG_LIVED_S = 2 * 3600.0
"""Half-life above which a time-only injection is refused: uptake of Cu-64, Zr-89, I-124 ... spans days, so the
injection day cannot be inferred from the scan day. F-18 (1.83 h) and shorter are fine (see `injection_time`)."""
MAX_UPTAKE_HALF_LIVES, MAX_UPTAKE_S = 10.0, 14 * 86400.0
"""Uptake (injection to scan start) above 10 half-lives (activity down 1000-fold: F-18 18 h, Ga-68 11 h) or 14 days
is refused: it means a wrong date or time. Not 48 h: Zr-89 antibody PET is routinely imaged 4-7 days after injection."""
CORRECTIONS_NEEDED = ("ATTN", "DECY")


class SuvTagError(ValueError):
    """A PET series cannot be converted to SUV.

    `missing` tells a missing tag from an unusable one; `kind` is the `petct.errors.StudyError` kind to report
    (missing_suv_tag, bad_suv_tag, not_corrected, implausible_value), by default derived from `missing`.
    """

    def __init__(self, message: str, missing: bool, kind: str | None = None):
        super().__init__(message)
        self.missing = missing
        self.kind = kind or ("missing_suv_tag" if missing else "bad_suv_tag")


def _require(ds: Dataset, keyword: str, where: str = "PET header"):
    try:
        value = getattr(ds, keyword, None)
    except (TypeError, ValueError) as exc:  # a value pydicom cannot convert to the tag's VR
        raise SuvTagError(f"DICOM tag {keyword} in {where} is malformed: {exc}", missing=False) from exc
    if value is None or value == "":
        raise SuvTagError(f"missing DICOM tag {keyword} in {where}", missing=True)
    return value


def _number(ds: Dataset, keyword: str, where: str = "PET header") -> float:
    value = _require(ds, keyword, where)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise SuvTagError(f"{keyword} in {where} is {value!r}, not a number", missing=False) from exc


def parse_dicom_time(value: str) -> dt.time:
    """DICOM TM ('HHMMSS.FFFFFF', 'HHMM', 'HH', optional colons) -> time; ValueError when it is not one."""
    text = str(value).strip().replace(":", "")
    whole, _, frac = text.partition(".")
    if not re.fullmatch(r"\d{2}(\d{2}){0,2}", whole) or not re.fullmatch(r"\d*", frac):
        raise ValueError(f"{value!r} is not a DICOM time (HHMMSS.FFFFFF)")
    parts = [int(whole[i : i + 2]) for i in range(0, len(whole), 2)]
    hh, mm, ss = (parts + [0, 0, 0])[:3]
    micro = int((frac + "000000")[:6]) if frac else 0
    return dt.time(hh, mm, min(ss, 59), micro)  # DICOM allows ss = 60 (leap second)


def parse_dicom_datetime(value: str) -> dt.datetime:
    """DICOM DT ('YYYYMMDDHHMMSS.FFFFFF&ZZXX'); the UTC offset is dropped: all times of a study share a zone."""
    text = str(value).strip()
    date = dt.datetime.strptime(text[:8], "%Y%m%d")
    clock = re.split(r"[+-]", text[8:])[0]
    return dt.datetime.combine(date.date(), parse_dicom_time(clock) if clock else dt.time())


def _when(keyword: str, parse, *values) -> dt.datetime:
    """Parse a date/time tag; a malformed one is an unusable tag naming `keyword`."""
    try:
        return parse(*values)
    except (TypeError, ValueError) as exc:
        raise SuvTagError(f"{keyword} {' '.join(map(str, values))!r} is not a valid DICOM date/time", False) from exc


def _combine(date: str, time: str) -> dt.datetime:
    return dt.datetime.combine(dt.datetime.strptime(str(date).strip(), "%Y%m%d").date(), parse_dicom_time(time))


def scan_start(slices: Sequence[Dataset]) -> dt.datetime:
    """SeriesDate+SeriesTime, unless it is later than the earliest acquisition (then that one).

    A series reconstructed or post-processed after the scan carries the later SeriesTime; AcquisitionDateTime
    (enhanced objects) or AcquisitionDate+AcquisitionTime of each slice then tells when the scan started.
    """
    first = slices[0]
    series_date = _require(first, "SeriesDate")
    series = _when("SeriesDate/SeriesTime", _combine, series_date, _require(first, "SeriesTime"))
    acquisitions = []
    for s in slices:
        if getattr(s, "AcquisitionDateTime", None):
            acquisitions.append(_when("AcquisitionDateTime", parse_dicom_datetime, s.AcquisitionDateTime))
        elif getattr(s, "AcquisitionTime", None):
            date = getattr(s, "AcquisitionDate", None) or series_date
            acquisitions.append(_when("AcquisitionDate/AcquisitionTime", _combine, date, s.AcquisitionTime))
    if acquisitions and min(acquisitions) < series:
        return min(acquisitions)
    return series


def injection_time(radio: Dataset, scan: dt.datetime, half_life_s: float) -> dt.datetime:
    """RadiopharmaceuticalStartDateTime when it has a time, else the scan's date + RadiopharmaceuticalStartTime.

    A time-only injection later in the day than the scan start was the day before (across midnight). That is
    unambiguous only for a tracer with half-life <= `LONG_LIVED_S`: every other candidate day gives an uptake over
    24 h > 10 half-lives, which `suv_factor` refuses anyway. For longer-lived tracers a time-only injection is refused.
    """
    where = "RadiopharmaceuticalInformation"
    stamp = str(getattr(radio, "RadiopharmaceuticalStartDateTime", "") or "").strip()
    if len(re.split(r"[+-]", stamp)[0]) >= 12:  # date and at least HHMM
        return _when("RadiopharmaceuticalStartDateTime", parse_dicom_datetime, stamp)
    clock = _require(radio, "RadiopharmaceuticalStartTime", where)
    if stamp:  # a DT with a date only: its date, the TM's time
        return _when("RadiopharmaceuticalStartDateTime/StartTime", _combine, stamp[:8], clock)
    if half_life_s > LONG_LIVED_S:
        raise SuvTagError(
            f"only RadiopharmaceuticalStartTime {clock} is given (no date) for a tracer with half-life "
            f"{half_life_s / 3600:.1f} h: its uptake may span days, so the injection day is unknown; "
            "RadiopharmaceuticalStartDateTime (0018,1078) is needed", missing=True)
    injected = _when("RadiopharmaceuticalStartTime", _combine, scan.strftime("%Y%m%d"), clock)
    return injected - dt.timedelta(days=1) if injected > scan else injected


def check_corrections(ds: Dataset) -> None:
    """CorrectedImage (0028,0051) must list ATTN and DECY: SUV of a NAC or not decay-corrected image is meaningless."""
    listed = cs_values(ds, "CorrectedImage")
    if not listed:
        raise SuvTagError("CorrectedImage (0028,0051) is absent or empty, so nothing says the PET is attenuation and "
                          "decay corrected; export the attenuation-corrected series (CorrectedImage with ATTN and "
                          "DECY) or, if it is one, add the tag", missing=True, kind="not_corrected")
    lacking = [c for c in CORRECTIONS_NEEDED if c not in listed]
    if lacking:
        what = {"ATTN": "attenuation (a NAC series)", "DECY": "decay"}
        raise SuvTagError(f"CorrectedImage (0028,0051) is {listed}: not corrected for "
                          f"{' and '.join(what[c] for c in lacking)}; use the study's attenuation- and decay-corrected "
                          "PET series", missing=False, kind="not_corrected")


def _series_tags(ds: Dataset) -> tuple:
    radio = (getattr(ds, "RadiopharmaceuticalInformationSequence", None) or [Dataset()])[0]
    return tuple(str(getattr(x, k, "")) for x, k in (
        (ds, "Units"), (ds, "DecayCorrection"), (ds, "CorrectedImage"), (ds, "PatientWeight"),
        (radio, "RadionuclideTotalDose"), (radio, "RadionuclideHalfLife"), (radio, "RadiopharmaceuticalStartTime"),
        (radio, "RadiopharmaceuticalStartDateTime")))


def _check_consistent(slices: Sequence[Dataset]) -> None:
    """Series-level tags must agree across slices: one factor is applied to the whole series."""
    names = ("Units", "DecayCorrection", "CorrectedImage", "PatientWeight", "RadionuclideTotalDose",
             "RadionuclideHalfLife", "RadiopharmaceuticalStartTime", "RadiopharmaceuticalStartDateTime")
    seen = {_series_tags(s) for s in slices}
    if len(seen) > 1:
        differ = [n for i, n in enumerate(names) if len({t[i] for t in seen}) > 1]
        raise SuvTagError(f"slices of one series disagree on {', '.join(differ)}: "
                          f"{sorted({t[names.index(differ[0])] for t in seen})[:4]}", missing=False)


def _check_units(units: str) -> None:
    if units == "CNTS":
        raise SuvTagError("Units (0054,1001) is CNTS (scanner counts, e.g. Philips), not activity concentration; "
                          "the vendor's private SUV scale factor is not used here because its definition could not "
                          "be verified: export the series in BQML (Bq/mL) or as SUV (GML)", missing=False)
    if units not in ("BQML", "GML"):
        raise SuvTagError(f"Units (0054,1001) is {units!r}; SUV needs BQML (Bq/mL) or GML (SUVbw)", missing=False)


def _check_weight(weight: float) -> None:
    if weight <= 0:
        raise SuvTagError(f"PatientWeight is {weight} kg", missing=False)
    if weight > WEIGHT_MAX_KG:
        hint = f" ({weight / 1000:g} kg if grams were written)" if weight / 1000 >= WEIGHT_MIN_KG else ""
        raise SuvTagError(f"PatientWeight (0010,1030) is {weight:g}: above {WEIGHT_MAX_KG:g} kg; DICOM requires kg, "
                          f"this looks like grams{hint}", missing=False, kind="implausible_value")
    if weight < WEIGHT_MIN_KG:
        raise SuvTagError(f"PatientWeight (0010,1030) is {weight:g} kg: below {WEIGHT_MIN_KG} kg, no patient weighs "
                          "that", missing=False, kind="implausible_value")


def _check_dose(dose: float) -> None:
    if dose < DOSE_MIN_BQ:
        raise SuvTagError(f"RadionuclideTotalDose (0018,1074) is {dose:g} Bq: below {DOSE_MIN_BQ:g} Bq (1 MBq); "
                          f"this looks like MBq written where DICOM requires Bq ({dose:g} MBq = {dose * 1e6:g} Bq; "
                          "or kBq)", missing=False, kind="implausible_value")
    if dose > DOSE_MAX_BQ:
        raise SuvTagError(f"RadionuclideTotalDose (0018,1074) is {dose:g} Bq: above {DOSE_MAX_BQ:g} Bq (50 GBq), no "
                          "PET injection is that large; DICOM requires Bq (a unit mix-up?)", missing=False,
                          kind="implausible_value")


def half_life(radio: Dataset) -> float:
    """Seconds: RadionuclideHalfLife (0018,1075), checked against the nuclide RadionuclideCodeSequence names.

    Stated and table value must agree within `HALF_LIFE_TOLERANCE`; the stated value is used (the scanner decay
    corrected with it). Absent stated value: the nuclide's from the table; unknown nuclide: the stated one.
    """
    where = "RadiopharmaceuticalInformation"
    try:
        nuclide = identify(radio)
    except NuclideError as exc:
        raise SuvTagError(str(exc), missing=False) from exc
    if getattr(radio, "RadionuclideHalfLife", None) in (None, "") and nuclide is not None:
        return nuclide.half_life_s
    stated = _number(radio, "RadionuclideHalfLife", where)
    if stated <= 0:
        raise SuvTagError(f"RadionuclideHalfLife is {stated} s", missing=False)
    if nuclide is not None and abs(stated / nuclide.half_life_s - 1.0) > HALF_LIFE_TOLERANCE:
        raise SuvTagError(f"RadionuclideHalfLife (0018,1075) is {stated:g} s but RadionuclideCodeSequence "
                          f"(0054,0300) names {nuclide.meaning} ({nuclide.name}), whose half-life is "
                          f"{nuclide.half_life_s:.1f} s; one of the two is wrong", missing=False)
    return stated


def _uptake_seconds(slices: Sequence[Dataset], radio: Dataset, half_life_s: float) -> float:
    scan = scan_start(slices)
    injected = injection_time(radio, scan, half_life_s)
    elapsed = (scan - injected).total_seconds()
    if elapsed < 0:
        raise SuvTagError(f"scan starts {-elapsed:.0f} s before injection (scan {scan}, injection {injected})",
                          missing=False)
    limit = min(MAX_UPTAKE_HALF_LIVES * half_life_s, MAX_UPTAKE_S)
    if elapsed > limit:
        raise SuvTagError(f"uptake time {elapsed / 3600:.2f} h (injection {injected}, scan start {scan}) is over "
                          f"{limit / 3600:.1f} h ({MAX_UPTAKE_HALF_LIVES:g} half-lives of {half_life_s:g} s, at most "
                          "14 days): a wrong injection date or time", missing=False, kind="implausible_value")
    return elapsed


def suv_factor(slices: Sequence[Dataset]) -> float:
    """Multiply activity concentration (Bq/mL, after each slice's rescale) by this to get SUVbw.

    `slices`: the datasets of one series (or the per-frame datasets of one enhanced object). Units BQML with
    DecayCorrection START (decay from injection to scan start applied here) or ADMIN (none needed); Units GML is
    SUVbw already (factor 1). Raises `SuvTagError` with its `kind` for everything else.
    """
    first = slices[0]
    _check_consistent(slices)
    check_corrections(first)
    units = str(_require(first, "Units")).strip().upper()
    _check_units(units)
    if units == "GML":  # already SUVbw
        return 1.0
    correction = str(_require(first, "DecayCorrection")).strip().upper()
    if correction == "NONE":
        raise SuvTagError("DecayCorrection (0054,1102) is NONE: the image is not decay corrected (each frame decays "
                          "from its own start); export a series decay corrected to START or ADMIN", missing=False,
                          kind="not_corrected")
    if correction not in ("START", "ADMIN"):
        raise SuvTagError(f"DecayCorrection is {correction!r}; supported: START, ADMIN", missing=False)
    weight = _number(first, "PatientWeight")
    _check_weight(weight)
    sequence = _require(first, "RadiopharmaceuticalInformationSequence")
    if len(sequence) == 0:
        raise SuvTagError("missing DICOM tag RadiopharmaceuticalInformationSequence (empty)", missing=True)
    radio = sequence[0]
    dose = _number(radio, "RadionuclideTotalDose", "RadiopharmaceuticalInformation")
    if dose <= 0:
        raise SuvTagError(f"RadionuclideTotalDose={dose}", missing=False)
    _check_dose(dose)
    half = half_life(radio)
    if correction == "ADMIN":  # images already decay-corrected to injection: no decay factor
        return weight * 1000.0 / dose
    elapsed = _uptake_seconds(slices, radio, half)
    return weight * 1000.0 / (dose * 2.0 ** (-elapsed / half))
