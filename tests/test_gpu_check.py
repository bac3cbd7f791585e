"""``benchmarks/gpu_check.py`` in its CPU mode: every check runs at tiny sizes and passes (the CUDA
tests are skipped), the summary fits 80 columns, and a failing check fails the command."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # its `timing` helper
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> "dict[str, str]":
    """check -> result, read from the rendered table (a row's first line: check, result, figures)."""
    found = (re.match(r"^(\S.*?)\s{2,}(pass|fail|skip)(\s{2,}|$)", line) for line in text.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def test_the_cpu_mode_runs_every_check_and_passes(gpu_check, tmp_path, capsys):
    out = tmp_path / "reports" / "gpu_check.txt"
    code = gpu_check.main(["--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    text = out.read_text()
    assert text == printed
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = _rows(text)
    expected = {
        "pytest -m gpu": "skip",  # no CUDA here: every gpu test skipped
        "score WRN-40-2 L2": "pass", "score WRN-40-2 Linf": "pass", "score PRN-18 L2": "pass",
        "score PRN-18 Linf": "pass", "timing f32": "pass", "timing f32 ch-last": "pass", "timing bf16": "pass",
        "timing bf16 ch-last": "pass", "transfer adv-ft": "pass", "transfer trades-ft": "pass",
        "transfer autolora": "pass", "certify crown": "pass",
    }
    if torch.cuda.is_available():
        expected["pytest -m gpu"] = "pass"
    assert rows == expected, text
    flat = " ".join(text.split())
    assert "skipped (test_gpu.py)" in flat
    assert flat.count("last weights bit for bit") == 3 and flat.count("resumed after epoch 1") == 3
    assert text.rstrip().endswith("0 failed")


def test_a_failing_check_is_a_row_and_fails_the_command(gpu_check, monkeypatch, capsys):
    def broken(device, sizes, work):  # noqa: ANN001, ANN202
        raise RuntimeError("the kernel\nsaid no")

    def failing(device, sizes, work):  # noqa: ANN001, ANN202
        return [gpu_check.Row("certify crown", "fail", "s_upper 1.0e-02 <= 1e-08")]

    monkeypatch.setitem(gpu_check.RUNNERS, "score", broken)
    monkeypatch.setitem(gpu_check.RUNNERS, "certify", failing)
    code = gpu_check.main(["--device", "cpu", "--checks", "score,certify"])
    text = capsys.readouterr().out
    assert code == 1
    assert _rows(text) == {"score": "fail", "certify crown": "fail"}
    assert "error: RuntimeError: the kernel said no" in " ".join(text.split())
    assert text.rstrip().endswith("2 failed")


def test_bad_options_are_refused_in_one_line(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--checks", "score,speed"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown speed" in err and "valid: pytest, score" in err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_:
            gpu_check.main(["--device", "cuda"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "torch sees no CUDA device" in err
