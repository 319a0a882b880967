"""nnU-Net v2 raw dataset: `dataset.json`, `imagesTr/<case>_<XXXX><ending>`, `labelsTr/<case><ending>`, `imagesTs`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..study import StudySource
from .base import Discovery, safe_id, unique_ids

PET_NAMES = ("pet", "pt", "suv")


def _channel(channels: dict, names: tuple[str, ...], role: str, path: Path) -> int:
    if not channels or not all(str(k).isdigit() for k in channels):
        raise ValueError(f"{path}: channel_names must map channel numbers to names, e.g. {{\"0\": \"CT\", \"1\": "
                         f"\"PET\"}}; got {channels}")
    hits = sorted(int(k) for k, v in channels.items() if str(v).strip().lower() in names)
    if len(hits) != 1:
        raise ValueError(f"{path}: channel_names {channels} must name exactly one {role} channel "
                         f"({' or '.join(n.upper() for n in names)}, any case); found {len(hits)}")
    return hits[0]


def _label_map(labels: dict, path: Path) -> dict[int, str]:
    regions = {name: v for name, v in labels.items() if not isinstance(v, int) or isinstance(v, bool)}
    if regions:
        raise ValueError(f"{path}: region-based labels {regions} are not supported (each class needs one integer "
                         "value); give the dataset's plain label values")
    return {int(v): str(name) for name, v in labels.items()}


class NnUNetRaw:
    """nnU-Net v2 raw dataset (`DatasetXXX_Name/`): `dataset.json` names the channels (`channel_names`, e.g.
    `{"0": "CT", "1": "PET"}`: the CT channel is named "CT", the PET channel "PET", "PT" or "SUV", any case; the PET
    must hold SUVbw) and the classes (`labels`, `{"background": 0, "lesion": 1}`: translated through the label set
    by name; region-based labels are refused). Cases: `imagesTr/<case>_<4-digit channel><file_ending>` with
    `labelsTr/<case><file_ending>` (labelled), `imagesTs/...` (unlabelled). study_id = case id; patient_id unknown.
    """

    name = "nnunet-raw"
    expects = "dataset.json with imagesTr/<case>_0000.nii.gz (nnU-Net v2 raw)"

    def detect(self, root: Path) -> bool:
        return (root / "dataset.json").is_file() and any((root / d).is_dir() for d in ("imagesTr", "imagesTs"))

    def discover(self, root: Path) -> Discovery:
        meta_path = root / "dataset.json"
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc})") from None
        channels, ending = meta.get("channel_names") or meta.get("modality") or {}, meta.get("file_ending", ".nii.gz")
        ct, pet = _channel(channels, ("ct",), "CT", meta_path), _channel(channels, PET_NAMES, "PET", meta_path)
        label_map = _label_map(meta.get("labels") or {}, meta_path)
        found = Discovery(self.name, looked=f"{root}: {self.expects}")
        found.skipped += [(f"channel {k} ({v})", "neither the CT nor the PET channel: not used")
                          for k, v in sorted(channels.items()) if int(k) not in (ct, pet)]
        cases = [(split, case) for split in ("imagesTr", "imagesTs")
                 for case in self._cases(root / split, ending, found)]
        ids = unique_ids(safe_id(case) for _, case in cases)
        for order, (sid, (split, case)) in enumerate(zip(ids, cases, strict=True)):
            found.sources.append(self._source(root, split, case, sid, (ct, pet), ending, label_map, order))
            s = found.sources[-1]
            found.pairing[sid] = f"{split}/{case}: CT channel {ct:04d}, PET channel {pet:04d}" + (
                f", label labelsTr/{case}{ending}" if s.label else "")
        return found

    def _cases(self, folder: Path, ending: str, found: Discovery) -> list[str]:
        if not folder.is_dir():
            return []
        pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
        cases = []
        for file in sorted(folder.iterdir()):
            match = pattern.match(file.name)
            if match is None:
                found.skipped.append((str(file), f"not <case>_<4-digit channel>{ending}"))
            elif match.group(1) not in cases:
                cases.append(match.group(1))
        return cases

    def _source(self, root: Path, split: str, case: str, sid: str, channels: tuple[int, int], ending: str,
                label_map: dict[int, str], order: int) -> StudySource:
        ct, pet = (root / split / f"{case}_{c:04d}{ending}" for c in channels)
        label = root / "labelsTr" / f"{case}{ending}" if split == "imagesTr" else None
        missing = [f"{p.name} ({role})" for p, role in ((ct, "CT"), (pet, "PET")) if not p.is_file()]
        problem = ("missing_modality", f"{root / split}: case {case} lacks {', '.join(missing)}") if missing else None
        if label is not None and not label.is_file():
            problem = problem or ("missing_modality", f"training case {case} has no label {label}")
        return StudySource(sid, ct.resolve(), pet.resolve(), label.resolve() if label else None,
                           "labeled" if label else "unlabeled", order, label_map=label_map if label else None,
                           layout=self.name, problem=problem)
