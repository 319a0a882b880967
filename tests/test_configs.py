"""Every experiment YAML loads against its schema; overrides and errors behave as documented."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from swinssl.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    SweepConfig,
    flatten,
    from_dict,
    load_config,
    save_config,
)
from swinssl.tune.space import expand_trials
from swinssl.tune.sweep import resolve_stage_paths
from swinssl.tune.trial import stage_configs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCHEMAS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "dataset_size": SweepConfig,
           "loss_weights": SweepConfig, "label_efficiency": SweepConfig, "pretext_menu": SweepConfig}


def _schema(path: Path):
    return SCHEMAS[path.stem.removesuffix("_tiny")]


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_loads(path, tmp_path):
    cfg = load_config(path, (), _schema(path))
    assert isinstance(cfg, _schema(path))
    saved = save_config(cfg, tmp_path / "resolved.yaml")  # the resolved config round-trips
    assert load_config(saved, (), _schema(path)) == cfg


@pytest.mark.parametrize("path", sorted(p for p in EXPERIMENTS.glob("*.yaml") if _schema(p) is SweepConfig),
                         ids=lambda p: p.name)
def test_every_sweep_trial_gets_valid_stage_configs(path, tmp_path):
    """Each trial's values are real keys of the stage configs (a typo in a search key fails here, not on a cluster)."""
    cfg = resolve_stage_paths(load_config(path, (), SweepConfig), path)
    specs = expand_trials(cfg)
    tuned = {repr(sorted(s.finetune_overrides().items())) for s in specs if s.init == "pretrained"} or {"[]"}
    assert specs and sum(s.init == "scratch" for s in specs) == len(cfg.seeds) * len(tuned)  # one per label count
    for spec in specs:
        pretrain, finetune = stage_configs(spec, cfg, tmp_path / spec.key, {"uri": "", "experiment": "x"})
        if pretrain is not None:
            assert {k: flatten(pretrain)[k] for k in spec.pretrain_overrides()} == {
                k: type(flatten(pretrain)[k])(v) for k, v in spec.pretrain_overrides().items()}
        assert finetune.trainer.seed == spec.seed
        assert all(flatten(finetune)[k] == v for k, v in spec.finetune_overrides().items())


def test_tiny_is_a_small_diff_of_the_default():
    full, tiny = load_config(EXPERIMENTS / "pretrain.yaml"), load_config(EXPERIMENTS / "pretrain_tiny.yaml")
    assert tiny.loss == full.loss and tiny.optim.lr == full.optim.lr  # inherited through `base:`
    assert tiny.model.feature_size == 12 and tiny.data.roi == [32, 32, 32]


def test_overrides_and_errors():
    cfg = load_config(EXPERIMENTS / "pretrain.yaml", ["loss.w_rotation=0", "data.subset=450", "data.roi=[64,64,64]"])
    assert cfg.loss.w_rotation == 0.0 and cfg.data.subset == "450" and cfg.data.roi == [64, 64, 64]
    assert from_dict(asdict(cfg)) == cfg
    assert load_config(EXPERIMENTS / "finetune.yaml", ["encoder="], FinetuneConfig).encoder == ""
    with pytest.raises(ConfigError, match="(?s)w_rot.*valid keys: .*loss.w_rotation"):
        load_config(EXPERIMENTS / "pretrain.yaml", ["loss.w_rot=0"])
    with pytest.raises(ConfigError, match="trainer.steps"):
        load_config(EXPERIMENTS / "pretrain.yaml", ["trainer.steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(EXPERIMENTS / "pretrain.yaml", ["trainer.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(EXPERIMENTS / "nope.yaml")


def test_flatten_gives_dotted_keys():
    flat = flatten(PretrainConfig())
    assert flat["loss.w_contrastive"] == 1.0 and flat["trainer.num_workers"] == 1 and "data.roi" in flat
