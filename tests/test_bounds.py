"""Lemma 1, Theorem 1 and Theorem 2 against closed forms and the pointwise inequalities."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from asbound import ScoreConfig, score
from asbound.attacks import PGD, loss_objective
from asbound.bounds import (
    NORM_FOR_Q,
    confidence_term,
    head_norms,
    headline_term,
    lemma1_terms,
    margins,
    summarize_points,
)
from asbound.errors import ConfigError
from asbound.losses import CROSS_ENTROPY, EUCLIDEAN, cross_entropy, euclidean_error
from asbound.models import frozen, split_model

# --- head norms and Lipschitz constants -------------------------------------------------------


def test_head_norms_match_their_definitions_and_bound_the_operator():
    torch.manual_seed(0)
    W = torch.randn(7, 11, dtype=torch.float64)
    norms = head_norms(W)
    rows = np.linalg.norm(W.numpy(), axis=1)
    assert norms["row_max"] == pytest.approx(rows.max())
    assert norms["row_sum"] == pytest.approx(rows.sum())
    assert norms["frobenius"] == pytest.approx(np.linalg.norm(W.numpy()))
    assert norms["spectral"] == pytest.approx(np.linalg.svd(W.numpy(), compute_uv=False)[0])
    u = torch.randn(2000, 11, dtype=torch.float64)
    Wu = u @ W.T
    un = u.norm(dim=1)
    assert torch.all(Wu.abs().amax(1) <= norms["row_max"] * un + 1e-12)
    assert torch.all(Wu.norm(dim=1) <= norms["spectral"] * un + 1e-12)
    assert torch.all(Wu.abs().sum(1) <= norms["row_sum"] * un + 1e-12)
    assert norms["spectral"] <= norms["frobenius"]
    # row_max is the exact l2 -> l-inf operator norm: attained at u = w_k / ||w_k||
    k = int(np.argmax(rows))
    assert float((W @ (W[k] / W[k].norm())).abs().max()) == pytest.approx(norms["row_max"])


@pytest.mark.parametrize("K", [2, 3, 10, 100])
def test_cross_entropy_lipschitz_constants(K):
    g = torch.Generator().manual_seed(K)
    u = torch.randn(5000, K, generator=g, dtype=torch.float64) * 4
    v = u + torch.randn(5000, K, generator=g, dtype=torch.float64) * torch.rand(5000, 1, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (5000,), generator=g)
    diff = (cross_entropy(u, y) - cross_entropy(v, y)).abs()
    lips = CROSS_ENTROPY.lipschitz(K)
    for q, p in (("inf", math.inf), ("2", 2), ("1", 1)):
        assert torch.all(diff <= lips[q] * torch.linalg.vector_norm(u - v, ord=p, dim=1) + 1e-12), q
    # the constant 2 in l-inf is approached: the gradient softmax(u) - e_y has l1 norm 2 (1 - p_y)
    u = torch.zeros(1, K, dtype=torch.float64)
    u[0, 1] = 30.0
    u.requires_grad_(True)
    (grad,) = torch.autograd.grad(cross_entropy(u, torch.tensor([0])).sum(), u)
    assert float(grad.abs().sum()) == pytest.approx(2.0, abs=1e-9)


def test_euclidean_error_lipschitz_constants():
    g = torch.Generator().manual_seed(1)
    K = 4
    u, v = torch.randn(3000, K, generator=g, dtype=torch.float64), torch.randn(3000, K, generator=g, dtype=torch.float64)
    y = torch.randn(3000, K, generator=g, dtype=torch.float64)
    diff = (euclidean_error(u, y) - euclidean_error(v, y)).abs()
    lips = EUCLIDEAN.lipschitz(K)
    assert lips == {"2": 1.0, "1": 1.0, "inf": 2.0}
    for q, p in (("inf", math.inf), ("2", 2), ("1", 1)):
        assert torch.all(diff <= lips[q] * torch.linalg.vector_norm(u - v, ord=p, dim=1) + 1e-12), q


# --- Theorem 2 margins ------------------------------------------------------------------------


def test_margins_by_hand():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64)
    g = torch.tensor([[2.0, 1.0], [2.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    # f = g W^T + b: (2, 1.5, -2), (2, 1.5, -2), (0, 0.5, 0)
    m = margins(g, torch.tensor([0, 1, 1]), W, b)
    expected = [
        min((2 - 1.5) / math.sqrt(2), (2 + 2) / 2.0),
        min((1.5 - 2) / math.sqrt(2), (1.5 + 2) / math.sqrt(2)),
        min(0.5 / math.sqrt(2), 0.5 / math.sqrt(2)),
    ]
    torch.testing.assert_close(m, torch.tensor(expected, dtype=torch.float64))


def test_margin_with_identical_rows_depends_on_the_bias_only():
    W = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    g = torch.tensor([[0.3, -1.0], [5.0, 2.0]])  # f_0 - f_1 = b_0 - b_1 = 1 wherever g is
    m = margins(g, torch.tensor([0, 1]), W, torch.tensor([3.0, 2.0]))
    assert m[0] == math.inf and m[1] == -math.inf
    tie = margins(g, torch.tensor([0, 1]), W, torch.tensor([2.0, 2.0]))  # identical rows, equal biases
    assert tie[0] == -math.inf and tie[1] == -math.inf  # a tie is never robust


def test_margin_is_the_feature_distance_to_the_decision_boundary():
    """Moving g by less than m_i never changes the class; moving it by m_i along the worst
    direction reaches a tie."""
    torch.manual_seed(2)
    K, m_dim = 5, 6
    W, b = torch.randn(K, m_dim, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
    g = torch.randn(200, m_dim, dtype=torch.float64)
    f = g @ W.T + b
    y = f.argmax(1)
    m = margins(g, y, W, b)
    assert torch.all(m > 0)
    # random perturbations of norm 0.999 m never flip the class
    for _ in range(20):
        d = torch.randn_like(g)
        d = d / d.norm(dim=1, keepdim=True) * (0.999 * m).unsqueeze(1)
        assert torch.all(((g + d) @ W.T + b).argmax(1) == y)
    # the worst direction: towards the closest competitor j, along w_j - w_y
    dist = torch.cdist(W, W)
    ratio = (f.gather(1, y[:, None]) - f) / dist[y]
    ratio.scatter_(1, y[:, None], math.inf)
    j = ratio.argmin(1)
    direction = (W[j] - W[y]) / dist[y, j].unsqueeze(1)
    moved = (g + direction * m.unsqueeze(1)) @ W.T + b
    torch.testing.assert_close(moved.gather(1, y[:, None]).squeeze(1), moved.gather(1, j[:, None]).squeeze(1))


def test_theorem2_certifies_with_the_exact_sensitivity_of_a_linear_representation():
    """g(x) = A x: the exact L2 sensitivity is eps * sigma_max(A); fulfilled points resist attack."""
    torch.manual_seed(3)
    A = torch.randn(4, 8, dtype=torch.float64)
    W, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x = torch.rand(300, 8, dtype=torch.float64) * 0.6 + 0.2
    eps = 0.15
    s = eps * torch.linalg.matrix_norm(A, ord=2)
    f = x @ A.T @ W.T + b
    y = f.argmax(1)
    fulfilled = s < margins(x @ A.T, y, W, b)
    assert 0 < int(fulfilled.sum()) < 300  # both cases occur
    model = nn.Sequential(nn.Linear(8, 4, bias=False), nn.Linear(4, 3)).double()
    model[0].weight.data, model[1].weight.data, model[1].bias.data = A, W, b
    with frozen(model):
        adv = PGD(eps=eps, norm="2", steps=30, restarts=2)(loss_objective(model, cross_entropy, y), x).x_adv
        for xs in [adv] + [x + eps * (lambda d: d / d.norm(dim=1, keepdim=True))(torch.randn_like(x)) for _ in range(5)]:
            assert torch.all(model(xs.clamp(0, 1)).argmax(1)[fulfilled] == y[fulfilled])


def _nearly_equal_rows(K: int = 30, m: int = 512) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """Issue 5's repro: rows of norm 10, ``w_1 = w_0 + 1e-3 u``, ``b_0 = 1e-4``, ``b_1 = 0``, the
    other biases -10, ``g = 0``: the binding class is 1, at feature distance 1e-4 / 1e-3 = 0.1."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(K, m, generator=gen)
    W = 10 * W / W.norm(dim=1, keepdim=True)
    u = torch.randn(m, generator=gen)
    W[1] = W[0] + 1e-3 * u / u.norm()
    b = torch.full((K,), -10.0)
    b[0], b[1] = 1e-4, 0.0
    return W, b, torch.zeros(1, m)


def test_margin_with_nearly_equal_rows_among_many_classes():
    W, b, g = _nearly_equal_rows()
    m = margins(g, torch.tensor([0]), W, b)
    W64, b64 = W.double(), b.double()
    exact = (b64[0] - b64[1]) / (W64[0] - W64[1]).norm()
    assert float(exact) == pytest.approx(0.1, rel=1e-4)
    assert float(m) == pytest.approx(float(exact), rel=1e-9)  # torch.cdist in float32 gave 0.68
    # the margin is the distance to the boundary: a shift of 1.01 m along w_1 - w_0 flips the class
    d = (W64[1] - W64[0]) / (W64[1] - W64[0]).norm()
    assert int(((g.double() + 1.01 * float(m) * d) @ W64.T + b64).argmax()) == 1
    assert int(((g.double() + 0.99 * float(m) * d) @ W64.T + b64).argmax()) == 0


@pytest.mark.parametrize("K", [2, 30, 200])
def test_margins_match_a_float64_loop(K):
    gen = torch.Generator().manual_seed(K)
    m_dim = 64
    W = torch.randn(K, m_dim, generator=gen) * 3
    W[K - 1] = W[0] + 1e-4 * torch.randn(m_dim, generator=gen)  # nearly equal rows
    b = torch.randn(K, generator=gen)
    g = torch.randn(25, m_dim, generator=gen)
    y = torch.randint(0, K, (25,), generator=gen)
    y[:5] = 0
    got = margins(g, y, W, b)
    assert got.dtype == torch.float64
    W64, b64, g64 = W.double(), b.double(), g.double()
    for i in range(len(g)):
        yi = int(y[i])
        expected = min(
            float(((W64[yi] - W64[j]) @ g64[i] + b64[yi] - b64[j]) / (W64[yi] - W64[j]).norm())
            for j in range(K) if j != yi
        )
        assert float(got[i]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_row_distances_in_small_chunks_equal_one_pass():
    from asbound.bounds import row_distances

    gen = torch.Generator().manual_seed(9)
    W = torch.randn(40, 16, generator=gen)
    rows = torch.tensor([3, 0, 39, 3])
    full = row_distances(W, rows)
    chunked = row_distances(W, rows, budget=1)  # one row at a time
    torch.testing.assert_close(full, chunked, rtol=0, atol=0)
    torch.testing.assert_close(full[1, 0], torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(full[0], (W[3].double() - W.double()).norm(dim=1), rtol=1e-15, atol=0)


# --- Lemma 1 pointwise, Theorem 1 ---------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lemma1_pointwise_on_random_networks(task, seed):
    """l(f(x'), y) - l(f(x), y) <= L ||W||_(q) ||g(x') - g(x)|| on every datapoint, every (q, ||W||)."""
    torch.manual_seed(seed)
    K = 4 if task == "classification" else 2
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 16), nn.Tanh(), nn.Linear(16, K)
    )
    x = torch.rand(64, 3, 8, 8)
    split = split_model(net, x[:4])
    loss = CROSS_ENTROPY if task == "classification" else EUCLIDEAN
    y = torch.randint(0, K, (64,)) if task == "classification" else torch.randn(64, K)
    norms = head_norms(split.W)
    with frozen(split):
        adv = PGD(eps=0.1, steps=10)(loss_objective(split, loss, y), x).x_adv
        rand = (x + 0.1 * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        for xs in (adv, rand):
            g0, g1 = split.features(x), split.features(xs)
            shift = (g1 - g0).norm(dim=1).double()
            delta = (loss(split.head(g1), y) - loss(split.head(g0), y)).double()
            assert torch.any(delta > 0)
            for term in lemma1_terms(loss, norms, K, 0.0):
                assert torch.all(delta <= term.scale * shift * (1 + 1e-5) + 1e-6), (term.q, term.head_norm_name)


def test_lemma1_terms_cover_every_valid_combination_and_the_seed_headline():
    norms = {"row_max": 4.4, "row_sum": 20.0, "frobenius": 9.0, "spectral": 6.0}
    terms = lemma1_terms(CROSS_ENTROPY, norms, 10, 0.74)
    assert [(t.q, t.head_norm_name) for t in terms] == list(NORM_FOR_Q)
    head = headline_term(CROSS_ENTROPY, terms)
    # seed 001 Table 1: Diff CE 0.74, ||W|| 4.4, L = 2 -> LHS 0.084 (reported 0.08)
    assert (head.q, head.lipschitz, head.head_norm) == ("inf", 2.0, 4.4)
    assert head.lhs == pytest.approx(0.74 / 8.8) and round(head.lhs, 2) == 0.08
    reg = headline_term(EUCLIDEAN, lemma1_terms(EUCLIDEAN, norms, 1, 0.5))
    assert (reg.q, reg.lipschitz, reg.head_norm_name, reg.lhs) == ("2", 1.0, "spectral", 0.5 / 6.0)


def test_confidence_term():
    assert confidence_term(10.0, 1000, 0.05) == pytest.approx(10 * math.sqrt(math.log(20) / 2000))
    for bad in ({"delta": 0.0}, {"delta": 1.0}, {"delta": 0.05, "cap": -1.0}):
        with pytest.raises(ConfigError):
            confidence_term(bad.get("cap", 1.0), 10, bad["delta"])


def test_summary_by_hand():
    points = {
        "sensitivity": np.array([0.5, 1.0, 1.5, 2.0]),
        "s_rep": np.array([0.5, 0.9, 1.5, 2.0]),
        "loss_clean": np.array([0.1, 0.2, 12.0, 1.0]),
        "loss_adv": np.array([0.3, 0.2, 13.0, 3.0]),
        "correct": np.array([True, True, False, True]),
        "robust": np.array([True, False, False, True]),
        "fulfilled": np.array([True, False, False, False]),
        "fulfilled_rep": np.array([True, True, False, False]),
    }
    norms = {"row_max": 2.0, "row_sum": 5.0, "frobenius": 3.0, "spectral": 2.5}
    s = summarize_points(points, loss=CROSS_ENTROPY, norms=norms, num_outputs=3, cap=10.0, delta=0.1)
    assert s["as_score"] == pytest.approx(1.25) and s["rhs"] == s["as_score"]
    assert s["loss_diff"] == pytest.approx((0.2 + 0 + 1 + 2) / 4)
    assert s["lhs"] == pytest.approx(0.8 / 4.0) and s["lipschitz"] == 2.0 and s["head_norm"] == 2.0
    assert s["lemma1_holds"]
    thm = s["theorem1"]
    assert thm["lhs_capped"] == pytest.approx((0.2 + 0 + 0 + 2) / 4)  # 12 and 13 both cap to 10
    assert thm["confidence"] == pytest.approx(10 * math.sqrt(math.log(10) / 8))
    assert thm["bound"] == pytest.approx(4.0 * 1.25 + thm["confidence"])
    assert (s["clean_accuracy"], s["robust_accuracy"], s["prop_fulfilled"]) == (0.75, 0.5, 0.25)
    assert s["rob_fulfilled"] == 1.0 and s["rob_fulfilled_rep"] == 0.5
    none = summarize_points({**points, "fulfilled": np.zeros(4, bool)}, loss=CROSS_ENTROPY, norms=norms,
                            num_outputs=3, cap=10.0, delta=0.1)
    assert none["rob_fulfilled"] is None  # no fulfilled point: reported as "-"


def test_lemma1_verdicts_both_ways():
    """``lemma1_holds`` compares LHS with the AS score of both attacks, ``lemma1_holds_rep`` with the
    AS attack alone (the paper's estimator); each can fail."""
    norms = {"row_max": 1.0, "row_sum": 3.0, "frobenius": 2.0, "spectral": 1.5}
    base = {"loss_clean": np.array([0.0, 0.0]), "correct": np.ones(2, bool), "robust": np.ones(2, bool),
            "fulfilled": np.ones(2, bool), "fulfilled_rep": np.ones(2, bool)}

    def summary(loss_adv, sensitivity, s_rep):
        points = {**base, "loss_adv": np.array(loss_adv), "sensitivity": np.array(sensitivity), "s_rep": np.array(s_rep)}
        return summarize_points(points, loss=CROSS_ENTROPY, norms=norms, num_outputs=3, cap=10.0, delta=0.1)

    # LHS = mean(loss_adv) / (L ||W||) = mean(loss_adv) / 2
    ok = summary([0.4, 0.4], [0.3, 0.3], [0.25, 0.25])  # LHS 0.2 <= 0.25 <= 0.3
    assert ok["lhs"] == pytest.approx(0.2) and ok["lemma1_holds"] and ok["lemma1_holds_rep"]
    rep_only = summary([0.4, 0.4], [0.3, 0.3], [0.1, 0.1])  # LHS 0.2 > AS attack alone 0.1
    assert rep_only["lemma1_holds"] and not rep_only["lemma1_holds_rep"]
    neither = summary([1.0, 1.0], [0.3, 0.3], [0.1, 0.1])  # LHS 0.5 > 0.3
    assert not neither["lemma1_holds"] and not neither["lemma1_holds_rep"]


# --- end to end through the API on a linear representation --------------------------------------


def _linear_model(A: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(A.shape[1], A.shape[0], bias=False), nn.Linear(W.shape[1], W.shape[0]))
    model[1].weight.data, model[2].weight.data, model[2].bias.data = A.clone(), W.clone(), b.clone()
    return model


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_score_on_a_linear_representation_matches_closed_forms(tmp_path, norm):
    torch.manual_seed(5)
    A, W, b = torch.randn(3, 4), torch.randn(3, 3), torch.randn(3)
    torch.save(_linear_model(A, W, b), tmp_path / "linear.pt")
    x = torch.rand(40, 1, 2, 2) * 0.5 + 0.25
    y = torch.randint(0, 3, (40,))
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    eps = 0.05
    result = score(
        ScoreConfig(model=f"file:{tmp_path / 'linear.pt'}", data=f"tensors:{tmp_path / 'data.pt'}"),
        allow_pickle=True, eps=eps, norm=norm, steps=60, rel_step=0.5, restarts=4, n=None, batch_size=16,
        progress=False, out=tmp_path / "run",
    )
    pts = result.points
    A64 = A.double()
    if norm == "2":
        exact = eps * float(torch.linalg.matrix_norm(A64, ord=2))
    else:
        vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64)
        exact = float((eps * vertices @ A64.T).norm(dim=1).max())
    np.testing.assert_allclose(pts["s_rep"], exact, rtol=2e-4)
    assert np.all(pts["sensitivity"] <= exact * (1 + 1e-5))
    # margins by an independent loop
    f = (x.flatten(1).double() @ A64.T) @ W.double().T + b.double()
    for i in range(len(x)):
        yi = int(y[i])
        expected = min(float((f[i, yi] - f[i, j]) / (W[yi] - W[j]).double().norm()) for j in range(3) if j != yi)
        assert pts["margin"][i] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # pointwise Lemma 1 (ratio <= the shift at the loss attack's point <= sensitivity), and its mean
    assert np.all(pts["lemma1_ratio"] <= pts["s_loss"] + 1e-5)
    assert result.summary["lhs"] == pytest.approx(pts["lemma1_ratio"].mean(), rel=1e-5)
    assert result.summary["lhs"] <= result.summary["rhs"]
    assert result.summary["head_norm"] == pytest.approx(head_norms(W)["row_max"], rel=1e-6)
    # with the loss attack's point counted, Theorem 2 makes rob. fulfilled 100% by construction
    fulfilled = pts["fulfilled"].astype(bool)
    assert pts["robust"][fulfilled].all()
