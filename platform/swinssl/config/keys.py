"""Config errors and dotted key names: the one error type every config problem is reported with, the flattened
`section.key` names MLflow params and sweep keys use, and the valid-key lists error messages show."""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass
from typing import Any


class ConfigError(ValueError):
    """A config file, override or value that does not fit the schema; `problems` lists every one found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{'loss.w_rotation': 1.0, ...}: MLflow params and sweep keys use these dotted names."""
    out: dict[str, Any] = {}
    for key, value in (asdict(cfg) if is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _valid_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += _valid_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _keys_near(schema: type, key: str) -> str:
    """The valid keys of `key`'s section (`loss.` for `loss.w_rot`), else all of them: short enough to read."""
    keys = _valid_keys(schema)
    section = key.rpartition(".")[0]
    near = [k for k in keys if section and k.startswith(section + ".")]
    return ", ".join(near or keys)
