"""nnU-Net v2 baseline on our folds: export a prepared cohort as an nnU-Net v2 raw dataset with our
cross-validation split, and read nnU-Net's fold summaries into the same Dice table as our fine-tune runs.

Export (`swinssl export-nnunet PREPARED --out nnUNet_raw/DatasetXXX_Name`), following nnU-Net's
documentation/dataset_format.md and manual_data_splits.md (MIC-DKFZ/nnUNet):

- `imagesTr/<study>_0000.nii.gz` CT in HU, `imagesTr/<study>_0001.nii.gz` PET in SUVbw, `labelsTr/<study>.nii.gz`
  uint8 with the label set's values, for every prepared study of the `labeled` cohort; with `include_unlabelled`,
  the other prepared studies go to `imagesTs/` (otherwise they are skipped and counted).
- The images are exactly our network's input, in nnU-Net's units: the shard's [0, 1] channels mapped back through
  each study's `ct_window` / `pet_window` (HU = lo + v * (hi - lo)). So values outside the windows were clipped by
  `prepare` (CT at -1000/1000 HU, PET at SUV 30 by default) and both channels are on the PET grid, the CT
  registered and resampled onto it (float32 NIfTI with the PET geometry; float16 in the shard: ~1 HU and ~0.015
  SUV steps near the top of the default windows). nnU-Net thus sees the same voxels as SwinUNETR does.
- `dataset.json`: `channel_names` {"0": "CT", "1": "PET"} ("CT" selects nnU-Net's CT normalisation, foreground
  intensity percentiles and mean/std over the training set; any other name, here "PET", per-image z-scoring),
  `labels` {name: value} from the label set (value 0 is called "background", which nnU-Net requires),
  `numTraining`, `file_ending` ".nii.gz", `overwrite_image_reader_writer` "SimpleITKIO".
- `splits_final.json`: a list of {"train": [...], "val": [...]} of case ids, one entry per fold: our folds
  (patient-grouped, lesion-stratified `make_folds` with `folds`/`seed`, default `CVConfig`'s), or a fine-tune
  run's `folds.json` (its "train" subset per fold when `cv.train_studies` chose one; folds it did not run get
  their full training set). Written into the raw folder (`nnUNetv2_plan_and_preprocess` copies it into
  nnUNet_preprocessed/DatasetXXX_Name/ when none is there) and, with `preprocessed`, straight into
  PREPROCESSED/DatasetXXX_Name/splits_final.json (where `nnUNetv2_train` reads it; a different split already
  there would make planning fail its consistency check).

Every file is written to a temp file and renamed; a rerun rewrites the dataset and removes the cases it no longer
holds, so `numTraining` always matches `imagesTr`.

Results (`swinssl report --nnunet NAME=RESULTS_DIR`): RESULTS_DIR is nnU-Net's
`nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>` folder; each finished
`fold_<k>/validation/summary.json` (written by `nnunetv2.evaluation.evaluate_predictions.compute_metrics_on_folder`)
is one fold. nnU-Net scores a case Dice 0 when the truth lacks a class the prediction has (NaN only when both lack
it); we score it NaN (MONAI `DiceMetric(ignore_empty=True)`, see the README's evaluation section). So the per-case
Dice is recomputed from nnU-Net's TP/FP/FN counts under our rule, and then averaged exactly as our runs are
(`swinssl.eval.families` and `summary.cv_summary`): per class the mean over the fold's cases where it is not NaN,
the fold's `mean` the mean of those per-class means, then mean and sample std over folds, NaN folds skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from petct.labels import LabelSet, read_label_set
from petct.shards import atomic_write_json, read_shard

from ..config import CVConfig, FinetuneConfig
from ..data.studies import read_manifest, select_studies
from ..eval.families import RESERVED_KEY, family
from ..eval.folds import fold_train_val
from ..eval.summary import cv_summary, jsonable

DATASET_NAME = re.compile(r"Dataset\d{3}_\w+", re.ASCII)
"""nnU-Net's dataset folder name: `Dataset`, a three-digit id, `_`, a name."""
CHANNELS = {"0": "CT", "1": "PET"}
FILE_ENDING = ".nii.gz"
SPLITS_FILE = "splits_final.json"
CASE_FOLDERS = ("imagesTr", "labelsTr", "imagesTs")


@dataclass
class NnUNetExport:
    """What `export_nnunet` wrote."""

    folder: Path
    train_ids: list[str]
    test_ids: list[str]
    skipped_unlabelled: int
    splits: list[dict[str, list[str]]]
    splits_source: str
    splits_files: list[Path] = field(default_factory=list)
    outside_splits: list[str] = field(default_factory=list)
    """Exported training cases in no fold's validation set (a fine-tune run made before they were prepared)."""

    def report(self) -> str:
        """What was written and the nnU-Net commands that come next."""
        dataset_id = int(self.folder.name[7:10])
        lines = [f"nnU-Net raw dataset: {self.folder} ({len(self.train_ids)} training cases, "
                 f"{len(self.test_ids)} in imagesTs)"]
        if self.skipped_unlabelled:
            lines.append(f"skipped {self.skipped_unlabelled} unlabelled studies (--include-unlabelled writes them to "
                         "imagesTs)")
        lines.append(f"splits: {len(self.splits)} folds from {self.splits_source} -> "
                     + ", ".join(str(p) for p in self.splits_files))
        if self.outside_splits:
            lines.append(f"note: {len(self.outside_splits)} training cases are in no validation fold: "
                         f"{self.outside_splits[:10]}")
        lines.append(f"next: export nnUNet_raw={self.folder.parent}; nnUNetv2_plan_and_preprocess -d {dataset_id} "
                     f"--verify_dataset_integrity; nnUNetv2_train {dataset_id} 3d_fullres 0")
        return "\n".join(lines)


def check_dataset_name(folder: str | Path) -> str:
    """The folder's name when it is a valid nnU-Net dataset name (`Dataset\\d{3}_\\w+`); ValueError otherwise: nnU-Net
    finds datasets by this name (`-d 1` looks for `Dataset001_*`), a folder named otherwise is never found."""
    name = Path(folder).name
    if not DATASET_NAME.fullmatch(name):
        raise ValueError(f"--out {folder}: the folder name {name!r} is not an nnU-Net dataset name: it must be "
                         "Dataset<3-digit id>_<name> (letters, digits, _), e.g. nnUNet_raw/Dataset501_PSMA")
    return name


def dataset_json(labels: LabelSet, num_training: int, name: str = "", description: str = "") -> dict:
    """nnU-Net v2 `dataset.json` for our two channels and `labels` (value 0 named "background", as nnU-Net
    requires). ValueError for a class nnU-Net would read differently: "ignore" is its ignore label (never trained,
    never scored), "background" must be value 0."""
    problems = [f"class {labels.name(v)!r} (value {v}): " + (
        "nnU-Net treats a class named 'ignore' as its ignore label (not trained, not scored)"
        if labels.name(v) == "ignore" else "nnU-Net reserves the name 'background' for value 0")
        for v in labels.foreground if labels.name(v) in ("ignore", "background")]
    if problems:
        raise ValueError("label set: " + "; ".join(problems) + "; rename it (prepare --labels FILE)")
    return {"name": name, "description": description, "channel_names": dict(CHANNELS),
            "labels": {"background": 0, **{labels.name(v): v for v in labels.foreground}},
            "numTraining": num_training, "file_ending": FILE_ENDING, "overwrite_image_reader_writer": "SimpleITKIO"}


def to_units(image: np.ndarray, ct_window, pet_window) -> tuple[np.ndarray, np.ndarray]:
    """(CT in HU, PET in SUV), float32, from a shard's (2, Z, Y, X) [0, 1] image: the inverse of `prepare`'s window
    mapping (clipped values stay at the window's ends)."""
    (ct_lo, ct_hi), (pet_lo, pet_hi) = (map(float, w) for w in (ct_window, pet_window))
    ct = np.float32(ct_lo) + image[0].astype(np.float32) * np.float32(ct_hi - ct_lo)
    pet = np.float32(pet_lo) + image[1].astype(np.float32) * np.float32(pet_hi - pet_lo)
    return ct, pet


def splits_from_folds(folds: list[list[str]], train: dict[str, list[str]] | None = None) -> list[dict]:
    """nnU-Net's split list from our folds: fold k validates on `folds[k]` and trains on `train[str(k)]` when given
    (a label-efficiency subset), else on every other fold. ValueError when a given training set holds a study
    outside the other folds."""
    splits = []
    for k in range(len(folds)):
        train_ids, val_ids = fold_train_val(folds, k)
        chosen = (train or {}).get(str(k))
        if chosen is not None:
            foreign = sorted(set(chosen) - set(train_ids))
            if foreign:
                raise ValueError(f"fold {k}: training studies {foreign[:10]} are not in the other folds")
            train_ids = sorted(chosen)
        splits.append({"train": train_ids, "val": val_ids})
    return splits


def finetune_splits(run_dir: str | Path) -> tuple[list[dict], str]:
    """(splits, source) from a fine-tune output folder's folds.json (see swinssl.train.finetune)."""
    path = Path(run_dir) / "folds.json"
    if not path.is_file():
        raise ValueError(f"--finetune {run_dir}: no folds.json there: give a `swinssl finetune` output_dir")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    folds = data.get("folds") if isinstance(data, dict) else None
    if not isinstance(folds, list) or len(folds) < 2 or not all(isinstance(f, list) and f for f in folds):
        raise ValueError(f"{path}: 'folds' must be a list of at least 2 non-empty lists of study ids")
    train = data.get("train") or {}
    if not isinstance(train, dict):
        raise ValueError(f"{path}: 'train' must map a fold index to its training study ids")
    try:
        return splits_from_folds([[str(s) for s in f] for f in folds], train), f"{path} (seed {data.get('seed')})"
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def computed_splits(prepared: Path, labels: LabelSet, folds: int | None, seed: int | None) -> tuple[list[dict], str]:
    """(splits, source) from `make_folds` on the prepared folder, exactly as `swinssl finetune` with
    cv.folds / cv.seed would split it (defaults: CVConfig's)."""
    from ..train.finetune import make_folds

    defaults = CVConfig()
    cv = CVConfig(folds=defaults.folds if folds is None else folds, seed=defaults.seed if seed is None else seed)
    try:
        ours = make_folds(FinetuneConfig(cv=cv), select_studies(prepared, "labeled", "all"), labels)
    except ValueError as exc:
        raise ValueError(f"--folds {cv.folds}: {exc}") from None
    return splits_from_folds(ours), f"make_folds(folds={cv.folds}, seed={cv.seed})"


def check_splits(splits: list[dict], cases: list[str], patient_of: dict[str, str]) -> list[str]:
    """The exported cases in no validation fold; ValueError when a split names a case that is not exported or puts
    one patient in both training and validation of a fold (nnU-Net would fail, or leak)."""
    known, problems = set(cases), []
    for k, split in enumerate(splits):
        unknown = sorted((set(split["train"]) | set(split["val"])) - known)
        if unknown:
            problems.append(f"fold {k} names studies that are not labelled prepared studies here: {unknown[:10]}")
        shared = sorted({patient_of.get(s, s) for s in split["train"]} & {patient_of.get(s, s) for s in split["val"]})
        if shared:
            problems.append(f"fold {k} has patients in both training and validation: {shared[:10]}")
    if problems:
        raise ValueError("splits: " + "; ".join(problems))
    validated = {s for split in splits for s in split["val"]}
    return sorted(known - validated)


def export_nnunet(prepared: str | Path, out: str | Path, *, finetune: str | Path | None = None,
                  folds: int | None = None, seed: int | None = None, preprocessed: str | Path | None = None,
                  include_unlabelled: bool = False, progress: bool = True) -> NnUNetExport:
    """Write `prepared`'s labelled cohort as the nnU-Net v2 raw dataset `out` with our folds (module docstring).
    Everything is checked (name, folder, label set, splits) before anything is written."""
    name = check_dataset_name(out)
    prepared, out = Path(prepared).resolve(), Path(out).resolve()
    if not (prepared / "manifest.jsonl").is_file():
        raise ValueError(f"{prepared}: no manifest.jsonl: PREPARED must be the output folder of `swinssl prepare`")
    if finetune is not None and (folds is not None or seed is not None):
        raise ValueError("give either --finetune RUN_DIR (its folds.json) or --folds/--seed, not both")
    labels = read_label_set(prepared)
    records = [r for r in read_manifest(prepared) if r.get("status") == "ok"]
    train_ids = [s.study_id for s in select_studies(prepared, "labeled", "all")]
    labelled = set(train_ids)
    meta = dataset_json(labels, len(train_ids), name.split("_", 1)[1], f"swinssl export-nnunet of {prepared}: CT in "
                        "HU and PET in SUVbw on the PET grid, clipped to the prepare windows")
    splits, source = finetune_splits(finetune) if finetune is not None else computed_splits(prepared, labels, folds,
                                                                                             seed)
    outside = check_splits(splits, train_ids, {r["study_id"]: str(r.get("patient_id") or r["study_id"])
                                               for r in records})
    others = [r for r in records if r["study_id"] not in labelled]
    test = others if include_unlabelled else []
    _write_cases(prepared, out, [r for r in records if r["study_id"] in labelled], test, progress)
    atomic_write_json(out / "dataset.json", meta)
    files = [out / SPLITS_FILE] + ([Path(preprocessed).resolve() / name / SPLITS_FILE] if preprocessed else [])
    for path in files:
        atomic_write_json(path, splits)
    return NnUNetExport(out, train_ids, [r["study_id"] for r in test], len(others) - len(test), splits, source, files,
                        outside)


def _write_cases(prepared: Path, out: Path, train: list[dict], test: list[dict], progress: bool) -> None:
    """Every case's files (temp files in out/.tmp, then renamed), then the removal of files no case wrote."""
    from tqdm.auto import tqdm

    tmp = out / ".tmp"
    for folder in CASE_FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    tmp.mkdir(exist_ok=True)
    written: set[Path] = set()
    jobs = [("imagesTr", r) for r in train] + [("imagesTs", r) for r in test]
    for split, record in tqdm(jobs, desc="export-nnunet", unit="study", disable=not progress):
        written |= _write_case(prepared, out, split, record, tmp)
    for folder in CASE_FOLDERS:
        for stale in (out / folder).glob(f"*{FILE_ENDING}"):
            if stale not in written:
                stale.unlink()
    shutil.rmtree(tmp, ignore_errors=True)


def _write_case(prepared: Path, out: Path, split: str, record: dict, tmp: Path) -> set[Path]:
    sid = record["study_id"]
    windows = [record.get("ct_window"), record.get("pet_window")]
    if any(not isinstance(w, list) or len(w) != 2 for w in windows):
        raise ValueError(f"study {sid}: its manifest record has no ct_window/pet_window: prepare it again")
    study = read_shard(prepared / record["shard"])
    ct, pet = to_units(study.image, *windows)
    files = {out / split / f"{sid}_0000{FILE_ENDING}": ct, out / split / f"{sid}_0001{FILE_ENDING}": pet}
    if split == "imagesTr":
        if study.label is None:
            raise ValueError(f"study {sid}: in the labeled cohort but its shard {record['shard']} has no label")
        files[out / "labelsTr" / f"{sid}{FILE_ENDING}"] = study.label.astype(np.uint8)
    for path, array in files.items():
        _write_image(study.to_sitk(array), path, tmp)
    return set(files)


def _write_image(image: sitk.Image, path: Path, tmp: Path) -> None:
    """Write then rename (the temp file outside the case folders: nnU-Net lists every *.nii.gz in them)."""
    part = tmp / f"{uuid.uuid4().hex}{FILE_ENDING}"
    try:
        sitk.WriteImage(image, str(part), useCompression=True)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


# --- nnU-Net results -> our metrics.json structure -----------------------------------------------------------------

def results_labels(meta: dict, source: str) -> LabelSet:
    """Our label set from an nnU-Net dataset.json `labels` {name: value} (the ignore label left out; region-based
    labels refused: they have no one value per class)."""
    raw = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{source}: no 'labels' mapping of class name -> value")
    regions = {n: v for n, v in raw.items() if not isinstance(v, int) or isinstance(v, bool)}
    if regions:
        raise ValueError(f"{source}: region-based labels {regions} cannot be scored per class")
    return LabelSet.from_dict({v: n for n, v in raw.items() if n != "ignore"}, source)


def case_dice(metrics: dict, labels: LabelSet, source: str) -> dict[str, float]:
    """{class name: Dice, "mean": mean of the non-NaN classes} of one `metric_per_case` entry, under our rule:
    NaN where the truth lacks the class (nnU-Net: 0 when only the prediction has it)."""
    row = {}
    for value in labels.foreground:
        entry = metrics.get(str(value))
        if not isinstance(entry, dict) or not {"TP", "FP", "FN"} <= set(entry):
            raise ValueError(f"{source}: no TP/FP/FN for label {value} ({labels.name(value)})")
        tp, fp, fn = (float(entry[k]) for k in ("TP", "FP", "FN"))
        row[labels.name(value)] = math.nan if tp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    kept = [v for v in row.values() if not math.isnan(v)]
    return {**row, RESERVED_KEY: sum(kept) / len(kept) if kept else math.nan}


def fold_summaries(results_dir: Path) -> dict[int, Path]:
    """{k: fold_<k>/validation/summary.json} of the finished folds (numbered ones; `fold_all` is not a CV fold)."""
    found = {}
    for folder in results_dir.glob("fold_*"):
        if folder.name[5:].isdigit() and (folder / "validation" / "summary.json").is_file():
            found[int(folder.name[5:])] = folder / "validation" / "summary.json"
    if not found:
        raise ValueError(f"--nnunet {results_dir}: no fold_<k>/validation/summary.json (nnUNetv2_train writes it when "
                         "a fold's training ends; `nnUNetv2_train ... --val` writes it again)")
    return dict(sorted(found.items()))


def read_nnunet_results(results_dir: str | Path) -> dict:
    """An nnU-Net results folder (`<trainer>__<plans>__<configuration>`) as our metrics.json: `labels`,
    `metric_families` ["dice"], `studies`, `folds`, `summary` {"dice": {class: {"mean", "std"}, "mean": ...}};
    NaN as None. Averaged as our runs are (module docstring)."""
    root = Path(results_dir).resolve()
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise ValueError(f"--nnunet {root}: no dataset.json: give nnUNet_results/DatasetXXX_Name/"
                         "<trainer>__<plans>__<configuration>")
    labels = results_labels(json.loads(meta_path.read_text()), str(meta_path))
    ending = json.loads(meta_path.read_text()).get("file_ending", FILE_ENDING)
    studies, folds = {}, {}
    for k, path in fold_summaries(root).items():
        cases = json.loads(path.read_text()).get("metric_per_case") or []
        if not cases:
            raise ValueError(f"{path}: no metric_per_case entries")
        rows = {}
        for case in cases:
            cid = Path(case.get("reference_file") or case["prediction_file"]).name.removesuffix(ending)
            rows[cid] = case_dice(case.get("metrics") or {}, labels, f"{path} case {cid}")
            studies[cid] = {"fold": k, "metrics": {"dice": rows[cid]}}
        folds[str(k)] = {"studies": sorted(rows), "metrics": {"dice": family("dice").fold(list(rows.values()))}}
    summary = cv_summary([f["metrics"] for f in folds.values()])
    return jsonable({"labels": labels.to_dict(), "metric_families": ["dice"], "source": f"nnU-Net {root}",
                     "folds": folds, "studies": studies, "summary": summary})


def nnunet_runs(items: list[str]) -> dict[str, dict]:
    """`--nnunet NAME=RESULTS_DIR ...` -> {name: metrics.json-like dict} (a bare DIR is named after its folder)."""
    runs = {}
    for item in items:
        name, _, folder = item.partition("=")
        runs[name if folder else Path(name).name] = read_nnunet_results(folder or name)
    return runs
