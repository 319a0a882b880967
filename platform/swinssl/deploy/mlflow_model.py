"""The fine-tuned model as an MLflow model: a pyfunc whose `predict` takes prepared studies and returns labels.

Logged by `swinssl finetune` into its run (artifact `model`, a LoggedModel in MLflow 3) and registrable
(`--register NAME`, or `mlflow.register_model`). The model folder holds the swinssl model package
(`artifacts/model_package`: `swinssl_model.json` + `fold_<k>.pt`, see package.py), so
`swinssl predict models:/NAME/1` and `mlflow.pyfunc.load_model("models:/NAME/1").predict(image)` run the same
networks.

Signature (MLflow tensor-based):
    input   float32 (-1, 2, -1, -1, -1): prepared studies (N, channel CT/PET, Z, Y, X), values in [0, 1] as
            `swinssl prepare` writes them (one study of any size per call, or N of one size)
    output  uint8 (-1, -1, -1, -1): labels (N, Z, Y, X), values the label set's (recorded in the package)
    params  folds: "all" or "0,2" (fold models to ensemble), tta: flip test-time augmentation
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

from .package import TrainedModel, load_trained

__all__ = ["SwinsslModel", "log_model", "signature"]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 2, -1, -1, -1), "image")]),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1), "labels")]),
                          params=ParamSchema([ParamSpec("folds", "string", "all"), ParamSpec("tta", "boolean", False)]))


def _folds(text: str, model: TrainedModel) -> list[int]:
    if text in ("", "all"):
        return model.folds
    folds = [int(v) for v in str(text).split(",")]
    if set(folds) - set(model.folds):
        raise ValueError(f"folds={text!r}: the model has folds {model.folds}")
    return folds


class SwinsslModel(mlflow.pyfunc.PythonModel):
    """pyfunc flavour of a swinssl model package (see the module docstring for the signature)."""

    def load_context(self, context) -> None:
        self.model = load_trained(context.artifacts["package"])
        self._ensembles = {}

    def _ensemble(self, folds: list[int], tta: bool):
        from .ensemble import Ensemble

        key = (tuple(folds), tta)
        if key not in self._ensembles:
            self._ensembles[key] = Ensemble([self.model.fold_model(k) for k in folds], tta=tta)
        return self._ensembles[key]

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        from .predict import predict_image

        params = params or {}
        if isinstance(model_input, dict):  # a named tensor input arrives as {name: array}
            model_input = model_input["image"]
        images = np.asarray(model_input, dtype=np.float32)
        if images.ndim == 4:
            images = images[None]
        if images.ndim != 5 or images.shape[1] != self.model.cfg.model.in_channels:
            raise ValueError(f"input must be (N, {self.model.cfg.model.in_channels}, Z, Y, X) prepared studies, got "
                             f"shape {images.shape}")
        ensemble = self._ensemble(_folds(params.get("folds", "all"), self.model), bool(params.get("tta", False)))
        return np.stack([predict_image(ensemble, self.model, image) for image in images])


def log_model(model: TrainedModel, package: Path, tracking_uri: str, run_id: str,
              registered_name: str = "") -> str:
    """Log `package` (written by `write_package(model, package)`) as the pyfunc model `model` of run `run_id`;
    register it as `registered_name` when given. Returns the model URI (`models:/NAME/VERSION` when registered)."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    # no input example: it would be a whole study, too large to keep next to the model
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=SwinsslModel(),
                                       artifacts={"package": str(package)}, signature=signature(),
                                       pip_requirements=_requirements(), metadata={"swinssl": model.describe()})
    if not registered_name:
        return info.model_uri
    version = mlflow.register_model(info.model_uri, registered_name)
    return f"models:/{registered_name}/{version.version}"


def _requirements() -> list[str]:
    """What the pyfunc needs to load (the swinssl package itself, plus its pinned tracking/runtime)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("swinssl", "torch", "monai", "mlflow")]
