"""``asbound score``: the summary, the run directory, resumption, one-line errors for bad input
(argparse's included), the defaults ``--help`` shows, and that the attack options reach the run.
The command line as a whole: start-up without the heavy stacks, every line at 80 columns, help
that the commands keep (the sweeps' embedded default), the lazy API.

Most runs use a tiny pickled model on a tensors file (fast); the embedded default and the
head/task checks use the shipped builtin LeNet on procedural dSprites with ``--n`` 8-16 and
``--steps 2``. ``conftest.py`` points ``$ASBOUND_DATA_ROOT``, ``$ASBOUND_MODEL_DIR`` and
``$XDG_CACHE_HOME`` at empty folders for every test.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import asbound.api as api
import asbound.cli as cli
import asbound.defaults as defaults
import asbound.scoring as scoring
from asbound.api import ScoreConfig
from asbound.cli import _slug, build_parser, main
from asbound.data import default_data_root
from asbound.models import default_model_dir
from fabricate import make_tensors_file, run_held_by_another_process

EPS = 8 / 255
CLASSIFICATION_COLUMNS = {"index", "label", "pred", "sensitivity", "margin", "fulfilled",
                          "loss_clean", "loss_adv", "robust"}
SUMMARY_KEYS = {"as_score", "lhs", "rhs", "lipschitz", "head_norm", "n", "eps", "norm",
                "clean_accuracy", "robust_accuracy", "prop_fulfilled", "rob_fulfilled"}


# --- helpers and shared assets ----------------------------------------------------------------


def _strict_json(text: str) -> object:
    """Parse JSON, refusing NaN / Infinity (not JSON)."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _snapshot(folder: Path) -> "dict[str, bytes]":
    """The run's files (the lock file, which only names the last writer, aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _words(text: str) -> str:
    """Whitespace collapsed (rich wraps long lines)."""
    return " ".join(text.split())


def _cli(capsys, *args: str) -> "tuple[int, str, str]":
    capsys.readouterr()
    rc = main(["score", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("asbound: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Tiny models (pickled nn.Modules), tensors files, heads and a foreign 'checkpoint'."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)

    def body() -> "list[nn.Module]":
        return [nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU()]

    torch.save(nn.Sequential(*body(), nn.Linear(16, 4)), root / "tiny.pt")
    torch.save(nn.Sequential(*body(), nn.Linear(16, 1)), root / "tiny_reg.pt")
    torch.save(nn.Sequential(*body(), nn.Linear(16, 2)), root / "tiny_reg2.pt")
    make_tensors_file(root / "data.pt", n=32, shape=(3, 8, 8), num_classes=4, seed=1)
    make_tensors_file(root / "reg.pt", n=16, shape=(3, 8, 8), target="float", seed=2)
    make_tensors_file(root / "reg2.pt", n=16, shape=(3, 8, 8), target="float2", seed=3)
    make_tensors_file(root / "nan.pt", n=8, extra={"x": torch.rand(8, 3, 8, 8).index_put_(
        (torch.tensor([2]), torch.tensor([1]), torch.tensor([3]), torch.tensor([4])),
        torch.tensor(float("nan")))})
    make_tensors_file(root / "range.pt", n=8, extra={"x": torch.full((8, 3, 8, 8), 2.0)})
    (root / "text.pt").write_text("this is not a checkpoint\njust text\n")
    torch.save(nn.Linear(84, 3).state_dict(), root / "head3.pt")
    torch.save(nn.Linear(10, 3).state_dict(), root / "head_bad.pt")
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a directory\n")
    return root


def _tiny(assets: Path, n: int = 24, batch_size: int = 8) -> "list[str]":
    return ["--model", f"file:{assets / 'tiny.pt'}", "--allow-pickle", "--data",
            f"tensors:{assets / 'data.pt'}", "--n", str(n), "--batch-size", str(batch_size),
            "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory) -> Path:
    """An uninterrupted run: tiny model, n=24, batch size 8 (three batches)."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert main(["score", *_tiny(assets), "--json", "--out", str(out)]) == 0
    return out


@pytest.fixture
def populated(baseline, tmp_path) -> Path:
    """A copy of the finished baseline run, to rerun into."""
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    return out


# --- a run and its records --------------------------------------------------------------------


def test_run_writes_points_summary_and_config(baseline, assets):
    points = pd.read_csv(baseline / "points.csv")
    assert len(points) == 24 and CLASSIFICATION_COLUMNS <= set(points.columns)
    assert sorted(points["position"]) == list(range(24))
    assert points["index"].is_unique and points["index"].between(0, 31).all()
    labels = torch.load(assets / "data.pt")["y"].numpy()
    assert (points["label"].to_numpy() == labels[points["index"].to_numpy()]).all()

    summary = _strict_json((baseline / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n"] == 24 and summary["eps"] == pytest.approx(EPS) and summary["norm"] == "inf"
    # the summary is derived from the records
    assert summary["as_score"] == pytest.approx(points["sensitivity"].mean(), rel=1e-6)
    assert summary["rhs"] == summary["as_score"]
    assert summary["clean_accuracy"] == pytest.approx(points["correct"].mean())
    assert summary["robust_accuracy"] == pytest.approx(points["robust"].mean())
    assert summary["prop_fulfilled"] == pytest.approx(points["fulfilled"].mean())
    fulfilled = points[points["fulfilled"]]
    if len(fulfilled):
        assert summary["rob_fulfilled"] == pytest.approx(fulfilled["robust"].mean())
    # Lemma 1 holds pointwise for the loss attack, whose shift the sensitivity dominates
    assert summary["lhs"] <= summary["rhs"] + 1e-9 and summary["lemma1_holds"] is True
    assert summary["loss"] == "cross_entropy" and summary["lipschitz"] == 2.0
    assert summary["theorem1"]["confidence"] == pytest.approx(10 * math.sqrt(math.log(20) / 48))

    config = _strict_json((baseline / "config.json").read_text())
    assert config["seed"] == 0 and config["eps"] == pytest.approx(EPS)
    assert config["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert config["device"] == "cpu"
    assert config["model"] == f"file:{assets / 'tiny.pt'}"
    assert config["data"] == f"tensors:{assets / 'data.pt'}"
    assert config["n"] == 24 and config["batch_size"] == 8 and config["steps"] == 2
    assert config["task"] == "classification" and config["head_outputs"] == 4


def test_json_goes_alone_to_stdout_and_progress_to_stderr(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # room for the long description and the count
    args = [a for a in _tiny(assets, n=8) if a != "--no-progress"]
    rc, out, err = _cli(capsys, *args, "--json", "--out", tmp_path / "run")
    assert rc == 0
    summary = _strict_json(out)  # nothing but the JSON on stdout, though the progress bar ran
    assert summary == _strict_json((tmp_path / "run" / "summary.json").read_text())
    assert summary["n"] == 8 and "as_score" in summary
    assert "8/8" in err  # the progress bar, on stderr


def test_regression_rows_give_lemma1_without_accuracies(assets, tmp_path, capsys):
    for model, data, dim in (("tiny_reg.pt", "reg.pt", 1), ("tiny_reg2.pt", "reg2.pt", 2)):
        out = tmp_path / model
        rc, stdout, _ = _cli(capsys, "--model", f"file:{assets / model}", "--allow-pickle",
                             "--data", f"tensors:{assets / data}", "--n", "8", "--steps", "2",
                             "--no-progress", "--json", "--out", out)
        assert rc == 0
        summary = _strict_json(stdout)
        assert summary["task"] == "regression" and summary["loss"] == "euclidean_error"
        assert summary["lhs"] <= summary["rhs"] + 1e-9 and summary["q"] == "2"
        assert "clean_accuracy" not in summary
        points = pd.read_csv(out / "points.csv")
        assert len(points) == 8 and {"label", "pred", "sensitivity", "loss_clean", "loss_adv"} <= set(points)
        if dim == 2:  # multi-dimensional targets are written as "a;b"
            assert points["label"].str.count(";").eq(1).all() and points["pred"].str.count(";").eq(1).all()


def test_head_that_does_not_match_the_task_gives_as_only(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "as-only"
    common = ["--data", "dsprites:shape", "--n", "8", "--steps", "2", "--no-progress"]
    rc, stdout, _ = _cli(capsys, "--model", "builtin:lenet-adversarial/orientation", *common,
                         "--json", "--out", out)
    assert rc == 0
    summary = _strict_json(stdout)
    assert summary["as_score"] is not None and summary["as_score"] >= 0
    assert "lhs" not in summary and "clean_accuracy" not in summary
    assert "3 classes" in summary["task_note"] and "--head" in summary["task_note"]
    # the table says why (rerunning the finished run only reprints it)
    rc, stdout, _ = _cli(capsys, "--model", "builtin:lenet-adversarial/orientation", *common, "--out", out)
    assert rc == 0
    text = _words(stdout)
    assert "AS only" in text and "only the AS score is computed" in text and "3 classes" in text

    # a head for the task fixes it
    rc, stdout, _ = _cli(capsys, "--model", "builtin:lenet-adversarial/orientation", *common,
                         "--head", assets / "head3.pt", "--json", "--out", tmp_path / "with-head")
    assert rc == 0
    summary = _strict_json(stdout)
    assert summary["task_note"] is None and summary["loss"] == "cross_entropy"
    assert {"lhs", "clean_accuracy", "prop_fulfilled"} <= set(summary)
    # ... but not into the directory of the AS-only run
    before = _snapshot(out)
    rc, _, err = _cli(capsys, "--model", "builtin:lenet-adversarial/orientation", *common,
                      "--head", assets / "head3.pt", "--out", out)
    assert rc == 2 and "head" in _one_line_error(err)
    assert _snapshot(out) == before


def test_head_mismatch_on_regression_targets(assets, tmp_path, capsys):
    rc, stdout, _ = _cli(capsys, "--model", f"file:{assets / 'tiny.pt'}", "--allow-pickle", "--data",
                         f"tensors:{assets / 'reg.pt'}", "--n", "8", "--steps", "2", "--no-progress",
                         "--json", "--out", tmp_path / "run")
    assert rc == 0
    summary = _strict_json(stdout)
    assert "lhs" not in summary and "1-dimensional targets" in summary["task_note"]


def test_embedded_default(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "default"
    rc, stdout, err = _cli(capsys, "--n", "16", "--steps", "2", "--json", "--out", out)
    assert rc == 0
    reg, cls = _strict_json(stdout)
    assert "dsprites:orientation" in err and "16/16" in err  # the progress bars
    assert reg["data"] == "dsprites:orientation" and reg["task"] == "regression"
    assert cls["data"] == "dsprites:shape" and cls["task"] == "classification"
    assert reg["model"] == "builtin:lenet-adversarial/orientation"
    assert cls["model"] == "builtin:lenet-shape-adversarial/shape"
    for s in (reg, cls):
        assert s["n"] == 16 and s["eps"] == pytest.approx(EPS) and s["steps"] == 2
        assert s["task_note"] is None and s["lhs"] <= s["rhs"] + 1e-9
        assert s["theorem1"]["confidence"] == pytest.approx(10 * math.sqrt(math.log(20) / 32))
    assert "clean_accuracy" not in reg and SUMMARY_KEYS <= set(cls)
    for sub, s in (("orientation", reg), ("shape", cls)):
        assert _strict_json((out / sub / "summary.json").read_text()) == s
        assert len(pd.read_csv(out / sub / "points.csv")) == 16
        assert _strict_json((out / sub / "config.json").read_text())["data"] == s["data"]
    assert CLASSIFICATION_COLUMNS <= set(pd.read_csv(out / "shape" / "points.csv").columns)

    # the same command without --json: the table (the finished runs are only reread)
    monkeypatch.setattr(scoring._Scorer, "__call__", lambda *a, **k: pytest.fail("nothing to score"))
    rc, stdout, _ = _cli(capsys, "--n", "16", "--steps", "2", "--out", out)
    assert rc == 0
    text = _words(stdout)
    for label in ("AS score = RHS", "Lemma 1 LHS", "q, L", "||W||_(q)", "Thm 1 bound",
                  "clean accuracy", "robust accuracy", "prop. fulfilled", "rob. fulfilled",
                  "dsprites:orientation", "dsprites:shape", "euclidean_error", "cross_entropy"):
        assert label in text, label
    assert f"{reg['as_score']:.4g}" in text and f"{cls['lhs']:.4g}" in text


def test_the_readme_shows_what_the_embedded_default_prints(tmp_path, capsys, monkeypatch):
    """The README's first run is `asbound score` with its output: the recorded default run
    (reports/default, made by analyses/default_score.sh) reread at 80 columns prints exactly the
    README's lines (they lacked the title line and named reports/default for runs/default)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("$ asbound score\n", 1)[1].split("```", 1)[0].splitlines()
    shutil.copytree(Path(__file__).parents[1] / "reports" / "default", tmp_path / "runs" / "default")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(scoring._Scorer, "__call__", lambda *a, **k: pytest.fail("nothing to score"))
    capsys.readouterr()
    assert main(["score", "--no-progress"]) == 0
    printed = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    assert printed == block


def test_the_developers_layout_names_every_module_of_the_package():
    """docs/DEVELOPING.md's layout lacked errors.py, defaults.py, _compat.py and protocol.py."""
    root = Path(__file__).parents[1]
    layout = (root / "docs" / "DEVELOPING.md").read_text().split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"^asbound/(\w+)", layout, flags=re.M))
    modules = {p.stem for p in (root / "asbound").glob("*.py") if p.stem not in ("__init__", "__main__")}
    packages = {p.parent.name for p in (root / "asbound").glob("*/__init__.py")}
    assert modules | packages <= named, sorted((modules | packages) - named)


# --- bad input: one line, exit code 2, nothing lost -------------------------------------------


def _bad_inputs(assets: Path) -> "dict[str, tuple[list, list[str]]]":
    tiny = _tiny(assets, n=8)
    with_tiny = lambda *extra: tiny + list(extra)  # noqa: E731 - later options win
    return {
        "unknown prefix": (["--model", "foo:bar", "--data", "dsprites:shape"], ["foo:bar", "builtin:", "file:"]),
        "unknown builtin": (["--model", "builtin:nope", "--data", "dsprites:shape"], ["nope", "lenet-adversarial"]),
        "unknown data": (["--model", "builtin:lenet-adversarial", "--data", "imagenette"], ["imagenette", "cifar10", "dsprites"]),
        "missing tensors": (["--model", "builtin:lenet-adversarial", "--data", "tensors:/nonexistent.pt"], ["/nonexistent.pt", "does not exist"]),
        "missing model": (["--model", "file:/nonexistent.pt", "--data", "dsprites:shape"], ["/nonexistent.pt", "does not exist"]),
        "absent offline": (["--model", "builtin:lenet-adversarial", "--data", "cifar10", "--data-root", str(assets / "empty")],
                           ["cifar10", str(assets / "empty"), "--download"]),
        "eps 2": (with_tiny("--eps", "2"), ["eps", "[0, 1]"]),
        "eps -0.1": (with_tiny("--eps", "-0.1"), ["eps", "[0, 1]"]),
        "eps abc": (with_tiny("--eps", "abc"), ["'abc'", "[0, 1]"]),
        "steps 0": (with_tiny("--steps", "0"), ["steps", ">= 1", "no attack"]),
        "n 0": (with_tiny("--n", "0"), ["n must be >= 1"]),
        "batch size 0": (with_tiny("--batch-size", "0"), ["batch size", ">= 1"]),
        "delta 1.5": (with_tiny("--delta", "1.5"), ["delta", "(0, 1)"]),
        "seed too large": (with_tiny("--seed", str(2**70)), ["seed", "2**63"]),
        "restarts without random start": (with_tiny("--restarts", "2", "--no-random-start"), ["random start"]),
        "head misfit": (["--model", "builtin:lenet-adversarial/orientation", "--data", "dsprites:shape",
                         "--head", str(assets / "head_bad.pt")], ["10 features", "Linear(84, K)"]),
        "head not a state dict": (with_tiny("--head", str(assets / "text.pt")), ["--head", "state_dict"]),
        "NaN input": (with_tiny("--data", f"tensors:{assets / 'nan.pt'}"), ["NaN", "row 2"]),
        "out of range": (with_tiny("--data", f"tensors:{assets / 'range.pt'}"), ["outside [0, 1]"]),
        "foreign checkpoint": (with_tiny("--model", f"file:{assets / 'text.pt'}"), ["text.pt", "torch.save"]),
        "pickle not allowed": ([a for a in with_tiny() if a != "--allow-pickle"], ["--allow-pickle"]),
        "foreign, pickle not allowed": ([a for a in with_tiny("--model", f"file:{assets / 'text.pt'}") if a != "--allow-pickle"],
                                        ["text.pt", "is not a torch.save file"]),
        "model without data": (["--model", "builtin:lenet-adversarial"], ["--data"]),
        "data without model": (["--data", "dsprites:shape"], ["--model"]),
        "input size misfit": (with_tiny("--data", "dsprites:shape"), ["1x64x64", "--resize"]),
    }


BAD_INPUTS = list(_bad_inputs(Path("/x")))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, assets, populated, capsys):
    args, expected = _bad_inputs(assets)[case]
    before = _snapshot(populated)
    rc, out, err = _cli(capsys, *args, "--out", populated)
    line = _one_line_error(err)
    assert rc == 2 and out == ""
    for text in expected:
        assert text in line, (text, line)
    assert _snapshot(populated) == before


def test_out_that_is_a_file(assets, capsys):
    rc, _, err = _cli(capsys, *_tiny(assets, n=8), "--out", assets / "a_file")
    assert rc == 2 and "--out" in _one_line_error(err)
    rc, _, err = _cli(capsys, *_tiny(assets, n=8), "--out", assets / "a_file" / "sub")
    assert rc == 2 and "--out" in _one_line_error(err)
    assert (assets / "a_file").read_text() == "not a directory\n"


@pytest.mark.parametrize("args, expected", [
    (["--eps", "2"], "eps"),
    (["--model", "file:/nonexistent.pt", "--data", "dsprites:shape"], "/nonexistent.pt"),
])
def test_subprocess_bad_input_has_no_traceback(args, expected, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "asbound.cli", "score", *args, "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asbound: error: ") and expected in lines[0]


# --- argparse's errors: one line too; --help unchanged -----------------------------------------


USAGE_ERRORS = {
    "split val": (["score", "--split", "val"], ["argument --split", "'val'", "train", "test"]),
    "n abc": (["score", "--n", "abc"], ["argument --n", "'abc'", "whole number", "'all'"]),
    "steps 1.5": (["score", "--steps", "1.5"], ["argument --steps", "'1.5'", "whole number"]),
    "backend x": (["score", "--backend", "x"], ["argument --backend", "'x'", "asbound", "foolbox"]),
    "unknown option": (["score", "--bogus"], ["unrecognized arguments: --bogus", "asbound score --help"]),
    "misspelt option": (["score", "--seeds", "3"], ["--seeds", "did you mean --seed?"]),
    "no command": ([], ["COMMAND", "score"]),
    "unknown command": (["scroe"], ["'scroe'", "score"]),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_exit_2(case, capsys):
    args, expected = USAGE_ERRORS[case]
    capsys.readouterr()
    rc = main(args)
    out, err = capsys.readouterr()
    line = _one_line_error(err)
    assert rc == 2 and out == ""
    assert "usage:" not in err
    for text in expected:
        assert text in line, (text, line)


@pytest.mark.parametrize("case", ["split val", "n abc", "steps 1.5", "backend x", "unknown option"])
def test_subprocess_usage_errors_are_one_line(case, tmp_path):
    args, expected = USAGE_ERRORS[case]
    entry = Path(sys.executable).with_name("asbound")  # the console script, where installed
    command = [str(entry)] if entry.exists() and case == "unknown option" else [sys.executable, "-m", "asbound.cli"]
    proc = subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asbound: error: "), proc.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "runs").exists()


def test_help_and_version_still_work(capsys):
    capsys.readouterr()
    assert main(["score", "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: asbound score") and "--no-random-start" in out and err == ""
    assert main(["--help"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("usage: asbound") and "score" in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("asbound ")


def _help_entries(text: str) -> "dict[str, str]":
    """``asbound score --help`` as {option: its help text, whitespace collapsed}."""
    entries: "dict[str, str]" = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and stripped.startswith("-"):
            current = next(w.rstrip(",") for w in stripped.split() if w.startswith("--"))  # "-h, --help"
            entries[current] = stripped
        elif current and line.startswith("    ") and stripped:
            entries[current] += " " + stripped
        else:
            current = None
    return {k: _words(v) for k, v in entries.items()}


def _score_help(capsys) -> str:
    capsys.readouterr()
    assert main(["score", "--help"]) == 0
    return capsys.readouterr().out


def test_help_shows_the_real_defaults(capsys, monkeypatch):
    text = _score_help(capsys)
    assert "None" not in text
    help_of = _help_entries(text)
    d = ScoreConfig()
    for option, value in (("--split", d.split), ("--steps", d.steps), ("--restarts", d.restarts),
                          ("--batch-size", d.batch_size), ("--backend", d.backend), ("--seed", d.seed),
                          ("--eps", d.eps), ("--norm", d.norm), ("--attack", d.attack), ("--amp", d.amp),
                          ("--device", d.device), ("--delta", d.delta), ("--loss-cap", d.loss_cap)):
        assert help_of[option].endswith(f"(default: {value})"), help_of[option]
    # the step's default depends on the attack: both named, from the table the config resolves with
    rel = scoring.REL_STEP
    assert rel["pgd"] == rel["nystrom"]
    assert help_of["--rel-step"].endswith(f"(default: {rel['pgd']:g} for pgd and nystrom, {rel['apgd']:g} for apgd)")
    assert help_of["--n"].endswith(f"(default: {d.n}; {scoring.DEFAULT_N} for the embedded default)")
    assert help_of["--out"].endswith(
        "(default: runs/<model>__<data>, runs/default/{orientation,shape} for the embedded default)")
    # computed at run time: shown as the environment variable or the user cache, and where that is now
    assert help_of["--model-dir"].endswith(
        f"(default: $ASBOUND_MODEL_DIR or the user cache, here {default_model_dir()})")
    assert help_of["--data-root"].endswith(
        f"(default: $ASBOUND_DATA_ROOT or the user cache, here {default_data_root()})")
    # every option explains itself
    parser = build_parser()
    score_parser = parser.commands["score"]
    for action in score_parser._actions:
        assert action.help, action.option_strings
    assert set(help_of) >= {o for a in score_parser._actions for o in a.option_strings if o.startswith("--")}

    # without the variables: the user cache (under $XDG_CACHE_HOME, which conftest isolates)
    monkeypatch.delenv("ASBOUND_MODEL_DIR")
    monkeypatch.delenv("ASBOUND_DATA_ROOT")
    help_of = _help_entries(_score_help(capsys))
    for option, path in (("--model-dir", default_model_dir()), ("--data-root", default_data_root())):
        assert path.is_relative_to(Path(os.environ["XDG_CACHE_HOME"])), path
        assert help_of[option].endswith(f"here {path})"), help_of[option]


def test_the_default_out_is_what_help_says(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data = f"file:{assets / 'tiny.pt'}", f"tensors:{assets / 'data.pt'}"
    rc, _, _ = _cli(capsys, *_tiny(assets, n=8))
    assert rc == 0
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [f"{_slug(model)}__{_slug(data)}"]
    assert (tmp_path / "runs" / f"{_slug(model)}__{_slug(data)}" / "summary.json").is_file()
    rc, _, _ = _cli(capsys, "--n", "4", "--steps", "1", "--no-progress")
    assert rc == 0
    for sub in ("orientation", "shape"):
        assert (tmp_path / "runs" / "default" / sub / "summary.json").is_file()


# --- the attack options reach the run -----------------------------------------------------------


def _run_json(capsys, *args) -> dict:
    rc, stdout, err = _cli(capsys, *args, "--json")
    assert rc == 0, err
    return _strict_json(stdout)


def test_no_random_start_reaches_the_run(assets, baseline, tmp_path, capsys):
    out = tmp_path / "run"
    summary = _run_json(capsys, *_tiny(assets), "--no-random-start", "--restarts", "1", "--out", out)
    config = _strict_json((out / "config.json").read_text())
    assert config["random_start"] is False and config["restarts"] == 1
    # at x' = x the gradient of ||g(x') - g(x)|| is zero: PGD started there never moves
    points = pd.read_csv(out / "points.csv")
    assert (points["s_rep"] == 0).all() and summary["as_score_rep"] == 0
    # with the random start (the baseline) it does
    assert _strict_json((baseline / "config.json").read_text())["random_start"] is True
    assert (pd.read_csv(baseline / "points.csv")["s_rep"] > 0).all()


def test_restarts_reach_the_run(assets, baseline, tmp_path, capsys):
    out = tmp_path / "run"
    summary = _run_json(capsys, *_tiny(assets), "--restarts", "3", "--out", out)
    assert _strict_json((out / "config.json").read_text())["restarts"] == 3 and summary["restarts"] == 3
    # the first restart draws the baseline's start; the best of three is at least as far, and further somewhere
    three = pd.read_csv(out / "points.csv")["s_rep"].to_numpy()
    one = pd.read_csv(baseline / "points.csv")["s_rep"].to_numpy()
    assert (three >= one - 1e-6).all() and (three > one + 1e-6).any()


def test_seed_reaches_the_run(assets, baseline, tmp_path, capsys):
    out = tmp_path / "seed1"
    summary = _run_json(capsys, *_tiny(assets), "--seed", "1", "--out", out)
    assert _strict_json((out / "config.json").read_text())["seed"] == 1 and summary["seed"] == 1
    # another subset (24 of 32) ...
    assert set(pd.read_csv(out / "points.csv")["index"]) != set(pd.read_csv(baseline / "points.csv")["index"])
    # ... and, on the same points, other random starts
    s_rep = {}
    for seed in ("0", "1"):
        _run_json(capsys, *_tiny(assets, n=8), "--n", "all", "--seed", seed, "--out", tmp_path / f"all{seed}")
        points = pd.read_csv(tmp_path / f"all{seed}" / "points.csv")
        assert sorted(points["index"]) == list(range(32))
        s_rep[seed] = points.sort_values("index")["s_rep"].to_numpy()
    assert not (abs(s_rep["0"] - s_rep["1"]) < 1e-6).all()


def test_backend_foolbox_runs_foolbox(assets, tmp_path, capsys, monkeypatch):
    calls = []
    original = scoring.foolbox_pgd

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(scoring, "foolbox_pgd", counting)
    out = tmp_path / "run"
    summary = _run_json(capsys, *_tiny(assets, n=8), "--backend", "foolbox", "--out", out)
    assert calls == [8, 8]  # the AS attack and the loss attack of the one batch
    assert _strict_json((out / "config.json").read_text())["backend"] == "foolbox"
    assert summary["n"] == 8 and summary["as_score"] > 0 and summary["lhs"] <= summary["rhs"] + 1e-9
    points = pd.read_csv(out / "points.csv")
    assert len(points) == 8 and (points["s_rep"] > 0).all() and points[["loss_clean", "loss_adv"]].notna().all().all()


def test_one_output_head_on_classification_gives_as_only(assets, tmp_path, capsys):
    out = tmp_path / "run"
    summary = _run_json(capsys, "--model", f"file:{assets / 'tiny_reg.pt'}", "--allow-pickle", "--data",
                        f"tensors:{assets / 'data.pt'}", "--n", "8", "--steps", "2", "--no-progress", "--out", out)
    note = summary["task_note"]
    assert "1 output" in note and "4 classes" in note and "only the AS score" in note and "--head" in note
    assert summary["task"] == "classification" and summary["as_score"] > 0
    assert not {"lhs", "clean_accuracy", "prop_fulfilled", "loss"} & {k for k, v in summary.items() if v is not None}
    points = pd.read_csv(out / "points.csv")
    assert len(points) == 8 and "loss_clean" not in points and (points["sensitivity_source"] == "rep").all()
    config = _strict_json((out / "config.json").read_text())
    assert config["head_outputs"] == 1 and config["task_note"] == note


# --- resumption -------------------------------------------------------------------------------


class _Recorder:
    """Stands in for the API's progress bar and batch scorer, to see what a rerun does."""

    def __init__(self, monkeypatch):
        self.progress: "list[tuple[int, int]]" = []
        self.batches: "list[int]" = []
        original_progress, original_call = scoring._progress, scoring._Scorer.__call__

        def progress(enabled, total, completed, cfg):
            self.progress.append((total, completed))
            return original_progress(False, total, completed, cfg)

        def call(scorer, x, *args, **kwargs):
            self.batches.append(len(x))
            return original_call(scorer, x, *args, **kwargs)

        monkeypatch.setattr(scoring, "_progress", progress)
        monkeypatch.setattr(scoring._Scorer, "__call__", call)


def _assert_same_run(out: Path, baseline: Path) -> None:
    got = pd.read_csv(out / "points.csv")
    want = pd.read_csv(baseline / "points.csv")
    assert len(got) == 24
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert _strict_json((out / "summary.json").read_text()) == _strict_json((baseline / "summary.json").read_text())


@pytest.mark.parametrize("rows_kept, completed, rescored", [(8, 8, [8, 8]), (13, 8, [8, 8])])
def test_resume_after_a_torn_write(rows_kept, completed, rescored, assets, baseline, populated, capsys, monkeypatch):
    lines = (populated / "points.csv").read_text().splitlines(keepends=True)
    torn = lines[rows_kept + 1][: len(lines[rows_kept + 1]) // 2]
    (populated / "points.csv").write_text("".join(lines[: rows_kept + 1]) + torn)
    (populated / "summary.json").unlink()
    seen = _Recorder(monkeypatch)
    rc, _, _ = _cli(capsys, *_tiny(assets), "--out", populated)
    assert rc == 0
    assert seen.progress == [(24, completed)]  # the bar starts at the completed batches
    assert seen.batches == rescored  # only the unfinished batches are scored again
    _assert_same_run(populated, baseline)


def test_rerunning_a_finished_run_scores_nothing(assets, baseline, populated, capsys, monkeypatch):
    seen = _Recorder(monkeypatch)
    rc, out, _ = _cli(capsys, *_tiny(assets), "--json", "--out", populated)
    assert rc == 0 and seen.batches == [] and seen.progress == [(24, 24)]
    assert _strict_json(out) == _strict_json((baseline / "summary.json").read_text())
    _assert_same_run(populated, baseline)


def test_keyboard_interrupt_keeps_finished_batches(assets, baseline, tmp_path, capsys, monkeypatch):
    original = scoring._Scorer.__call__
    calls = []

    def interrupted(scorer, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(scorer, *args, **kwargs)

    monkeypatch.setattr(scoring._Scorer, "__call__", interrupted)
    out = tmp_path / "run"
    args = [a for a in _tiny(assets) if a != "--no-progress"]  # with the progress bar running
    rc, stdout, err = _cli(capsys, *args, "--out", out)
    assert rc == 130 and "Traceback" not in err
    assert "rerun" in err and "resume" in err
    kept = pd.read_csv(out / "points.csv")
    pd.testing.assert_frame_equal(kept, pd.read_csv(baseline / "points.csv").iloc[:8], check_exact=True)
    assert not (out / "summary.json").exists()

    monkeypatch.setattr(scoring._Scorer, "__call__", original)
    rc, _, _ = _cli(capsys, *_tiny(assets), "--out", out)
    assert rc == 0
    _assert_same_run(out, baseline)


def test_a_run_directory_being_written_is_refused(assets, baseline, tmp_path, capsys):
    from asbound.records import RunDir

    out = tmp_path / "run"
    with RunDir(out).locked():
        rc, _, err = _cli(capsys, *_tiny(assets), "--out", out)
    line = _one_line_error(err)
    assert rc == 2 and "being written by asbound pid" in line and "another --out" in line
    assert not (out / "points.csv").exists() and not (out / "config.json").exists()
    rc, _, _ = _cli(capsys, *_tiny(assets), "--out", out)  # the lock went with its holder
    assert rc == 0
    _assert_same_run(out, baseline)


def test_a_second_process_on_the_same_run_is_refused(assets, tmp_path):
    """Another process holds the run (as a running `asbound score` does): `asbound score` on the same
    --out is refused and writes nothing (before the lock, two processes wrote 600 rows for --n 300)."""
    out = tmp_path / "run"
    with run_held_by_another_process(out) as pid:
        second = subprocess.run([sys.executable, "-m", "asbound.cli", "score", *_tiny(assets), "--out", str(out)],
                                capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert f"being written by asbound pid {pid}" in second.stderr and "another --out" in second.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("change, key", [
    (["--eps", "4/255"], "eps"),
    (["--seed", "1"], "seed"),
    (["--steps", "3"], "steps"),
    (["--batch-size", "4"], "batch_size"),
    (["--n", "16"], "n"),
])
def test_resume_with_other_settings_is_refused(change, key, assets, populated, capsys):
    before = _snapshot(populated)
    rc, out, err = _cli(capsys, *_tiny(assets), *change, "--out", populated)
    line = _one_line_error(err)
    assert rc == 2 and out == ""
    assert f"{key}:" in line and "--out" in line
    assert _snapshot(populated) == before  # points.csv (and all else) unchanged byte for byte


def test_versions_and_device_do_not_block_resume(assets, baseline, populated, capsys, monkeypatch):
    config = json.loads((populated / "config.json").read_text())
    config["versions"] = {**config["versions"], "torch": "0.0.1"}
    config["device"] = "cuda:3"
    config["python"] = "2.7"
    (populated / "config.json").write_text(json.dumps(config))
    seen = _Recorder(monkeypatch)
    rc, _, _ = _cli(capsys, *_tiny(assets), "--out", populated)
    assert rc == 0 and seen.batches == []
    config = json.loads((populated / "config.json").read_text())
    assert config["versions"]["torch"] != "0.0.1" and config["device"] == "cpu"
    _assert_same_run(populated, baseline)


# --- start-up: parsing and help import none of the heavy stacks ---------------------------------

HEAVY = {"torch", "torchvision", "numpy", "pandas", "robustbench", "foolbox", "timm", "matplotlib", "scipy",
         "autoattack", "pyautoattack", "submitit"}
COMMANDS = [[], ["score"], ["transfer"], ["sweep"], ["predict"], ["table"], ["plot"],
            *(["sweep", kind] for kind in ("shift", "eps", "resize", "grid"))]


def _imported_after(code: str) -> "set[str]":
    """The heavy top-level packages a fresh interpreter holds after running ``code``."""
    script = textwrap.dedent(code) + textwrap.dedent("""
        import sys
        print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split()) & HEAVY


def test_help_and_argument_errors_import_no_heavy_stack():
    """`asbound --help`, each command's --help and an argument error took 5 s, importing torch,
    robustbench, foolbox and pandas at start: the parser now reads its defaults from the
    declarations (asbound.defaults), and each command imports what it needs when it runs."""
    assert _imported_after(f"""
        import contextlib, io
        from asbound.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for command in {COMMANDS!r}:
                assert main([*command, "--help"]) == 0, command
            assert main(["score", "--steps", "x"]) == 2
            assert main(["transfer", "--method", "lp", "--epochs", "x", "--out", "o"]) == 2
            assert main(["sweep", "eps", "--bogus"]) == 2
    """) == set()
    assert _imported_after("import asbound, asbound.api, asbound.cli, asbound.defaults") == set()
    # a command needs only its own stack: tables and plots read records without torch
    assert _imported_after("from asbound.api import table, render, plot, TABLE_STYLES") <= {"numpy", "pandas"}


def test_the_parser_defaults_are_read_from_the_declarations(monkeypatch):
    """Every default and choice the parser takes from a torch module is read from its source
    (strict: no import as a fallback), and equals the imported value."""
    calls = []

    def strict(function):
        def read(*args):
            calls.append((function.__name__, args))
            return function(*args, strict=True)
        return read

    for name in ("config_defaults", "constant", "first_arguments"):
        monkeypatch.setattr(cli, name, strict(getattr(defaults, name)))
    build_parser()
    assert {name for name, _ in calls} == {"config_defaults", "constant", "first_arguments"}
    for name, args in set(calls):
        imported = getattr(importlib.import_module(args[0]), args[1])
        value = getattr(defaults, name)(*args, strict=True)
        if name == "config_defaults":
            assert value == {f.name: f.default for f in dataclasses.fields(imported)
                             if f.default is not dataclasses.MISSING}, args
            assert all(f.default_factory is dataclasses.MISSING for f in dataclasses.fields(imported))
        else:
            assert value == (tuple(imported) if name == "first_arguments" else imported), args


def test_the_declaration_reader_falls_back_to_the_import():
    # a registry of objects and a field with a default factory are no literals: strict refuses them ...
    with pytest.raises(defaults.NotLiteral):
        defaults.constant("asbound.transfer.methods", "METHODS", strict=True)
    with pytest.raises(defaults.NotLiteral):
        defaults.config_defaults("asbound.scoring", "ScoreResult", strict=True)
    # ... and without strict they come from the imported module
    from asbound.transfer.methods import METHODS

    assert defaults.constant("asbound.transfer.methods", "METHODS") is METHODS
    assert defaults.config_defaults("asbound.scoring", "ScoreResult") == {"out": None, "notes": []}
    # a name imported into a module is followed to where it is declared
    from asbound.models.peft import VARIANTS

    assert defaults.constant("asbound.transfer.config", "PEFTS", strict=True) == VARIANTS


def _field_defaults(config: type) -> "dict[str, object]":
    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("command", [["score"], ["transfer"], ["predict"], ["sweep", "eps"]])
def test_each_option_defaults_to_its_config_field(command):
    """An option that sets a config field starts from that field's default (a sweep's transfer
    options from TransferConfig's): no default is written twice."""
    import argparse

    from asbound.predict import PredictConfig
    from asbound.transfer import TransferConfig

    parser = build_parser().commands[command[0]]
    config = {"score": ScoreConfig, "transfer": TransferConfig, "predict": PredictConfig, "sweep": ScoreConfig}
    fields = {dest: (config[command[0]], dest) for dest in _field_defaults(config[command[0]])}
    if command[0] == "sweep":
        parser = next(a for a in parser._actions if a.dest == "kind").choices[command[1]]
        fields.update({dest: (TransferConfig, field) for dest, field in cli._TRANSFER_CELL_ONLY.items()})
    # None says what happens without the option: the embedded default; a sweep's score cells
    unset = {"model", "data"} | ({"method"} if command[0] == "sweep" else set())
    checked = []
    for action in parser._actions:
        if action.dest not in fields or action.dest in unset or action.required or action.default == argparse.SUPPRESS:
            continue
        expected = _field_defaults(fields[action.dest][0])[fields[action.dest][1]]
        if isinstance(expected, tuple) and isinstance(action.default, str):
            expected = ",".join(map(str, expected))
        assert action.default == expected, (action.dest, action.default, expected)
        checked.append(action.dest)
    assert len(checked) >= 8, checked


def test_the_api_is_lazy_and_its_static_imports_match():
    """asbound.api resolves each name from its room on first use; the TYPE_CHECKING imports (what
    editors and type checkers see) name the same objects."""
    tree = ast.parse(Path(api.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    static = {(alias.asname or alias.name): (node.module, alias.name)
              for node in block.body for alias in node.names}
    assert static == api._EXPORTS
    assert sorted(api.__all__) == sorted(api._EXPORTS) and set(dir(api)) >= set(api.__all__)
    for name, (module, attribute) in api._EXPORTS.items():
        assert getattr(api, name) is getattr(importlib.import_module(module), attribute), name
    with pytest.raises(AttributeError):
        api.no_such_name  # noqa: B018


def test_the_top_level_names_are_what_the_docstring_promises():
    """Every lazy name of ``asbound`` resolves to the API's object; ``transfer`` is not one of
    them, since ``asbound.transfer`` is the subpackage (its module shadowed the function)."""
    import asbound

    assert "transfer" not in asbound._API
    for name, module in asbound._API.items():
        assert getattr(asbound, name) is getattr(importlib.import_module(module), name), name
    assert callable(api.transfer) and api.transfer.__module__ == "asbound.transfer.run"
    namespace: dict = {}
    exec(textwrap.dedent(asbound.__doc__.split("::", 1)[1]).strip(), namespace)  # its imports, as written
    assert namespace["transfer"] is api.transfer and namespace["score"] is api.score


# --- 80 columns ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "asbound")
def test_every_help_reads_at_80_columns(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    assert main([*command, "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, max(lines, key=len)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "asbound")
def test_no_option_help_names_an_option_its_command_lacks(command):
    """`transfer --eps` (and the sweeps' and predict's) said "in the box of --protocol", an option
    only `score` has: every option an option's help names is one of its own command."""
    import argparse

    parser = build_parser()
    for word in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    own = {o for a in parser._actions for o in a.option_strings}
    named = {(a.dest, m) for a in parser._actions for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", a.help or "")}
    assert {(dest, m) for dest, m in named if m not in own} == set()


def test_the_progress_bar_keeps_its_count_at_80_columns(assets, tmp_path, capsys, monkeypatch):
    """A description longer than the line (here two long paths) hid the bar, the count and the
    time: it wraps now, and the count stays in view."""
    monkeypatch.setenv("COLUMNS", "80")
    deep = tmp_path / ("a-directory-with-a-long-name-" * 2)
    deep.mkdir()
    shutil.copy(assets / "tiny.pt", deep / "tiny.pt")
    shutil.copy(assets / "data.pt", deep / "data.pt")
    args = [a for a in _tiny(assets, n=8) if a != "--no-progress"]
    args[1], args[4] = f"file:{deep / 'tiny.pt'}", f"tensors:{deep / 'data.pt'}"
    rc, _, err = _cli(capsys, *args, "--json", "--out", tmp_path / "run")
    assert rc == 0 and len(f"{args[1]} on {args[4]}") > 80
    assert "8/8" in err and max(len(line) for line in err.splitlines()) <= 80


def _score_summary(model: str, data: str, **changes) -> dict:
    s = {"model": model, "data": data, "task": "classification", "loss": "cross_entropy", "n": 500,
         "eps_text": "8/255", "norm": "inf", "steps": 20, "as_score": 1.111, "as_score_rep": 2.222,
         "loss_clean": 0.3333, "loss_adv": 0.4444, "loss_diff": 5.555, "q": "inf", "lipschitz": 2.0,
         "head_norm": 6.666, "head_norm_name": "row_max", "lhs": 7.777, "lemma1_holds": True,
         "lemma1_holds_rep": False, "theorem1": {"lhs_capped": 8.888, "cap": 10.0, "delta": 0.05, "bound": 9.999,
                                                 "lipschitz_term": 9.5, "confidence": 0.499},
         "clean_accuracy": 0.111, "robust_accuracy": 0.222, "prop_fulfilled": 0.333, "rob_fulfilled": 0.444,
         "rob_fulfilled_rep": 0.555, "rhs_certified": 1.5, "tightness": 1.35, "prop_certified": 0.1,
         "prop_vacuous": 0.0}
    s.update(changes)
    return s


EMBEDDED = [_score_summary("builtin:lenet-adversarial/orientation", "dsprites:orientation", task="regression",
                           loss="euclidean_error", q="2", head_norm_name="spectral", clean_accuracy=None),
            _score_summary("builtin:lenet-shape-adversarial/shape", "dsprites:shape")]
ZOO = "robustbench:cifar100/Linf/Addepalli2022Efficient_WRN_34_10"


def _rendered(table) -> "list[str]":
    from rich.console import Console

    console = Console(width=80, record=True, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def _assert_readable(lines: "list[str]", whole: "list[str]", words: "list[str]") -> None:
    """At most 80 columns; each of ``whole`` on one line; no word of ``words`` cut."""
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    for text in whole:
        assert any(text in line for line in lines), text
    for text in words:
        for word in text.split():
            assert any(word in line for line in lines), (word, text)


@pytest.mark.parametrize("summaries", [
    EMBEDDED,
    [_score_summary(ZOO, "cifar10")],
    [*EMBEDDED, _score_summary(ZOO, "cifar10")],
    [_score_summary(ZOO, "cifar10"), _score_summary(ZOO, "tensors:/home/someone/data/a-cifar10-subset.pt")],
    [_score_summary("builtin:m", "cifar10"), _score_summary("builtin:m", "dsprites:shape")],
], ids=["embedded default", "one run", "three models", "long data", "one model"])
def test_the_score_table_reads_at_80_columns(summaries):
    """Specs stand whole (they broke mid-word: "builtin:lenet-ad / versarial/"), no value is cut,
    and with one or two runs every row label keeps its line."""
    from asbound.report.console import CERTIFIED_ROWS, ROWS, summary_table

    lines = _rendered(summary_table(summaries))
    specs = [s[key] for s in summaries for key in ("model", "data")]
    rows = ROWS + CERTIFIED_ROWS
    cells = [cell(s) for _, cell in rows for s in summaries]
    labels = [label for label, _ in rows]
    _assert_readable(lines, specs + (labels if len(summaries) <= 2 else []), cells + labels)


def _final(method: str, peft: "str | None" = None) -> dict:
    return {"method": method, "peft": peft,
            "test": {"n": 10000, "clean_accuracy": 0.8123, "pgd": {"10": 0.4512, "20": 0.4401}, "eps_text": "8/255"},
            "score_before": {"as_score": 1.2345},
            "score_after": {"as_score_rep": 1.111, "as_score": 1.2222, "loss": "cross_entropy", "loss_clean": 0.4321,
                            "loss_adv": 1.2345, "head_norm": 3.21, "lhs": 0.1234, "prop_fulfilled": 0.3456,
                            "rob_fulfilled": 0.9},
            "stages": [{"stage": "lp", "selected_epoch": 17, "epochs": 20},
                       *([{"stage": "ft", "selected_epoch": 9, "epochs": 10}] if method == "lp-ft" else [])]}


@pytest.mark.parametrize("methods", [["lp"], ["lp", "ft", "lp-ft"], ["lp", "ft", "lp-ft", "adv-lp", "adv-ft"],
                                     [("ranli", "lora"), ("roli", "adapter")]], ids=lambda m: str(len(m)))
def test_the_transfer_table_reads_at_80_columns(methods):
    from asbound.report.console import transfer_rows, transfer_table

    finals = [_final(*m) if isinstance(m, tuple) else _final(m) for m in methods]
    title = f"asbound transfer: {ZOO} -> cifar10 (classes 0-4)"
    lines = _rendered(transfer_table(finals, title=title))
    cells = [cell(f) for _, cell in transfer_rows(finals) for f in finals]
    _assert_readable(lines, [ZOO], cells + title.split() + [label for label, _ in transfer_rows(finals)])


def test_the_predict_table_reads_at_80_columns():
    from asbound.report.console import predict_table

    rec = {"model": ZOO, "eps_text": "8/255", "norm": "inf", "threshold": 2.0,
           "pretrain": {"label": "cifar100", "as_score": 0.8765},
           "tasks": [{"label": "cifar10", "as_score": 0.9, "ratio": 1.03, "verdict": "transfers",
                      "bound": {"loss_increase": 1.234}, "measured": {"relative_ce": 0.44}},
                     {"label": "digits [5-9] +zoom_blur-2 @32px", "as_score": 2.9, "ratio": 3.3,
                      "verdict": "does not transfer", "bound": None, "measured": None}]}
    lines = _rendered(predict_table(rec))
    _assert_readable(lines, [ZOO], ["digits [5-9] +zoom_blur-2 @32px", "does not transfer", "1.234", "0.44",
                                    "measured (rob. CE - CE) / CE", "verdict (ratio <= 2)"])


# --- help that the commands keep: the sweeps' embedded default ----------------------------------


def test_a_sweep_without_model_and_data_scores_the_embedded_default(tmp_path, capsys, monkeypatch):
    """`sweep eps --help` promised the embedded default without --model/--data, and the command
    refused with "give --model": now its cells score the embedded default's classification
    setting, the one its help names, and the eps table reads them."""
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert main(["sweep", "eps", "--help"]) == 0
    model, data = scoring.DEFAULT_RUNS[1]
    assert f"{model} on {data}" in _help_entries(capsys.readouterr().out)["--model"]
    out = tmp_path / "sweep"
    rc = main(["sweep", "eps", "--multiples", "1,2", "--n", "4", "--steps", "1", "--no-progress", "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    for cell, eps in (("eps-x1", EPS), ("eps-x2", 2 * EPS)):
        summary = _strict_json((out / cell / "summary.json").read_text())
        assert summary["model"] == f"{model}/shape" and summary["data"] == data
        assert summary["n"] == 4 and summary["eps"] == pytest.approx(eps) and "prop_fulfilled" in summary
    assert main(["table", str(out), "--style", "eps"]) == 0
    assert "robust accuracy of the fulfilled (x2)" in capsys.readouterr().out
    # without --n: the embedded default's n, as for score
    args = cli.build_parser().parse_args(["sweep", "eps", "--out", "o"])
    assert cli._sweep_base(args)[1]["n"] == scoring.DEFAULT_N
    args = cli.build_parser().parse_args(["sweep", "eps", "--model", "m", "--data", "d", "--out", "o"])
    assert cli._sweep_base(args)[1]["n"] == ScoreConfig.n


def test_a_sweeps_transfer_cells_score_as_many_test_images_as_they_evaluate():
    """`sweep eps --method lp --n-train 60` validated and tested on 60 images per cell but scored
    1000 (ScoreConfig's n) before and after transfer: without --n the cells' scores follow their
    test images, as transfer's do; --n still sets them."""
    from asbound.transfer import TransferConfig
    from asbound.transfer.config import image_counts

    sizes = (671, 35, 190)  # digits 5-9: training, validation and test splits
    argv = ["sweep", "eps", "--method", "lp", "--model", "builtin:digits-adversarial", "--data", "digits",
            "--classes", "5-9", "--n-train", "60", "--out", "o"]
    for extra, score_n in (([], 60), (["--n", "30"], 30), (["--n", "all"], 190)):
        run, base = cli._sweep_base(cli.build_parser().parse_args([*argv, *extra]))
        cfg = TransferConfig(**base).validated()
        assert run == "transfer"
        assert image_counts(cfg.n, cfg.n_val, cfg.n_test, cfg.score_n, sizes) == {
            "train": 60, "val": 35, "test": 60, "score": score_n}, extra


@pytest.mark.parametrize("args, expected", [
    (["--method", "lp"], ["--method", "--model and --data"]),
    (["--model", "builtin:lenet-adversarial"], ["both --model and --data"]),
    (["--epochs", "3"], ["--epochs", "score cells"]),
    (["--n-test", "50", "--lr", "0.1"], ["--lr, --n-test", "score cells"]),
    (["--method", "lp", "--model", "builtin:lenet-adversarial", "--data", "digits", "--attack", "apgd",
      "--head", "h.pt"], ["--head, --attack", "transfer cells"]),
])
def test_a_sweep_refuses_options_its_cells_would_not_use(args, expected, tmp_path, capsys):
    """Options that one kind of cell ignores were dropped silently; they are refused, one line."""
    capsys.readouterr()
    rc = main(["sweep", "eps", *args, "--out", str(tmp_path / "sweep")])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and not (tmp_path / "sweep").exists()
    for text in expected:
        assert text in line, (text, line)


# --- the test processes ---------------------------------------------------------------------------


def test_tests_and_the_processes_they_start_run_one_compute_thread():
    """conftest.py caps torch's threads (unless $OMP_NUM_THREADS says otherwise): with its default
    pool per process the suite took 19 minutes on a loaded 2-core machine."""
    threads = os.environ["OMP_NUM_THREADS"]
    assert torch.get_num_threads() == int(threads)
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == threads, proc.stderr


def test_attack_nystrom_reaches_the_run_and_the_sweep_and_predict_take_it(assets, tmp_path, capsys):
    out = tmp_path / "run"
    summary = _run_json(capsys, *_tiny(assets), "--attack", "nystrom", "--steps", "4", "--out", out)
    config = _strict_json((out / "config.json").read_text())
    assert (config["attack"], config["steps"], config["rel_step"]) == ("nystrom", 4, 0.7)
    assert summary["attack"] == "nystrom" and summary["as_score_rep"] > 0
    # the sweep's score cells and predict take the same option
    from asbound.cli import _sweep_base, build_parser

    args = build_parser().parse_args(["sweep", "eps", "--model", "builtin:digits-standard", "--data", "digits",
                                      "--attack", "nystrom", "--out", str(tmp_path / "s")])
    assert _sweep_base(args)[1]["attack"] == "nystrom"
    args = build_parser().parse_args(["predict", "--model", "builtin:digits-standard", "--pretrain-data", "digits",
                                      "--data", "digits", "--attack", "nystrom", "--out", str(tmp_path / "p")])
    assert args.attack == "nystrom"
    rc, _, err = _cli(capsys, *_tiny(assets), "--attack", "cw", "--out", str(tmp_path / "bad"))
    assert rc == 2 and "nystrom" in err


def test_the_attack_choices_are_the_attacks():
    """The parser's literal list (it imports no torch) names exactly the attacks scoring runs."""
    from asbound.attacks import ATTACKS
    from asbound.cli import ATTACK_CHOICES
    from asbound.scoring import REL_STEP

    assert set(ATTACK_CHOICES) == set(ATTACKS) == set(REL_STEP)
