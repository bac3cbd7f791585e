"""Lemma 1, Theorem 1 and Theorem 2 of Nern et al. (NeurIPS 2023), from per-datapoint quantities.

Notation (SPEC sections 1-4): ``f(x) = W g(x) + b``, rows ``w_k`` of ``W``; ``s_i`` the
(estimated) adversarial sensitivity of datapoint i; ``AS = mean_i s_i``.

* Head norms ``||W||_(q)`` (Lemma 2): ``q = inf``: ``max_k ||w_k||_2`` (exact operator norm
  l2 -> l-inf); ``q = 2``: spectral norm (tight) or Frobenius norm; ``q = 1``:
  ``sum_k ||w_k||_2``.
* Lemma 1: ``LHS = mean_i [l(f(x_i^adv), y_i) - l(f(x_i), y_i)] / (L ||W||_(q)) <= AS = RHS``;
  pointwise ``l(f(x'), y) - l(f(x), y) <= L ||W||_(q) ||g(x') - g(x)||_2`` for every ``x'``.
* Theorem 1: for ``0 <= l <= C``, with probability ``>= 1 - delta`` over an i.i.d. sample of
  size n, ``E[max_x' l(f(x'), y) - l(f(x), y)] <= L ||W||_(q) AS + C sqrt(ln(1/delta) / (2n))``;
  stated for the capped loss ``min(l, C)`` (same L), with C fixed before seeing the data.
  The theorem needs the true ``s_i``; with asbound's PGD estimate (a lower bound) the bound
  computed here is an *estimate* of the theorem's right-hand side, not a guaranteed bound.
* Theorem 2: ``m_i = min_{j != y} (f_y(x_i) - f_j(x_i)) / ||w_y - w_j||_2``; ``s_i < m_i``
  implies every ``x'`` in the ball is classified ``y``. Empirical with a PGD estimate of
  ``s_i`` (a lower bound); a certificate only with an upper bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from asbound.errors import ConfigError
from asbound.losses import Loss

# (q, name of the matching head norm) pairs that make Lemma 2 valid
NORM_FOR_Q: "tuple[tuple[str, str], ...]" = (
    ("inf", "row_max"),
    ("2", "spectral"),
    ("2", "frobenius"),
    ("1", "row_sum"),
)


def head_norms(W: Tensor) -> "dict[str, float]":
    """The operator-norm bounds of ``W`` (``[K, m]``) used by Lemma 1."""
    W = W.detach().double().cpu()
    rows = torch.linalg.vector_norm(W, dim=1)
    return {
        "row_max": float(rows.max()),
        "row_sum": float(rows.sum()),
        "frobenius": float(torch.linalg.matrix_norm(W, ord="fro")),
        "spectral": float(torch.linalg.matrix_norm(W, ord=2)),
    }


def row_distances(W: Tensor, rows: Tensor, *, budget: int = 2**24) -> Tensor:
    """``||w_r - w_j||_2`` for each ``r`` in ``rows`` and every ``j``, ``[len(rows), K]``, float64.

    The Gram formula ``||a||² + ||b||² - 2 a·b`` (in float64) is fast, but it loses the digits of
    nearly equal rows: in float32 (``torch.cdist`` above 25 rows) it returns 0 for rows of norm 10
    that differ by 1e-3. Every pair whose squared distance is below 1e-3 of ``||a||² + ||b||²``
    is therefore recomputed from the difference itself; elsewhere the formula's relative error is
    below about ``m 1e-13`` of the squared distance. The exact recomputation runs in chunks of at
    most ``budget`` numbers (at least one pair at a time).
    """
    W = W.detach().double()
    rows = rows.to(W.device)
    sq = (W * W).sum(1)
    scale = sq[rows][:, None] + sq[None, :]
    d2 = (scale - 2.0 * (W[rows] @ W.T)).clamp_min(0.0)
    suspect = (d2 <= 1e-3 * scale).nonzero()  # [P, 2]: (position in rows, j)
    chunk = max(1, budget // max(1, W.shape[1]))
    for i in range(0, len(suspect), chunk):
        r, j = suspect[i:i + chunk].unbind(1)
        d2[r, j] = ((W[rows[r]] - W[j]) ** 2).sum(1)
    return d2.sqrt()


def margins(features: Tensor, labels: Tensor, W: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """Theorem 2's normalised margin ``m_i = min_{j != y} (f_y - f_j) / ||w_y - w_j||_2``, float64 ``[N]``.

    ``features`` are the representations ``g(x_i)`` ``[N, m]``; ``f = W g + b`` and the row
    distances are evaluated in float64, the distances from the row differences (exact even for
    nearly equal rows). ``m_i`` is the l2 distance from ``g(x_i)`` to the nearest decision
    boundary of ``y_i`` in feature space. Where ``w_j = w_y`` the difference
    ``f_y - f_j = b_y - b_j`` is the same everywhere, so the term is ``+inf`` if it is positive
    and ``-inf`` otherwise. ``m_i <= 0`` when ``x_i`` is misclassified.
    """
    g = features.detach().double().flatten(1)
    W = W.detach().double().to(g.device)
    bias = torch.zeros(W.shape[0], dtype=torch.float64, device=g.device) if b is None else b.detach().double().to(g.device)
    labels = labels.to(g.device)
    f = g @ W.T + bias  # [N, K]
    present, inverse = torch.unique(labels, return_inverse=True)
    den = row_distances(W, present)[inverse]  # [N, K], ||w_y - w_j||_2
    num = f.gather(1, labels.view(-1, 1)) - f  # [N, K], f_y - f_j
    pos_inf = torch.full_like(num, math.inf)
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, pos_inf, -pos_inf))
    ratio = ratio.scatter(1, labels.view(-1, 1), math.inf)  # j == y does not count
    return ratio.amin(dim=1)


@dataclass(frozen=True)
class Lemma1Term:
    """One valid ``(q, L, ||W||_(q))`` combination and the Lemma 1 LHS it gives."""

    q: str
    lipschitz: float
    head_norm_name: str
    head_norm: float
    lhs: float

    @property
    def scale(self) -> float:
        return self.lipschitz * self.head_norm


def lemma1_terms(loss: Loss, norms: "dict[str, float]", num_outputs: int, mean_delta: float) -> "list[Lemma1Term]":
    """Lemma 1's LHS ``mean(l_adv - l_clean) / (L ||W||_(q))`` for every valid combination."""
    lips = loss.lipschitz(num_outputs)
    terms = []
    for q, norm_name in NORM_FOR_Q:
        scale = lips[q] * norms[norm_name]
        lhs = mean_delta / scale if scale > 0 else (0.0 if mean_delta <= 0 else math.inf)
        terms.append(Lemma1Term(q, lips[q], norm_name, norms[norm_name], lhs))
    return terms


def headline_term(loss: Loss, terms: "list[Lemma1Term]") -> Lemma1Term:
    """The seed's choice: q = inf, ``max_k ||w_k||`` for CE; q = 2, spectral norm for regression."""
    name = "row_max" if loss.headline_q == "inf" else "spectral"
    return next(t for t in terms if t.q == loss.headline_q and t.head_norm_name == name)


def confidence_term(cap: float, n: int, delta: float) -> float:
    """Theorem 1's ``C sqrt(ln(1/delta) / (2n))`` (Hoeffding)."""
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must lie in (0, 1), got {delta!r}")
    if not (cap > 0 and math.isfinite(cap)):
        raise ConfigError(f"the loss cap C must be a positive number, got {cap!r}")
    return cap * math.sqrt(math.log(1.0 / delta) / (2.0 * n))


@dataclass(frozen=True)
class Theorem1:
    """Theorem 1 for the capped loss ``min(l, C)`` with its confidence term.

    ``bound`` uses the AS score as given; with a PGD estimate of AS (a lower bound on the true
    score) it is an estimate of the theorem's bound, not a guarantee.
    """

    cap: float
    delta: float
    n: int
    lhs_capped: float  # mean(min(l_adv, C) - min(l_clean, C)), the sample estimate
    lipschitz_term: float  # L ||W||_(q) AS
    confidence: float
    bound: float


def theorem1(
    term: Lemma1Term, as_score: float, loss_clean: np.ndarray, loss_adv: np.ndarray, *, cap: float, delta: float
) -> Theorem1:
    """Theorem 1: ``L ||W||_(q) AS + C sqrt(ln(1/delta) / (2n))`` and the capped sample LHS."""
    n = int(len(loss_clean))
    conf = confidence_term(cap, n, delta)
    lhs = float(np.mean(np.minimum(loss_adv, cap) - np.minimum(loss_clean, cap)))
    lip = term.scale * as_score
    return Theorem1(cap, delta, n, lhs, lip, conf, lip + conf)


def _mean_or_none(values: np.ndarray) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def summarize_points(
    points: "dict[str, np.ndarray]",
    *,
    loss: Optional[Loss],
    norms: Optional["dict[str, float]"],
    num_outputs: int,
    cap: float,
    delta: float,
) -> dict:
    """Data-set level numbers, derived from the per-datapoint records and nothing else.

    ``points`` holds the columns of ``points.csv`` as arrays. ``loss`` is None when the head
    does not match the task: then only the AS score is reported.
    """
    s = np.asarray(points["sensitivity"], dtype=float)
    n = int(len(s))
    out: dict = {
        "n": n,
        "as_score": float(s.mean()) if n else None,
        "as_score_rep": float(np.mean(points["s_rep"])) if n else None,
    }
    if loss is None or norms is None or n == 0:
        return out
    loss_clean = np.asarray(points["loss_clean"], dtype=float)
    loss_adv = np.asarray(points["loss_adv"], dtype=float)
    mean_delta = float(np.mean(loss_adv - loss_clean))
    terms = lemma1_terms(loss, norms, num_outputs, mean_delta)
    head = headline_term(loss, terms)
    thm1 = theorem1(head, out["as_score"], loss_clean, loss_adv, cap=cap, delta=delta)
    out.update(
        loss=loss.name,
        loss_clean=float(loss_clean.mean()),
        loss_adv=float(loss_adv.mean()),
        loss_diff=mean_delta,
        q=head.q,
        lipschitz=head.lipschitz,
        head_norm=head.head_norm,
        head_norm_name=head.head_norm_name,
        lhs=head.lhs,
        rhs=out["as_score"],
        lemma1_holds=bool(head.lhs <= out["as_score"] + 1e-9),
        lemma1_holds_rep=bool(head.lhs <= out["as_score_rep"] + 1e-9),
        lemma1_all=[asdict(t) for t in terms],
        head_norms=dict(norms),
        theorem1=asdict(thm1),
    )
    if loss.name == "cross_entropy":
        correct = np.asarray(points["correct"], dtype=bool)
        robust = np.asarray(points["robust"], dtype=bool)
        fulfilled = np.asarray(points["fulfilled"], dtype=bool)
        fulfilled_rep = np.asarray(points["fulfilled_rep"], dtype=bool)
        out.update(
            clean_accuracy=float(correct.mean()),
            robust_accuracy=float(robust.mean()),
            prop_fulfilled=float(fulfilled.mean()),
            rob_fulfilled=_mean_or_none(robust[fulfilled]),
            prop_fulfilled_rep=float(fulfilled_rep.mean()),
            rob_fulfilled_rep=_mean_or_none(robust[fulfilled_rep]),
        )
    return out
