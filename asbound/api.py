"""The typed Python API: every capability of asbound, re-exported from the room that holds it.

    from asbound.api import ScoreConfig, score, TransferConfig, transfer

* :mod:`asbound.scoring`: ``score`` (AS score, Lemma 1, Theorem 1, Theorem 2 per datapoint);
* :mod:`asbound.transfer`: ``transfer`` (LP, FT, LP-FT, adversarial LP / FT, TRADES FT), whose
  runs re-enter as ``run:DIR`` models.

The command line (:mod:`asbound.cli`) is a thin layer over these names.
"""

from __future__ import annotations

from asbound.devices import resolve_device
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
from asbound.transfer import METHODS, MethodResult, TransferConfig, transfer

__all__ = [
    "BACKENDS",
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
