"""Damaged records, output paths that cannot be written, and files that are not what an option
expects: each is one line ``asbound: error: ...`` (exit 2, no traceback) that names the file and
says what to do; the remedies it gives work; nothing in the run is changed by the refusal.

The runs are the smallest real ones (``tiny_runs``): builtin digits model, 8 datapoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import tiny_runs
from asbound.cli import main

NOT_JSON = b'{"n": 8, "as_score": 0.'  # a write cut short
DAMAGES = {"not JSON": NOT_JSON, "a list": b"[1, 2]\n", "binary": b"\x8b\x00\xff\xfe"}


def _snapshot(folder: Path) -> "dict[str, bytes]":
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _error(capsys, argv: "list[str]") -> str:
    """Run ``argv``; it must fail with one line on stderr, exit code 2; return that line."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("asbound: error: "), (rc, err)
    return lines[0]


def _last_error(capsys, argv: "list[str]") -> str:
    """Run ``argv``; it must fail with exit code 2 and one error line on stderr, the last (after
    what a run says as it goes); return that line."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("asbound: error: ")]
    assert rc == 2 and "Traceback" not in err and errors == lines[-1:], (rc, err)
    return lines[-1]


def _ok(capsys, argv: "list[str]") -> None:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    assert rc == 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One finished run of each kind, to copy (never changed)."""
    root = tmp_path_factory.mktemp("runs")
    for kind in ("score", "transfer", "sweep", "predict"):
        assert main(getattr(tiny_runs, kind)(root / kind)) == 0
    return root


@pytest.fixture
def copy(runs, tmp_path):
    def make(kind: str) -> Path:
        shutil.copytree(runs / kind, tmp_path / kind)
        return tmp_path / kind

    return make


# --- damaged records: table, plot and the rerun say which file and what to do -------------------------

# (run kind, damaged file, table style, words the remedy must hold)
RECORDS = {
    "score summary": ("score", "summary.json", "lemma1", ["delete it and rerun", "written again from points.csv"]),
    "score config": ("score", "config.json", "lemma1", ["choose another --out"]),
    "transfer final": ("transfer", "final.json", "transfer", ["delete it and rerun", "model.pt is kept"]),
    "transfer config": ("transfer", "config.json", "transfer", ["choose another --out"]),
    "sweep manifest": ("sweep", "sweep.json", "eps", ["another --out"]),
    "sweep cell": ("sweep", "eps-x2/summary.json", "eps", ["delete it and rerun"]),
    "predict": ("predict", "predict.json", "predict", ["delete it and rerun the predict command"]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("case", list(RECORDS))
def test_a_damaged_record_is_one_line_in_table_and_plot(case, damage, copy, capsys, tmp_path):
    kind, name, style, remedy = RECORDS[case]
    run = copy(kind)
    (run / name).write_bytes(DAMAGES[damage])
    before = _snapshot(run)
    for argv in (["table", run, "--style", style], ["plot", run, "--kind", "lhs-rhs", "--out", tmp_path / "f.png"]):
        if kind == "predict" and argv[0] == "plot":
            argv[3] = "predict"
        line = _error(capsys, argv)
        assert f"{run / name} is damaged" in line, line
        assert {"not JSON": "not JSON", "a list": "holds a list, not an object", "binary": "not text"}[damage] in line
        for words in remedy:
            assert words in line, (words, line)
    assert _snapshot(run) == before
    assert not (tmp_path / "f.png").exists()


def _set(path: str, value):
    """An edit of a JSON record: the field at the dotted ``path`` (list items by number) set to ``value``."""
    def edit(record: dict) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in parents:
            record = record[key]
        if value is KeyError:
            del record[last]
        else:
            record[last] = value
    return edit


def _edit_json(path: Path, edit) -> None:
    """``edit`` applied to the JSON record in ``path``."""
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


# (run kind, record, field, value, the problem named, commands that read the field); each command
# ended in a traceback (TypeError, ValueError, KeyError, AttributeError) before
FIELDS = {
    "summary as_score": ("score", "summary.json", "as_score", "x", "as_score is a string, not a number",
                         ["table lemma1", "plot lhs-rhs"]),
    "summary prop_fulfilled": ("score", "summary.json", "prop_fulfilled", "x",
                               "prop_fulfilled is a string, not a number",
                               ["table theorem2", "plot margin-vs-sensitivity"]),
    "final test": ("transfer", "final.json", "test", "x", "test is a string, not an object",
                   ["table transfer", "rerun"]),
    "final no test": ("transfer", "final.json", "test", KeyError, "test is missing", ["rerun"]),
    "final pgd key": ("transfer", "final.json", "test.pgd", {"x": 0.5},
                      "test.pgd has the key 'x'; its keys are step counts", ["rerun"]),
    "final clean accuracy": ("transfer", "final.json", "test.clean_accuracy", "x",
                             "test.clean_accuracy is a string, not a number", ["table transfer", "rerun"]),
    "final score_after": ("transfer", "final.json", "score_after", "x", "score_after is a string, not an object",
                          ["table lemma1", "plot lhs-rhs", "rerun"]),
    "final stage": ("transfer", "final.json", "stages.0", "x", "stages[0] is a string, not an object", ["rerun"]),
    "final method": ("transfer", "final.json", "method", 3, "method is a number, not a string", ["rerun"]),
    "sweep params": ("sweep", "sweep.json", "cells.0.params", "x", "cells[0].params is a string, not an object",
                     ["table eps", "plot eps"]),
    "sweep base": ("sweep", "sweep.json", "base", "x", "base is a string, not an object", ["rerun"]),
    "predict config": ("predict", "predict.json", "config", [1], "config is a list, not an object", ["rerun"]),
    "predict tasks": ("predict", "predict.json", "tasks", "x", "tasks is a string, not a list",
                      ["table predict", "plot predict"]),
    "predict ratio": ("predict", "predict.json", "tasks.0.ratio", "x", "tasks[0].ratio is a string, not a number",
                      ["table predict"]),
    "predict pretrain": ("predict", "predict.json", "pretrain", "x", "pretrain is a string, not an object",
                         ["table predict"]),
    "predict threshold": ("predict", "predict.json", "threshold", "x", "threshold is a string, not a number",
                          ["table predict"]),
    "predict spearman": ("predict", "predict.json", "spearman", "x", "spearman is a string, not an object",
                         ["table predict"]),
    "predict task null": ("predict", "predict.json", "tasks.0", None, "tasks[0] is null, not an object",
                          ["table predict", "plot predict"]),
    "final stage null": ("transfer", "final.json", "stages.0", None, "stages[0] is null, not an object", ["rerun"]),
    "summary lemma1_all null": ("score", "summary.json", "lemma1_all", [None],
                                "lemma1_all[0] is null, not an object", ["table lemma1"]),
}


@pytest.mark.parametrize("case", list(FIELDS))
def test_a_record_with_a_field_of_another_type_is_one_line(case, copy, capsys, tmp_path):
    """Valid JSON whose fields are not what asbound writes: one line naming the file, the field
    and what to do, from every command that reads it; nothing in the run changes."""
    kind, name, field, value, problem, commands = FIELDS[case]
    run = copy(kind)
    record = json.loads((run / name).read_text())
    _set(field, value)(record)
    (run / name).write_text(json.dumps(record))
    before = _snapshot(run)
    for command in commands:
        verb, what = command.split()[0], command.split()[-1]
        argv = {"table": ["table", run, "--style", what], "plot": ["plot", run, "--kind", what, "--out",
                                                                    tmp_path / "f.png"],
                "rerun": getattr(tiny_runs, kind)(run)}[verb]
        line = _error(capsys, argv)
        assert f"{run / name} is damaged or not asbound's ({problem})" in line, (command, line)
        assert REMEDY_WORDS[name] in line, (command, line)
    assert _snapshot(run) == before
    assert not (tmp_path / "f.png").exists()


REMEDY_WORDS = {"summary.json": "written again from points.csv", "final.json": "model.pt is kept",
                "sweep.json": "another --out", "predict.json": "delete it and rerun the predict command"}


def test_a_sweep_whose_cells_are_not_a_list_is_one_line(copy, capsys):
    run = copy("sweep")
    (run / "sweep.json").write_text(json.dumps({**json.loads((run / "sweep.json").read_text()), "cells": "x"}))
    before = _snapshot(run)
    line = _error(capsys, ["table", run, "--style", "eps"])
    assert f"{run / 'sweep.json'} is damaged" in line and "cells" in line
    line = _error(capsys, tiny_runs.sweep(run))
    assert f"{run / 'sweep.json'} is damaged or not asbound's (cells is a string, not a list)" in line
    assert "another --out" in line
    assert _snapshot(run) == before


@pytest.mark.parametrize("damage, problem", [
    (b"\x8b\x00\xff\xfe\n", "not text"),
    (b"a,b\n1,2\n", "no position column"),
    (b"position,index\nx,1\n", "position 'x' in row 1 is not a whole number"),
])
def test_damaged_points_are_one_line_in_plot_and_rerun_and_deleting_them_rescores(damage, problem, copy, capsys,
                                                                                    runs, tmp_path):
    run = copy("score")
    (run / "points.csv").write_bytes(damage)
    before = _snapshot(run)
    plot = _error(capsys, ["plot", run, "--kind", "margin-vs-sensitivity", "--out", tmp_path / "f.png"])
    rerun = _error(capsys, tiny_runs.score(run))
    for line in (plot, rerun):
        assert f"{run / 'points.csv'} is damaged" in line and problem in line
        assert "delete it to score every datapoint again" in line
    assert _snapshot(run) == before
    (run / "points.csv").unlink()  # the remedy
    _ok(capsys, tiny_runs.score(run))
    pd.testing.assert_frame_equal(pd.read_csv(run / "points.csv"), pd.read_csv(runs / "score" / "points.csv"))


def _robust_maybe(points: pd.DataFrame) -> pd.DataFrame:
    robust = points["robust"].astype(object)
    robust[:] = ["maybe"] + ["False"] * 3 + ["True"] * (len(points) - 4)
    return points.assign(robust=robust)


# (edit of a real points.csv, the problem named); before, the rerun summarised them silently
# (a summary with n 15 or 16 for an 8-point run; 'maybe' and 'False' counted robust: robust
# accuracy 100% for 4 of 8 recorded robust) or ended in a traceback (plot: ValueError)
POINT_DAMAGES = {
    "a position twice": (lambda p: p.assign(position=[0] + list(p["position"][1:-1]) + [0]),
                         "position 0 is in rows 1 and 8"),
    "positions outside the run": (lambda p: p.assign(position=p["position"] + 90),
                                  "position 90 is outside this run's 8 datapoints"),
    "a margin that is no number": (lambda p: p.assign(margin=["abc"] + list(p["margin"][1:])),
                                   "margin 'abc' in row 1 is not a number"),
    "robust neither True nor False": (_robust_maybe, "robust 'maybe' in row 1 is not True or False"),
}


@pytest.mark.parametrize("case", list(POINT_DAMAGES))
def test_points_with_damaged_rows_are_one_line_in_plot_and_rerun(case, copy, capsys, runs, tmp_path):
    edit, problem = POINT_DAMAGES[case]
    run = copy("score")
    edit(pd.read_csv(run / "points.csv")).to_csv(run / "points.csv", index=False)
    before = _snapshot(run)
    lines = [_error(capsys, tiny_runs.score(run))]
    if case != "positions outside the run":  # (the plot does not know the run's size)
        lines.append(_error(capsys, ["plot", run, "--kind", "margin-vs-sensitivity", "--out", tmp_path / "f.png"]))
    for line in lines:
        assert f"{run / 'points.csv'} is damaged or not asbound's ({problem})" in line, line
        assert "delete it to score every datapoint again" in line
    assert _snapshot(run) == before
    (run / "points.csv").unlink()  # the remedy
    _ok(capsys, tiny_runs.score(run))
    pd.testing.assert_frame_equal(pd.read_csv(run / "points.csv"), pd.read_csv(runs / "score" / "points.csv"))


@pytest.mark.parametrize("rows", ["all", "some"])
def test_points_without_a_column_the_run_writes_are_refused_not_appended_to(rows, copy, capsys):
    """Before: KeyError 'sensitivity' (every row there), or the rerun appended rows one column wider
    than the header (some rows there), which the next read refused as not a CSV table."""
    run = copy("score")
    points = pd.read_csv(run / "points.csv").drop(columns=["sensitivity"])
    (points if rows == "all" else points.iloc[:5]).to_csv(run / "points.csv", index=False)
    before = _snapshot(run)
    line = _error(capsys, tiny_runs.score(run))
    assert f"{run / 'points.csv'} is damaged or not asbound's (no sensitivity column)" in line, line
    assert "delete it to score every datapoint again" in line
    assert _snapshot(run) == before


def test_points_without_rows_are_one_line_in_plot(copy, capsys, tmp_path):
    run = copy("score")
    pd.read_csv(run / "points.csv").iloc[:0].to_csv(run / "points.csv", index=False)
    line = _error(capsys, ["plot", run, "--kind", "margin-vs-sensitivity", "--out", tmp_path / "f.png"])
    assert f"{run / 'points.csv'} is damaged or not asbound's (no rows)" in line, line
    _ok(capsys, tiny_runs.score(run))  # the rerun scores every datapoint again


def test_a_damaged_summary_is_written_again_by_the_rerun(copy, runs, capsys):
    run = copy("score")
    (run / "summary.json").write_bytes(NOT_JSON)
    _ok(capsys, tiny_runs.score(run))
    assert json.loads((run / "summary.json").read_text()) == json.loads((runs / "score" / "summary.json").read_text())


def test_a_damaged_score_config_refuses_the_rerun(copy, capsys):
    run = copy("score")
    (run / "config.json").write_bytes(NOT_JSON)
    before = _snapshot(run)
    line = _error(capsys, tiny_runs.score(run))
    assert str(run / "config.json") in line and "choose another --out" in line
    assert _snapshot(run) == before


def test_a_control_character_in_a_config_is_named_once(copy, tmp_path, capsys):
    """json's message ends in 'at' ('Invalid control character at'): before, 'at at line 1'."""
    run = copy("transfer")
    (run / "config.json").write_text('{"model": "a\nb"}')
    for argv in (tiny_runs.transfer(run), _score_run(run, tmp_path)):
        line = _error(capsys, argv)
        assert "(not JSON: Invalid control character at line 1 column 13)" in line, line


def test_a_damaged_sweep_manifest_refuses_the_rerun(copy, capsys):
    run = copy("sweep")
    (run / "sweep.json").write_bytes(NOT_JSON)
    before = _snapshot(run)
    line = _error(capsys, tiny_runs.sweep(run))
    assert f"{run / 'sweep.json'} is damaged" in line and "another --out" in line
    assert _snapshot(run) == before


def test_a_damaged_prediction_refuses_the_rerun_and_deleting_it_reuses_the_runs(copy, runs, capsys):
    run = copy("predict")
    (run / "predict.json").write_bytes(NOT_JSON)
    before = _snapshot(run)
    line = _error(capsys, tiny_runs.predict(run))
    assert f"{run / 'predict.json'} is damaged" in line and "delete it and rerun the predict command" in line
    assert _snapshot(run) == before
    (run / "predict.json").unlink()  # the remedy
    _ok(capsys, tiny_runs.predict(run))
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k != "predict.json"} == {
        k: v for k, v in before.items() if k != "predict.json"}  # every run reused, none rescored
    old, new = (json.loads((p / "predict.json").read_text()) for p in (runs / "predict", run))
    assert new["tasks"] == old["tasks"] and new["pretrain"] == old["pretrain"]


def test_damaged_transfer_records_and_their_remedies(tmp_path, capsys):
    """A transfer run cannot move (its score records name it): damaged in place, repaired in place."""
    run = tmp_path / "lp"
    _ok(capsys, tiny_runs.transfer(run))
    weights, final = (run / "model.pt").read_bytes(), json.loads((run / "final.json").read_text())

    (run / "final.json").write_bytes(NOT_JSON)
    before = _snapshot(run)
    line = _error(capsys, tiny_runs.transfer(run))
    assert f"{run / 'final.json'} is damaged" in line and "model.pt is kept" in line
    assert _snapshot(run) == before
    (run / "final.json").unlink()  # the remedy: evaluated and scored again, not retrained
    _ok(capsys, tiny_runs.transfer(run))
    assert (run / "model.pt").read_bytes() == weights
    again = json.loads((run / "final.json").read_text())
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in final.items() if k != "seconds"}

    (run / "model.pt").write_bytes(b"garbage\n")  # run:DIR, and the rerun that evaluates it, say what to delete
    line = _error(capsys, ["score", "--model", f"run:{run}", "--data", "digits", "--classes", "5-9", "--n", "4",
                           "--out", tmp_path / "s"])
    assert f"run:{run}: {run / 'model.pt'} is not a torch.save file" in line and "weights_only" not in line
    assert "delete model.pt and final.json" in line
    (run / "final.json").unlink()
    assert _error(capsys, tiny_runs.transfer(run)) == line
    (run / "model.pt").unlink()  # the remedy: rebuilt from the checkpoints
    _ok(capsys, tiny_runs.transfer(run))
    assert (run / "model.pt").read_bytes() == weights

    (run / "final.json").unlink()  # stages.json is read when model.pt is evaluated again
    stages = (run / "stages.json").read_bytes()
    (run / "stages.json").write_bytes(b"[{")
    line = _error(capsys, tiny_runs.transfer(run))
    assert f"{run / 'stages.json'} is damaged" in line and "delete it, model.pt and final.json" in line
    for name in ("stages.json", "model.pt"):  # the remedy (final.json is gone already)
        (run / name).unlink()
    _ok(capsys, tiny_runs.transfer(run))
    assert (run / "stages.json").read_bytes() == stages and (run / "model.pt").read_bytes() == weights


# --- table --out and plot --out to a path that cannot be written ------------------------------------


def _unwritable(tmp_path: Path) -> "dict[str, tuple[Path, str]]":
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "a_dir.png").mkdir()
    cases = {"under a file": (tmp_path / "a_file" / "sub" / "t.png", "a_file is a file, not a folder"),
             "a directory": (tmp_path / "a_dir.png", "is a directory")}
    if Path("/proc/self").is_dir():  # a virtual file system: no folder can be made in /proc
        cases["in /proc"] = (Path("/proc/x/t.png"), "/proc/x cannot be created")
    return cases


@pytest.mark.parametrize("case", ["under a file", "a directory", "in /proc"])
def test_table_and_plot_out_that_cannot_be_written(case, runs, tmp_path, capsys):
    cases = _unwritable(tmp_path)
    if case not in cases:
        pytest.skip("no /proc here")
    out, reason = cases[case]
    before = _snapshot(tmp_path)
    table = _error(capsys, ["table", runs / "score", "--style", "lemma1", "--out", out])
    plot = _error(capsys, ["plot", runs / "score", "--kind", "lhs-rhs", "--out", out])
    for line in (table, plot):
        assert "--out" in line and reason in line, line
    assert _snapshot(tmp_path) == before  # no stray temporary file


def test_table_and_plot_out_create_their_folder(runs, tmp_path, capsys):
    _ok(capsys, ["table", runs / "score", "--style", "lemma1", "--out", tmp_path / "new" / "t.md"])
    _ok(capsys, ["plot", runs / "score", "--kind", "lhs-rhs", "--out", tmp_path / "new" / "deeper" / "f.png"])
    assert "Lemma 1" in (tmp_path / "new" / "t.md").read_text()
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["f.pdf", "f.png"]
    assert (tmp_path / "new" / "deeper" / "f.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "new" / "deeper" / "f.pdf").read_bytes().startswith(b"%PDF")


# --- files that are not what the option expects --------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    (root / "text.pt").write_text("this is not a checkpoint\n")
    (root / "garbage.pt").write_bytes(b"garbage")  # torch's own advice here: "weights_only=False"
    torch.save(nn.Linear(64, 5), root / "module.pt")
    torch.save(nn.Linear(64, 5).state_dict(), root / "state.pt")
    (root / "truncated.pt").write_bytes((root / "state.pt").read_bytes()[:300])
    nan_head = nn.Linear(64, 5)
    nan_head.weight.data[0, 0] = float("nan")
    torch.save(nan_head.state_dict(), root / "nan_head.pt")
    torch.save({"weight": torch.zeros(0, 64), "bias": torch.zeros(0)}, root / "no_rows.pt")
    for name, layer, value in (("nan_model.pt", 3, float("nan")), ("inf_model.pt", 1, float("inf"))):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
        model[layer].weight.data[0, 0] = value
        torch.save(model, root / name)
    (root / "a_folder.pt").mkdir()
    return root


SCORE = ["score", *tiny_runs.DIGITS, "--classes", "0-4", "--n", "4", "--steps", "1", "--no-progress"]


@pytest.mark.parametrize("option, name, expected", [
    ("file", "text.pt", "is not a torch.save file"),
    ("file", "garbage.pt", "is not a torch.save file"),
    ("file", "truncated.pt", "is not a torch.save file"),
    ("file", "state.pt", "holds OrderedDict (a state dict?), not an nn.Module"),
    ("file", "module.pt", "holds pickled Python objects (torch.nn.modules.linear.Linear)"),
    ("--head", "text.pt", "is not a torch.save file"),
    ("--head", "garbage.pt", "is not a torch.save file"),
    ("--head", "truncated.pt", "is not a torch.save file"),
    ("--head", "module.pt", "is not a state dict: it holds pickled Python objects (torch.nn.modules.linear.Linear)"),
    ("--weights", "garbage.pt", "is not a torch.save file"),
    # before: a LinAlgError and a RuntimeError traceback; 'does not exist' for a folder
    ("--head", "nan_head.pt", "holds non-finite values (nan or inf) in its weight"),
    ("--head", "no_rows.pt", "must hold {'weight': [K, 64], 'bias': [K]} with K >= 1"),
    ("--head", "a_folder.pt", "is a directory, not a file"),
    ("file", "a_folder.pt", "is a directory, not a file"),
])
def test_a_file_that_is_not_what_the_option_expects(option, name, expected, files, tmp_path, capsys):
    path = files / name
    if option == "file":
        argv = ["score", "--model", f"file:{path}", "--data", "digits", "--n", "4"]
    elif option == "--head":
        argv = [*SCORE, "--head", path]
    else:
        argv = ["score", "--model", "torchvision:resnet18", "--weights", path, "--data", "digits", "--n", "4"]
    line = _error(capsys, [*argv, "--out", tmp_path / "out"])
    assert str(path) in line and expected in line, line
    assert "weights_only" not in line  # never the advice to unpickle an unknown file
    if expected.startswith("is not a torch.save file") or "not an nn.Module" in expected:
        assert "--allow-pickle" not in line and "pickled nn.Module" not in line


@pytest.mark.parametrize("name, expected", [
    ("nan_model.pt", "the model's parameter 3.weight holds nan"),
    ("inf_model.pt", "the model's parameter 1.weight holds inf"),
])
def test_a_model_whose_weights_are_not_finite_says_so(name, expected, files, tmp_path, capsys):
    """Before: 'cannot run on digits inputs of shape 1x8x8: RuntimeError: atol must be greater than
    or equal to zero, but got -nan; give data in the model's input format, or --resize SIDE'."""
    line = _error(capsys, ["score", "--model", f"file:{files / name}", "--allow-pickle", "--data", "digits",
                           "--n", "4", "--out", tmp_path / "out"])
    assert expected in line and "--resize" not in line, line
    assert not (tmp_path / "out").exists()


def test_a_text_file_is_no_pickled_module_with_allow_pickle_either(files, tmp_path, capsys):
    line = _error(capsys, ["score", "--model", f"file:{files / 'text.pt'}", "--allow-pickle", "--data", "digits",
                           "--out", tmp_path / "out"])
    assert "is not a torch.save file" in line and "pickled" not in line


def _edit_config(run: Path, edit) -> None:
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))


def _score_run(run: Path, tmp_path: Path) -> "list":
    return ["score", "--model", f"run:{run}", "--data", "digits", "--classes", "5-9", "--n", "4", "--steps", "1",
            "--no-progress", "--out", tmp_path / "scored"]


@pytest.mark.parametrize("case, edit, expected", [
    ("base garbage", lambda c: c.update(base="garbage"), "(its base is str, not an object)"),
    ("no base model", lambda c: c["base"].pop("model"), "(its base has no model spec)"),
    ("bad input shape", lambda c: c["base"].update(input_shape="x"), "input_shape 'x' is not a list of sizes"),
    ("bad classes", lambda c: c.update(num_classes="5"), "num_classes '5' is not a whole number"),
    ("classes true", lambda c: c.update(num_classes=True), "num_classes True is not a whole number >= 1"),
    ("no classes", lambda c: c.update(num_classes=0), "num_classes 0 is not a whole number >= 1"),
    ("negative input shape", lambda c: c["base"].update(input_shape=[1, -8, 8]),
     "input_shape [1, -8, 8] is not a list of sizes"),
    ("fractional input shape", lambda c: c["base"].update(input_shape=[1, 8.0, 8]),
     "input_shape [1, 8.0, 8] is not a list of sizes"),
    # before: RuntimeError (a 1-channel model on 3x32x32) and TypeError (PeftSpec(x=1)) tracebacks
    ("input shape of another model", lambda c: c["base"].update(input_shape=[3, 32, 32]),
     "its base model builtin:digits-adversarial/digits0-4 cannot run on its input_shape [3, 32, 32]: "),
    ("structure of other keys", lambda c: c.update(structure={"x": 1}),
     "its structure has the key 'x'; a saved structure has variant, rank"),
    ("structure of other types", lambda c: c.update(structure={"variant": "adapter", "reduction": "8"}),
     "its structure's reduction '8' is not a whole number"),
])
def test_a_run_whose_config_is_not_a_transfer_config(case, edit, expected, copy, tmp_path, capsys):
    run = copy("transfer")
    _edit_config(run, edit)
    line = _error(capsys, _score_run(run, tmp_path))
    assert f"run:{run}: {run / 'config.json'} is damaged or not asbound's" in line and expected in line, line
    assert "rerun its `asbound transfer` command into another --out" in line


def test_a_run_whose_config_is_not_json_says_so(copy, tmp_path, capsys):
    run = copy("transfer")
    (run / "config.json").write_bytes(NOT_JSON)
    line = _error(capsys, _score_run(run, tmp_path))
    assert f"{run / 'config.json'} is damaged (not JSON" in line and "no config.json" not in line


def test_a_run_with_an_unknown_base_model_names_the_run(copy, tmp_path, capsys):
    run = copy("transfer")
    _edit_config(run, lambda c: c["base"].update(model="builtin:nope"))
    line = _error(capsys, _score_run(run, tmp_path))
    assert f"run:{run}: its base model builtin:nope (in {run / 'config.json'}) does not load" in line
    assert "unknown builtin model 'nope'" in line


@pytest.mark.parametrize("directory, expected", [
    ("score", "(a score run)"), ("sweep", "(a sweep)"), ("predict", "(a prediction)"),
])
def test_run_of_another_kind_of_directory_says_which(directory, expected, runs, tmp_path, capsys):
    line = _error(capsys, _score_run(runs / directory, tmp_path))
    assert "holds no `asbound transfer` run " + expected in line


def test_a_state_dict_mismatch_names_the_keys_and_shapes(copy, tmp_path, capsys):
    run = copy("transfer")
    state = torch.load(run / "model.pt", weights_only=True)
    dropped = sorted(k for k in state if k.startswith("backbone."))[:5]
    for key in dropped:
        del state[key]
    state["extra.weight"] = torch.zeros(2)
    shape = list(state["head.weight"].shape)
    state["head.weight"] = torch.zeros(3, 4)
    torch.save(state, run / "model.pt")
    line = _error(capsys, _score_run(run, tmp_path))
    assert "Error(s) in loading" not in line
    assert f"5 missing: {', '.join(dropped[:3])} and 2 more" in line
    assert "1 unexpected: extra.weight" in line
    assert f"1 of another shape: head.weight (3x4 in the file, {shape[0]}x{shape[1]} in the model)" in line


# --- transfer checkpoints: one line naming the file, a fallback to last.prev.pt where it is good ------

TWO_EPOCHS = ["--epochs", "2", "--no-score"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A finished two-epoch tiny transfer run (never changed): last.pt after epoch 2, last.prev.pt
    after epoch 1."""
    out = tmp_path_factory.mktemp("two") / "lp"
    assert main(tiny_runs.transfer(out, *TWO_EPOCHS)) == 0
    return out


def _checkpoint(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _momentum_of_another_shape(state: dict) -> None:
    for buffers in state["progress"]["optimizer"]["state"].values():
        buffers["momentum_buffer"] = torch.zeros(3)


def _other_groups(state: dict) -> None:
    groups = state["progress"]["optimizer"]["param_groups"]
    groups.append(dict(groups[0]))


# what a last.pt that loads holds instead of asbound's state, and the problem named; each ended in
# a traceback on resume (TypeError, ValueError, IndexError, RuntimeError)
LAST_DAMAGES = {
    "epoch a string": (_set("progress.epoch", "2"), "progress.epoch is a string, not a whole number"),
    "epoch null": (_set("progress.epoch", None), "progress.epoch is null"),
    "optimiser state a list": (_set("progress.optimizer", [1, 2]), "progress.optimizer is a list, not an object"),
    "optimiser state of other groups": (_other_groups, "its optimiser state does not fit this stage: ValueError"),
    "stage a string": (_set("stage", "x"), "stage is a string, not a whole number"),
    "a stage the method lacks": (_set("stage", 3), "stage 3 is outside the method's stages 0 to 0"),
    "weights a list": (_set("model", [1]), "model is a list, not an object"),
    "another model's weights": (_set("model", nn.Linear(2, 3).state_dict()),
                                "its weights do not fit this run's model: 18 missing: "),
    "history an object": (_set("history", {"a": 1}), "history is an object, not a list"),
    "progress of other keys": (_set("progress.foo", 1), "progress has the key 'foo'"),
    # before: a traceback (TypeError, RuntimeError) when a resumed epoch trains on, or an epoch
    # the stage lacks resumed as if the stage had ended
    "a history row null": (lambda state: state["progress"]["history"].append(None),
                           "progress.history[2] is null, not an object"),
    "a weight's key no string": (lambda state: state["model"].update({0: torch.zeros(1)}),
                                 "its weights do not fit this run's model: 1 unexpected: 0"),
    "a learning rate of text": (lambda state: state["progress"]["optimizer"]["param_groups"][0].update(lr="x"),
                                "its optimiser's lr is a string, not a number"),
    "an epoch the stage lacks": (_set("progress.epoch", 7), "progress.epoch 7 is outside stage lp's 0 to 2"),
    "momentum of another shape": (_momentum_of_another_shape,
                                  "its optimiser's momentum_buffer is 3 for a parameter of 5x64"),
    "a schedule of other types": (_set("progress.scheduler.last_epoch", "x"),
                                  "its schedule state is not one asbound writes"),
    # before: resumed with a fresh optimiser, silently (another model.pt than the uninterrupted run's)
    "no optimiser state": (_set("progress.optimizer", None), "progress.optimizer is null after epoch 2"),
}


@pytest.mark.parametrize("case", list(LAST_DAMAGES))
def test_a_last_checkpoint_of_wrong_types_falls_back_or_is_one_line(case, two_epochs, tmp_path, capsys):
    edit, problem = LAST_DAMAGES[case]
    run = tmp_path / "lp"
    shutil.copytree(two_epochs, run)
    checkpoints = run / "checkpoints"
    for name in ("final.json", "model.pt"):  # interrupted after epoch 2: resumed from last.pt
        (run / name).unlink()
    _checkpoint(checkpoints / "last.pt", edit)
    capsys.readouterr()
    assert main(tiny_runs.transfer(run, *TWO_EPOCHS)) == 0
    said = " ".join(capsys.readouterr().err.split())  # the note wraps at 80 columns
    assert "resuming lp: stage lp, after epoch 1" in said, said
    assert f"checkpoints/last.pt is damaged or not asbound's ({problem}" in said, said
    assert "resumed from last.prev.pt" in said
    # the fallback is a whole epoch's state: the result is the uninterrupted run's
    assert (run / "model.pt").read_bytes() == (two_epochs / "model.pt").read_bytes()
    assert pd.read_csv(run / "epochs.csv")["epoch"].tolist() == [1, 2]
    # the damaged last.pt went: the fallback stays last.prev.pt, not replaced by the damaged file
    assert (checkpoints / "last.prev.pt").read_bytes() == (two_epochs / "checkpoints" / "last.prev.pt").read_bytes()
    # neither usable: one line naming last.pt, nothing changed
    for name in ("final.json", "model.pt"):
        (run / name).unlink()
    for name in ("last.pt", "last.prev.pt"):
        _checkpoint(checkpoints / name, edit)
    before = _snapshot(run)
    line = _error(capsys, tiny_runs.transfer(run, *TWO_EPOCHS))
    assert f"{checkpoints / 'last.pt'} is damaged or not asbound's ({problem}" in line, line
    assert "and no earlier checkpoint is usable (last.prev.pt is damaged or not asbound's (" in line, line
    assert f"delete {checkpoints} to train" in line
    assert _snapshot(run) == before


def test_a_last_checkpoint_that_cannot_be_read_now_is_kept(two_epochs, tmp_path, capsys, monkeypatch):
    """Before: a PermissionError read as 'unreadable (truncated?)', and the good last.pt deleted
    for last.prev.pt."""
    run = tmp_path / "lp"
    shutil.copytree(two_epochs, run)
    for name in ("final.json", "model.pt"):
        (run / name).unlink()
    opened = Path.open

    def denied(self: Path, *args, **kwargs):  # as for a file of another user (the tests may run as root)
        if self.name == "last.pt":
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    before = _snapshot(run)
    monkeypatch.setattr(Path, "open", denied)
    line = _error(capsys, tiny_runs.transfer(run, *TWO_EPOCHS))
    monkeypatch.undo()
    assert f"{run / 'checkpoints' / 'last.pt'} cannot be read (Permission denied); it is kept" in line, line
    assert _snapshot(run) == before


def test_a_last_checkpoint_that_is_a_directory_is_one_line_and_kept(two_epochs, tmp_path, capsys):
    """Before: 'is missing', then an IsADirectoryError traceback removing it."""
    run = tmp_path / "lp"
    shutil.copytree(two_epochs, run)
    for name in ("final.json", "model.pt", "checkpoints/last.pt"):
        (run / name).unlink()
    (run / "checkpoints" / "last.pt").mkdir()
    before = _snapshot(run)
    line = _error(capsys, tiny_runs.transfer(run, *TWO_EPOCHS))
    assert f"{run / 'checkpoints' / 'last.pt'} is a directory, not a checkpoint; move it out of" in line, line
    assert _snapshot(run) == before and (run / "checkpoints" / "last.pt").is_dir()


def _best(run: Path) -> Path:
    return run / "checkpoints" / "0-lp-best.pt"


def _head_of_another_shape(run: Path) -> None:
    _checkpoint(_best(run), lambda state: state.update({"head.weight": torch.zeros(3, 64)}))


# best.pt damaged; before: a RuntimeError traceback (another model's weights), "unreadable
# (truncated?)" for a file that is missing or holds no state dict
BEST_DAMAGES = {
    "another model's weights": (lambda run: torch.save(nn.Linear(3, 2).state_dict(), _best(run)),
                                "is damaged or not asbound's (its weights do not fit this run's model: 18 missing: "
                                "backbone.features.conv.0.bias, backbone.features.conv.0.weight, "
                                "backbone.features.conv.2.bias and 15 more; 2 unexpected: bias, weight)"),
    "a head of another shape": (_head_of_another_shape,
                                "is damaged or not asbound's (its weights do not fit this run's model: 1 of another "
                                "shape: head.weight (3x64 in the file, 5x64 in the model))"),
    "missing": (lambda run: _best(run).unlink(), "is missing"),
    "a key that is no string": (lambda run: _checkpoint(_best(run), lambda state: state.update({0: torch.zeros(1)})),
                                "is damaged or not asbound's (its weights do not fit this run's model: 1 "
                                "unexpected: 0)"),
    "a list": (lambda run: torch.save([1, 2], _best(run)), "is damaged or not asbound's (it holds a list, not a "
                                                            "state dict)"),
}


@pytest.mark.parametrize("case", list(BEST_DAMAGES))
def test_a_damaged_best_checkpoint_says_what_is_wrong(case, copy, capsys):
    damage, problem = BEST_DAMAGES[case]
    run = copy("transfer")
    for name in ("final.json", "model.pt"):  # the stage's selection is loaded again
        (run / name).unlink()
    damage(run)
    before = _snapshot(run)
    line = _error(capsys, tiny_runs.transfer(run))
    assert f"{_best(run)} {problem}; delete {run / 'checkpoints'} to train this method" in line, line
    assert "truncated" not in line and "Error(s) in loading" not in line
    assert _snapshot(run) == before


# --- the folders a sweep or a prediction names lie inside it --------------------------------------


def _outside(run: Path) -> "dict[str, tuple[str, str]]":
    """Ways to name the finished score run beside ``run`` (a copy, so reading it would succeed):
    by an absolute path, climbing out with ``..``, or the directory itself; and the problem each
    is named by."""
    return {"absolute": (str(run.parent / "score"), "is an absolute path, not a folder inside this directory"),
            "climbing out": ("eps-x1/../../score", "leads out of this directory (..)"),
            "itself": ("", "is this directory itself, not a folder inside it")}


@pytest.mark.parametrize("how", ["absolute", "climbing out", "itself"])
def test_a_sweep_cell_outside_the_sweep_is_refused(how, copy, capsys, tmp_path):
    """Before: the table and the plot read the run outside as the sweep's cell."""
    run, outside = copy("sweep"), copy("score")
    folder, problem = _outside(run)[how]
    _edit_json(run / "sweep.json", _set("cells.1.dir", folder))
    before, elsewhere = _snapshot(run), _snapshot(outside)
    for argv in (["table", run, "--style", "lemma1"], ["plot", run, "--kind", "lhs-rhs", "--out", tmp_path / "f.png"],
                 tiny_runs.sweep(run)):
        line = _error(capsys, argv)
        assert f"{run / 'sweep.json'} is damaged or not asbound's (cells[1].dir {folder!r} {problem})" in line, line
    assert _snapshot(run) == before and _snapshot(outside) == elsewhere


@pytest.mark.parametrize("field", ["pretrain.dir", "tasks.0.dir"])
@pytest.mark.parametrize("how", ["absolute", "climbing out", "itself"])
def test_a_prediction_naming_a_run_outside_it_is_refused(how, field, copy, capsys):
    run, outside = copy("predict"), copy("score")
    folder, problem = _outside(run)[how]
    _edit_json(run / "predict.json", _set(field, folder))
    before, elsewhere = _snapshot(run), _snapshot(outside)
    shown = field.replace(".0", "[0]")
    for argv in (["table", run, "--style", "predict"], tiny_runs.predict(run)):
        line = _error(capsys, argv)
        assert f"{run / 'predict.json'} is damaged or not asbound's ({shown} {folder!r} {problem})" in line, line
    assert _snapshot(run) == before and _snapshot(outside) == elsewhere


# --- the configs inside a transfer run: the exact file, and what to do about it ----------------------

# (file in the run, damage, problem); before, the nested score runs advised "choose another --out"
# (the transfer's, with its trained model) and values of another type read "holds a run with
# other settings", naming the directory
NESTED_CONFIGS = {
    "before not JSON": ("score/before/config.json", lambda path: path.write_bytes(NOT_JSON), "not JSON: "),
    "before a list": ("score/before/config.json", lambda path: path.write_text("[1]"), "it holds a list, not an object"),
    "after model a number": ("score/after/config.json", lambda path: _edit_json(path, _set("model", 3)),
                             "model is a number, not a string"),
    "after eps a string": ("score/after/config.json", lambda path: _edit_json(path, _set("eps", "x")),
                           "eps is a string, not a number"),
}


@pytest.mark.parametrize("case", list(NESTED_CONFIGS))
def test_a_damaged_config_of_a_transfer_runs_score_names_it_and_its_remedy_works(case, runs, copy, capsys):
    name, damage, problem = NESTED_CONFIGS[case]
    run = copy("transfer")
    final = json.loads((run / "final.json").read_text())
    damage(run / name)
    scores = (run / name).parent
    remedy = (f"delete {scores} and {run / 'final.json'} and rerun the transfer command that made {run}: its "
              f"model.pt is kept, evaluated and scored again")
    if not case.startswith("after"):  # the score run read on its own (a table reads labels, any type, from it)
        line = _error(capsys, ["table", scores, "--style", "lemma1"])
        assert f"{run / name} is damaged or not asbound's ({problem}" in line and line.endswith(remedy), line
    (run / "final.json").unlink()  # the rerun scores again
    before = _snapshot(run)
    # a file that is no JSON object is read before anything is evaluated: the only line
    line = (_error if case.startswith("before") else _last_error)(capsys, tiny_runs.transfer(run))
    assert f"{run / name} is damaged or not asbound's ({problem}" in line and line.endswith(remedy), line
    assert "choose another --out" not in line
    assert _snapshot(run) == before
    shutil.rmtree(scores)  # the remedy
    _ok(capsys, tiny_runs.transfer(run))
    again = json.loads((run / "final.json").read_text())
    for record in (again, final):  # the seconds taken, and the run scored after (the copy, the original)
        del record["seconds"], record["score_after"]["model"]
    assert again == final
    assert (run / "model.pt").read_bytes() == (runs / "transfer" / "model.pt").read_bytes()


@pytest.mark.parametrize("field, value, problem", [
    ("base", "garbage", "base is a string, not an object"),
    ("n", "x", "n is a string, not a number"),
    ("stages", {"a": 1}, "stages is an object, not a list"),
])
def test_a_transfer_config_with_a_value_of_another_type_is_named_damaged(field, value, problem, copy, capsys):
    run = copy("transfer")
    _edit_json(run / "config.json", _set(field, value))
    before = _snapshot(run)
    line = _error(capsys, tiny_runs.transfer(run))
    assert f"{run / 'config.json'} is damaged or not asbound's ({problem}); the run's settings cannot be recovered" \
           in line, line
    assert "other settings" not in line
    assert _snapshot(run) == before


def test_a_null_setting_is_another_setting_not_damage(copy, capsys):
    """null is any type: a setting recorded as null (an option not given) that the rerun gives."""
    run = copy("score")
    _edit_json(run / "config.json", _set("classes", None))
    line = _error(capsys, tiny_runs.score(run))
    assert f"{run} holds a run with other settings (classes: None -> '0-4'); choose another --out" in line, line


def test_a_damaged_config_of_a_sweeps_cell_names_the_sweep_and_its_remedy_works(copy, runs, capsys):
    run = copy("sweep")
    cell = run / "eps-x2"
    (cell / "config.json").write_bytes(NOT_JSON)
    line = _error(capsys, ["table", run, "--style", "eps"])
    assert f"{cell / 'config.json'} is damaged or not asbound's (not JSON" in line, line
    assert line.endswith(f"delete {cell} and rerun the sweep command that made {run}: that cell runs again")
    shutil.rmtree(cell)  # the remedy
    _ok(capsys, tiny_runs.sweep(run))
    assert (cell / "summary.json").read_bytes() == (runs / "sweep" / "eps-x2" / "summary.json").read_bytes()
    _ok(capsys, ["table", run, "--style", "eps"])


def test_a_damaged_config_of_a_predictions_run_names_the_prediction_and_its_remedy_works(copy, runs, capsys):
    run = copy("predict")
    task = run / "as" / "digits"
    (task / "config.json").write_bytes(NOT_JSON)
    (task / "summary.json").unlink()  # not done: the rerun scores it again and reads its config
    before = _snapshot(run)
    line = _last_error(capsys, tiny_runs.predict(run))
    assert f"{task / 'config.json'} is damaged or not asbound's (not JSON" in line, line
    assert line.endswith(f"delete {task} and rerun the predict command that made {run}: that run is made again, "
                         f"the others are reused")
    assert _snapshot(run) == before
    shutil.rmtree(task)  # the remedy
    _ok(capsys, tiny_runs.predict(run))
    assert _snapshot(run / "as" / "pretrain-digits-0-4") == _snapshot(runs / "predict" / "as" / "pretrain-digits-0-4")
    assert (task / "summary.json").read_bytes() == (runs / "predict" / "as" / "digits" / "summary.json").read_bytes()


# --- stages.json and epochs.csv -----------------------------------------------------------------------


STAGE_DAMAGES = {  # before: the first three written into final.json as the run's stages, silently
    "none": (lambda stages: stages.clear(), "it lists the stages none; the method has lp"),
    "another stage": (lambda stages: stages[0].update(stage="ft"), "it lists the stages ft; the method has lp"),
    "a stage twice": (lambda stages: stages.append(stages[0]), "it lists the stages lp, lp; the method has lp"),
    "epochs a string": (lambda stages: stages[0].update(epochs="x"), "[0].epochs is a string, not a whole number"),
    "a stage a list": (lambda stages: stages.__setitem__(0, [1]), "[0] is a list, not an object"),
    "a stage null": (lambda stages: stages.append(None), "[1] is null, not an object"),  # before: AttributeError
}


@pytest.mark.parametrize("case", list(STAGE_DAMAGES))
def test_stages_damaged_or_not_the_methods_are_one_line(case, copy, capsys):
    edit, problem = STAGE_DAMAGES[case]
    run = copy("transfer")
    (run / "final.json").unlink()
    _edit_json(run / "stages.json", edit)
    before = _snapshot(run)
    line = _error(capsys, tiny_runs.transfer(run))
    assert f"{run / 'stages.json'} is damaged or not asbound's ({problem})" in line, line
    assert "delete it, model.pt and final.json" in line
    assert _snapshot(run) == before


def test_a_trained_model_without_its_stages_has_them_rebuilt_from_the_checkpoints(runs, copy, capsys):
    """Before: final.json recorded no stages (``[]``); without checkpoints training began again."""
    run = copy("transfer")
    stages = json.loads((run / "stages.json").read_text())
    for name in ("final.json", "stages.json"):  # as an interruption between model.pt and stages.json left it
        (run / name).unlink()
    _ok(capsys, tiny_runs.transfer(run))
    assert json.loads((run / "stages.json").read_text()) == stages
    assert json.loads((run / "final.json").read_text())["stages"] == stages
    assert (run / "model.pt").read_bytes() == (runs / "transfer" / "model.pt").read_bytes()
    # no checkpoint to rebuild them from: the trained weights are never trained over
    for name in ("final.json", "stages.json"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    line = _last_error(capsys, tiny_runs.transfer(run))
    assert f"{run / 'model.pt'} has no stages.json beside it and {run / 'checkpoints'} no checkpoint" in line, line
    assert "the trained weights are kept: delete model.pt to train this method again" in line
    assert _snapshot(run) == before


def test_an_interruption_while_the_trained_weights_are_written_leaves_the_stages(runs, copy, capsys, monkeypatch):
    """stages.json is written before model.pt: a model.pt is never without its stages."""
    import asbound.transfer.run as transfer_run

    run = copy("transfer")
    for name in ("final.json", "model.pt", "stages.json"):  # trained again from its checkpoint
        (run / name).unlink()
    save = transfer_run._save

    def interrupted(path: Path, obj: object, previous: "Path | None" = None) -> None:
        if path.name == "model.pt":
            raise KeyboardInterrupt
        save(path, obj, previous)

    monkeypatch.setattr(transfer_run, "_save", interrupted)
    assert main(tiny_runs.transfer(run)) == 130
    assert (run / "stages.json").read_bytes() == (runs / "transfer" / "stages.json").read_bytes()
    assert not (run / "model.pt").exists()
    monkeypatch.setattr(transfer_run, "_save", save)
    _ok(capsys, tiny_runs.transfer(run))
    assert (run / "model.pt").read_bytes() == (runs / "transfer" / "model.pt").read_bytes()


@pytest.mark.parametrize("damage", [b"\x8b\x00\xff\xfe garbage", b"a,b\n1,2\n"])
def test_a_damaged_epochs_csv_is_written_again_from_the_checkpoint(damage, two_epochs, tmp_path, capsys):
    """Nothing reads epochs.csv: the resumed run writes it again from the checkpoint's history."""
    run = tmp_path / "lp"
    shutil.copytree(two_epochs, run)
    for name in ("final.json", "model.pt"):
        (run / name).unlink()
    (run / "checkpoints" / "last.pt").unlink()  # resumed after epoch 1: epoch 2 trained again
    (run / "epochs.csv").write_bytes(damage)
    _ok(capsys, tiny_runs.transfer(run, *TWO_EPOCHS))
    again, first = (pd.read_csv(p / "epochs.csv") for p in (run, two_epochs))
    pd.testing.assert_frame_equal(again.drop(columns=["seconds", "images_per_second"]),
                                  first.drop(columns=["seconds", "images_per_second"]))


def test_a_transfer_runs_score_with_other_settings_is_made_again_not_moved(copy, capsys):
    """Before: "choose another --out", the transfer run's own, which holds its trained model."""
    run = copy("transfer")
    _edit_json(run / "score" / "before" / "config.json", _set("eps", 0.5))
    (run / "final.json").unlink()
    line = _last_error(capsys, tiny_runs.transfer(run))
    assert f"{run / 'score' / 'before'} holds a run with other settings (eps: 0.5 -> 0.0313" in line, line
    assert line.endswith(f"delete {run / 'score' / 'before'} and {run / 'final.json'} and rerun the transfer "
                         f"command that made {run}: its model.pt is kept, evaluated and scored again")
