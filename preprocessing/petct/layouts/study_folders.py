"""The README's study folders: `<root>/<study>/{ct,pet,label}` as a volume file or a DICOM series folder."""

from __future__ import annotations

from pathlib import Path

from ..study import StudySource
from .base import NIFTI_ENDINGS, Discovery, visible_dirs, volume_file

ROLES = ("ct", "pet", "label")


class StudyFolders:
    """One folder per study under the root, holding `ct` and `pet` and optionally `label`, each either a volume
    file (`ct.nii.gz`, `.nii`, `.nrrd`, `.mha`, `.mhd`) or a DICOM series folder (`ct/`), in any letter case
    (`CT.nii.gz`, `PET/`). Label values are the label set's. study_id = folder name; patient_id unknown (each
    study its own patient). A role found twice (`ct.nii.gz` and `ct/`) fails that study as ambiguous.
    """

    name = "study-folders"
    expects = "<study>/ct.nii.gz|ct/ and <study>/pet.nii.gz|pet/ (any letter case)"

    def detect(self, root: Path) -> bool:
        return root.is_dir() and any(volume_file(d, "ct") or volume_file(d, "pet") for d in visible_dirs(root))

    def discover(self, root: Path) -> Discovery:
        found = Discovery(self.name, looked=f"{root}: {self.expects} (folders seen: {len(visible_dirs(root))})")
        for folder in visible_dirs(root):
            entries = {role: volume_file(folder, role) for role in ROLES}
            if not entries["ct"] and not entries["pet"]:
                found.skipped.append((str(folder), f"no ct or pet volume ({self.expects})"))
                continue
            found.sources.append(self._source(folder, entries, len(found.sources)))
            found.pairing[folder.name] = ", ".join(f"{r}={e[0].name}" for r, e in entries.items() if e)
            found.skipped += [(str(p), "not a study file (ct, pet, label)") for p in sorted(folder.iterdir())
                              if not p.name.startswith(".") and p not in sum(entries.values(), [])]
        return found

    def _source(self, folder: Path, entries: dict[str, list[Path]], order: int) -> StudySource:
        twice = {role: found for role, found in entries.items() if len(found) > 1}
        missing = [role for role in ("ct", "pet") if not entries[role]]
        problem = None
        if twice:
            problem = ("ambiguous", "; ".join(f"{role} given {len(p)} times: {', '.join(x.name for x in p)}"
                                              for role, p in twice.items()) + ": keep one")
        elif missing:
            problem = ("missing_modality", f"{folder} has no {' or '.join(missing)} "
                       f"({'|'.join(m + e for m in missing for e in NIFTI_ENDINGS[:2])} or a {missing[0]}/ folder)")
        first = {role: (found[0].resolve() if found else None) for role, found in entries.items()}
        return StudySource(folder.name, first["ct"], first["pet"], first["label"],
                           "labeled" if first["label"] else "unlabeled", order, layout=self.name, problem=problem)
