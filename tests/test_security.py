"""Security defaults: no secrets in MLflow params, checkpoints and encoders load with weights_only=True."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from swinssl.models.encoder_io import load_encoder_into_swinunetr
from swinssl.tracking.mlflow_run import open_run, redact
from swinssl.train.checkpoint import STATE_FILE, load_state


def test_params_never_hold_credentials(tmp_path):
    assert redact("tracking.tracking_uri", "https://bob:hunter2@mlflow.example.com") == \
        "https://<redacted>@mlflow.example.com"
    assert redact("storage.aws_secret_access_key", "AKIA...") == "<redacted>"
    assert redact("data.root", "/mnt/shared/prepared") == "/mnt/shared/prepared"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = open_run(uri, "sec", "r", tmp_path / "run", {"tracking.tracking_uri": "http://u:pw@h:5000",
                                                          "api_token": "abc", "lr": 0.1})
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params == {"tracking.tracking_uri": "http://<redacted>@h:5000", "api_token": "<redacted>", "lr": "0.1"}


class _Payload:
    def __reduce__(self):  # what a malicious pickle would run on a plain torch.load
        return (Path.touch, (Path("/tmp/swinssl_pwned"),))


def test_checkpoints_refuse_arbitrary_objects(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(pickle.dumps({"model": _Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        load_state(tmp_path)
    torch.save({"state_dict": {"w": _Payload()}}, tmp_path / "encoder.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_encoder_into_swinunetr(torch.nn.Module(), tmp_path / "encoder.pt")
    assert not Path("/tmp/swinssl_pwned").exists()
