"""The smallest real run of each kind (score, transfer, sweep, predict), for tests that read,
damage or rerun records: the shipped builtin digits model on scikit-learn's bundled digits, a few
datapoints, one attack step. Each function returns the command line (run it with ``asbound.cli.main``).
"""

from __future__ import annotations

from pathlib import Path

DIGITS = ["--model", "builtin:digits-adversarial", "--data", "digits"]
QUICK = ["--steps", "1", "--no-progress"]


def score(out: "str | Path", *extra: str) -> "list[str]":
    """A classification score run (the model's head fits classes 0-4) on 8 datapoints."""
    return ["score", *DIGITS, "--classes", "0-4", "--n", "8", *QUICK, "--out", str(out), *extra]


def transfer(out: "str | Path", *extra: str) -> "list[str]":
    """Linear probing on classes 5-9 for one epoch, scored before and after on 8 datapoints."""
    return ["transfer", "--method", "lp", *DIGITS, "--classes", "5-9", "--epochs", "1", "--n", "32",
            "--n-val", "8", "--n-test", "8", "--score-n", "8", "--score-steps", "1", "--eval-steps", "1",
            "--attack-steps", "1", "--no-progress", "--out", str(out), *extra]


def sweep(out: "str | Path") -> "list[str]":
    """An eps sweep of two score cells."""
    return ["sweep", "eps", *DIGITS, "--classes", "0-4", "--multiples", "1,2", "--n", "8", *QUICK,
            "--out", str(out)]


def predict(out: "str | Path") -> "list[str]":
    """A prediction from classes 0-4 (pretraining) to all digits."""
    return ["predict", "--model", "builtin:digits-adversarial", "--pretrain-data", "digits",
            "--pretrain-classes", "0-4", "--data", "digits", "--n", "8", *QUICK, "--out", str(out)]
