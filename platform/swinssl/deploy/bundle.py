"""A fine-tuned fold as a MONAI bundle (`swinssl bundle`): MONAI's own format, run with `python -m monai.bundle run`.

Layout (MONAI Bundle specification, https://docs.monai.io/en/stable/mb_specification.html):
`configs/metadata.json` (versions, classes, the network's input and output format), `configs/inference.json`,
`models/model.pt` (the fold's state dict, tensors only), `docs/README.md`. The inference config uses MONAI
components and config expressions only (no swinssl import), so the bundle runs where swinssl is not installed; it
needs `monai` with nibabel, pytorch-ignite and fire (`pip install "monai[nibabel,ignite,fire]"`).

It reproduces `swinssl predict --folds K` (one fold, no TTA: `swinssl.eval.infer.predict_volume` on that fold's
network) step by step, on the `ct.nii.gz` / `pet.nii.gz` that `swinssl export` writes:

- NIfTI loaders index the array (x, y, z); swinssl's arrays are (z, y, x) (SimpleITK's NumPy order), so the image is
  transposed before the network and back after it: the network sees the very tensor `predict_volume` gives it.
  Nothing reorients the image (no Orientationd): the array must be on the grid `swinssl prepare` made.
- The body crop is `CropForegroundd` whose `select_fn` returns the box `predict_volume` infers over: MONAI's
  `generate_spatial_bounding_box` of CT > 0.3 with a 4-voxel margin clamped to the volume (`allow_smaller=True`)
  equals `body_box`, and the expression then grows each axis shorter than `roi` to `roi` with real voxels, as
  `_grow_to_roi` does (a plain CropForegroundd would leave the box small and SlidingWindowInferer would pad it with
  zeros: other context, other labels wherever the body box is smaller than `roi`, e.g. a body's front-to-back
  extent at 4 mm voxels with roi 96). The crop runs before the transposition, on (x, y, z) with `roi` reversed,
  so MONAI's affine stays true at every step. An axis of the volume itself shorter than `roi` is padded with zeros
  by the inferer, centred, in both.
- `SlidingWindowInferer` with the run's roi, sw_batch_size, overlap and blending mode (sigma_scale 0.125,
  constant-0 padding: `sliding_window_inference`'s defaults), argmax, and `Invertd` back to the input grid:
  background outside the box, the PET grid's geometry in `pred.nii.gz`.

What equality needs: float32 on CPU. `swinssl predict` on CUDA runs the network under bf16 autocast, the bundle in
float32, so on a GPU the labels can differ where two classes' logits are within bf16 rounding of each other.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import uuid
from pathlib import Path

import monai
import numpy
import torch

from ..eval.infer import BODY_THRESHOLD
from .package import TrainedModel

__all__ = ["write_bundle", "bundle_fold", "inference_config", "bundle_metadata", "SCHEMA", "BODY_MARGIN"]

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
BODY_MARGIN = 4
"""Voxels of air kept around the body box (`swinssl.eval.infer.body_box`'s margin)."""
OPTIONAL_PACKAGES = ("nibabel", "pytorch-ignite", "fire")
"""What `python -m monai.bundle run` of this bundle imports besides MONAI, PyTorch and NumPy."""
NETWORK_ORDER = [0, 3, 2, 1]
"""(C, x, y, z) as NIfTI loaders give it -> (C, z, y, x) as swinssl's networks were trained (its own inverse)."""
REFERENCES = [
    "Tang Y, Yang D, Li W, et al. Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis. "
    "CVPR 2022. https://arxiv.org/abs/2111.14791",
    "Hatamizadeh A, Nath V, Tang Y, et al. Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors "
    "in MRI Images. BrainLes 2021. https://arxiv.org/abs/2201.01266",
    "Cardoso MJ, Li W, Brown R, et al. MONAI: An open-source framework for deep learning in healthcare. 2022. "
    "https://arxiv.org/abs/2211.02701",
]

# Config expressions of the body crop (see the module docstring). `x` is CT as CropForegroundd hands it to
# select_fn, (1, x, y, z); the box is grown with the roi in that order, @roi reversed.
GROW_AXIS = ("$lambda s, e, n, r: (0, n) if e <= s or n <= r else (s, e) if e - s >= r else "
             "(min(max(s - (r - e + s) // 2, 0), n - r), min(max(s - (r - e + s) // 2, 0), n - r) + r)")
BOX_MASK = ("$lambda shape, box: torch.nn.functional.pad(torch.ones([e - s for s, e in box], dtype=torch.uint8), "
            "[p for (s, e), n in reversed(list(zip(box, shape))) for p in (s, n - e)])[None] > 0")
BODY_SELECT = ("$lambda x: @box_mask(x.shape[1:], [@grow_axis(s, e, n, r) for s, e, n, r in "
               "zip(*monai.transforms.generate_spatial_bounding_box(x, lambda v: v > @body_threshold, None, "
               "@body_margin, True), x.shape[1:], @roi[::-1])])")
STUDY_DIRS = ("$sorted({os.path.dirname(p) for p in glob.glob(os.path.join(@dataset_dir, '**', 'ct.nii.gz'), "
              "recursive=True)})")
NO_STUDY = ("$None if @datalist else (_ for _ in ()).throw(FileNotFoundError('no ct.nii.gz under dataset_dir=' "
            "+ @dataset_dir + ': give --dataset_dir, a folder of `swinssl export` outputs'))")
OUTPUT_NAME = ("$lambda meta, saver: {'subject': os.path.join(os.path.dirname(meta['filename_or_obj']), 'pred'), "
               "'idx': None}")


def bundle_fold(trained: TrainedModel, fold: int | None) -> int:
    """The fold to export: `fold`, or the model's first when None; a fold the model lacks is a ValueError."""
    if fold is None:
        return trained.folds[0]
    if fold not in trained.folds:
        raise ValueError(f"--fold {fold}: the model has folds {trained.folds}")
    return fold


def _network_def(trained: TrainedModel) -> dict:
    """SegmentationTask.build_model's SwinUNETR (use_checkpoint off: it only saves memory in backward passes)."""
    m = trained.cfg.model
    return {"_target_": "SwinUNETR", "in_channels": m.in_channels, "out_channels": m.out_channels,
            "feature_size": m.feature_size, "drop_rate": 0.0, "dropout_path_rate": m.drop_path_rate,
            "use_checkpoint": False, "use_v2": m.use_v2}


def _preprocessing(crop_to_body: bool) -> dict:
    transforms = [
        {"_target_": "LoadImaged", "keys": ["ct", "pet"], "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": ["ct", "pet"]},
        {"_target_": "ConcatItemsd", "keys": ["ct", "pet"], "name": "image", "dim": 0},
        {"_target_": "DeleteItemsd", "keys": ["ct", "pet"]},
        *(["@body_crop"] if crop_to_body else []),
        {"_target_": "Transposed", "keys": "image", "indices": NETWORK_ORDER},
    ]
    return {"_target_": "Compose", "transforms": transforms}


def _postprocessing() -> dict:
    return {"_target_": "Compose", "transforms": [
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": True, "to_tensor": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
         "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
         "data_root_dir": "@dataset_dir", "output_name_formatter": OUTPUT_NAME, "print_log": True},
    ]}


def inference_config(trained: TrainedModel) -> dict:
    """`configs/inference.json`: MONAI components only; `dataset_dir`, `output_dir`, `device` are meant to be
    overridden on the command line (`--dataset_dir DIR`)."""
    ev = trained.cfg.eval
    config = {
        "imports": ["$import glob", "$import os", "$import monai", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "roi": [int(r) for r in trained.cfg.data.roi],
        "crop_to_body": bool(ev.crop_to_body),
        "body_threshold": BODY_THRESHOLD,
        "body_margin": BODY_MARGIN,
        "grow_axis": GROW_AXIS,
        "box_mask": BOX_MASK,
        "body_select": BODY_SELECT,
        "body_crop": {"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
                      "select_fn": "@body_select", "channel_indices": 0, "margin": 0, "allow_smaller": True},
        "study_dirs": STUDY_DIRS,
        "datalist": "$[{'ct': os.path.join(d, 'ct.nii.gz'), 'pet': os.path.join(d, 'pet.nii.gz')} "
                    "for d in @study_dirs]",
        "check_inputs": NO_STUDY,
        "network_def": _network_def(trained),
        "network": "$@network_def.to(@device)",
        "preprocessing": _preprocessing(ev.crop_to_body),
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi", "sw_batch_size": ev.sw_batch_size,
                    "overlap": ev.overlap, "mode": ev.mode},
        "postprocessing": _postprocessing(),
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "@device"},
                     {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["@check_inputs"],
        "run": ["$@evaluator.run()"],
    }
    if not ev.crop_to_body:
        for key in ("grow_axis", "box_mask", "body_select", "body_crop"):
            del config[key]
    return config


def _versions() -> dict[str, str]:
    found = {}
    for name in OPTIONAL_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _channel_defs(prepare: dict) -> dict[str, str]:
    """What each input channel holds, from the training data's prepare settings."""
    return {"0": "CT: " + _window(prepare, "ct_window", "HU"), "1": "PET: " + _window(prepare, "pet_window", "SUVbw")}


def _window(prepare: dict, key: str, unit: str) -> str:
    window = prepare.get(key)
    if not window:
        return f"{unit} window of the training data's `swinssl prepare` (not recorded with the model)"
    return f"{unit} clipped to [{window['lo']:g}, {window['hi']:g}] and mapped linearly to [0, 1]"


def bundle_metadata(trained: TrainedModel, fold: int) -> dict:
    """`configs/metadata.json` in MONAI's metadata schema (`SCHEMA`), from the model's config and label set."""
    roi = [int(r) for r in trained.cfg.data.roi]
    names = list(trained.labels.names)
    source = ", ".join(f"{k}={v}" for k, v in trained.source.items() if v) or "unknown"
    return {
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by `swinssl bundle` from {source}, fold {fold}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "optional_packages_version": _versions(),
        "name": f"{trained.cfg.name}_fold{fold}_petct_segmentation",
        "task": f"Whole-body PET/CT segmentation into {len(names) - 1} classes: {', '.join(names[1:])}",
        "description": f"MONAI SwinUNETR (feature_size {trained.cfg.model.feature_size}"
                       f"{', V2' if trained.cfg.model.use_v2 else ''}) fine-tuned with swinssl, fold {fold} of "
                       f"run {trained.cfg.name!r}; input: CT and PET resampled to the PET grid and normalised by "
                       "`swinssl prepare`, exported with `swinssl export`.",
        "authors": "swinssl users (edit before publishing)",
        "copyright": "Copyright (c) the authors of the source run (edit before publishing)",
        "intended_use": "Research only, not for clinical use.",
        "data_type": "nibabel",
        "image_classes": "2 channels: normalised CT, normalised PET (SUVbw), on the PET grid",
        "pred_classes": ", ".join(f"{v}: {n}" for v, n in enumerate(names)),
        "references": REFERENCES,
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "CT+PET", "num_channels": 2,
                "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": _channel_defs(trained.prepare)}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": trained.labels.num_classes,
                "spatial_shape": roi, "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(v): n for v, n in enumerate(names)}}},
        },
        "swinssl": {"fold": fold, **trained.describe()},
    }


def _check(trained: TrainedModel) -> None:
    if trained.cfg.model.out_channels != trained.labels.num_classes:
        raise ValueError(f"model.out_channels={trained.cfg.model.out_channels} but the label set has "
                         f"{trained.labels.num_classes} classes {list(trained.labels.names)}")


def write_bundle(trained: TrainedModel, out: Path | str, fold: int | None = None) -> Path:
    """Write fold `fold` (default: the first) of `trained` as a MONAI bundle folder `out`; returns `out`.

    `out` must not exist or be empty. The bundle is written next to it under a temporary name and renamed into
    place, so a failed export leaves no half bundle."""
    _check(trained)
    fold = bundle_fold(trained, fold)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir(parents=True)
        _write_json(tmp / "configs" / "metadata.json", bundle_metadata(trained, fold))
        _write_json(tmp / "configs" / "inference.json", inference_config(trained))
        torch.save(trained.fold_model(fold).state_dict(), tmp / "models" / "model.pt")
        (tmp / "docs" / "README.md").write_text(bundle_readme(trained, fold))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def bundle_readme(trained: TrainedModel, fold: int) -> str:
    """`docs/README.md`: what the model is, how to make its inputs, its classes, where it came from, how to run it."""
    cfg, names = trained.cfg, list(trained.labels.names)
    ct, pet = trained.prepare.get("ct_window"), trained.prepare.get("pet_window")
    windows = (f" --ct-window {ct['lo']:g},{ct['hi']:g} --pet-window {pet['lo']:g},{pet['hi']:g}"
               if ct and pet else "")
    no_reg = "" if trained.prepare.get("registration", {}).get("enabled", True) else " --no-registration"
    classes = "\n".join(f"| {v} | {n} |" for v, n in enumerate(names))
    source = "\n".join(f"- {k}: `{v}`" for k, v in trained.source.items() if v) or "- unknown"
    ev, channels = cfg.eval, _channel_defs(trained.prepare)
    crop = (f"the body box (CT > {BODY_THRESHOLD} with a {BODY_MARGIN}-voxel margin; each axis shorter than the "
            "window grown to it with real voxels) cropped, background outside it" if ev.crop_to_body else
            "the whole volume (the model was evaluated without a body crop)")
    return f"""# {cfg.name}, fold {fold}: whole-body PET/CT segmentation (MONAI SwinUNETR)

A MONAI SwinUNETR (feature_size {cfg.model.feature_size}{", V2" if cfg.model.use_v2 else ""}, 2 input channels,
{len(names)} output classes) fine-tuned with swinssl; this bundle holds fold {fold}'s final weights
(`models/model.pt`, a plain state dict). Research only, not for clinical use.

## Inputs

A study folder with `ct.nii.gz` and `pet.nii.gz`: CT resampled to the PET grid, both normalised to [0, 1]
(float32), made exactly as the training data was:

    swinssl prepare --input cohort.csv --out PREPARED{windows}{no_reg}
    swinssl export PREPARED --study STUDY_ID --to DATA/STUDY_ID

Channel 0: {channels["0"]}.
Channel 1: {channels["1"]}.
Other inputs (another grid, other windows, raw HU or SUV) give meaningless labels: preparation is not part of the
bundle.

## Classes

| value | class |
| --- | --- |
{classes}

## Run it

Needs `pip install torch "monai[nibabel,ignite,fire]"` (no swinssl). From this folder:

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir DATA --output_dir OUT

Every folder under DATA holding a `ct.nii.gz` (DATA itself included) is one study; its labels are written to
`OUT/<the folder relative to DATA>/pred.nii.gz` (uint8, on the PET grid of the input). From elsewhere add
`--bundle_root PATH_TO_THIS_FOLDER`; `--device '$torch.device("cpu")'` forces the CPU.

What it runs: the NIfTI array, (x, y, z) as loaded, transposed to the (z, y, x) order the network was trained in;
{crop}; sliding-window inference (window {list(cfg.data.roi)} in (z, y, x), sw_batch_size {ev.sw_batch_size},
overlap {ev.overlap}, {ev.mode} blending); argmax; the labels transposed back and put on the input grid.

## Same labels as `swinssl predict`

On CPU the labels equal `swinssl predict MODEL --folds {fold}` (no `--tta`) on the same prepared study voxel for
voxel: same crop, same windows, same network, float32. `swinssl predict` on CUDA uses bf16 autocast and this bundle
float32, so on a GPU a few voxels where two classes are nearly tied can differ.

## Source

{source}
"""
