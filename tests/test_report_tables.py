"""Tables and plots from fabricated run records (docs/RECORDS.md): every style in every format
against golden files, the eps join by hand, missing columns named, every plot kind written.

Regenerate the golden files after an intended change: ASBOUND_UPDATE_GOLDEN=1 pytest tests/test_report_tables.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from rich.cells import cell_len

from asbound.cli import main
from asbound.errors import ConfigError
from asbound.report.plots import KINDS, plot
from asbound.report.tables import FORMATS, STYLES, render, table

GOLDEN = Path(__file__).parent / "golden"


def _summary(**over):
    s = dict(n=4, as_score=1.2, as_score_rep=1.1, loss="cross_entropy", loss_clean=0.5, loss_adv=0.9, loss_diff=0.4,
             q="inf", lipschitz=2.0, head_norm=2.0, head_norm_name="row_max", lhs=0.1, rhs=1.2,
             clean_accuracy=0.75, robust_accuracy=0.5, prop_fulfilled=0.25, rob_fulfilled=1.0, eps=0.1,
             eps_text="0.1", norm="inf", steps=20, attack="pgd", restarts=1, rel_step=0.7, model="builtin:m",
             data="digits", task="classification", head_norms={"row_max": 2.0})
    s.update(over)
    return s


def _points(fulfilled, robust, margin=None, sensitivity=None):
    n = len(fulfilled)
    return pd.DataFrame({
        "position": range(n), "index": [10 + i for i in range(n)], "label": [0] * n,
        "sensitivity": sensitivity or [0.5] * n, "margin": margin or [1.0, 0.8, 0.2, -0.1][:n],
        "correct": [m > 0 for m in (margin or [1.0, 0.8, 0.2, -0.1][:n])], "robust": robust, "fulfilled": fulfilled,
    })


def _score_run(path: Path, config: dict, summary: dict, points: pd.DataFrame) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "summary.json").write_text(json.dumps(summary))
    points.to_csv(path / "points.csv", index=False)


def _sweep(path: Path, kind: str, cells: "list[tuple[str, dict]]", base: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "sweep.json").write_text(json.dumps({
        "kind": kind, "command": f"asbound sweep {kind}", "run": "score", "axes": list(cells[0][1]), "base": base,
        "executor": "local", "versions": {},
        "cells": [{"name": n, "dir": n, "params": p, "status": "done", "error": None} for n, p in cells]}))


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A tree of fabricated runs; the working directory is its root (paths print relative)."""
    monkeypatch.chdir(tmp_path)
    base = {"model": "builtin:m", "data": "digits", "classes": "0-4", "norm": "inf", "eps": 0.1}
    pts = _points([True, False, False, False], [True, True, False, False])
    _score_run(tmp_path / "score" / "a", {**base, "data": "digits", "classes": "5-9"}, _summary(), pts)
    _score_run(tmp_path / "score" / "b", {**base, "model": "builtin:other", "data": "dsprites:shape", "classes": None},
               _summary(as_score=3.0, lhs=0.2, loss_diff=1.5, head_norm=3.75, clean_accuracy=0.9,
                        robust_accuracy=0.25, prop_fulfilled=0.0, rob_fulfilled=None), pts)
    # certified runs: one with certificates, one vacuous
    _score_run(tmp_path / "cert" / "a", {**base, "eps": 1 / 255}, _summary(eps_text="1/255", rhs_certified=6.0,
               tightness=5.0, prop_certified=0.25, prop_vacuous=0.0), pts)
    _score_run(tmp_path / "cert" / "b", {**base, "eps": 8 / 255}, _summary(eps_text="8/255", rhs_certified=9e9,
               tightness=7.5e9, prop_certified=0.0, prop_vacuous=1.0), pts)
    # a transfer directory with two methods
    for method, acc in (("lp", 0.8), ("ft", 0.95)):
        d = tmp_path / "transfer" / method
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({**base, "data": "digits", "classes": "5-9", "method": method}))
        (d / "final.json").write_text(json.dumps({
            "method": method, "peft": None, "stages": [],
            # "5" and "20": the string-largest key is not the most steps (RAcc is PGD-20's)
            "test": {"n": 4, "eps": 0.1, "eps_text": "0.1", "pgd": {"5": acc - 0.3, "20": acc - 0.4},
                     "clean_accuracy": acc, "autoattack": None},
            "score_before": _summary(), "score_after": _summary(as_score=acc * 5)}))
    # shift: the clean baseline, gaussian noise at 1 and 5
    shift_cells = [("clean", {"corruption": None, "severity": 0}),
                   ("gaussian_noise-1", {"corruption": "gaussian_noise", "severity": 1}),
                   ("gaussian_noise-5", {"corruption": "gaussian_noise", "severity": 5})]
    _sweep(tmp_path / "shift", "shift", shift_cells, base)
    for k, (name, params) in enumerate(shift_cells):
        cfg = {**base, **{"corruption": params["corruption"], "severity": params["severity"] or None},
               "transforms": ([f"corrupt: gaussian_noise severity {params['severity']} (CIFAR-10-C parameters: sigma "
                               f"{[0, 0.04, 0, 0, 0, 0.1][params['severity']]}), per image seeded by (seed 0, index)"]
                              if params["corruption"] else [])}
        _score_run(tmp_path / "shift" / name, cfg,
                   _summary(as_score=1.0 + k, lhs=0.1 * (k + 1), robust_accuracy=0.5 - 0.1 * k), pts)
    # eps: the fulfilled points of x1 are indices 10, 11; at x2 10 is robust, 11 is not
    eps_cells = [("eps-x1", {"eps": 0.05, "eps_text": "0.05", "multiple": 1}),
                 ("eps-x2", {"eps": 0.1, "eps_text": "0.1", "multiple": 2})]
    _sweep(tmp_path / "eps", "eps", eps_cells, base)
    _score_run(tmp_path / "eps" / "eps-x1", base, _summary(prop_fulfilled=0.5, robust_accuracy=0.75, eps=0.05,
                                                           eps_text="0.05"),
               _points([True, True, False, False], [True, True, True, False]))
    _score_run(tmp_path / "eps" / "eps-x2", base, _summary(prop_fulfilled=0.25, robust_accuracy=0.25),
               _points([True, False, False, False], [True, False, False, False]))
    # resize
    resize_cells = [("resize-16", {"resize": 16}), ("resize-32", {"resize": 32})]
    _sweep(tmp_path / "resize", "resize", resize_cells, base)
    for k, (name, params) in enumerate(resize_cells):
        _score_run(tmp_path / "resize" / name, {**base, **params}, _summary(as_score=2.0 + k, lhs=0.3 - 0.1 * k), pts)
    # predict
    (tmp_path / "predict").mkdir()
    (tmp_path / "predict" / "predict.json").write_text(json.dumps({
        "model": "builtin:m", "eps": 0.1, "eps_text": "0.1", "norm": "inf", "threshold": 2.0, "command": "x",
        "config": {"model": "builtin:m"},
        "pretrain": {"data": "digits", "label": "digits [0-4]", "dir": "as/p", "as_score": 2.0, "loss_clean": 0.1,
                     "loss_adv": 0.15, "n": 4},
        "tasks": [  # AS ratio = AS / 2: drawing the AS for the ratio shows
            {"label": "digits [5-9]", "data": "digits", "as_score": 3.0, "ratio": 1.5, "verdict": "transfers",
             "bound": None, "measured": {"loss_clean": 0.4, "loss_adv": 0.6, "relative_ce": 0.5}},
            {"label": "dsprites:shape", "data": "dsprites:shape", "as_score": 6.0, "ratio": 3.0,
             "verdict": "does not transfer", "bound": None,
             "measured": {"loss_clean": 0.5, "loss_adv": 1.5, "relative_ce": 2.0}},
            {"label": "digits [0-4] +zoom_blur-5", "data": "digits", "as_score": 4.0, "ratio": 2.0,
             "verdict": "transfers", "bound": None, "measured": {"loss_clean": 0.2, "loss_adv": 0.4, "relative_ce": 1.0}}],
        "spearman": {"ratio_vs_relative_ce": {"rho": 1.0, "p": 0.0, "n": 3}}}))
    return tmp_path


SOURCES = {"lemma1": ["score"], "theorem2": ["score/a", "score/b"], "transfer": ["transfer"], "shift": ["shift"],
           "eps": ["eps"], "resize": ["resize"], "predict": ["predict"], "certify": ["cert"]}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_style_renders_against_its_golden_file(runs, style, fmt):
    text = render(table(SOURCES[style], style), fmt, command=f"asbound table {' '.join(SOURCES[style])} --style {style}")
    golden = GOLDEN / f"{style}.{fmt}"
    if os.environ.get("ASBOUND_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()
    assert str(runs) not in text  # no absolute paths of the machine that made it


def test_the_tables_hold_the_records_numbers(runs):
    lemma = table(["score"], "lemma1").blocks[0].frame
    assert list(lemma.loc["LHS"]) == ["0.1", "0.2"] and list(lemma.loc["AS score (RHS)"]) == ["1.2", "3"]
    assert lemma.columns[1] == ("other", "dsprites:shape")  # (Pretraining, Downstream)
    assert lemma.index[1] == "‖W‖ (row_max)"
    t2 = table(["score/b"], "theorem2").blocks[0].frame
    assert list(t2.iloc[:, 0]) == ["90.0%", "25.0%", "0.0%", "-"]
    tr = table(["transfer"], "transfer").blocks[0].frame
    assert tr.loc["ft", "Acc"] == "95.0%" and tr.loc["ft", "RAcc"] == "55.0%"  # PGD-20, the most steps
    shift = table(["shift"], "shift").blocks[0].frame
    assert list(shift.columns) == ["clean", "C1", "C5"] and list(shift.loc["AS score"]) == ["1", "2", "3"]
    resize = table(["resize"], "resize").blocks[0].frame
    assert list(resize.index) == ["32x32", "16x16"]  # largest first, as seed Table 10
    pred = table(["predict"], "predict").blocks[0]
    assert pred.frame.iloc[0]["relative dif."] == "0.5"  # the pretraining row: (0.15 - 0.1) / 0.1
    assert any("rho 1.000" in n for n in pred.notes)


def test_the_eps_table_joins_the_cells_on_index(runs):
    frame = table(["eps"], "eps").blocks[0].frame
    col = frame.iloc[:, 0]
    assert col["prop. fulfilled (x1)"] == "50.0%"
    assert col["robust accuracy (x1)"] == "75.0%" and col["robust accuracy (x2)"] == "25.0%"
    # fulfilled at x1: indices 10 and 11; robust at x1: both; at x2: only 10
    assert col["robust accuracy of the fulfilled (x1)"] == "100.0%"
    assert col["robust accuracy of the fulfilled (x2)"] == "50.0%"
    # a cell that scored other points is named
    p = pd.read_csv(runs / "eps" / "eps-x2" / "points.csv")
    p.loc[0, "index"] = 99
    p.to_csv(runs / "eps" / "eps-x2" / "points.csv", index=False)
    rendered = table(["eps"], "eps")
    assert any("scored other points" in n for n in rendered.blocks[0].notes)
    assert rendered.blocks[0].frame.iloc[:, 0]["robust accuracy of the fulfilled (x2)"] == "0.0%"


@pytest.mark.parametrize(
    "paths, style, message",
    [
        (["score"], "eps", "is not a cell of a eps sweep"),
        (["predict"], "lemma1", "has no score summary"),
        (["score"], "transfer", "is a score run, not a transfer run"),
        (["score"], "predict", "is a score run, not an 'asbound predict' directory"),
        (["score"], "certify", "lacks rhs_certified"),
        (["nowhere"], "lemma1", "nowhere is not a directory"),
    ],
)
def test_tables_asked_of_the_wrong_runs_name_what_is_missing(runs, paths, style, message):
    with pytest.raises(ConfigError, match=message):
        table(paths, style)


def test_an_as_only_run_lacks_the_lemma1_columns(runs, capsys):
    s = json.loads((runs / "score" / "a" / "summary.json").read_text())
    for key in ("loss_diff", "lhs", "head_norm"):
        s[key] = None
    s["task_note"] = "the AS score only"
    (runs / "score" / "a" / "summary.json").write_text(json.dumps(s))
    assert main(["table", "score", "--style", "lemma1", "--out", "t.md"]) == 2
    err = capsys.readouterr().err
    assert "score/a lacks loss_diff, head_norm, lhs (the AS score only)" in err and err.count("\n") == 1
    assert not (runs / "t.md").exists()
    (runs / "empty").mkdir()
    assert main(["table", "empty", "--style", "lemma1"]) == 2
    assert "is not an asbound run directory" in capsys.readouterr().err


def test_a_sweep_with_cells_not_done_renders_the_rest_and_says_so(runs):
    manifest = json.loads((runs / "shift" / "sweep.json").read_text())
    manifest["cells"].append({"name": "zoom_blur-1", "dir": "zoom_blur-1", "params": {"corruption": "zoom_blur",
                                                                                      "severity": 1},
                              "status": "pending", "error": None})
    (runs / "shift" / "sweep.json").write_text(json.dumps(manifest))
    rendered = table(["shift"], "shift")
    assert len(rendered.blocks) == 1 and "zoom_blur-1" in rendered.notes[0]


def test_the_cli_writes_the_table_with_its_command(runs, capsys):
    assert main(["table", "score", "--style", "theorem2", "--format", "csv", "--out", "out/t3.csv"]) == 0
    text = (runs / "out" / "t3.csv").read_text()
    assert text.startswith("# command: asbound table score --style theorem2 --format csv --out out/t3.csv\n")
    frame = pd.read_csv(runs / "out" / "t3.csv", comment="#")
    assert list(frame["table"].unique()) == ["Theorem 2"]
    assert main(["table", "score", "--style", "bogus"]) == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _on_a_terminal(monkeypatch, columns: int = 80) -> None:
    """stdout as a terminal COLUMNS wide (what ``asbound table`` asks of it)."""
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)


def _reads_at(text: str, rendered, width: int) -> None:
    """Every line at most ``width`` columns with no trailing spaces, and the console shows what the
    Markdown does: every title, every cell (those without spaces as words of the output), every note."""
    lines = ANSI.sub("", text).splitlines()
    assert max(cell_len(line) for line in lines) <= width, max(lines, key=cell_len)
    assert all(line == line.rstrip() for line in lines)
    words = set(" ".join(lines).split())
    flat = " ".join(" ".join(lines).split())
    for block in rendered.blocks:
        assert " ".join(block.title.split()) in flat
        cells = [str(v) for v in block.frame.to_numpy().ravel() if isinstance(v, str) and v.split() == [v]]
        assert cells and set(cells) <= words, set(cells) - words
        for note in block.notes:
            assert " ".join(note.split()) in flat
    for note in rendered.notes:
        assert " ".join(note.split()) in flat


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("how", ["terminal", "--format console"])
def test_the_table_printed_on_the_console_reads_at_80_columns(runs, capsys, monkeypatch, style, how):
    """On a terminal (or with --format console) the tables are laid out at its width by rich."""
    if how == "terminal":
        _on_a_terminal(monkeypatch)
    else:
        monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    assert main(["table", *SOURCES[style], "--style", style, *([] if how == "terminal" else how.split())]) == 0
    out = capsys.readouterr().out
    assert "| ---" not in out and "|---" not in out  # not the Markdown
    assert (ANSI.search(out) is not None) == (how == "terminal")  # bold and italics on a terminal only
    _reads_at(out, table(SOURCES[style], style), 80)


@pytest.mark.parametrize("columns", [60, 40])
def test_a_wide_table_is_split_with_its_row_labels_repeated(runs, capsys, monkeypatch, columns):
    _wide_runs(runs)  # and a duplicate: one row per run, every quantity a column
    _score_run(runs / "t7" / "dup", {"model": "builtin:lenet-a/posx", "data": "dsprites:posx", "norm": "2"},
               _summary(model="builtin:lenet-a/posx", data="dsprites:posx", norm="2"), _points([True], [True]))
    rendered = table(["t7"], "lemma1")
    assert len(render(rendered, "md").splitlines()[3]) > 100  # the Markdown's rows are wider than a terminal
    _on_a_terminal(monkeypatch, columns)
    assert main(["table", "t7", "--style", "lemma1"]) == 0
    out = ANSI.sub("", capsys.readouterr().out)
    _reads_at(out, rendered, columns)
    # each part repeats the row labels: every run's label once per part
    parts = out.count("Downstream")
    assert parts > 1 and out.count("dsprites:posx (norm 2) #2") == parts


def test_split_tables_repeat_the_columns_that_tell_their_rows_apart(runs, capsys, monkeypatch):
    """The certify table has a row per run and eps: each part of a split table repeats the eps."""
    _on_a_terminal(monkeypatch, 50)
    assert main(["table", "cert", "--style", "certify"]) == 0
    out = ANSI.sub("", capsys.readouterr().out)
    _reads_at(out, table(["cert"], "certify"), 50)
    rows = [line.split("  ") for line in out.splitlines() if line.startswith("m → digits [0-4]")]
    assert len(rows) > 2 and len(rows) % 2 == 0  # two rows (eps 1/255, 8/255) per part, more than one part
    assert [r[1].strip() for r in rows] == ["1/255", "8/255"] * (len(rows) // 2)


@pytest.mark.parametrize("style", STYLES)
def test_piped_or_written_the_table_keeps_its_format_byte_for_byte(runs, capsys, monkeypatch, style):
    """Piped or redirected, the Markdown (the golden file); with --out, the file is the golden file
    even from a terminal."""
    capsys.readouterr()
    assert main(["table", *SOURCES[style], "--style", style]) == 0
    assert capsys.readouterr().out == (GOLDEN / f"{style}.md").read_text()
    _on_a_terminal(monkeypatch)
    for fmt in FORMATS:
        assert main(["table", *SOURCES[style], "--style", style, "--format", fmt, "--out", f"t.{fmt}"]) == 0
        golden = (GOLDEN / f"{style}.{fmt}").read_text()
        # the golden files name no --format/--out in their command line
        assert (runs / f"t.{fmt}").read_text() == golden.replace(
            f"--style {style}", f"--style {style} --format {fmt} --out t.{fmt}", 1)


@pytest.mark.parametrize("kind", KINDS)
def test_every_plot_kind_writes_png_and_pdf(runs, kind):
    source = {"lhs-rhs": ["score", "transfer"], "margin-vs-sensitivity": ["score", "transfer/lp"], "shift": ["shift"],
              "eps": ["eps"], "predict": ["predict"]}[kind]
    (runs / "transfer" / "lp" / "score" / "after").mkdir(parents=True)
    _points([True, False], [True, False], margin=[1.0, -0.5], sensitivity=[0.2, 0.4]).to_csv(
        runs / "transfer" / "lp" / "score" / "after" / "points.csv", index=False)
    written = plot(source, kind, runs / "fig" / f"{kind}.png")
    assert [p.suffix for p in written] == [".png", ".pdf"]
    assert all(p.stat().st_size > 1000 for p in written)
    assert written[0].read_bytes()[:4] == b"\x89PNG" and written[1].read_bytes()[:4] == b"%PDF"


def test_plots_refuse_what_they_cannot_draw(runs, capsys):
    with pytest.raises(ConfigError, match="must end in .png or .pdf"):
        plot(["score"], "lhs-rhs", runs / "fig.jpg")
    assert main(["plot", "score", "--kind", "shift", "--out", "f.png"]) == 2
    assert "is not a cell of a shift sweep" in capsys.readouterr().err
    assert not (runs / "f.png").exists()


def _wide_runs(root: Path) -> None:
    """Table 7's shape: 2 pretrainings x 2 attack norms x 2 probes (builtin ``NAME/HEAD`` models)."""
    pts = _points([True, False], [True, False])
    for k, (model, norm, factor) in enumerate((m, n, f) for m in ("a", "b") for n in ("2", "inf")
                                              for f in ("posx", "scale")):
        _score_run(root / "t7" / f"{model}-{norm}-{factor}",
                   {"model": f"builtin:lenet-{model}/{factor}", "data": f"dsprites:{factor}", "norm": norm},
                   _summary(loss="euclidean_error", lhs=0.01 * (k + 1), as_score=1.0 + k, head_norm_name="spectral",
                            model=f"builtin:lenet-{model}/{factor}", data=f"dsprites:{factor}", norm=norm), pts)


def test_many_runs_pivot_into_table7s_layout(runs):
    _wide_runs(runs)
    frame = table(["t7"], "lemma1").blocks[0].frame
    assert list(frame.columns) == ["dsprites:posx", "dsprites:scale"]  # a column per probe
    assert frame.index.names == ["Pretraining", "setting", "quantity"]
    assert frame.loc[("lenet-a", "norm inf", "LHS"), "dsprites:scale"] == "0.04"  # 4th run: lhs 0.04
    assert frame.loc[("lenet-b", "norm 2", "AS score (RHS)"), "dsprites:posx"] == "5"  # 5th run: as 5
    assert frame.loc[("lenet-b", "norm 2", "Diff. loss"), "dsprites:posx"] == "0.4"
    md = render(table(["t7"], "lemma1"), "md")
    assert "| lenet-a       | norm 2    | Diff. loss" in md and "|               | norm inf  | Diff. loss" in md
    tex = render(table(["t7"], "lemma1"), "tex")
    assert r"\multirow" in tex and r"\cline" not in tex and r"\addlinespace" in tex


def test_runs_that_do_not_pivot_get_a_row_each(runs):
    _wide_runs(runs)
    # two runs of one (pretraining, norm, probe): no unique pivot cell
    _score_run(runs / "t7" / "dup", {"model": "builtin:lenet-a/posx", "data": "dsprites:posx", "norm": "2"},
               _summary(model="builtin:lenet-a/posx", data="dsprites:posx", norm="2"), _points([True], [True]))
    frame = table(["t7"], "lemma1").blocks[0].frame
    assert frame.index.names == ["Pretraining", "Downstream"] and len(frame) == 9
    assert frame.index[0] == ("lenet-a", "dsprites:posx (norm 2)")
    assert ("lenet-a", "dsprites:posx (norm 2) #2") in frame.index


def test_the_transfer_table_takes_pgd_for_racc_and_adds_autoattack(runs):
    final = json.loads((runs / "transfer" / "ft" / "final.json").read_text())
    final["test"]["autoattack"] = 0.5
    (runs / "transfer" / "ft" / "final.json").write_text(json.dumps(final))
    block = table(["transfer"], "transfer").blocks[0]
    assert list(block.frame.columns) == ["Acc", "RAcc", "RAcc (AA)", "AS", "CE", "robust CE", "‖W‖"]
    assert block.frame.loc["ft", "RAcc"] == "55.0%" and block.frame.loc["ft", "RAcc (AA)"] == "50.0%"
    assert block.frame.loc["lp", "RAcc (AA)"] == "-"
    del final["test"]["clean_accuracy"]  # (without test at all, final.json is damaged: test_bad_files)
    (runs / "transfer" / "ft" / "final.json").write_text(json.dumps(final))
    with pytest.raises(ConfigError, match="ft lacks test.clean_accuracy"):
        table(["transfer"], "transfer")


def test_a_predict_record_without_its_fields_is_named(runs, capsys):
    rec = json.loads((runs / "predict" / "predict.json").read_text())
    del rec["tasks"][1]["ratio"]
    (runs / "predict" / "predict.json").write_text(json.dumps(rec))
    assert main(["table", "predict", "--style", "predict"]) == 2
    err = capsys.readouterr().err
    assert "predict.json is damaged or not asbound's (tasks[1].ratio is missing)" in err and err.count("\n") == 1
    rec["tasks"][1]["ratio"] = None  # (present, null: an infinite ratio as JSON writes it)
    (runs / "predict" / "predict.json").write_text(json.dumps(rec))
    assert main(["table", "predict", "--style", "predict"]) == 2
    err = capsys.readouterr().err
    assert "predict lacks tasks[1].ratio in predict.json" in err and err.count("\n") == 1


def test_the_predict_table_shows_lemma1s_bound_when_recorded(runs):
    rec = json.loads((runs / "predict" / "predict.json").read_text())
    rec["tasks"][0]["bound"] = {"head_norm": 2.0, "head_norm_name": "row_max", "q": "inf", "lipschitz": 2.0,
                                "loss_increase": 6.0, "source": "--head-norm"}
    (runs / "predict" / "predict.json").write_text(json.dumps(rec))
    frame = table(["predict"], "predict").blocks[0].frame
    assert list(frame["CE increase bound (Lem. 1)"]) == ["-", "6", "-", "-"]


def test_render_takes_a_bare_dataframe(runs):
    text = render(pd.DataFrame({"a": ["1"]}, index=["x"]), "csv")
    assert "runs:" not in text and text.splitlines()[-1] == "table,x,1"


def test_the_report_room_is_in_the_api_and_the_cli():
    import asbound.api as api
    import asbound.cli as cli

    for name in ("table", "render", "plot", "collect", "TABLE_STYLES", "PLOT_KINDS"):
        assert name in api.__all__ and hasattr(api, name)
    assert callable(cli._table_parser) and callable(cli._plot_parser)
    parser = cli.build_parser()
    args = parser.parse_args(["table", "r", "--style", "eps", "--format", "tex"])
    assert (args.style, args.format, args.out) == ("eps", "tex", None)
    assert parser.parse_args(["plot", "r", "--kind", "eps", "--out", "f.pdf"]).kind == "eps"


def test_the_margin_plot_draws_misclassified_and_infinite_margins(runs):
    points = _points([True, False, False, False], [True, False, False, False], margin=[float("inf"), 0.8, 0.2, -0.5],
                     sensitivity=[0.1, 0.9, 0.1, 0.3])
    points.to_csv(runs / "score" / "a" / "points.csv", index=False)
    written = plot(["score/a"], "margin-vs-sensitivity", runs / "m.pdf")
    assert [p.name for p in written] == ["m.png", "m.pdf"] and all(p.stat().st_size > 1000 for p in written)


def test_eps_tables_of_several_sweeps_line_up_by_row(runs):
    # a second sweep of the same setting with only the first multiple, and another fulfilled set
    _sweep(runs / "eps2", "eps", [("eps-x1", {"eps": 0.05, "eps_text": "0.05", "multiple": 1})],
           {"model": "builtin:m", "data": "digits", "classes": "0-4"})
    _score_run(runs / "eps2" / "eps-x1", {"model": "builtin:m", "data": "digits", "classes": "0-4", "seed": 1},
               _summary(prop_fulfilled=0.25, robust_accuracy=0.5),
               _points([False, False, True, False], [True, False, False, False]))
    frame = table(["eps", "eps2"], "eps").blocks[0].frame
    assert frame.shape[1] == 2  # the second sweep of one setting is kept, not overwritten
    second = frame.iloc[:, 1]
    assert second["prop. fulfilled (x1)"] == "25.0%" and second["robust accuracy (x1)"] == "50.0%"
    assert second["robust accuracy of the fulfilled (x1)"] == "0.0%"  # index 12: fulfilled, not robust
    assert second["robust accuracy (x2)"] == "-" and second["robust accuracy of the fulfilled (x2)"] == "-"
    assert frame.iloc[:, 0]["robust accuracy of the fulfilled (x2)"] == "50.0%"


def test_lemma1_reads_whether_it_held_from_the_record(runs):
    s = json.loads((runs / "score" / "a" / "summary.json").read_text())
    s.update(lhs=s["as_score"] + 5e-10, lemma1_holds=True)  # within the recorded float tolerance
    (runs / "score" / "a" / "summary.json").write_text(json.dumps(s))
    frame = table(["score/a"], "lemma1").blocks[0].frame
    assert "NO" not in frame.to_string()


def _transfer_run(path: Path, method: str, *, eps_text: str = "0.1", config: "dict | None" = None,
                  test: "dict | None" = None, after: "dict | None" = None) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": "builtin:m", "data": "digits", "classes": "5-9",
                                                  "method": method, "eps_text": eps_text, **(config or {})}))
    (path / "final.json").write_text(json.dumps({
        "method": method, "peft": None, "stages": [],
        "test": {"n": 4, "eps_text": eps_text, "pgd": {"20": 0.5}, "clean_accuracy": 0.9, **(test or {})},
        "score_after": _summary(eps_text=eps_text, **(after or {}))}))


def test_the_transfer_table_keeps_each_eps_apart_and_tells_two_runs_of_a_method_apart(runs):
    _transfer_run(runs / "more" / "lp-8", "lp", eps_text="8/255", after={"as_score": 7.0})
    _transfer_run(runs / "more" / "ft-30", "ft", config={"epochs": 30}, after={"as_score": 6.0})
    _transfer_run(runs / "more" / "ft-lr", "ft", config={"epochs": 20, "lr": 0.5}, after={"as_score": 5.0})
    (runs / "transfer" / "ft" / "config.json").write_text(json.dumps({
        **json.loads((runs / "transfer" / "ft" / "config.json").read_text()), "epochs": 20, "lr": 0.01}))
    blocks = table(["transfer", "more"], "transfer").blocks
    assert [b.title for b in blocks] == ["m → digits [5-9], eps 0.1", "m → digits [5-9], eps 8/255"]
    at_01, at_8 = (b.frame for b in blocks)
    assert list(at_8.index) == ["lp"] and at_8.loc["lp", "AS"] == "7"  # never under eps 0.1
    assert "eps 8/255" in blocks[1].notes[0] and "eps 0.1" in blocks[0].notes[0]
    # three ft runs: told apart by epochs; the two at 20 epochs by the next recorded difference
    assert list(at_01.index) == ["ft (epochs 20)", "lp", "ft (epochs 30)", "ft (epochs 20) #2"]
    (runs / "more" / "ft-lr" / "config.json").write_text(json.dumps({
        "model": "builtin:m", "data": "digits", "classes": "5-9", "method": "ft", "eps_text": "0.1", "lr": 0.5}))
    (runs / "more" / "ft-30").rename(runs / "ft-30")
    at_01 = table(["transfer", "more"], "transfer").blocks[0].frame
    assert list(at_01.index) == ["ft (lr 0.01)", "lp", "ft (lr 0.5)"]
    assert at_01.loc["ft (lr 0.5)", "AS"] == "5" and at_01.loc["ft (lr 0.01)", "AS"] == "4.75"


def test_the_transfer_table_reads_robust_accuracy_and_says_its_rule(runs):
    final = json.loads((runs / "transfer" / "ft" / "final.json").read_text())
    rule = "a point is robust only if PGD-5 and PGD-20 both fail on it"
    final["test"].update(robust_accuracy=0.125, robust_rule=rule)
    (runs / "transfer" / "ft" / "final.json").write_text(json.dumps(final))
    block = table(["transfer"], "transfer").blocks[0]
    assert block.frame.loc["ft", "RAcc"] == "12.5%"  # not a PGD entry
    assert block.frame.loc["lp", "RAcc"] == "40.0%"  # a record without it: PGD-20, the most steps
    assert rule in block.notes[0] and "PGD-20 accuracy (each attack counted alone" in block.notes[0]


def test_with_autoattack_racc_is_the_pgd_attacks_and_the_aa_column_every_attacks(runs):
    """A record of the per-point rule with AutoAttack: robust_accuracy is AutoAttack's column (a
    point robust against every attack run), so RAcc showed the same number twice; RAcc is the PGD
    attacks' per-point accuracy (PGD-20, the most steps), RAcc (AA) AutoAttack's."""
    final = json.loads((runs / "transfer" / "ft" / "final.json").read_text())
    final["test"].update(autoattack=0.375, robust_accuracy=0.375,
                         robust_rule="per point, robust against every attack run")
    (runs / "transfer" / "ft" / "final.json").write_text(json.dumps(final))
    block = table(["transfer"], "transfer").blocks[0]
    assert block.frame.loc["ft", "RAcc"] == "55.0%" and block.frame.loc["ft", "RAcc (AA)"] == "37.5%"
    assert block.frame.loc["lp", "RAcc"] == "40.0%" and block.frame.loc["lp", "RAcc (AA)"] == "-"
    assert "robust against every PGD attack run (PGD-20 and fewer steps)" in block.notes[0]
    assert "AutoAttack standard on the points every PGD attack left correct" in block.notes[0]


def test_the_transfer_tables_note_names_each_runs_test_images(runs):
    final = json.loads((runs / "transfer" / "lp" / "final.json").read_text())
    final["test"]["n"] = 10
    (runs / "transfer" / "lp" / "final.json").write_text(json.dumps(final))
    assert table(["transfer"], "transfer").blocks[0].notes[0].startswith("RAcc: on 4 / 10 test images at eps 0.1")


def test_lemma1_of_transfer_runs_labels_the_scored_points_not_the_training_images(runs):
    for name, n_train, n_scored in (("lp", 3000, 3), ("ft", None, 4)):
        config = json.loads((runs / "transfer" / name / "config.json").read_text())
        (runs / "transfer" / name / "config.json").write_text(json.dumps({**config, "n": n_train}))
        final = json.loads((runs / "transfer" / name / "final.json").read_text())
        final["score_after"]["n"] = n_scored
        (runs / "transfer" / name / "final.json").write_text(json.dumps(final))
    frame = table(["transfer"], "lemma1").blocks[0].frame
    assert [c[1] for c in frame.columns] == ["digits [5-9] (ft, n 4, n train all)",
                                             "digits [5-9] (lp, n 3, n train 3000)"]
    assert not re.search(r"(?<![a-z])n 3000", render(table(["transfer"], "lemma1"), "md"))


def test_the_certify_table_takes_n_and_eps_from_the_records_not_the_sweep_cell(runs):
    _sweep(runs / "cs", "grid", [("n=200", {"n": 200, "eps": "1/255"})], {"model": "builtin:m", "data": "digits"})
    _score_run(runs / "cs" / "n=200", {"model": "builtin:m", "data": "digits", "n": 170},
               _summary(n=170, eps_text="1/255", rhs_certified=6.0, tightness=5.0, prop_certified=0.25,
                        certify="crown"), _points([True], [True]))
    rendered = table(["cs", "cert"], "certify")
    frame = rendered.blocks[0].frame
    assert list(frame["n"]) == [170, 4, 4] and list(frame["eps"]) == ["1/255", "1/255", "8/255"]
    assert list(frame["bound"]) == ["crown", "ibp", "ibp"]
    assert "200" not in render(rendered, "md")
    assert list(frame.index) == ["m → digits", "m → digits [0-4]", "m → digits [0-4]"]


def test_prop_fulfilled_says_how_strong_the_attack_was(runs):
    s = json.loads((runs / "score" / "b" / "summary.json").read_text())
    s.update(attack="apgd", steps=50, restarts=4, rel_step=2.0)
    (runs / "score" / "b" / "summary.json").write_text(json.dumps(s))
    frame = table(["score"], "theorem2").blocks[0].frame
    assert list(frame.loc["attack"]) == ["PGD 20 steps x 1 restart, step 0.7 eps",
                                         "APGD 50 steps x 4 restarts, step 2 eps"]
    one = table(["score/a"], "theorem2").blocks[0]
    assert "attack" not in one.frame.index
    assert any(n.startswith("attack: PGD 20 steps x 1 restart, step 0.7 eps, on g and on the loss") for n in one.notes)
    cert = table(["cert"], "certify").blocks[0]
    assert any("attack: PGD 20 steps x 1 restart" in n for n in cert.notes)
    eps_frame = table(["eps"], "eps").blocks[0].frame
    assert eps_frame.iloc[:, 0]["attack"] == "PGD 20 steps x 1 restart, step 0.7 eps"
    assert eps_frame.iloc[:, 0]["eps"] == "0.05, 0.1" and eps_frame.iloc[:, 0]["n (scored points)"] == "4"


def test_the_predict_table_says_how_each_p_value_was_computed(runs):
    rec = json.loads((runs / "predict" / "predict.json").read_text())
    rec["spearman"]["ratio_vs_relative_ce"] = {"rho": 0.72, "p": 0.00031, "n": 20, "p_method": "t approximation",
                                               "p_permutation": 0.00048, "permutations": 100000}
    (runs / "predict" / "predict.json").write_text(json.dumps(rec))
    notes = table(["predict"], "predict").blocks[0].notes
    assert ("m: Spearman ratio vs relative CE: rho 0.720 (p 0.00031, t approximation; 0.00048 by 100,000 random "
            "permutations; 20 tasks)") in notes


def _figure(kind: str, paths: "list[str]"):
    """The matplotlib figure ``asbound plot`` would save, to read its drawn data."""
    from asbound.report import plots
    from asbound.report.runs import collect

    return plots.BUILDERS[kind](collect(paths)[0])


def _pct(text: str) -> float:
    return float(text.rstrip("%")) / 100


def test_the_eps_plot_draws_the_tables_values(runs):
    column = table(["eps"], "eps").blocks[0].frame.iloc[:, 0]
    every, fulfilled = _figure("eps", ["eps"]).axes[0].lines[:2]
    assert list(every.get_xdata()) == [1, 2] and list(fulfilled.get_xdata()) == [1, 2]
    assert list(every.get_ydata()) == pytest.approx([_pct(column[f"robust accuracy (x{m})"]) for m in (1, 2)], abs=5e-4)
    assert list(fulfilled.get_ydata()) == pytest.approx(
        [_pct(column[f"robust accuracy of the fulfilled (x{m})"]) for m in (1, 2)], abs=5e-4)
    assert list(fulfilled.get_ydata()) == [1.0, 0.5]  # x2's own points: of the fulfilled 10 and 11, only 10 robust


def test_the_shift_plot_draws_the_tables_values(runs):
    frame = table(["shift"], "shift").blocks[0].frame
    axes = _figure("shift", ["shift"]).axes
    for ax, row in zip(axes, ("AS score", "LHS (Lem. 1)", "Robust Acc.")):
        (line,) = ax.lines
        assert list(line.get_xdata()) == [0, 1, 5]
        want = [_pct(v) if v.endswith("%") else float(v) for v in frame.loc[row]]
        assert list(line.get_ydata()) == pytest.approx(want, rel=1e-3, abs=5e-4)


def test_the_lhs_rhs_plot_draws_each_runs_values_and_hides_none(runs):
    from matplotlib.collections import PathCollection

    lemma = table(["score"], "lemma1").blocks[0].frame
    shutil.copytree(runs / "transfer" / "lp", runs / "transfer" / "lp2")  # a run equal to another
    fig = _figure("lhs-rhs", ["score", "transfer"])
    ax = fig.axes[0]
    drawn = sorted(tuple(map(float, c.get_offsets()[0])) for c in ax.collections if isinstance(c, PathCollection))
    from_tables = [(float(a), float(b)) for a, b in zip(lemma.loc["AS score (RHS)"], lemma.loc["LHS"])]
    from_tables += [(4.75, 0.1), (4.0, 0.1), (4.0, 0.1)]  # the transfer runs' score after transfer: ft, lp, lp2
    assert drawn == sorted(from_tables)
    numbers = {t.get_text() for t in ax.texts}
    assert numbers == {"1", "2", "3", "4,5"}  # score/a, score/b, ft; lp and lp2 at one point: one label
    key = [t.get_text() for t in fig.legends[0].get_texts()]
    assert key[3] == "4  m → digits [5-9] (lp)" and key[0].startswith("1  m → digits [5-9] (no transfer")
    assert not any(re.search(r"\ball\b|method|peft", t) for t in key)  # nothing "not applicable" is named
    fig.draw_without_rendering()
    assert ax.get_position().width > 0.5  # the plot, not the legend, takes the width
    assert "4,5" in ax.get_title()


def test_the_predict_plot_draws_the_tables_values(runs):
    frame = table(["predict"], "predict").blocks[0].frame.iloc[1:]  # the tasks (row 0: the pretraining)
    (points,) = [c for c in _figure("predict", ["predict"]).axes[0].collections if len(c.get_offsets())]
    want = [(float(a), float(b)) for a, b in zip(frame["AS ratio"], frame["relative dif."])]
    assert [tuple(map(float, xy)) for xy in points.get_offsets()] == want


def test_the_margin_plot_draws_each_points_margin_and_sensitivity(runs):
    points = _points([True, False, False, False], [True, False, False, False], margin=[1.5, 0.8, 0.2, -0.5],
                     sensitivity=[0.1, 0.9, 0.1, 0.3])
    points.to_csv(runs / "score" / "a" / "points.csv", index=False)
    ax = _figure("margin-vs-sensitivity", ["score/a"]).axes[0]
    drawn = sorted(tuple(map(float, xy)) for c in ax.collections if c.get_label() in (
        "robust", "correct, not robust", "misclassified") for xy in c.get_offsets())
    assert drawn == sorted(zip(points["margin"], points["sensitivity"]))


def test_the_certify_table_shows_the_bound_a_run_computed(runs):
    """--certify crown over its budget computes crown-ibp (summary certify_used): the bound column
    says crown-ibp, not the method asked for."""
    for name, used in (("full", "crown"), ("fallback", "crown-ibp")):
        _score_run(runs / "cu" / name, {"model": "builtin:m", "data": "digits", "n": 4},
                   _summary(n=4, eps_text="1/255", rhs_certified=6.0, tightness=5.0, prop_certified=0.25,
                            certify="crown", certify_used=used), _points([True], [True]))
    frame = table([str(runs / "cu" / "full"), str(runs / "cu" / "fallback")], "certify").blocks[0].frame
    assert list(frame["bound"]) == ["crown", "crown-ibp"]


@pytest.mark.parametrize("columns", [30, 40, 50])
def test_a_console_too_narrow_for_whole_words_folds_them_and_loses_nothing(runs, columns):
    """Where no layout keeps every word whole (the certify table of reports/ at 50 columns: a run
    label ``builtin:lenet-shape-adversarial`` beside the eps, bound and a value), the cells fold
    onto the next line: no cell is cut to an ellipsis (``lenet-shape-adve…``, ``dsprites:orienta…``),
    every character of every cell, header and label is printed."""
    from collections import Counter

    for k, (model, data) in enumerate((("builtin:lenet-shape-adversarial", "dsprites:shape"),
                                       ("builtin:lenet-adversarial", "dsprites:orientation"))):
        for eps in ("1/255", "8/255"):
            _score_run(runs / "long" / f"{k}-{eps[0]}", {"model": model, "data": data, "eps": eps},
                       _summary(model=model, data=data, eps_text=eps, rhs_certified=6.0, tightness=5.0,
                                prop_certified=0.25, prop_vacuous=0.0, certify="crown", certify_used="crown-ibp"),
                       _points([True], [True]))
    rendered = table(["long"], "certify")
    text = render(rendered, "console", width=columns)
    lines = text.splitlines()
    assert max(cell_len(line) for line in lines) <= columns, max(lines, key=cell_len)
    assert "…" not in text
    printed = Counter("".join(text.split()))
    frame = rendered.blocks[0].frame
    cells = sum((Counter("".join(str(c).split())) for c in [*frame.to_numpy().ravel(), *frame.index, *frame.columns]),
                Counter())
    assert not cells - printed, cells - printed


def test_a_regression_run_asked_for_accuracies_says_it_is_a_regression_run(runs, capsys):
    s = json.loads((runs / "score" / "a" / "summary.json").read_text())
    s.update(task="regression", clean_accuracy=None, robust_accuracy=None, prop_fulfilled=None)
    (runs / "score" / "a" / "summary.json").write_text(json.dumps(s))
    assert main(["table", "score/a", "--style", "theorem2"]) == 2
    err = capsys.readouterr().err
    assert "score/a is a regression run (no accuracies); give classifier runs" in err and err.count("\n") == 1
