"""`config.validate`: every problem of a config in one ConfigError (enumerations, ranges, cross-field rules, sweep
keys), reached through `load_config` and `from_dict`; and every config field is documented."""

from __future__ import annotations

import ast
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import pytest

import swinssl.tasks.registry  # noqa: F401  (registers the pretext tasks' rules with config.validate)
from swinssl import config
from swinssl.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    SweepConfig,
    TrainerConfig,
    from_dict,
    load_config,
    save_config,
    validate,
)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PRETRAIN, FINETUNE, SWEEP = (EXPERIMENTS / f"{n}_tiny.yaml" for n in ("pretrain", "finetune", "dataset_size"))


def _problems(path: Path, overrides: list[str], schema: type = PretrainConfig) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, schema)
    return info.value.problems


def _literal_fields(schema: type, prefix: str = "") -> list[tuple[str, tuple]]:
    """(dotted key, choices) of every Literal field reachable from `schema`."""
    out = []
    for name, hint in get_type_hints(schema).items():
        if is_dataclass(hint):
            out += _literal_fields(hint, f"{prefix}{name}.")
        elif get_origin(hint) is Literal:
            out.append((prefix + name, get_args(hint)))
    return out


def test_every_config_field_has_a_docstring():
    """A string right after each field of each dataclass of the config package (house style: no undocumented knobs)."""
    modules = sorted(Path(config.__file__).parent.glob("*.py"))
    assert {m.name for m in modules} >= {"stages.py", "sweep.py"}
    classes = [n for m in modules for n in ast.parse(m.read_text()).body if isinstance(n, ast.ClassDef)]
    assert len(classes) >= 20  # every stage, sweep and sub-config class was found
    missing = []
    for cls in classes:
        if not any("dataclass" in ast.unparse(d) for d in cls.decorator_list):
            continue
        body = cls.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                documented = (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                              and isinstance(nxt.value.value, str) and nxt.value.value.strip())
                if not documented:
                    missing.append(f"{cls.name}.{ast.unparse(stmt.target)} (line {stmt.lineno})")
    assert not missing, "config fields without a docstring:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("schema", [PretrainConfig, FinetuneConfig, SweepConfig], ids=lambda s: s.__name__)
def test_defaults_are_valid(schema):
    validate(schema())


@pytest.mark.parametrize("key,choices", [kc for s in (PretrainConfig, FinetuneConfig, SweepConfig)
                                         for kc in _literal_fields(s)] + [("search.sample.x.kind", None)],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_literal_field_is_checked(key, choices):
    """Generic over the annotations: a value outside a Literal is refused by load_config (override) and by validate
    (a config built in code), naming the key and the valid choices."""
    if choices is None:  # SampleSpec.kind sits in a dict: checked through the sweep YAML below
        problems = _problems(SWEEP, ["search.sample={x: {kind: gaussian}}"], SweepConfig)
        assert any(p.startswith("search.sample.x.kind") and "uniform" in p for p in problems), problems
        return
    schema = next(s for s in (PretrainConfig, FinetuneConfig, SweepConfig) if key in dict(_literal_fields(s)))
    problems = _problems(None, [f"{key}=not_a_choice"], schema)
    assert len(problems) == 1 and problems[0].startswith(key) and all(str(c) in problems[0] for c in choices)
    cfg = schema()
    *parents, leaf = key.split(".")
    owner = cfg
    for part in parents:
        owner = getattr(owner, part)
    object.__setattr__(owner, leaf, "not_a_choice")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.problems[0].startswith(f"{key}: not a valid choice (got 'not_a_choice'; valid: ")


RANGE_CASES = [
    (PRETRAIN, "trainer.steps=0", "trainer.steps"),
    (PRETRAIN, "trainer.num_workers=0", "trainer.num_workers"),
    (PRETRAIN, "trainer.grad_accum=0", "trainer.grad_accum"),
    (PRETRAIN, "trainer.log_every=0", "trainer.log_every"),
    (PRETRAIN, "trainer.checkpoint_every=0", "trainer.checkpoint_every"),
    (PRETRAIN, "trainer.seed=-1", "trainer.seed"),
    (PRETRAIN, "data.batch_size=0", "data.batch_size"),
    (PRETRAIN, "data.crops_per_study=0", "data.crops_per_study"),
    (PRETRAIN, "data.min_foreground=1.5", "data.min_foreground"),
    (PRETRAIN, "data.subset=0", "data.subset"),
    (PRETRAIN, "data.subset=some", "data.subset"),
    (PRETRAIN, "data.roi=[33,33,33]", "data.roi"),
    (PRETRAIN, "data.roi=[32,32]", "data.roi"),
    (PRETRAIN, "model.feature_size=13", "model.feature_size"),
    (PRETRAIN, "optim.lr=0", "optim.lr"),
    (PRETRAIN, "loss.temperature=0", "loss.temperature"),
    (PRETRAIN, "loss.w_contrastive=-1", "loss.w_contrastive"),
    (PRETRAIN, "pretext.cutout_cross_sample=1.5", "pretext.cutout_cross_sample"),
    (PRETRAIN, "pretext.cutout_min_side=0.5", "pretext.cutout_min_side"),  # > cutout_max_side
    (PRETRAIN, "pretext.rotation_dims=[1,1]", "pretext.rotation_dims"),
    (FINETUNE, "data.roi=[32,32,32]", "data.roi"),  # >= 64 for SwinUNETR's decoder
    (FINETUNE, "model.feature_size=13", "model.feature_size"),
    (FINETUNE, "cv.folds=1", "cv.folds"),
    (FINETUNE, "cv.fold=2", "cv.fold"),  # folds=2: fold is -1, 0 or 1
    (FINETUNE, "eval.overlap=1.0", "eval.overlap"),
    (FINETUNE, "eval.sw_batch_size=0", "eval.sw_batch_size"),
    (SWEEP, "seeds=[]", "seeds"),
    (SWEEP, "scheduler.reduction_factor=1", "scheduler.reduction_factor"),
]


@pytest.mark.parametrize("path,override,key", RANGE_CASES, ids=[c[1] for c in RANGE_CASES])
def test_range_and_cross_field_rules(path, override, key):
    schema = {PRETRAIN: PretrainConfig, FINETUNE: FinetuneConfig, SWEEP: SweepConfig}[path]
    problems = _problems(path, [override], schema)
    assert any(p.startswith(f"{key}: ") and "(got " in p for p in problems), problems


def test_rotation_needs_equal_sides_only_while_rotation_is_on():
    problems = _problems(PRETRAIN, ["data.roi=[32,64,32]"])  # the axial plane (Y, X) is 64 x 32
    assert len(problems) == 1 and "rotation" in problems[0] and "data.roi" in problems[0]
    assert load_config(PRETRAIN, ["data.roi=[32,64,32]", "loss.w_rotation=0"]).data.roi == [32, 64, 32]
    assert load_config(PRETRAIN, ["data.roi=[64,32,32]"]).data.roi == [64, 32, 32]  # Z may differ


def test_every_problem_at_once():
    """Wrong types, unknown keys and broken rules all come back in one ConfigError, each naming its key."""
    overrides = ["trainer.amp=fp32", "loss.w_rot=1", "trainer.steps=many", "data.roi=[33,32,32]",
                 "model.feature_size=13", "optim.lr=-1", "data.roi_typo=1"]
    with pytest.raises(ConfigError) as info:
        load_config(PRETRAIN, overrides)
    problems = info.value.problems
    for key in ("trainer.amp", "loss.w_rot", "trainer.steps", "data.roi", "model.feature_size", "optim.lr",
                "data.roi_typo"):
        assert sum(p.startswith(f"{key}: ") for p in problems) == 1, (key, problems)
    assert str(info.value).splitlines()[0] == f"{len(problems)} config problems:"
    assert "valid keys: loss.w_rotation" in next(p for p in problems if p.startswith("loss.w_rot:"))


def test_extra_problems_join_the_same_error():
    """A driver's data-dependent problems (`extra`) come after the config's own, in the same ConfigError."""
    bad = replace(load_config(PRETRAIN), trainer=replace(TrainerConfig(), steps=0))
    extra = "data.subset: 760 but data.root has only 4 prepared 'unlabeled' studies"
    with pytest.raises(ConfigError) as info:
        validate(bad, extra=[extra])
    assert info.value.problems == ["trainer.steps: must be >= 1 (got 0)", extra]
    with pytest.raises(ConfigError, match="^data.subset: 760"):
        validate(load_config(PRETRAIN), extra=(extra,))
    assert validate(load_config(PRETRAIN)) is None


def test_from_dict_validates():
    good = load_config(PRETRAIN)
    assert from_dict(asdict(good)) == good
    with pytest.raises(ConfigError, match="data.roi: every side must be a positive multiple of 32"):
        from_dict({**asdict(good), "data": {**asdict(good.data), "roi": [33, 32, 32]}})
    with pytest.raises(ConfigError, match="trainer.amp"):
        from_dict({"trainer": {"amp": "fp32"}})


def test_type_errors_in_code_built_configs():
    cfg = replace(PretrainConfig(), trainer=replace(TrainerConfig(), steps="10", use_gpu="yes"))  # type: ignore
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert [p.split(":")[0] for p in info.value.problems] == ["trainer.steps", "trainer.use_gpu"]


def test_sweep_search_keys_and_values_are_checked_against_the_stage_schemas(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""base: {SWEEP}
pretrain: {EXPERIMENTS / 'pretrain_tiny.yaml'}
finetune: {FINETUNE}
search:
  grid:
    loss.w_rot: [1.0]
    data.subset: ["2", "0"]
    trainer.steps: [3, many]
    finetune.cv.folds: [2, 1]
    finetune.optim.lr: [1.0e-3]
  sample:
    loss.temperature: {{kind: loguniform, low: 0.0, high: 1.0}}
    finetune.trainer.amp: {{kind: choice, values: [bf16, fp32]}}
pretrain_overrides: {{trainer: {{stepz: 3}}}}
finetune_overrides: {{cv: {{folds: 1}}}}
""")
    with pytest.raises(ConfigError) as info:
        load_config(sweep, (), SweepConfig)
    by_key = {p.split(": ")[0]: p for p in info.value.problems}
    assert "valid keys: loss.w_rotation" in by_key["search.grid.loss.w_rot"]
    assert "got '0'" in by_key["search.grid.data.subset"]
    assert "many" in by_key["search.grid.trainer.steps"]
    assert "must be >= 2 (got 1)" in by_key["search.grid.finetune.cv.folds"]
    assert "loguniform needs low > 0" in by_key["search.sample.loss.temperature.low"]
    assert "fp32" in by_key["search.sample.finetune.trainer.amp"]
    assert "valid keys: trainer.steps" in by_key["pretrain_overrides.trainer.stepz"]
    assert "must be >= 2 (got 1)" in by_key["finetune_overrides.cv.folds"]
    assert "search.grid.finetune.optim.lr" not in by_key and len(info.value.problems) == 9


def test_literal_annotations_survive_omegaconf(tmp_path):
    """OmegaConf (structured configs) accepts the Literal fields, keeps plain strings and round-trips them."""
    cfg = load_config(PRETRAIN, ["trainer.amp=fp16", "data.cohort=all"])
    assert cfg.trainer.amp == "fp16" and type(cfg.trainer.amp) is str and cfg.data.cohort == "all"
    assert load_config(save_config(cfg, tmp_path / "c.yaml")) == cfg


def test_unreadable_yaml_files_name_the_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("trainer: {steps: [1,\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "child.yaml").write_text("base: broken.yaml\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML: .*line \d+"):
        load_config(tmp_path / "child.yaml")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_check_false_leaves_the_rules_to_the_caller():
    """Drivers validate with their data problems; load_config(check=False) then only refuses keys and types (and,
    when it refuses, lists the rule problems too)."""
    cfg = load_config(PRETRAIN, ["data.roi=[33,32,32]"], check=False)
    assert cfg.data.roi == [33, 32, 32]
    with pytest.raises(ConfigError) as info:
        validate(cfg, extra=["data.root: prepared does not exist"])
    assert [p.split(":")[0] for p in info.value.problems] == ["data.roi", "data.root"]
    with pytest.raises(ConfigError) as info:
        load_config(PRETRAIN, ["data.roi=[33,32,32]", "trainer.amp=fp32"], check=False)
    assert [p.split(":")[0] for p in info.value.problems] == ["trainer.amp", "data.roi"]
