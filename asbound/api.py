"""The typed Python API: every capability of asbound, re-exported from the room that holds it.

    from asbound.api import ScoreConfig, score, TransferConfig, transfer

* :mod:`asbound.scoring`: ``score`` (AS score, Lemma 1, Theorem 1, Theorem 2 per datapoint);
* :mod:`asbound.transfer`: ``transfer`` (LP, FT, LP-FT, adversarial LP / FT, TRADES FT), whose
  runs re-enter as ``run:DIR`` models;
* :mod:`asbound.sweep`: ``run_sweep`` over ``shift_sweep`` / ``eps_sweep`` / ``resize_sweep`` /
  ``grid_sweep`` cells (each an ordinary run), locally or through submitit;
* :mod:`asbound.predict`: ``predict`` (the AS ratio before transfer, with its measured power);
* :mod:`asbound.data.corruptions`: ``parse_corruption`` / ``corrupt`` (CIFAR-10-C, ImageNet-C);
* :mod:`asbound.report`: ``table`` / ``render`` (seed 001's tables in Markdown, LaTeX, CSV),
  ``plot`` (figures), from stored run records only (``collect`` reads run directories), and
  ``summary_table`` / ``transfer_table`` / ``predict_table`` (the tables ``score``, ``transfer``
  and ``predict`` print).

Each name is imported from its room on first use, so that a name needs only what its room needs
(``table`` reads records without torch). The command line (:mod:`asbound.cli`) is a thin layer
over these names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name -> (module, name there)
_EXPORTS: "dict[str, tuple[str, str]]" = {
    **{name: ("asbound.data.corruptions", name) for name in ("Corruption", "corrupt", "parse_corruption")},
    "resolve_device": ("asbound.devices", "resolve_device"),
    **{name: ("asbound.predict", name) for name in ("PredictConfig", "predict")},
    "PLOT_KINDS": ("asbound.report.plots", "KINDS"),
    "plot": ("asbound.report.plots", "plot"),
    **{name: ("asbound.report.runs", name) for name in ("Run", "collect")},
    "TABLE_FORMATS": ("asbound.report.tables", "FORMATS"),
    "TABLE_STYLES": ("asbound.report.tables", "STYLES"),
    **{name: ("asbound.report.tables", name) for name in ("Rendered", "render", "table")},
    **{name: ("asbound.report.console", name) for name in ("predict_table", "summary_table", "transfer_table")},
    **{name: ("asbound.scoring", name) for name in (
        "BACKENDS", "DEFAULT_MODEL", "DEFAULT_N", "DEFAULT_RUNS", "DEFAULT_TASKS", "ScoreConfig", "ScoreResult",
        "head_mismatch", "score", "score_default", "summarize")},
    **{name: ("asbound.sweep", name) for name in (
        "SlurmOptions", "Sweep", "eps_sweep", "grid_sweep", "resize_sweep", "run_sweep", "shift_sweep")},
    **{name: ("asbound.transfer", name) for name in ("METHODS", "MethodResult", "TransferConfig", "transfer")},
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what static type checkers and editors see; tests/test_cli.py keeps it equal to _EXPORTS
    from asbound.data.corruptions import Corruption, corrupt, parse_corruption
    from asbound.devices import resolve_device
    from asbound.predict import PredictConfig, predict
    from asbound.report.console import predict_table, summary_table, transfer_table
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
        DEFAULT_RUNS,
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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'asbound.api' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(_EXPORTS))
