"""SUVbw maths and tag rules on header-only datasets (whole DICOM series: test_pet_vendor_variants, test_synth).

SUV = activity[Bq/mL] * weight[kg] * 1000 / (dose[Bq] * 2^(-dt/half_life)), dt = scan start - injection; every input
from a tag, a missing one is an error, an implausible one is refused (see petct/suv.py). Expected factors are
recomputed here independently (exp(-ln2 t / T), explicit datetime arithmetic)."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag

from petct.radionuclides import NUCLIDES, identify, parse_meaning
from petct.suv import SuvTagError, parse_dicom_datetime, parse_dicom_time, scan_start, suv_factor

F18_S = 109.77 * 60  # NuDat 3


def _pet_header(**overrides) -> Dataset:
    ds = Dataset()
    ds.Units, ds.DecayCorrection, ds.PatientWeight = "BQML", "START", 80.0
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT"]
    ds.SeriesDate, ds.SeriesTime, ds.AcquisitionTime = "20260101", "110000", "110000"
    radio = Dataset()
    radio.RadionuclideTotalDose, radio.RadionuclideHalfLife = 150e6, 4056.0
    radio.RadiopharmaceuticalStartTime = "100000"
    ds.RadiopharmaceuticalInformationSequence = Sequence([radio])
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


def _radio(header: Dataset) -> Dataset:
    return header.RadiopharmaceuticalInformationSequence[0]


def _code(header: Dataset, value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    _radio(header).RadionuclideCodeSequence = Sequence([item])
    return header


def _expected(weight: float, dose: float, seconds: float, half_life: float) -> float:
    return weight * 1000.0 / (dose * math.exp(-math.log(2) * seconds / half_life))


def _refused(header: Dataset, kind: str, phrase: str) -> SuvTagError:
    with pytest.raises(SuvTagError, match=phrase) as info:
        suv_factor([header])
    assert info.value.kind == kind
    return info.value


def test_time_parsing():
    assert parse_dicom_time("101530.5") == parse_dicom_time("10:15:30.500000")
    assert parse_dicom_time("1015").minute == 15
    moment = parse_dicom_datetime("20260101101530.25+0100")
    assert (moment.hour, moment.second, moment.microsecond) == (10, 30, 250000)
    with pytest.raises(ValueError):
        parse_dicom_time("10h15")


def test_malformed_time_names_the_tag():
    _refused(_pet_header(SeriesTime="25:61"), "bad_suv_tag", "SeriesDate/SeriesTime")


def test_suv_factor_matches_hand_computation():
    # dt = 3600 s: decayed dose = 150 MBq * 2^(-3600/4056); factor = 80 kg * 1000 / decayed dose
    assert suv_factor([_pet_header()]) == pytest.approx(_expected(80, 150e6, 3600, 4056), rel=1e-12)


def test_start_datetime_wins_over_start_time():
    header = _pet_header()
    _radio(header).RadiopharmaceuticalStartDateTime = "20260101103000"
    assert suv_factor([header]) == pytest.approx(_expected(80, 150e6, 1800, 4056), rel=1e-12)


def test_start_datetime_without_time_takes_the_time_tag():
    header = _pet_header()
    _radio(header).RadiopharmaceuticalStartDateTime = "20260101"  # a DT may stop after the date
    assert suv_factor([header]) == pytest.approx(_expected(80, 150e6, 3600, 4056), rel=1e-12)


def test_scan_start_uses_earliest_acquisition_when_series_time_is_later():
    slices = [_pet_header(SeriesTime="113000", AcquisitionTime=t) for t in ("112000", "110500", "111000")]
    assert scan_start(slices).strftime("%H%M%S") == "110500"
    slices = [_pet_header(SeriesTime="110000", AcquisitionTime=t) for t in ("110500", "111000")]
    assert scan_start(slices).strftime("%H%M%S") == "110000"
    enhanced = _pet_header(SeriesTime="120000", AcquisitionDateTime="20260101105000")
    del enhanced.AcquisitionTime
    assert scan_start([enhanced]) == dt.datetime(2026, 1, 1, 10, 50)


def test_admin_decay_correction_has_no_decay_factor():
    assert suv_factor([_pet_header(DecayCorrection="ADMIN")]) == pytest.approx(80.0 * 1000 / 150e6)


@pytest.mark.parametrize("tag", ["PatientWeight", "Units", "DecayCorrection", "SeriesTime"])
def test_missing_tag_is_an_error_not_a_guess(tag):
    header = _pet_header()
    delattr(header, tag)
    error = _refused(header, "missing_suv_tag", tag)
    assert error.missing


@pytest.mark.parametrize("tag", ["RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartTime"])
def test_missing_radiopharmaceutical_tag(tag):
    header = _pet_header()
    delattr(_radio(header), tag)
    _refused(header, "missing_suv_tag", tag)


def test_error_kind_defaults_from_missing():
    assert SuvTagError("x", missing=True).kind == "missing_suv_tag"
    assert SuvTagError("x", missing=False).kind == "bad_suv_tag"
    assert SuvTagError("x", missing=False, kind="not_corrected").kind == "not_corrected"


@pytest.mark.parametrize(("corrected", "phrase"), [
    (None, "absent or empty"), ([], "absent or empty"), (["DECY", "SCAT"], "attenuation"),
    (["ATTN", "SCAT"], "decay"), ("NORM", "attenuation .* and decay")])
def test_uncorrected_pet_is_refused(corrected, phrase):
    header = _pet_header()
    if corrected is None:
        del header.CorrectedImage
    else:
        header.CorrectedImage = corrected
    _refused(header, "not_corrected", phrase)
    _refused(_pet_header(CorrectedImage=header.get("CorrectedImage"), Units="GML"), "not_corrected", "CorrectedImage")


def test_corrections_as_one_backslash_string():
    assert suv_factor([_pet_header(CorrectedImage="ATTN\\DECY")]) == pytest.approx(_expected(80, 150e6, 3600, 4056))


def test_units():
    _refused(_pet_header(Units="CNTS"), "bad_suv_tag", "CNTS.*BQML")
    _refused(_pet_header(Units="PROPCNTS"), "bad_suv_tag", "PROPCNTS")
    header = _pet_header(Units="GML")
    del header.PatientWeight  # SUVbw already: no weight or dose needed
    assert suv_factor([header]) == 1.0


def test_decay_correction_none_is_refused():
    _refused(_pet_header(DecayCorrection="NONE"), "not_corrected", "DecayCorrection .*NONE")
    _refused(_pet_header(DecayCorrection="FRAME"), "bad_suv_tag", "FRAME")


@pytest.mark.parametrize(("dose", "phrase"), [(150.0, "looks like MBq"), (150e3, "looks like MBq"),
                                              (6e10, "above 5e\\+10 Bq")])
def test_implausible_dose(dose, phrase):
    header = _pet_header()
    _radio(header).RadionuclideTotalDose = dose
    _refused(header, "implausible_value", phrase)


def test_dose_at_the_limits_is_accepted():
    for dose in (1e6, 5e10):
        header = _pet_header()
        _radio(header).RadionuclideTotalDose = dose
        assert suv_factor([header]) == pytest.approx(_expected(80, dose, 3600, 4056))


@pytest.mark.parametrize(("weight", "phrase"), [(80000.0, "grams.*80 kg"), (0.2, "below 0.5 kg"), (351.0, "grams")])
def test_implausible_weight(weight, phrase):
    _refused(_pet_header(PatientWeight=weight), "implausible_value", phrase)
    _refused(_pet_header(PatientWeight=-1), "bad_suv_tag", "PatientWeight")


def test_half_life_mismatch_with_the_code_names_both():
    header = _code(_pet_header(), "77004003", "SCT", "^18^Fluorine")  # F-18 code, Ga-68 half-life stated
    error = _refused(header, "bad_suv_tag", "RadionuclideHalfLife")
    assert "4056" in str(error) and "^18^Fluorine" in str(error) and "6586" in str(error)


def test_half_life_within_two_percent_uses_the_stated_value():
    header = _code(_pet_header(), "C-131A3", "SRT", "^68^Gallium")  # legacy SNOMED RT code, as older scanners write
    assert suv_factor([header]) == pytest.approx(_expected(80, 150e6, 3600, 4056), rel=1e-12)


def test_half_life_from_the_code_when_not_stated():
    header = _code(_pet_header(), "C-111A1", "SRT", "^18^Fluorine")
    del _radio(header).RadionuclideHalfLife
    assert suv_factor([header]) == pytest.approx(_expected(80, 150e6, 3600, F18_S), rel=1e-9)


def test_code_and_meaning_that_disagree_are_refused():
    _refused(_code(_pet_header(), "77004003", "SCT", "^68^Gallium"), "bad_suv_tag", "CodeMeaning")


def test_private_scheme_falls_back_to_the_meaning_and_unknown_nuclides_to_the_stated_value():
    header = _code(_pet_header(), "X1", "99SDM", "Fluorine-18")
    _refused(header, "bad_suv_tag", "RadionuclideHalfLife")  # identified by its meaning: F-18 != 4056 s
    header = _code(_pet_header(), "X1", "99SDM", "^99^Unobtainium")
    assert suv_factor([header]) == pytest.approx(_expected(80, 150e6, 3600, 4056), rel=1e-12)


def test_nuclide_table_agrees_with_dicom_cid_4020():
    """Every code of our table is in pydicom's copy of PS3.16 CID 4020, with the same meaning (SRT via SCT)."""
    cid = {(c.scheme_designator, c.value): c.meaning for c in (getattr(codes.cid4020, k) for k in codes.cid4020.dir())}
    for nuclide in NUCLIDES:
        for scheme, value in nuclide.codes:
            if scheme == "SRT":
                assert any(Code(value, "SRT", nuclide.meaning) == Code(v, s, m) for (s, v), m in cid.items()), value
            else:
                assert cid[(scheme, value)] == nuclide.meaning
    assert parse_meaning("^18^Fluorine") is parse_meaning("F-18") is parse_meaning("18F")
    assert parse_meaning("Fluorine") is None and identify(Dataset()) is None


def test_time_only_injection_across_midnight_is_the_day_before():
    header = _pet_header(SeriesDate="20260102", SeriesTime="002000", AcquisitionTime="002000")
    _radio(header).RadiopharmaceuticalStartTime = "233000"
    seconds = (dt.datetime(2026, 1, 2, 0, 20) - dt.datetime(2026, 1, 1, 23, 30)).total_seconds()
    assert seconds == 3000
    assert suv_factor([header]) == pytest.approx(_expected(80, 150e6, seconds, 4056), rel=1e-12)


def test_time_only_injection_of_a_long_lived_tracer_is_refused():
    header = _code(_pet_header(), "3932008", "SCT", "^64^Copper")
    _radio(header).RadionuclideHalfLife = 12.701 * 3600
    _refused(header, "missing_suv_tag", "RadiopharmaceuticalStartDateTime")
    _radio(header).RadiopharmaceuticalStartDateTime = "20251231110000"  # with the date: a day of uptake is fine
    assert suv_factor([header]) == pytest.approx(_expected(80, 150e6, 86400, 12.701 * 3600), rel=1e-12)


@pytest.mark.parametrize(("start", "half_life", "ok"), [
    ("20251231150000", F18_S, False),  # F-18, 20 h: over 10 half-lives
    ("20251227110000", 78.41 * 3600, True),  # Zr-89, 5 days: routine
    ("20251215110000", 78.41 * 3600, False),  # 17 days
])
def test_uptake_time_plausibility(start, half_life, ok):
    header = _pet_header()
    _radio(header).RadiopharmaceuticalStartDateTime, _radio(header).RadionuclideHalfLife = start, half_life
    if ok:
        seconds = (dt.datetime(2026, 1, 1, 11) - dt.datetime.strptime(start, "%Y%m%d%H%M%S")).total_seconds()
        assert suv_factor([header]) == pytest.approx(_expected(80, 150e6, seconds, half_life), rel=1e-12)
    else:
        _refused(header, "implausible_value", "uptake time")


def test_unusable_values_are_errors():
    header = _pet_header()
    _radio(header).RadiopharmaceuticalStartDateTime = "20260101113000"
    _refused(header, "bad_suv_tag", "before injection")
    header = _pet_header()
    del header.PatientWeight  # as read from a file with a malformed DS: pydicom keeps the text
    header[0x00101030] = RawDataElement(Tag(0x00101030), "DS", 6, b"eighty", 0, False, True)
    _refused(header, "bad_suv_tag", "PatientWeight .*not a number")


def test_slices_that_disagree_on_series_tags_are_refused():
    with pytest.raises(SuvTagError, match="disagree on PatientWeight") as info:
        suv_factor([_pet_header(), _pet_header(PatientWeight=81.0)])
    assert info.value.kind == "bad_suv_tag"
