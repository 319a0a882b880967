"""Exit codes mean what `swinssl --help` says: every config or input error exits 2 with one line naming the key or
file (`swinssl <verb>: error: ...`; several config problems: a count, then one line each), never a traceback and
never 4. Tested for every verb through the real CLI (`swinssl.cli.main`, and a few via the installed `swinssl`
script), all without Ray: validation happens before Ray starts (`make test-fast` refuses `ray.init`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swinssl.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
PRETRAIN, FINETUNE, SWEEP = (str(EXPERIMENTS / f"{n}_tiny.yaml") for n in ("pretrain", "finetune", "dataset_size"))
SWINSSL = Path(sys.executable).with_name("swinssl")


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """`swinssl ARGV` in this process: (exit code, stderr). argparse's usage errors exit through SystemExit."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _assert_input_error(code: int, err: str, verb: str, *names: str, lines: int = 1) -> list[str]:
    """Exit 2, `swinssl <verb>: error: ...` on `lines` lines (1, or a count line plus one per problem), no
    traceback, every one of `names` (keys, files, study ids) in the message."""
    text = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(text) == lines, err
    assert text[0].startswith(f"swinssl {verb}: error: "), err
    for name in names:
        assert name in err, (name, err)
    return text


# --- synth, prepare, export: petct input -----------------------------------------------------------------------

def test_synth_bad_out_is_an_input_error(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code, err = _run(["synth", "--out", str(tmp_path / "a_file" / "cohort"), "--unlabeled", "1", "--labeled", "0"],
                     capsys)
    _assert_input_error(code, err, "synth", "a_file")


def test_synth_bad_count_is_a_usage_error(tmp_path, capsys):
    code, err = _run(["synth", "--out", str(tmp_path), "--unlabeled", "many"], capsys)
    assert code == 2 and "--unlabeled" in err and "Traceback" not in err


def test_synth_negative_count_is_refused(tmp_path, capsys):
    code, err = _run(["synth", "--out", str(tmp_path / "c"), "--unlabeled", "-1", "--labeled", "0"], capsys)
    assert code == 2 and "argument --unlabeled: must be >= 0" in err and "Traceback" not in err  # argparse usage
    assert not (tmp_path / "c").exists()


def test_prepare_missing_input(tmp_path, capsys):
    code, err = _run(["prepare", "--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out"),
                      "--workers", "0", "--quiet"], capsys)
    _assert_input_error(code, err, "prepare", "nope.csv")


def test_prepare_refuses_an_input_without_studies(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _run(["prepare", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "out"),
                      "--workers", "0", "--quiet"], capsys)
    _assert_input_error(code, err, "prepare", str(tmp_path / "empty"))


@pytest.mark.parametrize("budget", ["0", "-5", "lots"])
def test_prepare_bad_volume_budget(tmp_path, capsys, budget):
    code, err = _run(["prepare", "--input", str(tmp_path), "--out", str(tmp_path / "out"), "--max-volume-mib", budget],
                     capsys)
    _assert_input_error(code, err, "prepare", "--max-volume-mib")


def test_prepare_volume_budget_fails_the_study_not_the_run(tmp_path, capsys):
    """A volume above `--max-volume-mib` is refused from its header (too_large), the run finishes with exit 3."""
    from petct.synth import synth_cohort

    cohort = synth_cohort(tmp_path / "cohort", unlabeled=1, labeled=0, seed=0, scale="small")
    code = main(["prepare", "--input", str(cohort), "--out", str(tmp_path / "out"), "--workers", "0", "--quiet",
                 "--no-qc", "--max-volume-mib", "0.5"])
    record = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    assert code == 3 and record["error_kind"] == "too_large" and "--max-volume-mib" in record["error"], record


@pytest.mark.parametrize("window", ["5,1", "abc"])
def test_prepare_bad_window(tmp_path, capsys, window):
    code, err = _run(["prepare", "--input", str(tmp_path), "--out", str(tmp_path / "out"), "--ct-window", window],
                     capsys)
    _assert_input_error(code, err, "prepare", "--ct-window")


def test_prepare_bad_labels_file(tmp_path, capsys):
    bad = tmp_path / "labels.yaml"
    bad.write_text("classes: {0: background, 2: lesion}\n")  # a gap in the values
    for labels in (bad, tmp_path / "missing.yaml"):
        code, err = _run(["prepare", "--input", str(tmp_path), "--out", str(tmp_path / "out"),
                          "--labels", str(labels)], capsys)
        _assert_input_error(code, err, "prepare", labels.name)


def test_export_unknown_study_and_unprepared_folder(tiny_prepared, tmp_path, capsys):
    code, err = _run(["export", str(tiny_prepared), "--study", "no_such_study", "--to", str(tmp_path)], capsys)
    _assert_input_error(code, err, "export", "'no_such_study'", str(tiny_prepared))
    assert not err.split("error: ", 1)[1].startswith('"')  # the KeyError's message, not its repr
    code, err = _run(["export", str(tmp_path), "--study", "lab_0000", "--to", str(tmp_path / "x")], capsys)
    _assert_input_error(code, err, "export", "manifest.jsonl")


# --- pretrain, finetune, sweep: configs and the data they need ---------------------------------------------------

STAGE_CASES = [
    ("bad_key", ["trainer.stepz=3"], ["trainer.stepz", "valid keys: trainer.steps"]),
    ("bad_value", ["trainer.steps=many"], ["trainer.steps", "many"]),
    ("roi_33", ["data.roi=[33,33,33]"], ["data.roi", "multiple of 32"]),
    ("feature_size_13", ["model.feature_size=13"], ["model.feature_size", "multiple of 12"]),
    ("bad_literal", ["trainer.amp=fp32"], ["trainer.amp", "bf16"]),
]


@pytest.mark.parametrize("verb,config", [("pretrain", PRETRAIN), ("finetune", FINETUNE)])
@pytest.mark.parametrize("case,overrides,names", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_stage_config_errors(verb, config, case, overrides, names, tiny_prepared, tmp_path, capsys):
    code, err = _run([verb, config, f"data.root={tiny_prepared}", f"output_dir={tmp_path / 'run'}", *overrides],
                     capsys)
    _assert_input_error(code, err, verb, *names)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_several_problems_are_listed_one_per_line(tmp_path, capsys):
    code, err = _run(["pretrain", PRETRAIN, f"output_dir={tmp_path}", "data.roi=[33,32,32]", "trainer.amp=fp32",
                      "model.feature_size=13"], capsys)
    lines = _assert_input_error(code, err, "pretrain", "data.roi", "trainer.amp", "model.feature_size", lines=4)
    assert lines[0] == "swinssl pretrain: error: 3 config problems:"


@pytest.mark.parametrize("verb,config", [("pretrain", PRETRAIN), ("finetune", FINETUNE)])
def test_stage_missing_data_root(verb, config, tmp_path, capsys):
    for root in ("", str(tmp_path / "not_prepared")):
        code, err = _run([verb, config, f"data.root={root}", f"output_dir={tmp_path / 'run'}"], capsys)
        _assert_input_error(code, err, verb, "data.root", *([root] if root else []))


def test_pretrain_subset_larger_than_the_cohort(tiny_prepared, tmp_path, capsys):
    code, err = _run(["pretrain", PRETRAIN, f"data.root={tiny_prepared}", f"output_dir={tmp_path / 'run'}",
                      "data.subset=5"], capsys)
    _assert_input_error(code, err, "pretrain", "data.subset", "5", "2")


def test_finetune_more_folds_than_labelled_studies(tiny_prepared, tmp_path, capsys):
    code, err = _run(["finetune", FINETUNE, f"data.root={tiny_prepared}", f"output_dir={tmp_path / 'run'}",
                      "cv.folds=3", "tracking.enabled=false"], capsys)
    _assert_input_error(code, err, "finetune", "cv.folds")


def test_finetune_encoder_of_another_shape(tiny_prepared, tmp_path, capsys):
    from swinssl.models.encoder_io import save_encoder
    from swinssl.models.ssl_head import SSLModel

    wrong = save_encoder(SSLModel(in_channels=2, feature_size=24), tmp_path / "enc24.pt")
    code, err = _run(["finetune", FINETUNE, f"data.root={tiny_prepared}", f"output_dir={tmp_path / 'run'}",
                      f"encoder={wrong}", "tracking.enabled=false"], capsys)
    _assert_input_error(code, err, "finetune", "feature_size")


def _sweep_yaml(tmp_path: Path, body: str) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: {SWEEP}\npretrain: {PRETRAIN}\nfinetune: {FINETUNE}\n{body}")
    return str(path)


SWEEP_CASES = [
    ("bad_key", "search: {grid: {loss.w_rot: [1.0, 0.0]}}\n", [], ["search.grid.loss.w_rot", "loss.w_rotation"]),
    ("bad_value", "search: {grid: {trainer.steps: [3, many]}}\n", [], ["search.grid.trainer.steps", "many"]),
    ("roi_33", "", ["pretrain_overrides={data: {roi: [33, 33, 33]}}"], ["pretrain_overrides.data.roi"]),
    ("feature_size_13", "finetune_overrides: {model: {feature_size: 13}}\n", [],
     ["finetune_overrides.model.feature_size"]),
    ("bad_literal", "search: {sample: {loss.temperature: {kind: gaussian}}}\n", [],
     ["search.sample.loss.temperature.kind", "loguniform"]),
    ("bad_sweep_key", "", ["search.gird={}"], ["search.gird", "valid keys: search.grid"]),
]


@pytest.mark.parametrize("case,body,overrides,names", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_sweep_config_errors(case, body, overrides, names, tiny_prepared, tmp_path, capsys):
    code, err = _run(["sweep", _sweep_yaml(tmp_path, body), f"data.root={tiny_prepared}",
                      f"output_dir={tmp_path / 'sweep'}", *overrides], capsys)
    _assert_input_error(code, err, "sweep", *names)
    assert not (tmp_path / "sweep").exists()


def test_sweep_missing_data_root_and_subset_larger_than_the_cohort(tiny_prepared, tmp_path, capsys):
    code, err = _run(["sweep", SWEEP, "data.root=", f"output_dir={tmp_path / 'sweep'}"], capsys)
    _assert_input_error(code, err, "sweep", "data.root")
    code, err = _run(["sweep", _sweep_yaml(tmp_path, "search: {grid: {data.subset: ['2', '9']}}\n"),
                      f"data.root={tiny_prepared}", f"output_dir={tmp_path / 'sweep'}"], capsys)
    _assert_input_error(code, err, "sweep", "data.subset", "9")


# --- report --------------------------------------------------------------------------------------------------------

def test_report_missing_folder(tmp_path, capsys):
    code, err = _run(["report", "--runs", f"a={tmp_path / 'no_run'}"], capsys)
    _assert_input_error(code, err, "report", "no_run")


def test_report_bad_sweep_ref(tmp_path, capsys, monkeypatch):
    """(An unknown sweep name in a real MLflow store exits 2 as well; left out here: creating the store takes ~8 s.)"""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, err = _run(["report", "--sweep", "no_such_sweep"], capsys)  # no tracking URI to look it up in
    _assert_input_error(code, err, "report", "--tracking-uri")
    code, err = _run(["report", "--sweep", str(tmp_path)], capsys)  # a folder that is no sweep output
    _assert_input_error(code, err, "report", "--tracking-uri")


def test_report_unusable_tracking_store(tmp_path, capsys):
    """A store MLflow cannot open (here a file:// URI pointing at a plain file) is an input error naming the URI."""
    (tmp_path / "not_a_store").write_text("")
    uri = f"file://{tmp_path / 'not_a_store'}"
    code, err = _run(["report", "--sweep", "some_sweep", "--tracking-uri", uri], capsys)
    _assert_input_error(code, err, "report", uri)


# --- the installed script ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,names", [
    (["pretrain", PRETRAIN, "data.roi=[33,33,33]"], ["data.roi"]),  # exited 4 "training failed" before validation
    (["report", "--runs", "a=/nonexistent/run"], ["/nonexistent/run"]),
], ids=["pretrain_roi_33", "report_missing_folder"])
def test_installed_script_exit_codes(argv, names, tmp_path, tiny_prepared):
    stage = [f"output_dir={tmp_path / 'run'}", f"data.root={tiny_prepared}"] if argv[0] == "pretrain" else []
    result = subprocess.run([str(SWINSSL), *argv, *stage],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    _assert_input_error(result.returncode, result.stderr, argv[0], *names)


def test_installed_script_usage_error():
    result = subprocess.run([str(SWINSSL), "pretrain"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "usage: swinssl pretrain" in result.stderr and not result.stdout
