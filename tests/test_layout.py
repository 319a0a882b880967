"""The `platform/` source root must never shadow the standard library module `platform`."""

import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_platform_is_stdlib():
    import platform

    assert Path(platform.__file__).resolve().parent == Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert callable(platform.system)


def test_source_roots_have_no_init():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert not (ROOT / "preprocessing" / "__init__.py").exists()


def test_packages_import_from_source_roots():
    import petct
    import swinssl

    assert Path(swinssl.__file__).resolve().is_relative_to(ROOT / "platform")
    assert Path(petct.__file__).resolve().is_relative_to(ROOT / "preprocessing")


def test_petct_never_imports_swinssl():
    for path in (ROOT / "preprocessing" / "petct").glob("*.py"):
        text = path.read_text()
        assert "import swinssl" not in text and "from swinssl" not in text, path.name
