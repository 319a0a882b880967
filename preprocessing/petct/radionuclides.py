"""PET radionuclides: half-lives and how a DICOM header names them (RadionuclideCodeSequence, (0054,0300)).

Codes: DICOM PS3.16 CID 4020 "PET Radionuclide" (SNOMED CT codes, scheme "SCT"; older files carry the legacy SNOMED
RT codes, scheme "SRT", e.g. C-111A1 for ^18^Fluorine; a few nuclides have DICOM "DCM" codes). Half-lives: NNDC
NuDat 3 (ENSDF evaluations), rounded to 4-5 significant figures; where an older evaluation is still in use by
scanners (Ga-68 67.63 min, Rb-82 1.273 min, Sc-44 3.97 h) it is within the 2 % `HALF_LIFE_TOLERANCE` of ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

MIN, HOUR, DAY = 60.0, 3600.0, 86400.0
HALF_LIFE_TOLERANCE = 0.02
"""Stated RadionuclideHalfLife may differ this much (relative) from the table: evaluations and vendor tables differ
by < 1 %; the closest two nuclides of the table (N-13 and Cu-62) differ by 3 %, so a wrong nuclide is still caught."""


@dataclass(frozen=True)
class Nuclide:
    """One radionuclide: CID 4020 code meaning (e.g. '^18^Fluorine'), element symbol, mass number, half-life."""

    meaning: str
    symbol: str
    mass: str  # '18', '94m'
    half_life_s: float
    codes: tuple[tuple[str, str], ...]  # (CodingSchemeDesignator, CodeValue)

    @property
    def name(self) -> str:
        return f"{self.symbol}-{self.mass}"


def _n(meaning: str, symbol: str, half_life_s: float, *codes: tuple[str, str]) -> Nuclide:
    mass = re.match(r"\^(\d+m?)\^", meaning).group(1)
    return Nuclide(meaning, symbol, mass, half_life_s, codes)


NUCLIDES: tuple[Nuclide, ...] = (
    _n("^11^Carbon", "C", 20.364 * MIN, ("SCT", "40565003"), ("SRT", "C-105A1")),
    _n("^13^Nitrogen", "N", 9.965 * MIN, ("SCT", "21576001"), ("SRT", "C-107A1")),
    _n("^14^Oxygen", "O", 70.62, ("SCT", "424875009"), ("SRT", "C-1018C")),
    _n("^15^Oxygen", "O", 122.24, ("SCT", "129504001"), ("SRT", "C-B1038")),
    _n("^18^Fluorine", "F", 109.77 * MIN, ("SCT", "77004003"), ("SRT", "C-111A1")),
    _n("^22^Sodium", "Na", 2.6018 * 365.25 * DAY, ("SCT", "71633006"), ("SRT", "C-155A1")),
    _n("^38^Potassium", "K", 7.636 * MIN, ("SCT", "423764008"), ("SRT", "C-135A4")),
    _n("^43^Scandium", "Sc", 3.891 * HOUR, ("DCM", "126605")),
    _n("^44^Scandium", "Sc", 4.042 * HOUR, ("DCM", "126600")),
    _n("^45^Titanium", "Ti", 184.8 * MIN, ("SCT", "75696008"), ("SRT", "C-166A2")),
    _n("^52^Iron", "Fe", 8.275 * HOUR, ("SCT", "69089000"), ("SRT", "C-130A1")),
    _n("^52^Manganese", "Mn", 5.591 * DAY, ("SCT", "37225000"), ("SRT", "C-149A1")),
    _n("^61^Copper", "Cu", 3.339 * HOUR, ("SCT", "71425003"), ("SRT", "C-127A1")),
    _n("^62^Copper", "Cu", 9.673 * MIN, ("SCT", "422934004"), ("SRT", "C-127A5")),
    _n("^64^Copper", "Cu", 12.701 * HOUR, ("SCT", "3932008"), ("SRT", "C-127A2")),
    _n("^66^Gallium", "Ga", 9.49 * HOUR, ("SCT", "79477007"), ("SRT", "C-131A1")),
    _n("^68^Gallium", "Ga", 67.71 * MIN, ("SCT", "35337001"), ("SRT", "C-131A3")),
    _n("^68^Germanium", "Ge", 270.93 * DAY, ("SCT", "53315004"), ("SRT", "C-128A2")),
    _n("^76^Bromine", "Br", 16.2 * HOUR, ("SCT", "79523006"), ("SRT", "C-113A2")),
    _n("^82^Rubidium", "Rb", 1.2575 * MIN, ("SCT", "79197006"), ("SRT", "C-159A2")),
    _n("^86^Yttrium", "Y", 14.74 * HOUR, ("SCT", "10738001"), ("SRT", "C-162A3")),
    _n("^89^Zirconium", "Zr", 78.41 * HOUR, ("SCT", "63360001"), ("SRT", "C-168A4")),
    _n("^90^Yttrium", "Y", 64.05 * HOUR, ("SCT", "14691008"), ("SRT", "C-162A7")),
    _n("^94m^Technetium", "Tc", 52.0 * MIN, ("SCT", "424079002"), ("SRT", "C-163AA")),
    _n("^124^Iodine", "I", 4.176 * DAY, ("SCT", "40937006"), ("SRT", "C-114A5")),
)

_BY_CODE = {code: n for n in NUCLIDES for code in n.codes}
_ELEMENTS = {n.meaning.split("^")[-1].lower(): n.symbol.lower() for n in NUCLIDES}
_BY_NAME = {(n.symbol.lower(), n.mass): n for n in NUCLIDES}


class NuclideError(ValueError):
    """The header names its radionuclide inconsistently (code and meaning disagree)."""


def parse_meaning(text: str) -> Nuclide | None:
    """'^18^Fluorine', 'Fluorine-18', 'F-18', '18F', 'F18' -> the nuclide; None when not a known nuclide."""
    compact = re.sub(r"[\s^_\-]", "", str(text)).lower()
    match = re.fullmatch(r"(\d+m?)([a-z]+)", compact) or re.fullmatch(r"([a-z]+)(\d+m?)", compact)
    if not match:
        return None
    a, b = match.groups()
    mass, element = (a, b) if a[0].isdigit() else (b, a)
    symbol = _ELEMENTS.get(element, element)
    return _BY_NAME.get((symbol, mass))


def identify(radio: Dataset) -> Nuclide | None:
    """The nuclide named by RadionuclideCodeSequence in one RadiopharmaceuticalInformationSequence item.

    A CID 4020 code (scheme + value) decides; the CodeMeaning is used when the code is not in the table (private
    schemes such as '99SDM'). None when the sequence is absent or names no nuclide we know.
    """
    items = getattr(radio, "RadionuclideCodeSequence", None) or []
    if not items:
        return None
    item = items[0]
    scheme, value = str(getattr(item, "CodingSchemeDesignator", "")).strip(), str(getattr(item, "CodeValue", ""))
    by_code = _BY_CODE.get((scheme.upper(), value.strip()))
    by_meaning = parse_meaning(getattr(item, "CodeMeaning", ""))
    if by_code and by_meaning and by_code is not by_meaning:
        raise NuclideError(f"RadionuclideCodeSequence (0054,0300) code {scheme} {value} is {by_code.meaning} but its "
                           f"CodeMeaning says {item.CodeMeaning!r}")
    return by_code or by_meaning
