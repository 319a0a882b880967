"""Loading configs: dataclass defaults <- a YAML file (with `base:`) <- dotted `key=value` overrides, every
unknown key, wrong type and broken rule reported together; `from_dict` for configs shipped to Ray workers;
`save_config` for the resolved config every run keeps."""

from __future__ import annotations

from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from petct.shards import atomic_write_text

from .keys import ConfigError, _keys_near
from .rules import _problems, _raise_problems, _type_problem, validate
from .stages import PretrainConfig

T = TypeVar("T")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """YAML with an optional `base:` (path relative to this file) merged underneath."""
    if path in seen:
        raise ConfigError(f"{path}: circular base chain {[str(p) for p in seen]}")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys, got a {type(node).__name__}")
    base = node.pop("base", None)
    if base:
        return OmegaConf.merge(_read_yaml((path.parent / base).resolve(), (*seen, path)), node)
    return node


def _omegaconf_problem(exc: OmegaConfBaseException, schema: type, where: str = "", raw: str | None = None) -> str:
    """`key: problem` from OmegaConf's error; an unknown key lists the valid keys of its section. For an override
    (`where`=its key, `raw` its value) of the wrong type: "key: must be of type int (got 'many')", as validate says
    it (OmegaConf's own text for anything deeper, e.g. one element of a list)."""
    key = getattr(exc, "full_key", None) or where
    text = str(exc).splitlines()[0]
    if isinstance(exc, ConfigKeyError):
        return f"{key}: unknown key: {text} (valid keys: {_keys_near(schema, key)})"
    hint = _hint_at(schema, key) if raw is not None and key == where else None
    if hint is not None:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        return _type_problem(key, hint, value) or f"{key}: {text}"
    return f"{key}: {text}" if key else text


def _hint_at(schema: type, key: str) -> Any:
    """The annotation of the dotted leaf `key` of `schema`, or None (not a leaf of nested dataclasses)."""
    hint: Any = schema
    for part in key.split("."):
        hint = get_type_hints(hint).get(part) if is_dataclass(hint) else None
        if hint is None:
            return None
    return None if is_dataclass(hint) else hint


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), schema: type[T] = PretrainConfig,
                check: bool = True) -> T:
    """Defaults <- YAML (with base) <- `key=value` overrides, checked against `schema` (keys and types) and then
    `validate`d; every problem found (each bad override, then every rule) comes in one ConfigError.

    `check=False` skips `validate` when keys and types are fine: for a caller that validates itself, with its
    data-dependent problems in the same error (the pretrain/finetune drivers), or a test of such a caller."""
    merged = OmegaConf.structured(schema)
    try:
        if path:
            merged = OmegaConf.merge(merged, _read_yaml(Path(path).resolve()))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_omegaconf_problem(exc, schema)}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    problems = []
    for override in overrides:  # one at a time, so that every bad override is reported, not only the first
        # `key=` means the empty string (e.g. encoder= for scratch), not YAML's null
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{override}''" if override.endswith("=")
                                                                     else override]))
        except OmegaConfBaseException as exc:
            problems.append(_omegaconf_problem(exc, schema, *override.split("=", 1)))
        except yaml.YAMLError as exc:  # the value part is parsed as YAML: `data.roi=[33,` or `x={a:b:c}`
            problems.append(f"{override.partition('=')[0]}: the value is not valid YAML: "
                            f"{str(exc).splitlines()[0]} (got {override.partition('=')[2]!r})")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:  # e.g. a mandatory value missing in the YAML
        _raise_problems([*problems, _omegaconf_problem(exc, schema)])
    # with check=False a key or type error still brings every other problem along: all of them in one error
    _raise_problems([*problems, *(_problems(cfg) if check or problems else [])])
    return cfg  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); it loads back with `load_config`."""
    path = Path(path)
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return path


def from_dict(data: dict, schema: type[T] = PretrainConfig) -> T:
    """Rebuild a config from `dataclasses.asdict` output (e.g. inside Ray workers), validated like a YAML."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_problem(exc, schema)) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


