"""SUVbw maths and tag rules on header-only datasets (whole DICOM series: test_synth, test_prepare_bad_input).

SUV = activity[Bq/mL] * weight[kg] * 1000 / (dose[Bq] * 2^(-dt/half_life)), dt = scan start - injection; every input
from a tag, a missing one is an error (see petct/suv.py)."""

from __future__ import annotations

import math

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from petct.suv import SuvTagError, parse_dicom_datetime, parse_dicom_time, scan_start, suv_factor


def _pet_header(**overrides) -> Dataset:
    ds = Dataset()
    ds.Units, ds.DecayCorrection, ds.PatientWeight = "BQML", "START", 80.0
    ds.SeriesDate, ds.SeriesTime, ds.AcquisitionTime = "20260101", "110000", "110000"
    radio = Dataset()
    radio.RadionuclideTotalDose, radio.RadionuclideHalfLife = 150e6, 4056.0
    radio.RadiopharmaceuticalStartTime = "100000"
    ds.RadiopharmaceuticalInformationSequence = Sequence([radio])
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


def test_time_parsing():
    assert parse_dicom_time("101530.5") == parse_dicom_time("10:15:30.500000")
    assert parse_dicom_time("1015").minute == 15
    moment = parse_dicom_datetime("20260101101530.25+0100")
    assert (moment.hour, moment.second, moment.microsecond) == (10, 30, 250000)


def test_suv_factor_matches_hand_computation():
    # dt = 3600 s: decayed dose = 150 MBq * 2^(-3600/4056); factor = 80 kg * 1000 / decayed dose
    expected = 80.0 * 1000.0 / (150e6 * 2 ** (-3600 / 4056))
    assert suv_factor([_pet_header()]) == pytest.approx(expected, rel=1e-12)


def test_start_datetime_wins_over_start_time():
    header = _pet_header()
    header.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime = "20260101103000"
    expected = 80.0 * 1000.0 / (150e6 * 2 ** (-1800 / 4056))
    assert suv_factor([header]) == pytest.approx(expected, rel=1e-12)


def test_scan_start_uses_earliest_acquisition_when_series_time_is_later():
    slices = [_pet_header(SeriesTime="113000", AcquisitionTime=t) for t in ("112000", "110500", "111000")]
    assert scan_start(slices).strftime("%H%M%S") == "110500"
    slices = [_pet_header(SeriesTime="110000", AcquisitionTime=t) for t in ("110500", "111000")]
    assert scan_start(slices).strftime("%H%M%S") == "110000"


def test_admin_decay_correction_has_no_decay_factor():
    assert suv_factor([_pet_header(DecayCorrection="ADMIN")]) == pytest.approx(80.0 * 1000 / 150e6)


@pytest.mark.parametrize("tag", ["PatientWeight", "Units", "DecayCorrection", "SeriesTime"])
def test_missing_tag_is_an_error_not_a_guess(tag):
    header = _pet_header()
    delattr(header, tag)
    with pytest.raises(SuvTagError, match=tag) as info:
        suv_factor([header])
    assert info.value.missing


@pytest.mark.parametrize("tag", ["RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartTime"])
def test_missing_radiopharmaceutical_tag(tag):
    header = _pet_header()
    delattr(header.RadiopharmaceuticalInformationSequence[0], tag)
    with pytest.raises(SuvTagError, match=tag):
        suv_factor([header])


def test_unusable_values_are_errors():
    with pytest.raises(SuvTagError, match="CNTS"):
        suv_factor([_pet_header(Units="CNTS")])
    with pytest.raises(SuvTagError, match="before injection"):
        suv_factor([_pet_header(SeriesTime="090000", AcquisitionTime="090000")])
    assert math.isclose(suv_factor([_pet_header(Units="GML")]), 1.0)
