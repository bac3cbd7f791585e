"""Per-example losses and their Lipschitz constants in the output norm (SPEC section 3).

A loss ``l(u, y)`` is ``L_q``-Lipschitz in ``||.||_q`` of the output ``u``. The bounds pair each
valid ``(q, L_q)`` with the matching head norm ``||W||_(q)`` (:mod:`asbound.bounds`).

* Softmax cross-entropy: the gradient ``softmax(u) - e_y`` has l1 norm ``2 (1 - p_y) <= 2``,
  l2 norm ``<= sqrt(2) (1 - p_y) <= sqrt(2)`` and l-inf norm ``<= 1``; so CE is 2-Lipschitz in
  ``||.||_inf`` (seed 001, Lemma 3), sqrt(2)-Lipschitz in ``||.||_2`` and 1-Lipschitz in ``||.||_1``.
* Euclidean error ``||u - y||_2`` (the seed's "MSE", unsquared): 1-Lipschitz in ``||.||_2``
  (reverse triangle inequality), 1 in ``||.||_1`` and ``sqrt(K)`` in ``||.||_inf``.
  Squared error is not globally Lipschitz and is not offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(outputs: Tensor, labels: Tensor) -> Tensor:
    """Softmax cross-entropy per example: ``[N, K], [N] -> [N]``."""
    return F.cross_entropy(outputs, labels, reduction="none")


def euclidean_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """``||f(x) - y||_2`` per example; ``targets`` is ``[N]`` (one output) or ``[N, K]``."""
    return torch.linalg.vector_norm(outputs - targets.reshape(outputs.shape), dim=1)


@dataclass(frozen=True)
class Loss:
    """A loss with its Lipschitz constants ``{q: L_q}`` in the output norms it is Lipschitz in."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    headline_q: str  # the norm the seed uses for its headline Lemma 1 numbers

    def lipschitz(self, num_outputs: int) -> "dict[str, float]":
        if self.name == "cross_entropy":
            return {"inf": 2.0, "2": math.sqrt(2.0), "1": 1.0}
        return {"2": 1.0, "1": 1.0, "inf": math.sqrt(num_outputs)}

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.fn(outputs, targets)


CROSS_ENTROPY = Loss("cross_entropy", cross_entropy, headline_q="inf")
EUCLIDEAN = Loss("euclidean_error", euclidean_error, headline_q="2")


def loss_for_task(task: str) -> Loss:
    """Cross-entropy for integer labels, the Euclidean error for float targets."""
    return CROSS_ENTROPY if task == "classification" else EUCLIDEAN
