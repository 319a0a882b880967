"""Import direction: cli -> tune -> train -> tasks -> {models, losses, data}; eval is used by train (never the other
way); petct never imports swinssl; config imports nothing of swinssl. Checked on every import statement of the
source tree, including the lazy ones inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWINSSL = ROOT / "platform" / "swinssl"
PETCT = ROOT / "preprocessing" / "petct"

# What each part of swinssl may import (besides itself, petct and third-party packages).
ALLOWED: dict[str, set[str]] = {
    "cli": {"deploy", "tune", "train", "tasks", "models", "losses", "data", "eval", "tracking", "config"},
    "deploy": {"train", "tasks", "models", "data", "eval", "tracking", "config"},
    "tune": {"train", "tasks", "models", "losses", "data", "eval", "tracking", "config"},
    "train": {"tasks", "models", "losses", "data", "eval", "tracking", "config"},
    "tasks": {"models", "losses", "data", "config"},
    "eval": {"models", "data", "config"},
    "models": {"config"},
    "losses": {"config"},
    "data": {"config"},
    "tracking": {"config"},
    "config": set(),
}


def _part(path: Path) -> str:
    """'train' for swinssl/train/loop.py, 'cli' for swinssl/cli.py."""
    rel = path.relative_to(SWINSSL)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_parts(path: Path, text: str | None = None) -> set[tuple[str, int]]:
    """(swinssl part, line) for every import of swinssl in one module (source `text`, default: the file's)."""
    package = ["swinssl", *path.relative_to(SWINSSL).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                # `from . import loop` names a module of the package itself
                names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "swinssl" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


SOURCES = sorted(p for p in SWINSSL.rglob("*.py") if p.name != "__init__.py" or p.parent != SWINSSL)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SWINSSL)))
def test_swinssl_imports_follow_the_layers(path: Path):
    part = _part(path)
    if part == "__init__":
        return
    assert part in ALLOWED, f"{path}: new top-level part {part!r}: add it to the layering table on purpose"
    wrong = sorted((target, line) for target, line in _imported_parts(path)
                   if target != part and target not in ALLOWED[part])
    assert not wrong, f"{path.relative_to(ROOT)} ({part}) imports {wrong}; allowed: {sorted(ALLOWED[part])}"


def test_petct_never_imports_swinssl_anywhere():
    offenders = []
    for path in PETCT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "swinssl"]
    assert not offenders


def test_the_layer_checker_sees_relative_and_lazy_imports():
    """The checker itself finds a relative import inside a function, so the test above cannot pass vacuously."""
    text = ("def f():\n    from ..train.checkpoint import load_state\n    from . import metrics\n"
            "    import swinssl.tune\n")
    found = {target for target, _ in _imported_parts(SWINSSL / "eval" / "evaluate.py", text)}
    assert found == {"train", "eval", "tune"}


def test_parquet_is_read_in_one_place():
    """One shard reader: pyarrow.parquet is imported only by petct/shards.py."""
    users = []
    for path in [*SWINSSL.rglob("*.py"), *PETCT.rglob("*.py")]:
        if path == PETCT / "shards.py":
            continue
        text = path.read_text()
        if "pyarrow.parquet" in text:
            users.append(str(path.relative_to(ROOT)))
    assert not users, f"read shards through petct.shards, not pyarrow.parquet directly: {users}"


def test_plotting_lives_with_plots():
    """matplotlib only in swinssl's plots modules: inference, training and metrics code draw nothing."""
    users = [str(p.relative_to(ROOT)) for p in SWINSSL.rglob("*.py")
             if p.name != "plots.py" and "matplotlib" in p.read_text()]
    assert not users, f"move drawing code into a plots.py module: {users}"
