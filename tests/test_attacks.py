"""PGD against closed-form oracles, its invariants, and foolbox as the reference semantics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from asbound.attacks import PGD, Watch, foolbox_pgd, loss_objective, representation_shift
from asbound.errors import ConfigError
from asbound.losses import cross_entropy
from asbound.models import frozen, split_model


def linear_features(A: torch.Tensor):
    """``g(x) = A x`` on flattened inputs."""
    return lambda x: x.flatten(1) @ A.T


def _radius(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """``||x' - x||`` per example, in the attack's norm."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "inf" else delta.norm(dim=1)


def test_l2_as_score_is_eps_times_largest_singular_value():
    torch.manual_seed(0)
    A = torch.randn(5, 12, dtype=torch.float64)
    x = torch.full((4, 12), 0.5, dtype=torch.float64)  # the L2 ball of radius 0.1 stays in the box
    eps = 0.1
    attack = PGD(eps=eps, norm="2", steps=100, rel_step=0.5, restarts=3)
    result = attack(representation_shift(linear_features(A), x), x)
    exact = eps * torch.linalg.matrix_norm(A, ord=2)
    assert torch.all(result.value <= exact * (1 + 1e-9))
    torch.testing.assert_close(result.value, exact.expand(4), rtol=1e-4, atol=0)


@pytest.mark.parametrize("attack_name", ["pgd", "apgd", "nystrom"])
def test_linf_as_score_is_the_best_vertex_of_the_cube(attack_name):
    from asbound.attacks import ATTACKS

    torch.manual_seed(1)
    d = 6
    A = torch.randn(3, d, dtype=torch.float64)
    x = torch.full((2, d), 0.5, dtype=torch.float64)
    eps = 0.05
    vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64)
    exact = (eps * vertices @ A.T).norm(dim=1).max()  # a convex function peaks at a vertex
    attack = ATTACKS[attack_name](eps=eps, norm="inf", steps=50, restarts=8)
    result = attack(representation_shift(linear_features(A), x), x)
    assert torch.all(result.value <= exact * (1 + 1e-9))
    torch.testing.assert_close(result.value, exact.expand(2), rtol=1e-9, atol=1e-12)


def test_box_constraint_limits_the_linear_oracle():
    # at x = 1 only decreasing coordinates are feasible: max ||A d|| over d in [-eps, 0]^d
    A = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    x = torch.ones(1, 2, dtype=torch.float64)
    eps = 0.1
    result = PGD(eps=eps, norm="inf", steps=20, restarts=2)(representation_shift(linear_features(A), x), x)
    assert float(result.x_adv.max()) <= 1.0
    torch.testing.assert_close(result.value, torch.tensor([eps * math.sqrt(9 + 1)], dtype=torch.float64))


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_iterates_stay_in_the_threat_set(norm):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(), nn.Linear(16, 5))
    x = torch.rand(7, 3, 8, 8)
    eps = 0.2
    attack = PGD(eps=eps, norm=norm, steps=10, rel_step=1.0, restarts=2)
    with frozen(net):
        result = attack(representation_shift(net, x), x)
    assert torch.all(_radius(result.x_adv, x, norm) <= eps + 1e-6)
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    # the reported value is the objective at the returned point
    with torch.no_grad():
        torch.testing.assert_close(result.value, (net(result.x_adv) - net(x)).norm(dim=1))


def test_attack_takes_input_gradients_only_and_restores_modes():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    net.train()
    x = torch.rand(5, 12)
    running = net[2].running_mean.clone()
    with frozen(net):
        PGD(eps=0.1, steps=3)(representation_shift(net, x), x)
    assert net.training
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())
    torch.testing.assert_close(net[2].running_mean, running)  # eval mode while attacking


def test_zero_eps_returns_the_clean_point():
    x = torch.rand(3, 4)
    result = PGD(eps=0.0)(representation_shift(lambda t: t * 2, x), x)
    torch.testing.assert_close(result.x_adv, x)
    torch.testing.assert_close(result.value, torch.zeros(3))


def test_representation_objective_needs_a_random_start():
    A = torch.randn(3, 4)
    x = torch.full((2, 4), 0.5)
    still = PGD(eps=0.1, steps=5, random_start=False)(representation_shift(linear_features(A), x), x)
    torch.testing.assert_close(still.value, torch.zeros(2))  # the gradient is zero at x' = x
    moved = PGD(eps=0.1, steps=5)(representation_shift(linear_features(A), x), x)
    assert torch.all(moved.value > 0)


def _recording(objective):
    """The objective, with every batch it is evaluated at recorded: ``[(x', value)]``."""
    seen = []

    def wrapped(x_adv):
        value = objective(x_adv)
        seen.append((x_adv.detach().clone(), value.detach().clone()))
        return value

    wrapped.vanishes_at_x = getattr(objective, "vanishes_at_x", False)  # a shift stays a shift
    return wrapped, seen


def test_best_is_the_best_evaluated_point_and_last_is_the_last():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 4))
    x = torch.rand(6, 10)
    with frozen(net):
        objective, seen = _recording(representation_shift(net, x))
        best = PGD(eps=0.3, steps=8, rel_step=1.0, restarts=2)(objective, x, generator=torch.Generator().manual_seed(5))
        again = PGD(eps=0.3, steps=8, rel_step=1.0, restarts=2)(representation_shift(net, x), x, generator=torch.Generator().manual_seed(5))
        assert len(seen) == 1 + 2 * (8 + 1)  # the clean input, then steps + the final point per restart
        values = torch.stack([v for _, v in seen])  # [evaluations, N]
        torch.testing.assert_close(best.value, values.max(0).values, rtol=0, atol=0)
        for i, k in enumerate(values.argmax(0).tolist()):
            torch.testing.assert_close(best.x_adv[i], seen[k][0][i], rtol=0, atol=0)
        assert (values.argmax(0) > 0).all()  # some step beat the clean point on every example
        objective, seen = _recording(representation_shift(net, x))
        last = PGD(eps=0.3, steps=8, rel_step=1.0, select="last")(objective, x, generator=torch.Generator().manual_seed(5))
        assert len(seen) == 8 + 1
        torch.testing.assert_close(last.x_adv, seen[-1][0], rtol=0, atol=0)
        torch.testing.assert_close(last.value, seen[-1][1], rtol=0, atol=0)
    torch.testing.assert_close(best.x_adv, again.x_adv, rtol=0, atol=0)  # same generator, same result


def test_the_clean_point_is_a_candidate():
    """An objective that peaks at x itself: PGD's iterates oscillate around it, the clean point wins."""
    x = torch.rand(5, 7) * 0.5 + 0.25
    x0 = x.clone()

    def peak(x_adv):
        return -((x_adv - x0) ** 2).sum(1)

    result = PGD(eps=0.1, steps=5, rel_step=0.7)(peak, x)
    torch.testing.assert_close(result.value, torch.zeros(5), rtol=0, atol=0)
    torch.testing.assert_close(result.x_adv, x, rtol=0, atol=0)
    last = PGD(eps=0.1, steps=5, rel_step=0.7, select="last")(peak, x)
    assert torch.all(last.value < 0)  # without the clean point the attack stays below it


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_an_explicit_start_is_projected_onto_the_threat_set(norm):
    x = torch.full((3, 4), 0.5)
    A = torch.eye(4)
    eps = 0.01
    start = x + 0.4  # far outside the ball
    result = PGD(eps=eps, norm=norm, steps=0, select="last")(representation_shift(linear_features(A), x), x, start=start)
    assert torch.all(_radius(result.x_adv, x, norm) <= eps * (1 + 1e-6))
    exact = eps * 2.0 if norm == "inf" else eps  # max ||d||_2 over the ball: sqrt(4) eps for L-inf
    assert torch.all(result.value <= exact * (1 + 1e-6))  # it reported 0.8 before the projection
    torch.testing.assert_close(result.value, torch.full((3,), exact), rtol=1e-5, atol=0)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_foolbox_projects_an_explicit_start_too(norm):
    x = torch.full((3, 4), 0.5)
    eps = 0.01
    attack = PGD(eps=eps, norm=norm, steps=0, select="last")
    result = foolbox_pgd(attack, representation_shift(linear_features(torch.eye(4)), x), x,
                         start=torch.full((3, 4), 0.4))
    assert torch.all(_radius(result.x_adv, x, norm) <= eps * (1 + 1e-6))


def test_watch_sees_every_evaluated_point():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
    split = split_model(net, torch.rand(2, 12))
    x = torch.rand(9, 12)
    y = torch.randint(0, 3, (9,))
    with frozen(split), torch.no_grad():
        g0 = split.features(x)
    watch = Watch(split.exact_head(), g0, labels=y, loss=cross_entropy)
    with frozen(split):
        objective, seen = _recording(loss_objective(split, cross_entropy, y, watch=watch))
        PGD(eps=0.2, steps=6, restarts=3)(objective, x)
        points = torch.stack([p for p, _ in seen])  # [evaluations, N, 12]
        with torch.no_grad():
            g = split.features(points.flatten(0, 1)).view(len(seen), 9, -1).double()
    W, b = net[3].weight.double(), net[3].bias.double()
    out = g @ W.T + b  # the exact head, float64
    assert watch.evaluations == len(seen) == 1 + 3 * 7
    assert watch.shift.dtype == torch.float64
    torch.testing.assert_close(watch.shift, (g - g0.double()).norm(dim=2).amax(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(watch.loss, torch.stack([cross_entropy(o, y) for o in out]).amax(0), rtol=1e-12, atol=1e-12)
    wrong = out.argmax(2) != y  # [evaluations, N]
    assert torch.equal(watch.fooled, wrong.any(0))
    assert bool(watch.fooled.any()) and not bool(watch.fooled.all())
    first = wrong.float().argmax(0)
    expected = torch.where(wrong.any(0), out.argmax(2).gather(0, first[None]).squeeze(0), y)
    assert torch.equal(watch.witness, expected)


def test_watch_witness_is_the_first_wrong_class():
    """Three classes, the head the identity: the point goes to class 1, then to class 2."""
    head = lambda g: g.double()  # noqa: E731
    watch = Watch(head, torch.tensor([[1.0, 0.0, 0.0]]), labels=torch.tensor([0]))
    for g in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]):
        watch.observe(torch.tensor([g]))
    assert watch.fooled.tolist() == [True] and watch.witness.tolist() == [1]
    assert watch.shift.tolist() == [pytest.approx(math.sqrt(2))]


def test_best_includes_the_final_iterate():
    """A linear objective with no random start: every step improves, so the final point is the best."""
    x = torch.full((2, 5), 0.5, dtype=torch.float64)
    result = PGD(eps=0.1, steps=3, rel_step=0.25, random_start=False)(lambda t: t.sum(1), x)
    torch.testing.assert_close(result.value, torch.full((2,), 5 * (0.5 + 0.075), dtype=torch.float64))


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_pinned_to_foolbox(norm):
    """foolbox's LinfPGD / L2PGD and asbound's PGD agree step for step from the same start."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8)).double()
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64) * 0.8 + 0.1
    eps = 8 / 255 if norm == "inf" else 0.5
    attack = PGD(eps=eps, norm=norm, steps=10, rel_step=0.7, select="last")
    start = x + attack.geometry.random_start(x, eps, torch.Generator().manual_seed(0))
    with frozen(net):
        for objective in (representation_shift(net, x), loss_objective(net[:], lambda o, y: cross_entropy(o, y), torch.arange(5) % 8)):
            ours = attack(objective, x, start=start).x_adv
            theirs = foolbox_pgd(attack, objective, x, start=start - x).x_adv
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_foolbox_honours_seed_and_restarts():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(), nn.Linear(16, 6))
    x = torch.rand(16, 3, 8, 8)
    objective = representation_shift(net, x)

    def run(restarts, seed):
        attack = PGD(eps=8 / 255, steps=3, restarts=restarts)
        return foolbox_pgd(attack, objective, x, generator=torch.Generator().manual_seed(seed))

    with frozen(net):
        a, b, other = run(1, 0), run(1, 0), run(1, 1)
        four = run(4, 0)
    torch.testing.assert_close(a.x_adv, b.x_adv, rtol=0, atol=0)  # same seed, same result
    assert not torch.equal(a.x_adv, other.x_adv)  # another seed, other starts
    assert torch.all(four.value >= a.value) and torch.any(four.value > a.value)  # restart 0 is the same
    with frozen(net), torch.no_grad():
        torch.testing.assert_close(four.value, (net(four.x_adv) - net(x)).norm(dim=1))


def test_invalid_settings_are_config_errors():
    for kwargs in ({"eps": 1.5}, {"eps": -0.1}, {"eps": 0.1, "steps": -1}, {"eps": 0.1, "norm": "1"},
                   {"eps": 0.1, "restarts": 0}, {"eps": 0.1, "rel_step": 0.0}, {"eps": float("nan")}):
        with pytest.raises(ConfigError):
            PGD(**kwargs)


def test_l2_random_start_is_uniform_in_the_ball():
    x = torch.zeros(4000, 3)
    delta = PGD(eps=1.0, norm="2").geometry.random_start(x, 1.0, torch.Generator().manual_seed(0))
    r = delta.norm(dim=1).numpy()
    assert r.max() <= 1.0 + 1e-6
    # P(r <= t) = t^3 in three dimensions
    for t in (0.5, 0.8):
        assert abs(np.mean(r <= t) - t**3) < 0.03


def test_a_training_attack_asking_for_the_point_only_skips_the_last_evaluation():
    """``value=False`` (the training attacks): the same point, one objective evaluation fewer."""
    from asbound.attacks import PGD

    torch.manual_seed(0)
    w = torch.randn(4, 3)
    x = torch.rand(5, 4)
    calls = []

    def objective(z):
        calls.append(1)
        return (z @ w).square().sum(1)

    pgd = PGD(eps=0.1, norm="inf", steps=3, rel_step=0.25, random_start=True, select="last")
    full = pgd(objective, x, generator=torch.Generator().manual_seed(2))
    n_full, calls[:] = len(calls), []
    point = pgd(objective, x, generator=torch.Generator().manual_seed(2), value=False)
    assert torch.equal(point.x_adv, full.x_adv) and point.value is None
    assert (n_full, len(calls)) == (4, 3)
    best = PGD(eps=0.1, norm="inf", steps=3, rel_step=0.25, select="best")(objective, x, value=False)
    assert best.value is not None  # "best" needs the values to choose


# --- Auto-PGD and the fast (low-precision / compiled) gradient path ---------------------------


def test_apgd_checkpoints_are_croce_and_hein_s():
    from asbound.attacks import APGD

    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (1.05 is past the end): w_j = ceil(p_j N)
    assert APGD(eps=0.1, steps=100).checkpoints() == [22, 41, 57, 70, 80, 87, 93, 99]
    assert APGD(eps=0.1, steps=10).checkpoints() == [3, 5, 6, 7, 8, 9]
    assert APGD(eps=0.1, steps=1).checkpoints() == []


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_apgd_evaluates_only_points_of_the_threat_set_and_returns_the_best(norm):
    from asbound.attacks import APGD

    torch.manual_seed(5)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 6))
    x = torch.rand(9, 3, 6, 6)
    eps = 0.15
    with frozen(net):
        objective, seen = _recording(representation_shift(net, x))
        result = APGD(eps=eps, norm=norm, steps=12, restarts=2)(objective, x)
    assert len(seen) == 1 + 2 * (12 + 1)  # the clean point, and per restart every step and the last point
    for x_adv, _ in seen:
        assert torch.all(_radius(x_adv, x, norm) <= eps * (1 + 1e-6))
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    best = torch.stack([v for _, v in seen]).max(0).values
    torch.testing.assert_close(result.value, best)
    with torch.no_grad():
        torch.testing.assert_close(result.value, (net(result.x_adv) - net(x)).norm(dim=1))


def test_apgd_halves_the_step_and_restarts_from_the_best_point():
    from asbound.attacks import APGD

    # a concave objective peaking inside the ball: every full step of 2 eps overshoots, so the
    # step halves at checkpoints and the iterates close in on the peak (PGD's fixed step cannot)
    x = torch.full((1, 4), 0.5, dtype=torch.float64)
    peak = x + torch.tensor([[0.03, -0.02, 0.01, 0.0]], dtype=torch.float64)
    objective = lambda z: -((z - peak) ** 2).sum(1)  # noqa: E731
    start = x + 0.05
    apgd = APGD(eps=0.05, steps=60)(objective, x, start=start)
    pgd = PGD(eps=0.05, steps=60, rel_step=2.0)(objective, x, start=start)
    assert float(apgd.value) > -1e-6
    assert float(apgd.value) > float(pgd.value)


def test_apgd_settings_are_checked():
    from asbound.attacks import APGD

    with pytest.raises(ConfigError, match="select"):
        APGD(eps=0.1, select="last")
    with pytest.raises(ConfigError, match="momentum"):
        APGD(eps=0.1, momentum=1.5)


@pytest.mark.parametrize("attack_name", ["pgd", "apgd", "nystrom"])
def test_fast_gradients_keep_every_reported_value_float32(attack_name):
    from asbound.attacks import ATTACKS, FastObjective

    torch.manual_seed(6)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 6)).eval()
    x = torch.rand(5, 3, 6, 6)
    head = nn.Linear(6, 3).double()
    with frozen(net):
        g0 = net(x)
        watch = Watch(head, g0)
        exact = representation_shift(net, x, g0, watch=watch)
        fast = FastObjective(representation_shift(net, x, g0), torch.bfloat16, "cpu")
        result = ATTACKS[attack_name](eps=0.1, steps=6, restarts=2)(exact, x, fast=fast, clean_value=torch.zeros(5))
        with torch.no_grad():
            recomputed = (net(result.x_adv) - g0).norm(dim=1)
    assert result.value.dtype == torch.float32
    torch.testing.assert_close(result.value, recomputed, rtol=0, atol=0)  # the float32 value at the kept point
    # the watch saw only float32 evaluations: the kept point of each restart (not the bf16 steps)
    assert watch.evaluations == 2
    torch.testing.assert_close(watch.shift, result.value.double(), rtol=1e-5, atol=1e-7)  # the best kept point


def test_fast_objective_runs_under_autocast_and_returns_float32():
    from asbound.attacks import FastObjective

    seen = []

    def objective(z):
        y = torch.nn.functional.linear(z, torch.ones(2, 3))
        seen.append(y.dtype)
        return y.sum(1)

    value = FastObjective(objective, torch.bfloat16, "cpu")(torch.rand(4, 3))
    assert seen == [torch.bfloat16] and value.dtype == torch.float32
    assert FastObjective(objective, None, "cpu")(torch.rand(4, 3)).dtype == torch.float32 and seen[-1] == torch.float32



# --- the Nystrom attack: a model of J^T J from every step's gradient ----------------------------

from asbound.attacks import APGD as _APGD, Nystrom as _Nystrom  # noqa: E402 - the originals, for the wrappers

APGD_RUN, MODEL_STEP = _APGD._run_once, _Nystrom._model_step


def test_nystrom_finds_the_top_singular_vector_of_a_linear_map_exactly():
    """g(x) = A x, L2, the box not binding: the optimum is eps * sigma_max at x + eps v_1 (v_1 the
    top right singular vector). Each step's gradient gives A^T A d, so after rank(A) = 5 steps
    the model is A^T A itself and its top eigenvector is the next point."""
    from asbound.attacks import Nystrom

    torch.manual_seed(7)
    A = torch.randn(5, 12, dtype=torch.float64)
    x = torch.full((3, 12), 0.5, dtype=torch.float64)
    eps = 0.1
    objective, seen = _recording(representation_shift(linear_features(A), x))
    result = Nystrom(eps=eps, norm="2", steps=7, tail=1)(objective, x, generator=torch.Generator().manual_seed(1))
    _, S, Vh = torch.linalg.svd(A)
    torch.testing.assert_close(result.value, (eps * S[0]).expand(3), rtol=1e-9, atol=0)
    cosine = ((result.x_adv - x) @ Vh[0]) / eps
    torch.testing.assert_close(cosine.abs(), torch.ones(3, dtype=torch.float64), rtol=1e-9, atol=0)
    # reached by the 6th pass at the latest: the model's step after 5 points, where the model is exact
    torch.testing.assert_close(seen[6][1], (eps * S[0]).expand(3), rtol=1e-9, atol=0)
    # the start is far from it: the steps found it
    assert float(seen[1][1].max()) < float(eps * S[0]) * 0.99


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_nystrom_evaluates_only_points_of_the_threat_set_and_keeps_the_best(norm):
    from asbound.attacks import Nystrom

    torch.manual_seed(8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 6))
    x = torch.rand(9, 3, 6, 6)
    x[:, 0] = 0.0  # coordinates with room on one side only
    x[:, 1, :2] = 1.0
    eps = 0.15 if norm == "inf" else 1.0
    with frozen(net):
        objective, seen = _recording(representation_shift(net, x))
        result = Nystrom(eps=eps, norm=norm, steps=8, restarts=2)(objective, x)
    assert len(seen) == 1 + 2 * (8 + 1)  # the clean point, and per restart every step and the last point
    for x_adv, _ in seen:
        assert torch.all(_radius(x_adv, x, norm) <= eps * (1 + 1e-6))
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    values = torch.stack([v for _, v in seen])
    torch.testing.assert_close(result.value, values.max(0).values, rtol=0, atol=0)
    for i, k in enumerate(values.argmax(0).tolist()):
        torch.testing.assert_close(result.x_adv[i], seen[k][0][i], rtol=0, atol=0)
    with torch.no_grad():  # the value is the float32 objective at the kept point
        assert result.value.dtype == torch.float32
        torch.testing.assert_close(result.value, (net(result.x_adv) - net(x)).norm(dim=1), rtol=0, atol=0)


def test_nystrom_is_at_least_as_strong_as_its_start_and_the_model_steps_add():
    """The first point is the random vertex (``random_vertex``); a later point is kept only where it
    is better, so the result is never below the start or any other point, even where the steps go
    downhill (an oscillating g); on a ReLU net the model's steps beat the start everywhere."""
    from asbound.attacks import Nystrom

    torch.manual_seed(9)
    W = torch.randn(48, 8)
    wavy = lambda z: torch.sin(60 * z) @ W  # noqa: E731
    x = torch.rand(64, 48)
    attack = Nystrom(eps=0.1, steps=4)
    objective, seen = _recording(representation_shift(wavy, x))
    result = attack(objective, x, generator=torch.Generator().manual_seed(3))
    start = x + attack.random_vertex(x, torch.Generator().manual_seed(3)).view_as(x)
    torch.testing.assert_close(seen[1][0], start, rtol=0, atol=0)  # the first point after the clean one
    values = torch.stack([v for _, v in seen])
    assert bool((seen[-1][1] < values[:-1].max(0).values).any())  # the last point is not the best somewhere ...
    assert torch.all(result.value >= seen[1][1])  # ... the result is never below the start
    torch.testing.assert_close(result.value, values.max(0).values, rtol=0, atol=0)  # nor below any point
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 8))
    with frozen(net):
        objective, seen = _recording(representation_shift(net, x))
        result = Nystrom(eps=0.1, steps=6)(objective, x, generator=torch.Generator().manual_seed(3))
    assert torch.all(result.value > seen[1][1] * 1.05)


def test_nystrom_start_moves_one_sided_coordinates_sparsely_and_the_others_up():
    from asbound.attacks import Nystrom

    x = torch.cat([torch.zeros(1, 4000), torch.ones(1, 4000), torch.full((1, 4000), 0.5)], 1).double()
    eps = 0.125
    d = Nystrom(eps=eps, one_sided=0.25, upper=0.75).random_vertex(x, torch.Generator().manual_seed(0))
    at0, at1, mid = d[0, :4000], d[0, 4000:8000], d[0, 8000:]
    assert set(at0.tolist()) == {0.0, eps} and abs(float((at0 > 0).float().mean()) - 0.25) < 0.03
    assert set(at1.tolist()) == {0.0, -eps} and abs(float((at1 < 0).float().mean()) - 0.25) < 0.03
    assert set(mid.tolist()) == {-eps, eps} and abs(float((mid > 0).float().mean()) - 0.75) < 0.03


def test_nystrom_is_deterministic_under_a_seed():
    from asbound.attacks import Nystrom

    torch.manual_seed(10)
    net = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.rand(6, 20)
    with frozen(net):
        objective = representation_shift(net, x)
        runs = [Nystrom(eps=0.2, steps=6, restarts=2)(objective, x, generator=torch.Generator().manual_seed(s))
                for s in (4, 4, 5)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv) and torch.equal(runs[0].value, runs[1].value)
    assert not torch.equal(runs[0].x_adv, runs[2].x_adv)


def test_nystrom_without_a_random_start_stays_at_x():
    from asbound.attacks import Nystrom

    A = torch.randn(3, 4)
    x = torch.full((2, 4), 0.5)
    for norm in ("inf", "2"):
        still = Nystrom(eps=0.1, norm=norm, steps=5, random_start=False)(representation_shift(linear_features(A), x), x)
        torch.testing.assert_close(still.x_adv, x, rtol=0, atol=0)
        torch.testing.assert_close(still.value, torch.zeros(2), rtol=0, atol=0)


def test_nystrom_runs_apgd_on_any_other_objective(monkeypatch):
    """The model needs an objective that vanishes with its gradient at x; a loss does not."""
    from asbound.attacks import APGD, Nystrom

    runs, steps = [], []
    monkeypatch.setattr(APGD, "_run_once", lambda self, *a, **k: runs.append(type(self)) or APGD_RUN(self, *a, **k))
    monkeypatch.setattr(Nystrom, "_model_step", lambda self, *a: steps.append(1) or MODEL_STEP(self, *a))
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.rand(5, 10), torch.tensor([0, 1, 2, 0, 1])
    objective = loss_objective(net, cross_entropy, y)
    with frozen(net):
        ours = Nystrom(eps=0.1, steps=5, restarts=2)(objective, x, generator=torch.Generator().manual_seed(1))
        apgd = APGD(eps=0.1, steps=5, restarts=2)(objective, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.x_adv, apgd.x_adv) and torch.equal(ours.value, apgd.value)
    assert runs == [APGD] * 4 and steps == []  # two restarts each, none of them Nystrom's
    assert representation_shift(net, x).vanishes_at_x and not getattr(objective, "vanishes_at_x", False)
    with frozen(net):
        Nystrom(eps=0.1, steps=5)(representation_shift(net, x), x)
    assert steps and runs == [APGD] * 4  # and on the shift its own model


def test_nystrom_settings_are_checked():
    from asbound.attacks import Nystrom

    with pytest.raises(ConfigError, match="select"):
        Nystrom(eps=0.1, select="last")
    with pytest.raises(ConfigError, match="tail"):
        Nystrom(eps=0.1, tail=-1)
    with pytest.raises(ConfigError, match="one_sided"):
        Nystrom(eps=0.1, one_sided=1.5)


def test_nystrom_model_steps_never_revisit_a_point():
    """Once the sign iteration of the model settles on a visited vertex, the step goes to the best
    unvisited one: on a linear map in L-inf no vertex is evaluated twice."""
    from asbound.attacks import Nystrom

    torch.manual_seed(12)
    A = torch.randn(3, 6, dtype=torch.float64)
    x = torch.full((4, 6), 0.5, dtype=torch.float64)
    objective, seen = _recording(representation_shift(linear_features(A), x))
    Nystrom(eps=0.05, steps=12, tail=0)(objective, x, generator=torch.Generator().manual_seed(2))
    points = torch.stack([p for p, _ in seen[1:-1]], 1)  # [N, 12 passes, 6]
    for i in range(len(x)):
        assert len({tuple(row) for row in points[i].tolist()}) == 12
