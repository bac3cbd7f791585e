"""Sweeps: grids of ordinary runs, reused when done, resumed after an interruption, run locally or
through submitit's local executor; bad input refused before anything is written."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from asbound import records
from asbound.cli import main
from asbound.errors import ConfigError, ResumeError
from asbound.sweep import eps_sweep, grid_sweep, resize_sweep, run_sweep
from asbound.sweep.grid import scaled_eps

BASE = dict(model="builtin:digits-adversarial", data="digits", n=24, steps=3, batch_size=8, device="cpu")


def _cells(out):
    return {c["name"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}


def _records(out, name):
    pts = pd.read_csv(out / name / "points.csv")
    summary = json.loads((out / name / "summary.json").read_text())
    return pts, summary


def test_eps_multiples_keep_their_fraction():
    assert scaled_eps("8/255", 2) == (16 / 255, "16/255")
    assert scaled_eps("2/255", 3)[1] == "6/255"  # not 2/85
    assert scaled_eps("0.1", 2)[1] == "0.2"
    assert scaled_eps("8/255", 1.5)[0] == pytest.approx(12 / 255)


def test_an_eps_sweep_scores_the_same_points_at_each_multiple(tmp_path):
    out = tmp_path / "eps"
    result = run_sweep(eps_sweep(BASE, "2/255", [1, 2]), out, progress=False, printer=lambda _: None)
    assert result.ran == ["eps-x1", "eps-x2"] and not result.failed
    cells = _cells(out)
    assert cells["eps-x2"]["params"] == {"eps": 4 / 255, "eps_text": "4/255", "multiple": 2}
    assert all(c["status"] == "done" for c in cells.values())
    p1, s1 = _records(out, "eps-x1")
    p2, s2 = _records(out, "eps-x2")
    assert list(p1["index"]) == list(p2["index"])  # Table 8 joins the cells on index
    assert s1["eps_text"] == "2/255" and s2["eps_text"] == "4/255"
    assert s2["as_score"] > s1["as_score"]
    # a rerun reuses every cell without running anything; a wider sweep runs only the new cell
    again = run_sweep(eps_sweep(BASE, "2/255", [1, 2]), out, progress=False, printer=lambda _: None)
    assert again.reused == ["eps-x1", "eps-x2"] and not again.ran
    wider = run_sweep(eps_sweep(BASE, "2/255", [1, 2, 3]), out, progress=False, printer=lambda _: None)
    assert wider.reused == ["eps-x1", "eps-x2"] and wider.ran == ["eps-x3"]
    assert set(_cells(out)) == {"eps-x1", "eps-x2", "eps-x3"}


def test_an_interrupted_sweep_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, monkeypatch):
    sweep = eps_sweep(BASE, "2/255", [1, 2])
    whole = tmp_path / "whole"
    run_sweep(sweep, whole, progress=False, printer=lambda _: None)

    # interrupt the second cell after its first batch of records
    broken = tmp_path / "broken"
    appended = {"n": 0}
    real_append = records.RunDir.append

    def append(self, rows):
        real_append(self, rows)
        if self.path.name == "eps-x2":
            appended["n"] += 1
            if appended["n"] == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(records.RunDir, "append", append)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, broken, progress=False, printer=lambda _: None)
    assert _cells(broken)["eps-x1"]["status"] == "done"
    assert _cells(broken)["eps-x2"]["status"] == "pending"
    assert len(pd.read_csv(broken / "eps-x2" / "points.csv")) == 8  # one batch kept
    monkeypatch.setattr(records.RunDir, "append", real_append)
    result = run_sweep(sweep, broken, progress=False, printer=lambda _: None)
    assert result.reused == ["eps-x1"] and result.ran == ["eps-x2"]
    for name in ("eps-x1", "eps-x2"):
        p_whole, s_whole = _records(whole, name)
        p_broken, s_broken = _records(broken, name)
        pd.testing.assert_frame_equal(p_whole, p_broken)
        assert s_whole == s_broken


def test_submitit_local_executor_runs_a_two_cell_grid(tmp_path):
    pytest.importorskip("submitit")
    grid = tmp_path / "grid.toml"
    grid.write_text(
        'run = "score"\n[base]\nmodel = "builtin:digits-adversarial"\ndata = "digits"\nn = 16\nsteps = 2\n'
        'batch_size = 8\ndevice = "cpu"\n[grid]\nseed = [0, 1]\n'
    )
    out = tmp_path / "grid"
    code = main(["sweep", "grid", "--config", str(grid), "--executor", "submitit-local", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    cells = _cells(out)
    assert set(cells) == {"seed=0", "seed=1"} and all(c["status"] == "done" for c in cells.values())
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["executor"] == "submitit-local" and manifest["axes"] == ["seed"]
    assert manifest["command"].startswith("asbound sweep grid --config")
    # the same cells in this process give the same records (submitit ran the same code path)
    local = tmp_path / "local"
    assert main(["sweep", "grid", "--config", str(grid), "--out", str(local), "--no-progress"]) == 0
    for name in cells:
        pd.testing.assert_frame_equal(_records(out, name)[0], _records(local, name)[0])


def test_a_failing_cell_is_recorded_and_the_others_still_run(tmp_path, capsys):
    sweep = resize_sweep({**BASE, "n": 8}, [8, 4])  # the digits CNN cannot run on 4x4 inputs
    result = run_sweep(sweep, tmp_path / "r", progress=False, printer=lambda _: None)
    assert result.ran == ["resize-8"] and list(result.failed) == ["resize-4"]
    cell = _cells(tmp_path / "r")["resize-4"]
    assert cell["status"] == "failed" and "cannot run" in cell["error"]
    code = main(["sweep", "resize", "--model", BASE["model"], "--data", "digits", "--sizes", "8,4", "--n", "8",
                 "--steps", "3", "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "r"),
                 "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "asbound: error: cell resize-4:" in err and "Traceback" not in err


def _grid(tmp_path, text):
    path = tmp_path / "g.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ('run = "score"\nbogus = 1\n', "unknown key bogus; valid: run, base, grid, cases"),
        ('[base]\nmodel = "builtin:digits-adversarial"\ndata = "digits"\nepsilon = 1\n[grid]\nseed = [0]\n',
         "[base]: unknown score option epsilon"),
        ('[base]\nmodel = "builtin:digits-adversarial"\ndata = "digits"\n[grid]\nsteps = 3\n',
         "[grid] steps must be a non-empty list"),
        ('[base]\nmodel = "builtin:digits-adversarial"\ndata = "digits"\n[grid]\nstepz = [3]\n',
         "[grid]: unknown score option stepz"),
        ('run = "train"\n', "run 'train' is not valid; valid: score, transfer"),
        ('[base\n', "is not valid TOML"),
        ('[base]\nmodel = "builtin:digits-adversarial"\n[grid]\nseed = [0]\n[[cases]]\ndata = "digits"\nclases = "0-4"\n',
         "[[cases]] entry 1: unknown score option clases"),
        ('[base]\nmodel = "builtin:digits-adversarial"\n[grid]\ndata = ["digits"]\n[[cases]]\ndata = "digits"\n',
         "data is both a [grid] axis and set by [[cases]] entry 1"),
        ('[base]\nmodel = "builtin:digits-adversarial"\n[grid]\nseed = [0]\n', "give --data"),
        ('[base]\nmodel = "builtin:digits-adversarial"\ndata = "digits"\n[grid]\neps = ["1/255", "bad"]\n', "eps"),
    ],
)
def test_bad_grid_files_are_one_line_and_write_nothing(tmp_path, capsys, text, message):
    out = tmp_path / "out"
    code = main(["sweep", "grid", "--config", str(_grid(tmp_path, text)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("asbound: error:")
    assert not out.exists()


def test_grid_cases_cross_the_grid(tmp_path):
    path = _grid(tmp_path, 'run = "transfer"\n[base]\nmodel = "builtin:digits-adversarial"\nmethod = "lp"\n'
                           '[grid]\nweight_decay = [0.0, 0.01]\n[[cases]]\ndata = "digits"\nclasses = "5-9"\n'
                           '[[cases]]\ndata = "dsprites:shape"\n')
    sweep = grid_sweep(path).validated()
    assert [c.name for c in sweep.cells] == [
        "weight_decay=0__data=digits__classes=5-9", "weight_decay=0__data=dsprites-shape",
        "weight_decay=0.01__data=digits__classes=5-9", "weight_decay=0.01__data=dsprites-shape"]
    assert sweep.axes == ("weight_decay", "data", "classes")
    assert sweep.cells[1].config == {"model": "builtin:digits-adversarial", "method": "lp", "weight_decay": 0.0,
                                     "data": "dsprites:shape"}


def test_a_missing_grid_file_and_a_transfer_cell_with_several_methods(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        grid_sweep(tmp_path / "missing.toml")
    path = _grid(tmp_path, 'run = "transfer"\n[base]\nmodel = "builtin:digits-adversarial"\ndata = "digits"\n'
                           'method = "lp,ft"\n[grid]\nseed = [0]\n')
    with pytest.raises(ConfigError, match="a transfer cell runs one method"):
        run_sweep(grid_sweep(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_executor_that_is_not_installed_names_its_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    out = tmp_path / "out"
    code = main(["sweep", "eps", "--model", BASE["model"], "--data", "digits", "--multiples", "1", "--n", "4",
                 "--executor", "slurm", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'asbound[slurm]'" in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eps", "--multiples", "1,x"], "--multiples must be numbers separated by commas, got 'x'"),
        (["eps", "--multiples", "0"], "eps multiples must be numbers > 0"),
        (["resize", "--sizes", "8,-1"], "sizes must be whole numbers >= 1"),
        (["eps", "--method", "lp,ft"], "one method each"),
        (["eps", "--eps", "-1"], "eps"),
        (["eps", "--executor", "ray"], "invalid choice: 'ray'"),
    ],
)
def test_bad_sweep_options_are_one_line_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = main(["sweep", argv[0], "--model", BASE["model"], "--data", "digits", *argv[1:], "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_sweep_directory_is_not_reused_for_another_sweep(tmp_path):
    out = tmp_path / "s"
    run_sweep(eps_sweep({**BASE, "n": 8}, "2/255", [1]), out, progress=False, printer=lambda _: None)
    with pytest.raises(ResumeError, match="holds a eps sweep, not resize"):
        run_sweep(resize_sweep({**BASE, "n": 8}, [8]), out, progress=False, printer=lambda _: None)
    with pytest.raises(ResumeError, match="other shared settings .*n: 8 -> 9"):
        run_sweep(eps_sweep({**BASE, "n": 9}, "2/255", [1]), out, progress=False, printer=lambda _: None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ResumeError, match="is not empty and holds no sweep.json"):
        run_sweep(eps_sweep(BASE, "2/255", [1]), tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_a_sweep_being_written_by_another_process_is_refused(tmp_path):
    from asbound.errors import RunLockedError

    from fabricate import run_held_by_another_process

    out = tmp_path / "s"
    with run_held_by_another_process(out):
        with pytest.raises(RunLockedError):
            run_sweep(eps_sweep(BASE, "2/255", [1]), out, progress=False, printer=lambda _: None)


def test_a_shift_sweep_has_the_clean_baseline_and_each_severity(tmp_path, capsys):
    out = tmp_path / "shift"
    code = main(["sweep", "shift", "--model", BASE["model"], "--data", "digits", "--classes", "0-4", "--corruption",
                 "gaussian_noise,zoom_blur", "--severity", "1,5", "--n", "16", "--steps", "2", "--batch-size", "8",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    cells = _cells(out)
    assert list(cells) == ["clean", "gaussian_noise-1", "gaussian_noise-5", "zoom_blur-1", "zoom_blur-5"]
    assert cells["clean"]["params"] == {"corruption": None, "severity": 0}
    assert cells["zoom_blur-5"]["params"] == {"corruption": "zoom_blur", "severity": 5}
    config = json.loads((out / "zoom_blur-5" / "config.json").read_text())
    assert config["corruption"] == "zoom_blur" and config["severity"] == 5
    assert json.loads((out / "clean" / "config.json").read_text())["corruption"] is None
    p0, _ = _records(out, "clean")
    p5, _ = _records(out, "gaussian_noise-5")
    assert list(p0["index"]) == list(p5["index"]) and not p0["s_rep"].equals(p5["s_rep"])
    capsys.readouterr()
    assert main(["sweep", "shift", "--model", BASE["model"], "--data", "digits", "--corruption", "gaussian_noise",
                 "--severity", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "severity 0 is not valid" in capsys.readouterr().err
    assert main(["sweep", "shift", "--model", BASE["model"], "--data", "digits", "--corruption", "rain",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "unknown corruption 'rain'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_shipped_grid_files_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "analyses" / "sweeps").glob("*.toml")):
        sweep = grid_sweep(path).validated()
        assert sweep.run in ("score", "transfer") and len(sweep.cells) >= 3, path


def test_bad_grid_values_are_refused_before_anything_runs_and_the_device_may_change(tmp_path):
    for text in ("n = [8, true]", "resize = [0]"):
        path = _grid(tmp_path, f'[base]\nmodel = "builtin:digits-adversarial"\ndata = "digits"\n[grid]\n{text}\n')
        with pytest.raises(ConfigError):
            run_sweep(grid_sweep(path), tmp_path / "never")
        assert not (tmp_path / "never").exists()
    out = tmp_path / "dev"
    run_sweep(eps_sweep({**BASE, "n": 8, "device": "auto"}, "2/255", [1]), out, progress=False, printer=lambda _: None)
    again = run_sweep(eps_sweep({**BASE, "n": 8}, "2/255", [1]), out, progress=False, printer=lambda _: None)
    assert again.reused == ["eps-x1"]


def test_two_eps_values_that_slug_to_one_cell_name_are_refused_not_merged(tmp_path):
    """0.1234567 and 0.1234568 both name the cell eps=0.123457: in one grid the sweep refuses to
    write two runs into one directory; across two sweeps into one --out, the second is refused
    before it runs, and the first cell's records stay as they were."""
    text = ('[base]\nmodel = "builtin:digits-adversarial"\ndata = "digits"\nn = 4\nsteps = 1\nbatch_size = 4\n'
            'device = "cpu"\n[grid]\neps = [{}]\n')
    both = grid_sweep(_grid(tmp_path, text.format("0.1234567, 0.1234568")))
    assert [c.name for c in both.cells] == ["eps=0.123457", "eps=0.123457"]
    with pytest.raises(ConfigError, match=r"names cells twice \(eps=0.123457\)"):
        run_sweep(both, tmp_path / "one", progress=False, printer=lambda _: None)
    assert not (tmp_path / "one").exists()
    out = tmp_path / "two"
    run_sweep(grid_sweep(_grid(tmp_path, text.format("0.1234567"))), out, progress=False, printer=lambda _: None)
    first = (out / "eps=0.123457" / "summary.json").read_text()
    with pytest.raises(ResumeError, match=r"holds a cell eps=0.123457 with other values .*0.1234567.*0.1234568"):
        run_sweep(grid_sweep(_grid(tmp_path, text.format("0.1234568"))), out, progress=False,
                  printer=lambda _: None)
    assert _cells(out)["eps=0.123457"]["params"] == {"eps": 0.1234567}
    assert (out / "eps=0.123457" / "summary.json").read_text() == first
