"""Label maps (`--labels FILE`): parsing, every problem named, the JSON round trip of `labels.json`."""

from __future__ import annotations

import json

import pytest

from petct.labels import LABELS_FILE, PSMA, LabelSet, LabelSetError, read_label_set, write_label_set

TWO = LabelSet(("background", "lesion"), lesion=1)


@pytest.mark.parametrize(("text", "phrases"), [
    ("{0: background}", ["need background and at least one class"]),
    ("{0: background, 2: lesion}", ["0..1 without gaps", "[0, 2]"]),
    ("{1: liver, 2: lesion}", ["without gaps (0 = background)", "[1, 2]"]),
    ("{0: background, 1: liver, 2: liver}", ["duplicated class names ['liver']"]),
    ("{0: background, one: lesion}", ["label value 'one' is not an integer"]),
    ("{0: background, 1: }", ["label value 1: class name must be a non-empty string, got None"]),
    ("{0: background, 1: 7, x: lesion}", ["label value 1: class name", "'x' is not an integer"]),
    ("{0: background, '1': lesion, 1: liver}", ["label value 1 is given twice"]),
    ("[background, lesion]", ["expected a mapping", "list"]),
    ("classes: {0: background, 1: liver}\nlesion: tumour", ["lesion 'tumour' is not one of the classes ['liver']"]),
    ("classes: {0: background, 1: lesion}\ncolours: {}", ["unknown keys ['colours']", "valid: classes, lesion"]),
    ("classes: []", ["'classes' must be a non-empty mapping"]),
    ("{0: background, 1: [lesion", ["not valid YAML"]),
])
def test_each_problem_is_named_with_the_file(tmp_path, text, phrases):
    path = tmp_path / "map.yaml"
    path.write_text(text)
    with pytest.raises(LabelSetError) as info:
        LabelSet.load(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for phrase in phrases:
        assert phrase in message, message
    assert isinstance(info.value, ValueError)  # the CLI turns ValueError into exit 2


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(LabelSetError, match="label map file not found: .*nothing.yaml"):
        LabelSet.load(tmp_path / "nothing.yaml")
    bad = tmp_path / "map.json"
    bad.write_text('{"0": "background", "1": "lesion",}')
    with pytest.raises(LabelSetError, match=r"map.json: not valid JSON"):
        LabelSet.load(bad)


def test_plain_and_full_forms(tmp_path):
    (tmp_path / "two.yaml").write_text("{0: background, 1: lesion}\n")
    (tmp_path / "two.json").write_text('{"0": "background", "1": "lesion"}')
    (tmp_path / "three.yaml").write_text("classes:\n  0: background\n  1: liver\n  2: tumour\nlesion: tumour\n")
    (tmp_path / "organs.yaml").write_text("{0: background, 1: liver, 2: spleen}")
    assert LabelSet.load(tmp_path / "two.yaml") == TWO == LabelSet.load(tmp_path / "two.json")
    three = LabelSet.load(tmp_path / "three.yaml")
    assert (three.names, three.lesion, three.lesion_name, three.num_classes) == (
        ("background", "liver", "tumour"), 2, "tumour", 3)
    organs = LabelSet.load(tmp_path / "organs.yaml")
    assert organs.lesion is None and organs.lesion_name is None and list(organs.foreground) == [1, 2]
    assert TWO.describe() == "{0: background, 1: lesion}"


def test_labels_json_round_trip(tmp_path):
    assert read_label_set(tmp_path) == PSMA  # folders prepared before label sets existed
    three = LabelSet(("background", "liver", "tumour"), lesion=2)
    path = write_label_set(three, tmp_path)
    assert path == tmp_path / LABELS_FILE
    assert json.loads(path.read_text()) == {"classes": {"0": "background", "1": "liver", "2": "tumour"},
                                            "lesion": "tumour"}
    assert read_label_set(tmp_path) == three
    assert [p.name for p in tmp_path.iterdir()] == [LABELS_FILE]  # no temp file left behind
    assert LabelSet.from_dict(PSMA.to_dict()) == PSMA
