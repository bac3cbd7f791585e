"""Run directories: config.json, points.csv written batch by batch, torn-line repair, resumption."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import asbound.scoring as scoring
from asbound.api import ScoreConfig, score
from asbound.errors import AsboundError, ConfigError, ResumeError
from asbound.records import (
    CONFIG,
    POINTS,
    SUMMARY,
    VOLATILE_KEYS,
    RunDir,
    clean_json,
    environment,
    read_summary,
)
from fabricate import make_tensors_file

HEADER = "position,index,label,sensitivity,fulfilled\n"


def _config(**changes) -> dict:
    config = {"model": "builtin:lenet-adversarial/shape", "data": "dsprites:shape", "eps": 8 / 255,
              "n": 6, "seed": 0, "batch_size": 3, "steps": 2, "transforms": [], "device": "cpu",
              **environment()}
    config.update(changes)
    return config


def _batch(positions, offset: float = 0.0) -> pd.DataFrame:
    positions = list(positions)
    return pd.DataFrame({
        "position": positions,
        "index": [10 * p for p in positions],
        "label": [p % 3 for p in positions],
        "sensitivity": [0.125 * p + offset for p in positions],
        "fulfilled": [p % 2 == 0 for p in positions],
    })


def _strict_json(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _snapshot(folder: Path) -> "dict[str, bytes]":
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def run(tmp_path) -> RunDir:
    """A run directory holding two finished batches of three (positions 0-5)."""
    rd = RunDir(tmp_path / "run")
    assert rd.start(_config()) == set()
    rd.append(_batch(range(0, 3)))
    rd.append(_batch(range(3, 6)))
    return rd


# --- writing and resuming ---------------------------------------------------------------------


def test_fresh_directory(tmp_path):
    rd = RunDir(tmp_path / "a" / "b")
    assert rd.start(_config()) == set()
    assert (tmp_path / "a" / "b" / CONFIG).is_file() and not rd.points_path.exists()
    written = _strict_json((tmp_path / "a" / "b" / CONFIG).read_text())
    assert written["eps"] == 8 / 255 and written["seed"] == 0
    assert not list((tmp_path / "a" / "b").glob("*.tmp"))


def test_batches_are_appended_with_one_header(run):
    text = run.points_path.read_text()
    assert text.count("position") == 1 and text.endswith("\n") and len(text.splitlines()) == 7
    pd.testing.assert_frame_equal(run.points(), pd.concat([_batch(range(6))], ignore_index=True))


def test_each_batch_is_synced_to_disk(tmp_path, monkeypatch):
    import os

    synced = []  # (inode, size) of each file synced
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.fstat(fd).st_ino, os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rd = RunDir(tmp_path)
    rd.start(_config())
    rd.append(_batch([0, 1, 2]))
    rd.append(_batch([3, 4]))
    # points.csv (not config.json's atomic write) is synced once per batch, after the batch was
    # written: its size at each sync
    points = rd.points_path.stat().st_ino
    lines = rd.points_path.read_bytes().splitlines(keepends=True)
    sizes = [size for inode, size in synced if inode == points]
    assert sizes == [len(b"".join(lines[:4])), len(b"".join(lines))]  # header + 3 rows, all


def test_points_are_sorted_by_position(tmp_path):
    rd = RunDir(tmp_path)
    rd.start(_config())
    rd.append(_batch([3, 4, 5]))
    rd.append(_batch([0, 1, 2]))
    assert list(rd.points()["position"]) == [0, 1, 2, 3, 4, 5]


def test_resume_returns_recorded_positions(run):
    assert RunDir(run.path).start(_config()) == set(range(6))
    assert len(run.points()) == 6


@pytest.mark.parametrize("torn", [
    "6,60,0,0.7",  # fewer fields, no newline
    "6,60,0,0.75,Tr",  # all fields, the last cut short: no newline
    "6",
])
def test_torn_last_line_is_dropped(run, torn):
    complete = run.points_path.read_text()
    run.points_path.write_text(complete + torn)
    assert RunDir(run.path).start(_config()) == set(range(6))
    assert run.points_path.read_text() == complete
    run.append(_batch([6, 7, 8]))
    points = run.points()
    assert list(points["position"]) == list(range(9))
    pd.testing.assert_frame_equal(points, _batch(range(9)))


def test_malformed_line_and_everything_after_it_are_dropped(run):
    lines = run.points_path.read_text().splitlines(keepends=True)
    run.points_path.write_text("".join(lines[:3]) + "2,20\n" + "".join(lines[3:]))
    assert RunDir(run.path).start(_config()) == {0, 1}
    assert run.points_path.read_text() == "".join(lines[:3])


def test_torn_header_starts_the_file_afresh(tmp_path):
    rd = RunDir(tmp_path)
    rd.start(_config())
    rd.points_path.write_text(HEADER[:9])  # interrupted while writing the first batch
    assert RunDir(tmp_path).start(_config()) == set()
    rd.append(_batch([0, 1, 2]))
    pd.testing.assert_frame_equal(rd.points(), _batch([0, 1, 2]))


def test_empty_or_header_only_points_file(tmp_path):
    rd = RunDir(tmp_path)
    rd.start(_config())
    for text in ("", HEADER):
        rd.points_path.write_text(text)
        assert RunDir(tmp_path).start(_config()) == set()
        rd.append(_batch([0]))
        assert list(rd.points()["position"]) == [0]
        rd.points_path.unlink()


# --- refusing a directory that holds another run ----------------------------------------------


@pytest.mark.parametrize("key, value", [("eps", 4 / 255), ("seed", 1), ("model", "builtin:lenet-standard/shape"),
                                        ("n", 7), ("transforms", ["resize 8x8 -> 64x64"])])
def test_other_settings_are_refused_and_nothing_changes(run, key, value):
    torn = run.points_path.read_text() + "6,60"
    run.points_path.write_text(torn)
    before = _snapshot(run.path)
    with pytest.raises(ResumeError) as info:
        RunDir(run.path).start(_config(**{key: value}))
    message = str(info.value)
    assert f"{key}:" in message and repr(value) in message and "--out" in message
    assert len(message.splitlines()) == 1
    assert _snapshot(run.path) == before  # not even the torn line is repaired


def test_added_or_removed_keys_are_refused(run):
    with pytest.raises(ResumeError, match="head"):
        RunDir(run.path).start(_config(head="probe.pt"))
    config = _config()
    del config["seed"]
    with pytest.raises(ResumeError, match="seed"):
        RunDir(run.path).start(config)


def test_many_differences_are_summarised(run):
    with pytest.raises(ResumeError, match="and 2 more"):
        RunDir(run.path).start(_config(eps=0.1, seed=3, n=9, steps=5, batch_size=1))


def test_volatile_keys_do_not_block_resume(run):
    assert {"versions", "device"} <= set(VOLATILE_KEYS)
    new = _config(versions={"torch": "0.0.1", "asbound": "9"}, device="cuda:1", python="3.99",
                  platform="elsewhere")
    assert RunDir(run.path).start(new) == set(range(6))
    written = json.loads((run.path / CONFIG).read_text())
    assert written["versions"] == {"torch": "0.0.1", "asbound": "9"} and written["device"] == "cuda:1"
    # each volatile key on its own, including the resumption flag and the output path
    for key, value in (("versions", {}), ("device", "mps"), ("python", "2.7"),
                       ("platform", "other"), ("resumed", True), ("out", "/elsewhere")):
        assert RunDir(run.path).start(_config(**{key: value})) == set(range(6)), key
    # and a key that is not volatile still blocks
    with pytest.raises(ResumeError, match="steps"):
        RunDir(run.path).start(_config(steps=3))


def test_values_compare_as_they_read_back(tmp_path):
    """Tuples, paths and numpy scalars are stored as JSON: a rerun with them still resumes."""
    config = _config(data_root=tmp_path / "data", shape=(1, 64, 64), n=np.int64(6), eps=np.float64(8 / 255))
    rd = RunDir(tmp_path / "run")
    rd.start(config)
    rd.append(_batch([0, 1, 2]))
    assert RunDir(tmp_path / "run").start(config) == {0, 1, 2}


def test_unreadable_config_is_refused(run):
    (run.path / CONFIG).write_text('{"model": "builtin:lenet-adv')
    before = _snapshot(run.path)
    with pytest.raises(ResumeError, match=CONFIG):
        RunDir(run.path).start(_config())
    assert _snapshot(run.path) == before


def test_points_without_config_are_refused(run):
    (run.path / CONFIG).unlink()
    before = _snapshot(run.path)
    with pytest.raises(ResumeError, match=CONFIG):
        RunDir(run.path).start(_config())
    assert _snapshot(run.path) == before


def test_out_that_cannot_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ConfigError, match="--out") as info:
            RunDir(path).start(_config())
        assert isinstance(info.value, AsboundError) and info.value.exit_code == 2
    assert (tmp_path / "file").read_text() == "x"


# --- summaries and the environment -----------------------------------------------------------


def test_clean_json_replaces_non_finite_numbers():
    obj = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, None), "e": "nan"}
    assert clean_json(obj) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, None], "e": "nan"}


def test_summary_is_strict_json(tmp_path):
    rd = RunDir(tmp_path)
    assert read_summary(tmp_path) is None
    rd.write_summary(clean_json({"as_score": np.float64(0.5), "n": np.int64(3), "lhs": math.nan,
                                 "where": tmp_path, "terms": [{"x": math.inf}]}))
    summary = _strict_json((tmp_path / SUMMARY).read_text())
    assert summary == {"as_score": 0.5, "n": 3, "lhs": None, "where": str(tmp_path), "terms": [{"x": None}]}
    assert read_summary(tmp_path) == summary
    with pytest.raises(ValueError):  # NaN is never written
        rd.write_summary({"lhs": math.nan})
    assert read_summary(tmp_path) == summary


def test_environment_records_versions():
    """Each recorded version against a source independent of how it was recorded: the
    packages' own ``__version__`` (torch with its build tag), the installed metadata, the
    interpreter."""
    import importlib.util
    import platform
    from importlib import metadata

    import torchvision

    import asbound

    env = environment()
    assert set(env) == {"python", "platform", "versions"}
    versions = env["versions"]
    assert versions["torch"] == torch.__version__  # the build tag (+cpu, +cu130) included
    assert versions["cuda"] == (torch.version.cuda or "none")
    assert versions["numpy"] == np.__version__ == metadata.version("numpy")
    assert versions["pandas"] == pd.__version__
    assert versions["asbound"] == asbound.__version__
    assert versions["torchvision"].split("+")[0] == torchvision.__version__.split("+")[0]
    optional = {name for name in ("foolbox", "robustbench") if importlib.util.find_spec(name)}
    assert set(versions) == {"asbound", "torchvision", "numpy", "pandas", "torch", "cuda"} | optional
    for name in optional:
        assert versions[name] == metadata.version(name)
    assert env["python"] == platform.python_version()
    assert env["platform"] == platform.platform()


# --- through the API --------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path) -> "tuple[str, str]":
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 3)), tmp_path / "m.pt")
    make_tensors_file(tmp_path / "d.pt", n=12, shape=(3, 4, 4), num_classes=3)
    return f"file:{tmp_path / 'm.pt'}", f"tensors:{tmp_path / 'd.pt'}"


def test_api_run_directory_and_resume(tiny, tmp_path, monkeypatch):
    model, data = tiny
    cfg = ScoreConfig(model=model, data=data, n=12, batch_size=4, steps=2, allow_pickle=True)
    out = tmp_path / "out"
    # an API caller may pass paths: recorded as strings, and the rerun still resumes
    first = score(cfg, out=out, progress=False, data_root=tmp_path / "root")
    assert first.out == out and len(first.points) == 12
    assert set(p.name for p in out.iterdir()) == {CONFIG, POINTS, SUMMARY, ".lock"}
    config = _strict_json((out / CONFIG).read_text())
    assert config["data_root"] == str(tmp_path / "root") and config["seed"] == 0
    assert config["model"] == model and config["data"] == data and config["device"] == "cpu"
    assert config["versions"]["torch"] == torch.__version__ and config["eps"] == pytest.approx(8 / 255)
    assert _strict_json((out / SUMMARY).read_text()) == first.summary

    in_memory = score(cfg, out=None, progress=False)
    assert in_memory.out is None
    for column in ("index", "label", "pred", "correct", "robust", "fulfilled"):
        assert (in_memory.points[column].to_numpy() == first.points[column].to_numpy()).all()
    np.testing.assert_allclose(in_memory.points["sensitivity"], first.points["sensitivity"], rtol=1e-5)

    monkeypatch.setattr(scoring._Scorer, "__call__", lambda *a, **k: pytest.fail("resumed run rescored"))
    again = score(cfg, out=out, progress=False, data_root=tmp_path / "root")
    assert again.summary == first.summary
    pd.testing.assert_frame_equal(again.points, first.points)


# --- docs/RECORDS.md lists exactly what real runs write -----------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "RECORDS.md"


def _cells(line: str) -> "list[str]":
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _doc() -> "tuple[set[str], dict[tuple[str, str], dict[str, frozenset[str]]]]":
    """The conditions the page defines, and per (section, file) its rows: name -> conditions."""
    legend: "set[str]" = set()
    tables: "dict[tuple[str, str], dict[str, frozenset[str]]]" = {}
    section = sub = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section, sub = line[3:].split(" (")[0], None
        elif line.startswith("### "):
            sub = line[4:].strip().strip("`")
        elif line.startswith("|") and not line.startswith("|---"):
            first, written = _cells(line)[:2]
            if section is None and first != "written":
                legend.add(first)
            elif sub and first.startswith("`"):
                conditions = frozenset() if written == "always" else frozenset(written.split(", "))
                tables.setdefault((section, sub), {})[first.strip("`")] = conditions
    return legend, tables


LEGEND, TABLES = _doc()


def _expected(section: str, name: str, holds: "set[str]") -> "set[str]":
    return {key for key, conditions in TABLES[(section, name)].items() if conditions <= holds}


def _flatten(obj: dict, documented: "set[str]", prefix: str = "") -> "set[str]":
    """The keys of ``obj`` (``a.b``, ``a[].b``), inside an object or a list only where the page
    lists keys inside it."""
    keys = set()
    for key, value in obj.items():
        path = prefix + key
        keys.add(path)
        if isinstance(value, dict) and any(d.startswith(path + ".") for d in documented):
            keys |= _flatten(value, documented, path + ".")
        if isinstance(value, list) and any(d.startswith(path + "[].") for d in documented):
            for item in value:
                keys |= _flatten(item, documented, path + "[].")
    return keys


def _check_json(section: str, name: str, obj: dict, holds: "set[str]", options: "set[str]" = frozenset()) -> None:
    documented = set(TABLES[(section, name)])
    written = _flatten(obj, documented) - set(options)
    assert set(options) <= set(obj), f"{section} {name}: options not recorded: {set(options) - set(obj)}"
    expected = _expected(section, name, holds)
    assert written - expected == set(), f"{section} {name}: written but not documented (or not so): {written - expected}"
    assert expected - written == set(), f"{section} {name}: documented but not written: {expected - written}"


def _pattern(name: str) -> "re.Pattern[str]":
    return re.compile("".join("[^/]+" if part.startswith("<") else re.escape(part)
                              for part in re.split(r"(<[^>]+>)", name)))


def _check_files(section: str, root: Path, holds: "set[str]") -> None:
    """Every file and folder in ``root`` matches a documented one; every documented one that
    holds is there. Folders whose contents the page lists are entered; others (runs) are not."""
    rows = TABLES[(section, "Files")]
    found: "set[str]" = set()

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            rel = str(entry.relative_to(root)) + ("/" if entry.is_dir() else "")
            match = [name for name in rows if _pattern(name).fullmatch(rel)]
            assert match, f"{section}: {rel} is written but not documented"
            assert any(rows[m] <= holds for m in match), f"{section}: {rel} is written where the page says it is not"
            found.update(match)
            if entry.is_dir() and any(name.startswith(m) and name != m for m in match for name in rows):
                walk(entry)

    walk(root)
    missing = {name for name, conditions in rows.items() if conditions <= holds} - found
    assert not missing, f"{section}: documented but not written: {missing}"


def _fields(config_class: type) -> "set[str]":
    import dataclasses

    return {f.name for f in dataclasses.fields(config_class)}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> "dict[str, tuple[Path, set[str]]]":
    """Real tiny runs of every kind and variant, with the conditions of the page that hold."""
    import tiny_runs
    from asbound.cli import main

    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 1)), root / "reg.pt")
    make_tensors_file(root / "reg.pt.data", n=8, shape=(3, 4, 4), target="float", seed=2)
    regression = ["score", "--model", f"file:{root / 'reg.pt'}", "--allow-pickle", "--data",
                  f"tensors:{root / 'reg.pt.data'}", "--steps", "1", "--no-progress"]
    variants = {
        "classification": (tiny_runs.score, (), {"loss", "classification"}),
        "as-only": (tiny_runs.score, ("--as-only",), set()),
        "head misfit": (tiny_runs.score, ("--classes", "0-9"), set()),
        "certify": (tiny_runs.score, ("--certify", "ibp"), {"loss", "classification", "--certify"}),
        "certify as-only": (tiny_runs.score, ("--certify", "crown", "--as-only"), {"--certify", "--certify crown"}),
        "regression": (lambda out, *extra: [*regression, "--out", str(out), *extra], (), {"loss"}),
        "regression certify": (lambda out, *extra: [*regression, "--out", str(out), *extra], ("--certify", "ibp"),
                               {"loss", "--certify"}),
        "transfer": (tiny_runs.transfer, (), {"scored"}),
        "transfer unscored": (tiny_runs.transfer, ("--no-score",), set()),
        "sweep": (lambda out: tiny_runs.sweep(out), (), set()),
        "predict": (lambda out: tiny_runs.predict(out), (), set()),
        "predict measured": (lambda out, *extra: [*tiny_runs.predict(out), *extra],
                             ("--head-norm", "1", "--measure", "lp,adv-lp", "--epochs", "1", "--n-train", "32"),
                             {"--head-norm", "--measure", "--measure adv-lp"}),
    }
    runs = {}
    for name, (command, extra, holds) in variants.items():
        out = root / name.replace(" ", "-")
        assert main(command(out, *extra)) == 0, name
        runs[name] = (out, holds)
    return runs


def test_the_page_uses_only_the_conditions_it_defines():
    assert {"loss", "classification", "--certify", "scored", "--measure"} <= LEGEND
    used = {c for rows in TABLES.values() for conditions in rows.values() for c in conditions}
    assert used <= LEGEND, used - LEGEND
    for table in [("Score run", f) for f in ("Files", "config.json", "points.csv", "summary.json")] + [
            ("Transfer run", f) for f in ("Files", "config.json", "epochs.csv", "final.json")] + [
            ("Sweep", "Files"), ("Sweep", "sweep.json"), ("Prediction", "Files"), ("Prediction", "predict.json")]:
        assert TABLES.get(table), table


SCORE_VARIANTS = ["classification", "as-only", "head misfit", "certify", "certify as-only", "regression",
                  "regression certify"]


@pytest.mark.parametrize("variant", SCORE_VARIANTS)
def test_records_md_lists_what_a_score_run_writes(variant, real_runs):
    out, holds = real_runs[variant]
    _check_files("Score run", out, holds)
    columns = list(pd.read_csv(out / POINTS, nrows=0).columns)
    assert len(columns) == len(set(columns))
    _check_json("Score run", "points.csv", dict.fromkeys(columns), holds)
    _check_json("Score run", "summary.json", json.loads((out / SUMMARY).read_text()), holds)
    _check_json("Score run", "config.json", json.loads((out / CONFIG).read_text()), holds, _fields(ScoreConfig))


@pytest.mark.parametrize("variant", ["transfer", "transfer unscored"])
def test_records_md_lists_what_a_transfer_run_writes(variant, real_runs):
    from asbound.transfer import TransferConfig

    out, holds = real_runs[variant]
    _check_files("Transfer run", out, holds)
    final = json.loads((out / "final.json").read_text())
    _check_json("Transfer run", "final.json", final, holds)
    _check_json("Transfer run", "config.json", json.loads((out / CONFIG).read_text()), holds, _fields(TransferConfig))
    _check_json("Transfer run", "epochs.csv", dict.fromkeys(pd.read_csv(out / "epochs.csv", nrows=0).columns), holds)
    assert json.loads((out / "stages.json").read_text()) == final["stages"]
    for name in ("before", "after") if "scored" in holds else ():  # ordinary score runs
        _check_files("Score run", out / "score" / name, set())


def test_records_md_lists_what_a_sweep_writes(real_runs):
    out, holds = real_runs["sweep"]
    _check_files("Sweep", out, holds)
    manifest = json.loads((out / "sweep.json").read_text())
    _check_json("Sweep", "sweep.json", manifest, holds)
    assert set(manifest["base"]) == _fields(ScoreConfig)  # every option the cells share, resolved


@pytest.mark.parametrize("variant", ["predict", "predict measured"])
def test_records_md_lists_what_a_prediction_writes(variant, real_runs):
    from asbound.predict import PredictConfig

    out, holds = real_runs[variant]
    _check_files("Prediction", out, holds)
    record = json.loads((out / "predict.json").read_text())
    _check_json("Prediction", "predict.json", record, holds)
    assert set(record["config"]) == _fields(PredictConfig)


def test_every_record_of_a_real_run_fits_the_fields_its_readers_check(real_runs):
    """records.RECORD_FIELDS (the types a damaged record is refused for) accepts what every kind and
    variant of run writes, and every record committed under reports/."""
    from asbound.records import RECORD_FIELDS, read_json

    roots = [out for out, _ in real_runs.values()] + [Path(__file__).resolve().parents[1] / "reports"]
    read = 0
    for root in roots:
        for name in RECORD_FIELDS:
            for path in root.rglob(name):
                read_json(path, kind=None)
                read += 1
    assert read > 100


# --- what the damaged-record checks must not let through (each a one-line change they missed) ------


def test_a_position_equal_to_the_run_size_is_outside_it(tmp_path):
    from asbound.errors import RecordError

    rd = RunDir(tmp_path / "run")
    rd.start(_config())
    rd.append(_batch([0, 1, 6]))  # n 6: positions 0..5
    with pytest.raises(RecordError, match="position 6 is outside this run's 6 datapoints"):
        RunDir(tmp_path / "run").start(_config())
    with pytest.raises(RecordError, match="position -1 is outside"):
        rd.points_path.write_text(HEADER + "-1,0,0,0.5,True\n")
        RunDir(tmp_path / "run").start(_config())


def test_rows_in_another_column_order_are_not_appended(run):
    """points.csv is positional: the same columns in another order would shift every value."""
    from asbound.errors import RecordError

    before = run.points_path.read_bytes()
    with pytest.raises(RecordError, match="its columns are not this run's"):
        run.append(_batch([6])[["position", "label", "index", "sensitivity", "fulfilled"]])
    assert run.points_path.read_bytes() == before


def test_an_atomic_write_syncs_before_it_replaces_and_a_failed_one_leaves_the_old_file(tmp_path, monkeypatch):
    import os

    from asbound.records import atomic_write, write_json

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b)))
    path = tmp_path / SUMMARY
    write_json(path, {"n": 3})
    assert events == [("fsync", len(path.read_bytes())), ("replace", SUMMARY)]

    def half(handle) -> None:
        handle.write(b'{"n": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"n": 3}  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [SUMMARY]  # no stray temporary file


@pytest.mark.parametrize("field, value, problem", [
    ("n", 8.5, "n is a number, not a whole number"),
    ("n", True, "n is true or false, not a whole number"),
    ("as_score", "", "as_score is a string, not a number"),
    ("lemma1_holds", 0, "lemma1_holds is a number, not true or false"),
    ("theorem1", [], "theorem1 is a list, not an object"),
    ("lemma1_all", {}, "lemma1_all is an object, not a list"),
])
def test_summary_fields_of_another_type_even_empty_or_false_are_damage(field, value, problem, tmp_path):
    """Values that are falsy or numbers of another kind are not let through as 'missing'."""
    from asbound.errors import RecordError
    from asbound.records import read_json

    good = {"n": 8, "as_score": 0.5, "lemma1_holds": True, "theorem1": {"n": 8}, "lemma1_all": []}
    (tmp_path / SUMMARY).write_text(json.dumps(good))
    assert read_json(tmp_path / SUMMARY) == good
    (tmp_path / SUMMARY).write_text(json.dumps({**good, field: value}))
    with pytest.raises(RecordError, match=re.escape(f"is damaged or not asbound's ({problem})")):
        read_json(tmp_path / SUMMARY)


def test_a_default_stands_only_for_a_key_the_record_lacks(tmp_path):
    """``defaults`` fill keys a run recorded before its option existed; they never replace a value
    either config holds (else a changed option that has a default would resume the old run)."""
    rd = RunDir(tmp_path / "run")
    rd.start(_config(certify=None), defaults={"certify": None, "attack": "pgd"})
    with pytest.raises(ResumeError, match="certify: None -> 'ibp'"):
        RunDir(tmp_path / "run").start(_config(certify="ibp"), defaults={"certify": None, "attack": "pgd"})
    RunDir(tmp_path / "run").start(_config(certify=None, attack="pgd"), defaults={"certify": None, "attack": "pgd"})
    with pytest.raises(ResumeError, match="attack: 'pgd' -> 'apgd'"):
        RunDir(tmp_path / "run").start(_config(certify=None, attack="apgd"), defaults={"certify": None, "attack": "pgd"})
