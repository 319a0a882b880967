"""`swinssl export-nnunet` and `swinssl report --nnunet` (swinssl.deploy.nnunet) against real nnU-Net v2 code.

The export of the session's `tiny_prepared` folder (2 labelled + 2 unlabelled small studies) must pass nnU-Net's own
`verify_dataset_integrity` without an error or warning, hold HU / SUV that re-normalise to the shard's [0, 1]
values on the PET geometry, carry our folds as splits_final.json, and read back through our own nnU-Net raw layout
into the same shards. The report side reads `summary.json` files written by nnU-Net's own
`compute_metrics_on_folder` on real label files, checked against MONAI's DiceMetric and against our own scoring of
the same predictions (same numbers in both columns of one table). No Ray.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from petct.labels import read_label_set
from petct.shards import read_shard
from swinssl.cli import main
from swinssl.config import CVConfig, FinetuneConfig
from swinssl.data.studies import read_manifest, select_studies
from swinssl.deploy.nnunet import check_splits, export_nnunet, read_nnunet_results, splits_from_folds
from swinssl.train.finetune import make_folds

NAME = "Dataset501_Tiny"
TRAINER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


@pytest.fixture(scope="module")
def exported(tiny_prepared, tmp_path_factory):
    """(raw dataset folder, preprocessed root, NnUNetExport): 2 folds, unlabelled studies in imagesTs."""
    base = tmp_path_factory.mktemp("nnunet")
    result = export_nnunet(tiny_prepared, base / "raw" / NAME, folds=2, seed=0, preprocessed=base / "pre",
                           include_unlabelled=True, progress=False)
    return base / "raw" / NAME, base / "pre", result


def _records(prepared: Path) -> dict[str, dict]:
    return {r["study_id"]: r for r in read_manifest(prepared) if r.get("status") == "ok"}


def test_export_passes_nnunets_integrity_check(exported, tiny_prepared, capfd):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder, _, result = exported
    meta = json.loads((folder / "dataset.json").read_text())
    labels = read_label_set(tiny_prepared)
    assert meta["channel_names"] == {"0": "CT", "1": "PET"} and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, **{labels.name(v): v for v in labels.foreground}}
    labelled = sorted(s.study_id for s in select_studies(tiny_prepared, "labeled", "all"))
    assert meta["numTraining"] == len(labelled) == 2 and sorted(result.train_ids) == labelled
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{s}.nii.gz" for s in labelled]
    assert len(list((folder / "imagesTs").glob("*_0001.nii.gz"))) == len(result.test_ids) == 2
    capfd.readouterr()
    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any error
    out = capfd.readouterr().out
    assert "verify_dataset_integrity Done" in out and "Error" not in out and "Warning" not in out, out


def test_exported_values_are_hu_and_suv_of_the_shard(exported, tiny_prepared):
    folder, _, result = exported
    records = _records(tiny_prepared)
    for sid in result.train_ids + result.test_ids:
        split = "imagesTr" if sid in result.train_ids else "imagesTs"
        study = read_shard(tiny_prepared / records[sid]["shard"])
        for channel, window in enumerate((records[sid]["ct_window"], records[sid]["pet_window"])):
            image = sitk.ReadImage(str(folder / split / f"{sid}_{channel:04d}.nii.gz"))
            assert image.GetPixelID() == sitk.sitkFloat32
            assert image.GetSpacing() == pytest.approx(study.spacing) and image.GetOrigin() == pytest.approx(
                study.origin) and image.GetDirection() == pytest.approx(study.direction)
            values = sitk.GetArrayFromImage(image)
            lo, hi = window
            assert values.min() >= lo - 1e-3 and values.max() <= hi + 1e-3  # clipped by prepare
            np.testing.assert_allclose((values - lo) / (hi - lo), study.image[channel], atol=1e-6)
        if split == "imagesTr":
            label = sitk.ReadImage(str(folder / "labelsTr" / f"{sid}.nii.gz"))
            assert label.GetPixelID() == sitk.sitkUInt8
            np.testing.assert_array_equal(sitk.GetArrayFromImage(label), study.label)
    assert not (folder / ".tmp").exists()


def test_splits_final_are_our_patient_grouped_folds(exported, tiny_prepared):
    folder, pre, _ = exported
    studies = select_studies(tiny_prepared, "labeled", "all")
    ours = make_folds(FinetuneConfig(cv=CVConfig(folds=2, seed=0)), studies, read_label_set(tiny_prepared))
    raw = json.loads((folder / "splits_final.json").read_text())
    assert json.loads((pre / NAME / "splits_final.json").read_text()) == raw
    assert [s["val"] for s in raw] == ours
    patient = {s.study_id: s.patient_id for s in studies}
    for k, split in enumerate(raw):
        assert sorted(split["train"]) == sorted(s for j, f in enumerate(ours) if j != k for s in f)
        assert not {patient[s] for s in split["train"]} & {patient[s] for s in split["val"]}


def test_finetune_folds_json_is_honoured(tiny_prepared, tmp_path):
    studies = sorted(s.study_id for s in select_studies(tiny_prepared, "labeled", "all"))
    computed = make_folds(FinetuneConfig(cv=CVConfig(folds=2, seed=0)), select_studies(tiny_prepared, "labeled"),
                          read_label_set(tiny_prepared))
    folds = computed[::-1]  # another split than --folds 2 --seed 0 would give
    run = tmp_path / "ft"
    run.mkdir()
    (run / "folds.json").write_text(json.dumps({"seed": 7, "folds": folds, "train": {"0": folds[1]}}))
    result = export_nnunet(tiny_prepared, tmp_path / NAME, finetune=run, progress=False)
    assert json.loads((tmp_path / NAME / "splits_final.json").read_text()) == result.splits == [
        {"train": folds[1], "val": folds[0]}, {"train": folds[0], "val": folds[1]}]
    assert str(run / "folds.json") in result.splits_source and sorted(result.train_ids) == studies
    (run / "folds.json").write_text(json.dumps({"folds": [["lab_0000"], ["someone_else"]]}))
    with pytest.raises(ValueError, match="someone_else"):
        export_nnunet(tiny_prepared, tmp_path / NAME, finetune=run, progress=False)


def test_training_subsets_and_patient_leaks():
    folds = [["a", "b"], ["c"], ["d"]]
    splits = splits_from_folds(folds, {"0": ["c"]})  # fold 0 trains on a label-efficiency subset, the others on all
    assert splits == [{"train": ["c"], "val": ["a", "b"]}, {"train": ["a", "b", "d"], "val": ["c"]},
                      {"train": ["a", "b", "c"], "val": ["d"]}]
    with pytest.raises(ValueError, match=r"fold 1: training studies \['e'\]"):
        splits_from_folds(folds, {"1": ["a", "e"]})
    assert check_splits(splits, ["a", "b", "c", "d", "e"], {}) == ["e"]
    with pytest.raises(ValueError, match="patients in both.*'p1'"):
        check_splits(splits, ["a", "b", "c", "d"], {"b": "p1", "c": "p1"})


def test_rerun_replaces_the_dataset(tiny_prepared, tmp_path):
    out = tmp_path / NAME
    export_nnunet(tiny_prepared, out, folds=2, include_unlabelled=True, progress=False)
    assert len(list((out / "imagesTs").iterdir())) == 4
    again = export_nnunet(tiny_prepared, out, folds=2, progress=False)
    assert again.skipped_unlabelled == 2 and not list((out / "imagesTs").iterdir())
    assert "skipped 2 unlabelled studies" in again.report()
    assert len(list((out / "imagesTr").iterdir())) == 2 * json.loads((out / "dataset.json").read_text())["numTraining"]


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_export_and_refusals(tiny_prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    code, out, err = _cli(["export-nnunet", str(tiny_prepared), "--out", str(tmp_path / NAME), "--folds", "2",
                           "--quiet"], capsys)
    assert code == 0, err
    assert "nnUNetv2_plan_and_preprocess -d 501" in out and (tmp_path / "pre" / NAME / "splits_final.json").is_file()
    for argv, names in [
        (["--out", str(tmp_path / "Dataset1_Short"), "--folds", "2"], ["Dataset1_Short", "Dataset<3-digit id>"]),
        (["--out", str(tmp_path / "Dataset502_Bad-Name"), "--folds", "2"], ["Dataset502_Bad-Name"]),
        (["--out", str(tmp_path / NAME)], ["--folds 5", "2 patients"]),  # CVConfig's default 5 folds, 2 studies
        (["--out", str(tmp_path / NAME), "--finetune", str(tmp_path), "--folds", "2"], ["--finetune", "--folds"]),
        (["--out", str(tmp_path / NAME), "--finetune", str(tmp_path)], ["folds.json"]),
    ]:
        code, _, err = _cli(["export-nnunet", str(tiny_prepared), *argv, "--quiet"], capsys)
        assert code == 2 and "Traceback" not in err and err.startswith("swinssl export-nnunet: error: "), err
        assert all(n in err for n in names), (names, err)
    code, _, err = _cli(["export-nnunet", str(tmp_path), "--out", str(tmp_path / NAME), "--folds", "2"], capsys)
    assert code == 2 and "manifest.jsonl" in err and "swinssl prepare" in err, err


def test_export_reads_back_through_our_nnunet_layout(exported, tiny_prepared, tmp_path):
    from petct.config import PrepareConfig
    from petct.layouts import discover
    from petct.pipeline import prepare_cohort

    folder, _, _ = exported
    found = discover(folder)
    assert found.layout == "nnunet-raw"
    assert {s.study_id: s.cohort for s in found.sources} == {
        sid: ("labeled" if r["labeled"] else "unlabeled") for sid, r in _records(tiny_prepared).items()}
    cfg = PrepareConfig(qc_png=False, labels=read_label_set(tiny_prepared))
    cfg = replace(cfg, registration=replace(cfg.registration, enabled=False))
    assert prepare_cohort(folder, tmp_path / "again", cfg, workers=0, progress=False).exit_code == 0
    before, after = _records(tiny_prepared), _records(tmp_path / "again")
    for sid in before:
        a, b = read_shard(tiny_prepared / before[sid]["shard"]), read_shard(tmp_path / "again" / after[sid]["shard"])
        np.testing.assert_allclose(b.image, a.image, atol=1e-3)  # float16 shards: one step near 1.0 is 4.9e-4
        assert (a.label is None and b.label is None) or np.array_equal(a.label, b.label)
        assert b.spacing == pytest.approx(a.spacing) and b.origin == pytest.approx(a.origin)


# --- nnU-Net results --------------------------------------------------------------------------------------------

def _write_label(array: np.ndarray, like: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


@pytest.fixture(scope="module")
def nnunet_results(exported, tiny_prepared, tmp_path_factory):
    """An nnU-Net results folder laid out as nnUNetv2_train leaves it, each fold's summary.json written by nnU-Net's
    own compute_metrics_on_folder: (trainer folder, {case: (prediction, truth)}, labels, splits).

    Truth: the exported label, with one class erased in the first case (the prediction still has it: nnU-Net says
    Dice 0, we say NaN). Prediction: the label shifted by one voxel along x, one other class dropped in the second
    case (Dice 0 for both scorers)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder, _, result = exported
    labels = read_label_set(tiny_prepared)
    root = tmp_path_factory.mktemp("nnunet_results") / NAME / TRAINER
    root.mkdir(parents=True)
    shutil.copy(folder / "dataset.json", root / "dataset.json")
    gt, cases = root.parent / "gt_segmentations", {}
    first, second = sorted(result.train_ids)
    for sid in (first, second):
        like = sitk.ReadImage(str(folder / "labelsTr" / f"{sid}.nii.gz"))
        label = sitk.GetArrayFromImage(like)
        truth, pred = label.copy(), np.roll(label, 1, axis=2)
        if sid == first:
            truth[truth == labels.value("spleen")] = 0
        else:
            pred[pred == labels.value("liver")] = 0
        _write_label(truth, like, gt / f"{sid}.nii.gz")
        cases[sid] = (pred, truth)
    for k, split in enumerate(result.splits):
        validation = root / f"fold_{k}" / "validation"
        for sid in split["val"]:
            _write_label(cases[sid][0], sitk.ReadImage(str(gt / f"{sid}.nii.gz")), validation / f"{sid}.nii.gz")
        compute_metrics_on_folder(str(gt), str(validation), str(validation / "summary.json"), SimpleITKIO(),
                                  ".nii.gz", list(labels.foreground), None, num_processes=1)
    return root, cases, labels, result.splits


def _monai_dice(cases: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> np.ndarray:
    """MONAI DiceMetric(include_background=False, ignore_empty=True, mean_batch) per class; NaN where no case has
    the class in its truth (MONAI writes 0.0 with not_nans 0)."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="mean_batch", get_not_nans=True, ignore_empty=True,
                        num_classes=num_classes)
    for pred, truth in cases:
        metric(one_hot(torch.from_numpy(pred[None, None].astype(np.int64)), num_classes),
               one_hot(torch.from_numpy(truth[None, None].astype(np.int64)), num_classes))
    values, not_nans = metric.aggregate()
    return np.where(not_nans.numpy() > 0, values.numpy(), np.nan)


def test_nnunet_fold_dice_read_like_ours(nnunet_results):
    root, cases, labels, splits = nnunet_results
    read = read_nnunet_results(root)
    assert sorted(read["folds"]) == ["0", "1"] and read["metric_families"] == ["dice"]
    per_fold = []
    for k, split in enumerate(splits):
        expected = _monai_dice([cases[s] for s in split["val"]], labels.num_classes)
        per_fold.append(expected)
        nnunet_own = json.loads((root / f"fold_{k}" / "validation" / "summary.json").read_text())["mean"]
        fold = read["folds"][str(k)]["metrics"]["dice"]
        for value in labels.foreground:
            name, want = labels.name(value), expected[value - 1]
            got = math.nan if fold[name] is None else fold[name]
            assert got == pytest.approx(want, abs=1e-6, nan_ok=True), (k, name)
            truth_has = any((cases[s][1] == value).any() for s in split["val"])
            if truth_has:  # where the truth has the class, nnU-Net's own mean is ours
                assert got == pytest.approx(nnunet_own[str(value)]["Dice"], abs=1e-6), (k, name)
        assert fold["mean"] == pytest.approx(np.nanmean(expected), abs=1e-6)
    erased = labels.value("spleen")  # truth lacks it in one case, the prediction has it: nnU-Net 0, ours NaN
    fold_of_first = next(k for k, s in enumerate(splits) if sorted(cases)[0] in s["val"])
    own = json.loads((root / f"fold_{fold_of_first}" / "validation" / "summary.json").read_text())["mean"]
    assert own[str(erased)]["Dice"] == 0.0 and read["folds"][str(fold_of_first)]["metrics"]["dice"]["spleen"] is None
    summary = read["summary"]["dice"]
    for value in labels.foreground:
        kept = [f[value - 1] for f in per_fold if not math.isnan(f[value - 1])]
        assert summary[labels.name(value)]["mean"] == pytest.approx(np.mean(kept), abs=1e-6)
        assert summary[labels.name(value)]["std"] == pytest.approx(np.std(kept, ddof=1) if len(kept) > 1 else 0.0,
                                                                   abs=1e-6)


def test_report_puts_nnunet_and_our_columns_in_one_table(nnunet_results, tmp_path, capsys):
    """Our own scoring of the same prediction files (study_metrics -> fold_metrics -> cv_summary, as `finetune`
    writes metrics.json) and the nnU-Net column must agree cell for cell."""
    from swinssl.eval.families import study_metrics
    from swinssl.eval.summary import cv_summary, fold_metrics, jsonable

    root, cases, labels, splits = nnunet_results
    folds = [fold_metrics([study_metrics(*cases[s], (1.0, 1.0, 1.0), labels, ["dice"]) for s in split["val"]])
             for split in splits]
    run = tmp_path / "ours"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(jsonable({"labels": labels.to_dict(), "summary": cv_summary(folds)})))
    code, out, err = _cli(["report", "--runs", f"ours={run}", "--nnunet", f"nnunet={root}"], capsys)
    assert code == 0, err
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| class")}
    assert set(rows) == {*(labels.name(v) for v in labels.foreground), "**mean**"}
    assert all(ours == theirs for ours, theirs in rows.values()), rows
    assert rows["spleen"][1] != "n/a" and "nnunet: nnU-Net folds 0, 1" in out
    code, _, err = _cli(["report", "--runs", f"nnunet={run}", "--nnunet", f"nnunet={root}"], capsys)
    assert code == 2 and "nnunet" in err
    code, _, err = _cli(["report", "--runs", f"ours={run}", "--nnunet", f"nnunet={tmp_path}"], capsys)
    assert code == 2 and "dataset.json" in err
