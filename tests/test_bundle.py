"""`swinssl bundle`: the MONAI bundle of one fold, checked with MONAI's own tools and against `predict_volume`.

The model is a tiny random SwinUNETR (feature_size 12, roi 64) saved as a fold file and packaged with
`write_package`: no training, no Ray. Its logits differ from voxel to voxel, so any change of what the network sees
(axis order, crop, windows, weights) changes the labels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from monai.networks.nets import SwinUNETR

from petct.export import export_study, manifest_records
from petct.labels import PSMA, LabelSet
from petct.shards import read_shard
from swinssl.cli import main
from swinssl.config import FinetuneConfig
from swinssl.deploy.bundle import NETWORK_ORDER, SCHEMA, inference_config, write_bundle
from swinssl.deploy.package import TrainedModel, load_trained, write_package
from swinssl.eval.infer import _grow_to_roi, body_box, predict_volume
from swinssl.tasks.segment import SegmentationTask

FOLD = 1
STUDY = "lab_0000"
ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # in-plane rotation: not the identity
# python -m monai.bundle, with swinssl and petct made unimportable: the bundle must not need them
RUNNER = ("import runpy, sys; sys.modules.update(swinssl=None, petct=None); "
          "runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)")


def _config(roi=(64, 64, 64), classes: int = PSMA.num_classes) -> FinetuneConfig:
    cfg = FinetuneConfig(name="tiny")
    cfg.model.feature_size, cfg.model.out_channels, cfg.data.roi = 12, classes, list(roi)
    return cfg


@pytest.fixture(scope="module")
def package(tiny_prepared, tmp_path_factory) -> Path:
    """A model package of one random fold (`fold_1.pt`), with the tiny cohort's prepare settings."""
    base = tmp_path_factory.mktemp("bundle_model")
    cfg = _config()
    torch.manual_seed(0)
    torch.save(SegmentationTask(cfg, None).build_model().state_dict(), base / f"fold_{FOLD}.pt")
    prepare = json.loads((tiny_prepared / "prepare_config.json").read_text())
    model = TrainedModel(cfg, PSMA, prepare, {FOLD: base / f"fold_{FOLD}.pt"}, {"run_dir": "tests/tiny"})
    return write_package(model, base / "package")


@pytest.fixture(scope="module")
def bundle(package, tmp_path_factory) -> Path:
    return write_bundle(load_trained(package), tmp_path_factory.mktemp("b") / "bundle", FOLD)


def test_layout_and_weights_load_into_a_plain_monai_swinunetr(bundle, package):
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / name).is_file(), name
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    net = SwinUNETR(in_channels=2, out_channels=PSMA.num_classes, feature_size=12)
    net.load_state_dict(state)  # strict: every key and shape
    expected = torch.load(package / f"fold_{FOLD}.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    config = (bundle / "configs" / "inference.json").read_text()
    assert not [word for word in ("import swinssl", "swinssl.", "petct") if word in config]
    readme = (bundle / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run --config_file configs/inference.json" in readme
    assert "--ct-window -1000,1000 --pet-window 0,30 --no-registration" in readme
    assert all(name in readme for name in PSMA.names)


def test_metadata_describes_the_network_and_monai_checks_its_input_and_output(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == [64, 64, 64]
    assert fmt["inputs"]["image"]["num_channels"] == 2 and fmt["inputs"]["image"]["value_range"] == [0, 1]
    assert "[-1000, 1000]" in fmt["inputs"]["image"]["channel_def"]["0"]
    assert "[0, 30]" in fmt["inputs"]["image"]["channel_def"]["1"]
    assert fmt["outputs"]["pred"]["channel_def"] == {str(v): n for v, n in enumerate(PSMA.names)}
    assert any("Tang" in ref and "CVPR 2022" in ref for ref in meta["references"])
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu")


def test_metadata_passes_monais_schema(bundle, tmp_path):
    from monai.apps.utils import download_url

    schema = tmp_path / "schema.json"
    try:
        download_url(SCHEMA, str(schema), progress=False)
    except Exception as exc:  # offline: this one check cannot run here
        pytest.skip(f"MONAI's metadata schema could not be downloaded ({type(exc).__name__}: {exc})")
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))


def _parser(config: dict, **overrides) -> ConfigParser:
    parser = ConfigParser(config)
    for key, value in overrides.items():
        parser[key] = value
    parser.parse()
    return parser


def _body(shape, box) -> np.ndarray:
    """(2, Z, Y, X): CT 0.6 inside `box`, air noise below the body threshold outside, PET random."""
    rng = np.random.default_rng(1)
    image = rng.uniform(0.0, 0.25, (2, *shape)).astype(np.float32)
    if box is not None:
        image[(0, *box)] = 0.6
    return image


@pytest.mark.parametrize("roi", [(64, 64, 64), (96, 64, 32)])
@pytest.mark.parametrize("shape, box", [
    ((80, 72, 90), (slice(30, 40), slice(20, 30), slice(40, 50))),  # small body: grown with real voxels
    ((80, 72, 90), (slice(2, 10), slice(60, 72), slice(0, 90))),    # at the edges: grown inwards, clamped
    ((120, 40, 100), (slice(10, 110), slice(5, 35), slice(20, 80))),  # an axis smaller than the window
    ((70, 70, 70), None),                                             # no body: the whole volume
])
def test_bundle_crop_is_the_box_predict_volume_infers_over(shape, box, roi):
    """MONAI's CropForegroundd as the bundle configures it, on the (x, y, z) array a NIfTI loader gives."""
    parser = _parser(inference_config(TrainedModel(_config(roi), PSMA, {}, {})))
    crop = parser.get_parsed_content("body_crop")
    image = _body(shape, box)
    out = crop({"image": torch.from_numpy(image).permute(*NETWORK_ORDER)})
    got = out["image"].permute(*NETWORK_ORDER).numpy()  # back to (C, z, y, x)
    expected = _grow_to_roi(body_box(image), roi, shape)
    np.testing.assert_array_equal(got, image[(slice(None), *expected)])


def test_a_model_evaluated_without_the_body_crop_is_bundled_without_it():
    cfg = _config()
    cfg.eval.crop_to_body = False
    transforms = _parser(inference_config(TrainedModel(cfg, PSMA, {}, {}))).get_parsed_content("preprocessing")
    names = [type(t).__name__ for t in transforms.transforms]
    assert "CropForegroundd" not in names and names[-1] == "Transposed"


def test_no_study_under_dataset_dir_is_a_clear_error(tmp_path):
    parser = _parser(inference_config(TrainedModel(_config(), PSMA, {}, {})), dataset_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps what a config expression raises
        parser.get_parsed_content("check_inputs")
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    assert f"no ct.nii.gz under dataset_dir={tmp_path}" in str(raised.value.__cause__)


def _studies(tiny_prepared: Path, data: Path):
    """The exported study, and the same arrays on a rotated grid (a direction that is not the identity)."""
    record = {r["study_id"]: r for r in manifest_records(tiny_prepared)}[STUDY]
    study = read_shard(tiny_prepared / record["shard"])
    export_study(tiny_prepared, STUDY, data / STUDY)
    rotated = replace(study, direction=ROTATED, origin=(-40.5, 310.25, -700.0))
    (data / "rotated").mkdir()
    for c, name in enumerate(("ct", "pet")):
        sitk.WriteImage(rotated.to_sitk(rotated.image[c]), str(data / "rotated" / f"{name}.nii.gz"))
    return study, rotated


def test_monai_bundle_run_reproduces_predict_volume_on_the_pet_grid(bundle, package, tiny_prepared, tmp_path):
    """The documented command, run from the bundle folder; fold K's labels of `predict_volume`, voxel for voxel."""
    study, rotated = _studies(tiny_prepared, tmp_path / "data")
    command = [sys.executable, "-c", RUNNER, "run", "--config_file", "configs/inference.json",
               "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
               "--device", "$torch.device('cpu')"]
    done = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-4000:]

    trained = load_trained(package)
    ev = trained.cfg.eval
    expected = predict_volume(trained.fold_model(FOLD), study.image, tuple(trained.cfg.data.roi),
                              trained.labels.num_classes, ev.sw_batch_size, ev.overlap, ev.mode, ev.crop_to_body,
                              device="cpu")
    assert len(np.unique(expected)) > 2  # a network whose labels vary: equality below means something
    for name, grid in ((STUDY, study), ("rotated", rotated)):
        written = sitk.ReadImage(str(tmp_path / "out" / name / "pred.nii.gz"))
        assert written.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected, err_msg=name)
        np.testing.assert_allclose(written.GetOrigin(), grid.origin, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(written.GetSpacing(), grid.spacing, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(written.GetDirection(), grid.direction, atol=1e-6, err_msg=name)


def test_cli_bundle_and_its_input_errors(package, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bundle", str(package), "--out", str(out)]) == 0
    assert f"fold {FOLD} written" in capsys.readouterr().out
    assert json.loads((out / "configs" / "metadata.json").read_text())["swinssl"]["fold"] == FOLD
    assert main(["bundle", str(package), "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["bundle", str(package), "--out", str(tmp_path / "c"), "--fold", "3"]) == 2
    assert f"--fold 3: the model has folds [{FOLD}]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_label_set_other_than_the_network_is_refused(tmp_path):
    two = LabelSet(("background", "lesion"), lesion=1)
    with pytest.raises(ValueError, match="model.out_channels=12 but the label set has 2 classes"):
        write_bundle(TrainedModel(_config(), two, {}, {0: tmp_path / "none.pt"}), tmp_path / "b")
