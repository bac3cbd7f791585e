"""asbound: verify robustness theory for transfer learning on real models.

Nern et al. (NeurIPS 2023): the adversarial sensitivity (AS) of a representation bounds the
robustness of any linear head on top of it (Lemma 1, Theorem 1), and a margin criterion
(Theorem 2) decides per datapoint whether its prediction can change. asbound estimates the AS
score with PGD, from below, so its Lemma 1 RHS and Theorem 1 bound are estimates and its
Theorem 2 criterion is empirical; ``--certify`` bounds the AS from above and makes them sound.
See ``docs/SPEC.md`` sections 1-4.

The public API is imported lazily, so that ``import asbound`` stays cheap::

    from asbound import ScoreConfig, score, score_default, TransferConfig
    from asbound.api import transfer   # ``asbound.transfer`` is the subpackage of that name
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "ScoreConfig": "asbound.api",
    "ScoreResult": "asbound.api",
    "score": "asbound.api",
    "score_default": "asbound.api",
    "TransferConfig": "asbound.api",
    "load_model": "asbound.models",
    "split_model": "asbound.models",
    "SplitModel": "asbound.models",
    "load_data": "asbound.data",
    "DataSet": "asbound.data",
    "PGD": "asbound.attacks",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'asbound' has no attribute {name!r}")
