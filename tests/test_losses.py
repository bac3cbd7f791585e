"""asbound.losses: the losses, and their Lipschitz constants shown to be the *smallest* ones.

A differentiable loss ``l(u)`` is L-Lipschitz in ``||.||_q`` exactly when the dual norm of its
gradient (``||.||_1`` for q = inf, ``||.||_2`` for q = 2, ``||.||_inf`` for q = 1) is at most L
everywhere; the best constant is the supremum of that dual norm. Each constant is checked both
ways: the dual gradient norm stays below it at random outputs, and comes within 1e-6 of it at an
output chosen to attain it (so a constant that is too large fails as surely as one too small).
The upper-bound checks against random pairs stay in ``test_bounds.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asbound.losses import (
    CROSS_ENTROPY,
    EUCLIDEAN,
    Loss,
    cross_entropy,
    euclidean_error,
    loss_for_task,
)

#: the dual exponent of each output norm q: ||grad||_{dual(q)} is the local Lipschitz constant
DUAL = {"inf": 1, "2": 2, "1": math.inf}
KS = [2, 3, 10, 100]


def _grad(loss: Loss, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    u = u.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(u, y).sum(), u)
    return grad


def _dual_norms(grad: torch.Tensor) -> "dict[str, torch.Tensor]":
    return {q: torch.linalg.vector_norm(grad, ord=p, dim=1) for q, p in DUAL.items()}


# --- the losses themselves ----------------------------------------------------------------------


def test_cross_entropy_is_the_negative_log_softmax_per_example():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 2, 0])
    expected = -torch.log(torch.exp(u) / torch.exp(u).sum(1, keepdim=True))[torch.arange(6), y]
    assert cross_entropy(u, y).shape == (6,)
    torch.testing.assert_close(cross_entropy(u, y), expected)
    torch.testing.assert_close(CROSS_ENTROPY(u, y), expected)


def test_euclidean_error_is_the_unsquared_distance_per_example():
    u = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(euclidean_error(u, y), torch.tensor([5.0, 0.0, math.sqrt(5.0)],
                                                                  dtype=torch.float64))
    # a single output with [N] targets
    one = euclidean_error(torch.tensor([[2.0], [-1.0]]), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(one, torch.tensor([1.5, 2.0]))
    torch.testing.assert_close(EUCLIDEAN(u, y), euclidean_error(u, y))


def test_loss_for_task_and_headline_norms():
    assert loss_for_task("classification") is CROSS_ENTROPY
    assert loss_for_task("regression") is EUCLIDEAN
    assert CROSS_ENTROPY.name == "cross_entropy" and CROSS_ENTROPY.headline_q == "inf"
    assert EUCLIDEAN.name == "euclidean_error" and EUCLIDEAN.headline_q == "2"


# --- cross-entropy: L = 2 (q = inf), sqrt(2) (q = 2), 1 (q = 1) ------------------------------


@pytest.mark.parametrize("K", KS)
def test_cross_entropy_gradient_is_softmax_minus_onehot(K):
    g = torch.Generator().manual_seed(K)
    u = torch.randn(50, K, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, K, (50,), generator=g)
    expected = torch.softmax(u, dim=1) - F.one_hot(y, K).double()
    torch.testing.assert_close(_grad(CROSS_ENTROPY, u, y), expected)


@pytest.mark.parametrize("K", KS)
def test_cross_entropy_constants_bound_the_dual_gradient_norms(K):
    lips = CROSS_ENTROPY.lipschitz(K)
    assert set(lips) == {"inf", "2", "1"}
    g = torch.Generator().manual_seed(100 + K)
    scale = torch.rand(4000, 1, generator=g, dtype=torch.float64) * 30  # flat to very peaked
    u = torch.randn(4000, K, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, K, (4000,), generator=g)
    for q, norm in _dual_norms(_grad(CROSS_ENTROPY, u, y)).items():
        assert float(norm.max()) <= lips[q] + 1e-12, q


def _one_huge_wrong_logit(K: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """p_y -> 0 with all the mass on one wrong class: the gradient tends to e_1 - e_0."""
    u = torch.zeros(1, K, dtype=torch.float64)
    u[0, 1] = 40.0
    return u, torch.tensor([0])


@pytest.mark.parametrize("K", KS)
def test_cross_entropy_constants_are_attained(K):
    lips = CROSS_ENTROPY.lipschitz(K)
    norms = _dual_norms(_grad(CROSS_ENTROPY, *_one_huge_wrong_logit(K)))
    assert float(norms["inf"]) == pytest.approx(2.0, abs=1e-6)  # l1 of the gradient
    assert float(norms["2"]) == pytest.approx(math.sqrt(2.0), abs=1e-6)  # l2
    assert float(norms["1"]) == pytest.approx(1.0, abs=1e-6)  # l-inf
    for q in ("inf", "2", "1"):
        assert float(norms[q]) == pytest.approx(lips[q], abs=1e-6), q


@pytest.mark.parametrize("K", [3, 10])
def test_cross_entropy_constants_are_approached_by_loss_differences(K):
    """No autograd: a small step along the extremal direction of each norm changes the loss by
    L times the step's norm (to first order), at the output that attains the constant."""
    lips = CROSS_ENTROPY.lipschitz(K)
    u, y = _one_huge_wrong_logit(K)
    grad = (torch.softmax(u, dim=1) - F.one_hot(y, K).double())[0]
    directions = {"inf": torch.sign(grad), "2": grad / grad.norm(),
                  "1": F.one_hot(grad.abs().argmax(), K).double() * torch.sign(grad)}
    t = 1e-6
    for q, d in directions.items():
        p = {"inf": math.inf, "2": 2, "1": 1}[q]
        step = t * d
        ratio = float((cross_entropy(u + step, y) - cross_entropy(u, y)) /
                      torch.linalg.vector_norm(step, ord=p))
        assert ratio == pytest.approx(lips[q], abs=1e-5), q


# --- Euclidean error: L = 1 (q = 2), 1 (q = 1), sqrt(K) (q = inf) ------------------------------


@pytest.mark.parametrize("K", [1, 2, 5, 64])
def test_euclidean_constants_bound_the_dual_gradient_norms(K):
    lips = EUCLIDEAN.lipschitz(K)
    assert set(lips) == {"inf", "2", "1"}
    g = torch.Generator().manual_seed(K)
    u = torch.randn(3000, K, generator=g, dtype=torch.float64)
    y = torch.randn(3000, K, generator=g, dtype=torch.float64)
    grad = _grad(EUCLIDEAN, u, y)
    torch.testing.assert_close(grad, (u - y) / (u - y).norm(dim=1, keepdim=True))
    for q, norm in _dual_norms(grad).items():
        assert float(norm.max()) <= lips[q] + 1e-12, q


@pytest.mark.parametrize("K", [1, 2, 5, 64])
def test_euclidean_constants_are_attained(K):
    lips = EUCLIDEAN.lipschitz(K)
    y = torch.zeros(2, K, dtype=torch.float64)
    u = torch.zeros(2, K, dtype=torch.float64)
    u[0, K - 1] = -3.0  # the error along one axis: l-inf of the gradient is 1
    u[1] = 0.7  # the error along the diagonal: l1 of the gradient is sqrt(K)
    norms = _dual_norms(_grad(EUCLIDEAN, u, y))
    assert float(norms["2"][0]) == pytest.approx(1.0, abs=1e-6)
    assert float(norms["2"][1]) == pytest.approx(1.0, abs=1e-6)
    assert float(norms["1"][0]) == pytest.approx(1.0, abs=1e-6)
    assert float(norms["inf"][1]) == pytest.approx(math.sqrt(K), abs=1e-6)
    assert float(norms["2"][0]) == pytest.approx(lips["2"], abs=1e-6)
    assert float(norms["1"][0]) == pytest.approx(lips["1"], abs=1e-6)
    assert float(norms["inf"][1]) == pytest.approx(lips["inf"], abs=1e-6)


@pytest.mark.parametrize("K", [2, 9])
def test_euclidean_constants_are_approached_by_loss_differences(K):
    lips = EUCLIDEAN.lipschitz(K)
    y = torch.zeros(1, K, dtype=torch.float64)
    axis = F.one_hot(torch.tensor(0), K).double()[None]
    diagonal = torch.ones(1, K, dtype=torch.float64)
    # (point, step): moving away from y along the error direction changes the loss by ||step||_2
    cases = {"2": (axis, 0.25 * axis, 2), "1": (axis, 0.25 * axis, 1),
             "inf": (diagonal, 0.25 * diagonal, math.inf)}
    for q, (u, step, p) in cases.items():
        ratio = float((euclidean_error(u + step, y) - euclidean_error(u, y)) /
                      torch.linalg.vector_norm(step, ord=p))
        assert ratio == pytest.approx(lips[q], abs=1e-9), q
