"""autoPET (FDG-PET-CT-Lesions, TCIA): `<patient>/<acquisition>/{CT,CTres,PET,SUV,SEG}.nii.gz`."""

from __future__ import annotations

from pathlib import Path

from ..study import StudySource
from .base import Discovery, safe_id, unique_ids, visible_dirs

SEG_MAP = {0: "background", 1: "lesion"}
"""autoPET SEG.nii.gz: binary lesion mask."""
FILES = ("ct", "ctres", "pet", "suv", "seg")


def _files(folder: Path) -> dict[str, Path]:
    """{lower-case stem: path} of the autoPET volumes in one acquisition folder."""
    out = {}
    for entry in folder.iterdir():
        stem = entry.name[:-7].lower() if entry.name.lower().endswith(".nii.gz") else ""
        if entry.is_file() and stem in FILES:
            out[stem] = entry
    return out


def _unused_folders(root: Path, kept: set[Path]) -> list[tuple[str, str]]:
    reason = "not an autoPET acquisition (no SUV/PET with CT/CTres .nii.gz)"
    out = []
    for patient in visible_dirs(root):
        acquisitions = visible_dirs(patient)
        if not kept.intersection(acquisitions):
            out.append((str(patient), f"no autoPET acquisition inside ({reason})"))
        else:
            out += [(str(a), reason) for a in acquisitions if a not in kept]
    return out


class AutoPet:
    """autoPET: one folder per patient (`PETCT_<id>`), one sub-folder per acquisition (date-named), holding
    `SUV.nii.gz` (PET in SUVbw on the PET grid: the PET used), `CTres.nii.gz` (CT resampled onto the PET grid: the
    CT used; `CT.nii.gz` when CTres is absent) and optionally `SEG.nii.gz` (on the PET grid, 0 = background,
    1 = lesion; mapped to the label set's lesion class). `PET.nii.gz` holds activity (Bq/mL), not SUV: an
    acquisition without SUV.nii.gz fails (missing_modality) rather than be read as SUV. patient_id = patient
    folder; study_id = `<patient>_<acquisition>` with characters outside [A-Za-z0-9._-] replaced by '_'.
    """

    name = "autopet"
    expects = "<patient>/<acquisition>/SUV.nii.gz with CTres.nii.gz|CT.nii.gz [and SEG.nii.gz]"

    def _acquisitions(self, root: Path) -> list[tuple[Path, Path, dict[str, Path]]]:
        if not root.is_dir():
            return []
        return [(patient, acq, files) for patient in visible_dirs(root) for acq in visible_dirs(patient)
                if (files := _files(acq)) and {"suv", "pet"} & set(files) and {"ct", "ctres"} & set(files)]

    def detect(self, root: Path) -> bool:
        return bool(self._acquisitions(root))

    def discover(self, root: Path) -> Discovery:
        found = Discovery(self.name, looked=f"{root}: {self.expects}")
        acquisitions = self._acquisitions(root)
        found.skipped += _unused_folders(root, {acq for _, acq, _ in acquisitions})
        ids = unique_ids(safe_id(f"{p.name}_{a.name}") for p, a, _ in acquisitions)
        for order, (sid, (patient, acq, files)) in enumerate(zip(ids, acquisitions, strict=True)):
            found.sources.append(self._source(sid, patient, acq, files, order))
            used = [files.get("ctres") or files.get("ct"), files.get("suv"), files.get("seg")]
            found.pairing[sid] = f"patient {patient.name}: " + ", ".join(p.name for p in used if p)
            found.skipped += [(str(p), "not used (" + ("CTres.nii.gz is the CT" if k == "ct" else
                                                       "activity, not SUV: SUV.nii.gz is the PET") + ")")
                              for k, p in sorted(files.items()) if p not in used]
        return found

    def _source(self, sid: str, patient: Path, acq: Path, files: dict[str, Path], order: int) -> StudySource:
        ct, suv, seg = files.get("ctres") or files.get("ct"), files.get("suv"), files.get("seg")
        problem = None if suv else (
            "missing_modality", f"{acq} has PET.nii.gz (activity in Bq/mL) but no SUV.nii.gz: a NIfTI has no tags "
            "to convert activity to SUV; add autoPET's SUV.nii.gz or prepare the DICOM series")
        return StudySource(sid, ct.resolve(), suv.resolve() if suv else None, seg.resolve() if seg else None,
                           "labeled" if seg else "unlabeled", order, patient_id=patient.name,
                           label_map=dict(SEG_MAP) if seg else None, layout=self.name, problem=problem)
