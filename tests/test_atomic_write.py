"""The one atomic-write helper family (petct.shards): whole new content or the old one, never a temp file left."""

from __future__ import annotations

import json

import pytest

from petct.shards import atomic_write_bytes, atomic_write_json, atomic_write_text


def test_text_and_json_land_whole_in_a_new_folder(tmp_path):
    target = tmp_path / "new" / "folder" / "report.md"
    atomic_write_text(target, "héllo\n")
    assert target.read_bytes() == "héllo\n".encode()
    atomic_write_json(tmp_path / "new" / "m.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "new" / "m.json").read_text()) == {"a": [1, 2]}
    assert (tmp_path / "new" / "m.json").read_text().endswith("]\n}\n")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["folder", "m.json"]


def test_a_failed_write_keeps_the_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"step": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"step": object()})  # not serialisable: nothing is written
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "text, not bytes")  # fails inside the temp-file write
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_temp_files_go_to_tmp_dir_and_are_hidden(tmp_path):
    tmp = tmp_path / ".tmp"
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01", tmp)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert tmp.is_dir() and not list(tmp.iterdir())
    atomic_write_text(tmp_path / "b.txt", "x", tmp)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp", "a.bin", "b.txt"]
