"""A DICOM tree as a PACS or a DICOM CD exports it: studies found by their UIDs, not by folder names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..dicom_index import SeriesInfo, contains_dicom, role, scan_tree
from ..study import StudySource
from .base import Discovery, safe_id, unique_ids

RULE = ("the CT sharing the PET's FrameOfReferenceUID, then the one covering most of the PET's axial range, then "
        "the finest slice spacing")


@dataclass
class Pairing:
    """The series chosen for one study, or the problem that stops it; `skipped` = (series, reason)."""

    ct: SeriesInfo | None = None
    pet: SeriesInfo | None = None
    problem: tuple[str, str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    why: str = ""


def axial_overlap_mm(ct: SeriesInfo, pet: SeriesInfo) -> float:
    """Length (mm) of the PET's slice range that the CT's slice range covers, along the PET's slice normal."""
    normal = np.asarray(pet.normal or (0.0, 0.0, 1.0))
    a, b = ct.axial(normal), pet.axial(normal)
    return float(max(0.0, min(a[-1], b[-1]) - max(a[0], b[0]))) if a.size and b.size else 0.0


def _rank(ct: SeriesInfo, pet: SeriesInfo) -> tuple[bool, float, float]:
    """Larger is better: same frame of reference, axial overlap (0.1 mm), then finer slices."""
    return (bool(pet.frame_uid) and ct.frame_uid == pet.frame_uid, round(axial_overlap_mm(ct, pet), 1),
            -round(ct.slice_spacing, 2))


def _lost(loser: tuple, winner: tuple) -> str:
    reasons = ("does not share the PET's frame of reference (another CT does)",
               f"covers {loser[1]:.1f} mm of the PET's axial range, another CT {winner[1]:.1f} mm",
               f"slice spacing {-loser[2]:.2f} mm, another CT {-winner[2]:.2f} mm")
    return "CT not chosen: " + next(r for r, a, b in zip(reasons, loser, winner, strict=True) if a != b)


def _listing(series: list[SeriesInfo]) -> str:
    return "; ".join(s.describe() for s in series)


def pair_study(series: list[SeriesInfo]) -> Pairing:
    """Pick the study's attenuation-corrected static PET and its CT by `RULE`; ambiguity is a problem, not a guess."""
    out, cts, pets = Pairing(), [], []
    for s in series:
        kind, reason = role(s)
        {"ct": cts, "pet": pets}.get(kind, []).append(s)
        if reason:
            out.skipped.append((f"{s.describe()} in {s.folder}", reason))
    skipped_text = "; ".join(f"{what}: {why}" for what, why in out.skipped) or "nothing else in the study"
    if len(pets) != 1 or not cts:
        missing = "attenuation-corrected static PET" if not pets else "CT"
        out.problem = ("ambiguous", f"{len(pets)} attenuation-corrected static PET series: {_listing(pets)}; give "
                       "pet_series in a cohort CSV (`swinssl scan`)") if len(pets) > 1 else (
            "missing_modality", f"no usable {missing} series in the study (skipped: {skipped_text})")
        return out
    pet = out.pet = pets[0]
    ranks = {c.uid: _rank(c, pet) for c in cts}
    best = max(cts, key=lambda c: ranks[c.uid])
    tied = [c for c in cts if ranks[c.uid] == ranks[best.uid]]
    if len(tied) > 1:
        out.problem = ("ambiguous", f"{len(tied)} CT series tie for {pet.describe()} under the rule ({RULE}): "
                       f"{_listing(tied)}; give ct_series in a cohort CSV (`swinssl scan`)")
        return out
    out.ct = best
    out.skipped += [(f"{c.describe()} in {c.folder}", _lost(ranks[c.uid], ranks[best.uid]))
                    for c in cts if c is not best]
    same, overlap, spacing = ranks[best.uid]
    out.why = (f"{'same' if same else 'different'} frame of reference, {overlap:.1f} mm axial overlap, "
               f"{-spacing:.2f} mm slices")
    return out


class DicomTree:
    """DICOM files anywhere under the root (any folder names and depths, several series per folder, DICOMDIR or
    not, other files around). Files are grouped by StudyInstanceUID and SeriesInstanceUID from their headers. Per
    study the PET is the one Modality PT series that is static (SeriesType not DYNAMIC/GATED, no repeated slice
    positions), not a localizer, with CorrectedImage holding ATTN and DECY; the CT is chosen by `RULE`. Several
    such PETs or tied CTs fail the study as `ambiguous` (listing the series), none as `missing_modality`. Unlabelled
    (SEG/RTSTRUCT objects are skipped). study_id = `<PatientID>_<StudyDate>` (made safe and unique); patient_id =
    PatientID.
    """

    name = "dicom"
    expects = "DICOM files at any depth (a CT and an attenuation-corrected static PET per study)"

    def detect(self, root: Path) -> bool:
        return contains_dicom(root)

    def discover(self, root: Path) -> Discovery:
        index = scan_tree(root)
        found = Discovery(self.name, skipped=list(index.skipped),
                          looked=f"{root}: {index.files_seen} files, {len(index.series)} DICOM series")
        studies: dict[str, list[SeriesInfo]] = {}
        for s in index.series.values():
            studies.setdefault(s.study_uid, []).append(s)
        firsts = [group[0] for group in studies.values()]
        ids = unique_ids(safe_id(f"{s.patient_id or 'anonymous'}_{s.study_date}") for s in firsts)
        for order, (sid, group) in enumerate(zip(ids, studies.values(), strict=True)):
            pairing = pair_study(group)
            found.skipped += pairing.skipped
            found.sources.append(_source(sid, group[0], pairing, order, self.name))
            found.pairing[sid] = _describe(group[0], pairing)
        return found


def _source(sid: str, first: SeriesInfo, pairing: Pairing, order: int, layout: str) -> StudySource:
    ct, pet = pairing.ct, pairing.pet
    return StudySource(sid, ct.folder.resolve() if ct else None, pet.folder.resolve() if pet else None, None,
                       "unlabeled", order, patient_id=first.patient_id, ct_series=ct.uid if ct else "",
                       pet_series=pet.uid if pet else "", layout=layout, problem=pairing.problem)


def _describe(first: SeriesInfo, pairing: Pairing) -> str:
    head = f"patient {first.patient_id or '(no PatientID)'}, study {first.study_uid}: "
    if pairing.problem:
        return head + f"{pairing.problem[0]}: {pairing.problem[1]}"
    return head + f"{pairing.ct.describe()} + {pairing.pet.describe()} ({pairing.why})"
