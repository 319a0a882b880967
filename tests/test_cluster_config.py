"""ray_cluster.yaml is a valid cluster-launcher config by Ray's own checks (offline: `ray up` has no dry run)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validation():
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _config()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written: a misspelt key fails here
    prepared = prepare_config(config)  # fills the defaults the launcher would use
    validate_config(prepared)  # schema + node-type rules, as `ray up` checks
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cluster_yaml_security_and_stack():
    config = _config()
    text = (ROOT / "ray_cluster.yaml").read_text()
    assert config["docker"]["image"].startswith("rayproject/ray:") and "-gpu" in config["docker"]["image"]
    assert any("--shm-size" in option for option in config["docker"]["run_options"])
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "--host 127.0.0.1" in " ".join(config["head_setup_commands"])  # MLflow not exposed
    assert "mlflow==3.17.2" in " ".join(config["setup_commands"])
    assert "pip install -q -e /home/ray/swinssl" in config["setup_commands"]
    for resources in (t["resources"] for t in config["available_node_types"].values()):
        assert all(isinstance(v, int) for v in resources.values())  # the launcher rejects fractional resources
    for secret in ("aws_secret_access_key", "AWS_SECRET", "password", "token:"):
        assert secret not in text
