"""The certify benchmarks' helpers: ``benchmarks/certify_reference.py`` and
``benchmarks/certify_timing.py`` write their own sections of one report file
(``benchmarks/timing.py:write_section``), and a call over the time limit is recorded as such."""

from __future__ import annotations

import importlib.util
import sys
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # their `timing` helper
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_section_is_replaced_and_the_others_are_kept(tmp_path):
    write_section = _load("timing").write_section
    report = tmp_path / "r.md"
    write_section(report, "## Tightness", "old tightness\n\n| a |\n|---|\n| 1 |")
    write_section(report, "## Time per point", "old times")
    write_section(report, "## Tightness", "new tightness")
    text = report.read_text()
    assert text == "## Tightness\n\nnew tightness\n\n## Time per point\n\nold times\n"
    write_section(report, "## Time per point", "new times")
    assert report.read_text() == "## Tightness\n\nnew tightness\n\n## Time per point\n\nnew times\n"


def test_a_call_past_the_limit_is_recorded_as_such(monkeypatch):
    timing = _load("certify_timing")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    net[1].bias.data += 1.0  # active ReLUs: the output moves with the input
    bounder = timing.Bounder(net)
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    seconds, bound = timing._time(bounder, x, 0.01, "inf", "crown", limit=30)
    assert seconds is not None and seconds > 0 and bound > 0
    monkeypatch.setitem(timing.OUTPUT_BOXES, "crown", lambda *args: time.sleep(10))
    start = time.perf_counter()
    assert timing._time(bounder, x, 0.01, "inf", "crown", limit=1) == (None, None)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("size", [8])
def test_the_cifar_resnet18_is_bounded_by_every_method(size):
    """The timing network is one certify supports (3x3 stem, no max pooling), and what score
    computes for --certify crown there is crown-ibp (over the budget)."""
    timing = _load("certify_timing")
    from asbound.models import split_model

    split = split_model(timing.resnet18_cifar(), torch.rand(2, 3, 32, 32))
    bounder = timing.Bounder(split.backbone)
    x = torch.rand(1, 3, size, size, dtype=torch.float64)
    assert timing.method_for(bounder, "crown", x, "inf")[0] == "crown-ibp"
    seconds, bound = timing._time(bounder, x, 1 / 255, "inf", "ibp", limit=60)
    assert seconds is not None and bound > 0


def test_the_mlp_rows_time_every_method_and_say_what_score_computes(tmp_path, capsys):
    """--only mlp at a tiny width: one row, every method timed, its multiply-adds and the method
    score computes there (crown: far under the budget); --json keeps the rows for --render."""
    timing = _load("certify_timing")
    out = tmp_path / "rows.json"
    assert timing.main(["--only", "mlp", "--mlp-widths", "16", "--limit", "60", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["network"] == "mlp 3072-16-16-10 (random)" and row["score --certify crown computes"] == "crown"
    assert all(isinstance(row[f"{m} s"], float) for m in timing.METHODS)
    # the multiply-adds: 16 rows through the second pre-activation's path (the first is an exact
    # interval) and 16 through the representation's (its ReLU and the Identity the head left)
    path = 3072 + 3072 + 16 * 3072 + 16 + 16 * 16  # the input, its flatten, Linear, ReLU, Linear
    assert row[timing.COST] == 16 * path + 16 * (path + 16 + 16) + 2e5 * (5 + 7)  # and 2e5 per node visited
    assert "mlp 3072-16-16-10" in capsys.readouterr().out
