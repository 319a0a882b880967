"""A trained segmentation model as one self-describing object, whatever it came from.

`load_trained(spec)` accepts:

- a `swinssl finetune` output folder (`config.yaml`, `labels.json`, `folds.json`, `ray/fold_<k>/checkpoint_*`);
- a model package folder written by `write_package` (`swinssl_model.json` + `fold_<k>.pt`), e.g. a downloaded MLflow
  model's `artifacts/model_package`;
- an MLflow model URI (`models:/<name>/<version>`, `models:/<name>@<alias>`, `runs:/<run id>/model`) or the run id
  of a `swinssl finetune` run (its logged model): downloaded, then read as a package.

What a package records, and why each part is needed to use the model on new data:

- `config`: the resolved fine-tuning config (network shape, `data.roi`, `eval.*` sliding-window settings);
- `labels`: the class set (names and values of the output channels);
- `prepare`: the `swinssl prepare` settings of the training data (CT/PET windows, registration): new studies must
  be prepared exactly the same way, or the network sees other intensities than it was trained on;
- `folds`: the folds whose final weights are in the package (one `fold_<k>.pt` state dict each, tensors only:
  `torch.load(weights_only=True)`);
- `source`: where it came from (run folder, MLflow run, git commit).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from petct.labels import LabelSet, read_label_set
from petct.shards import atomic_write_json

from ..config import FinetuneConfig, from_dict, load_config
from ..tasks.segment import SegmentationTask
from ..train.checkpoint import latest_checkpoint_dir, load_meta, load_state

FORMAT = "swinssl.model/1"
MANIFEST = "swinssl_model.json"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MLFLOW_URI = re.compile(r"^(models|runs):/")

__all__ = ["TrainedModel", "load_trained", "write_package", "FORMAT", "MANIFEST"]


@dataclass
class TrainedModel:
    """A fine-tuned SwinUNETR: its config, classes, preparation settings and per-fold weights."""

    cfg: FinetuneConfig
    labels: LabelSet
    prepare: dict
    """`prepare_config.json` of the training data ({} when unknown: then only prepared inputs can be predicted)."""
    weights: dict[int, Path]
    """fold -> a checkpoint folder (`state.pt` with "model") or a `fold_<k>.pt` state dict."""
    source: dict = field(default_factory=dict)

    @property
    def folds(self) -> list[int]:
        return sorted(self.weights)

    def fold_model(self, fold: int, device: torch.device | str = "cpu") -> nn.Module:
        """A fresh SwinUNETR with fold `fold`'s final weights, in eval mode."""
        if fold not in self.weights:
            raise ValueError(f"fold {fold} is not in this model (folds: {self.folds})")
        net = SegmentationTask(self.cfg, None).build_model()
        path = self.weights[fold]
        state = load_state(path)["model"] if path.is_dir() else torch.load(path, map_location="cpu",
                                                                           weights_only=True)
        net.load_state_dict(state)
        return net.to(device).eval()

    def describe(self) -> dict:
        """Plain values for records: what model ran."""
        return {"name": self.cfg.name, "folds": self.folds, "classes": list(self.labels.names),
                "roi": list(self.cfg.data.roi), "feature_size": self.cfg.model.feature_size,
                "use_v2": self.cfg.model.use_v2, **self.source}


def _finished_folds(run_dir: Path, cfg: FinetuneConfig) -> dict[int, Path]:
    """fold -> final checkpoint of every fold that finished training (its step reached trainer.steps)."""
    done = {}
    for folder in sorted((run_dir / "ray").glob("fold_*")):
        latest = latest_checkpoint_dir(folder)
        if latest is not None and load_meta(latest).get("step", 0) >= cfg.trainer.steps:
            done[int(folder.name.split("_")[1])] = latest
    return done


def _prepare_settings(run_dir: Path, cfg: FinetuneConfig) -> dict:
    """The training data's prepare settings: the copy in the run folder, else data.root's ({} when neither)."""
    for folder in [run_dir, *([Path(cfg.data.root)] if cfg.data.root else [])]:
        path = folder / "prepare_config.json"
        if path.exists():
            return json.loads(path.read_text())
    return {}


def _from_run_dir(run_dir: Path) -> TrainedModel:
    cfg = load_config(run_dir / "config.yaml", [], FinetuneConfig, check=False)
    weights = _finished_folds(run_dir, cfg)
    if not weights:
        raise ValueError(f"{run_dir}: no fold has finished training (no ray/fold_<k>/checkpoint_* at step "
                         f"{cfg.trainer.steps}); run `swinssl finetune` to the end first")
    source = {"run_dir": str(run_dir)}
    record = run_dir / "mlflow_run.json"
    if record.exists():
        saved = json.loads(record.read_text())
        source.update(run_id=saved.get("run_id", ""), tracking_uri=saved.get("tracking_uri", ""))
    return TrainedModel(cfg, read_label_set(run_dir), _prepare_settings(run_dir, cfg), weights, source)


def _from_package(folder: Path) -> TrainedModel:
    meta = json.loads((folder / MANIFEST).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: format {meta.get('format')!r}, expected {FORMAT!r}")
    weights = {int(k): folder / name for k, name in meta["weights"].items()}
    missing = [str(p) for p in weights.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: model package is incomplete, missing {missing}")
    return TrainedModel(from_dict(meta["config"], FinetuneConfig), LabelSet.from_dict(meta["labels"]),
                        meta.get("prepare", {}), weights, meta.get("source", {}))


def _download(uri: str, tracking_uri: str, dst: Path) -> Path:
    """An MLflow model URI -> local folder of its package."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                         tracking_uri=tracking_uri or None))
    except MlflowException as exc:
        raise ValueError(f"{uri}: not found in MLflow at {tracking_uri or mlflow.get_tracking_uri()} "
                         f"({str(exc).splitlines()[0][:300]})") from None
    # pyfunc keeps a logged folder's own name under artifacts/ (swinssl finetune logs `model_package`)
    found = sorted(p.parent for p in (local / "artifacts").glob(f"*/{MANIFEST}"))
    if len(found) != 1:
        raise ValueError(f"{uri}: not a swinssl model (no artifacts/<package>/{MANIFEST}); log it with "
                         "`swinssl finetune` or swinssl.deploy.mlflow_model.log_model")
    return found[0]


def load_trained(spec: str | Path, tracking_uri: str = "", cache: Path | None = None) -> TrainedModel:
    """A run folder, a package folder, an MLflow model URI or a fine-tune run id -> TrainedModel (see module doc).

    `cache`: where MLflow downloads go (default: a temporary folder kept for the process's life)."""
    text = str(spec)
    path = Path(text)
    if path.is_dir() and (path / MANIFEST).exists():
        return _from_package(path.resolve())
    if path.is_dir() and (path / "config.yaml").exists():
        return _from_run_dir(path.resolve())
    if path.exists():
        raise ValueError(f"{text}: neither a `swinssl finetune` output folder (config.yaml, ray/fold_*) nor a model "
                         f"package ({MANIFEST})")
    if MLFLOW_URI.match(text) or RUN_ID.match(text):
        import tempfile

        uri = text if MLFLOW_URI.match(text) else f"runs:/{text}/model"
        target = cache or Path(tempfile.mkdtemp(prefix="swinssl-model-"))
        model = _from_package(_download(uri, tracking_uri, target))
        model.source = {**model.source, "model_uri": uri}
        return model
    raise FileNotFoundError(f"{text}: no such folder, and not an MLflow model URI (models:/NAME/VERSION, "
                            "runs:/RUN_ID/model) or run id")


def write_package(model: TrainedModel, out: Path | str, folds: list[int] | None = None) -> Path:
    """Write `model` as a self-contained package folder (weights as plain state dicts); returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = model.folds if folds is None else folds
    weights = {}
    for k in chosen:
        name = f"fold_{k}.pt"
        state = model.fold_model(k).state_dict()
        tmp = out / f".{name}.tmp"
        torch.save(state, tmp)
        tmp.replace(out / name)
        weights[str(k)] = name
    meta = {"format": FORMAT, "config": asdict(model.cfg), "labels": model.labels.to_dict(),
            "prepare": model.prepare, "weights": weights, "source": model.source,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(out / MANIFEST, meta)
    return out
