"""The typed Python API: every capability of asbound, re-exported from the room that holds it.

    from asbound.api import ScoreConfig, score, TransferConfig, transfer

* :mod:`asbound.scoring`: ``score`` (AS score, Lemma 1, Theorem 1, Theorem 2 per datapoint);
* :mod:`asbound.transfer`: ``transfer`` (LP, FT, LP-FT, adversarial LP / FT, TRADES FT), whose
  runs re-enter as ``run:DIR`` models;
* :mod:`asbound.sweep`: ``run_sweep`` over ``shift_sweep`` / ``eps_sweep`` / ``resize_sweep`` /
  ``grid_sweep`` cells (each an ordinary run), locally or through submitit;
* :mod:`asbound.predict`: ``predict`` (the AS ratio before transfer, with its measured power);
* :mod:`asbound.data.corruptions`: ``parse_corruption`` / ``corrupt`` (CIFAR-10-C, ImageNet-C);
* :mod:`asbound.report`: ``table`` / ``render`` (seed 001's tables in Markdown, LaTeX, CSV) and
  ``plot`` (figures), from stored run records only (``collect`` reads run directories).

The command line (:mod:`asbound.cli`) is a thin layer over these names.
"""

from __future__ import annotations

from asbound.data.corruptions import Corruption, corrupt, parse_corruption
from asbound.devices import resolve_device
from asbound.predict import PredictConfig, predict
from asbound.report.plots import KINDS as PLOT_KINDS
from asbound.report.plots import plot
from asbound.report.runs import Run, collect
from asbound.report.tables import FORMATS as TABLE_FORMATS
from asbound.report.tables import STYLES as TABLE_STYLES
from asbound.report.tables import Rendered, render, table
from asbound.scoring import (
    BACKENDS,
    DEFAULT_MODEL,
    DEFAULT_N,
    DEFAULT_TASKS,
    ScoreConfig,
    ScoreResult,
    head_mismatch,
    score,
    score_default,
    summarize,
)
from asbound.sweep import SlurmOptions, Sweep, eps_sweep, grid_sweep, resize_sweep, run_sweep, shift_sweep
from asbound.transfer import METHODS, MethodResult, TransferConfig, transfer

__all__ = [
    "BACKENDS",
    "Corruption",
    "PLOT_KINDS",
    "PredictConfig",
    "Rendered",
    "Run",
    "TABLE_FORMATS",
    "TABLE_STYLES",
    "collect",
    "plot",
    "render",
    "table",
    "SlurmOptions",
    "Sweep",
    "corrupt",
    "eps_sweep",
    "grid_sweep",
    "parse_corruption",
    "predict",
    "resize_sweep",
    "run_sweep",
    "shift_sweep",
    "DEFAULT_MODEL",
    "DEFAULT_N",
    "DEFAULT_TASKS",
    "METHODS",
    "MethodResult",
    "ScoreConfig",
    "ScoreResult",
    "TransferConfig",
    "head_mismatch",
    "resolve_device",
    "score",
    "score_default",
    "summarize",
    "transfer",
]
