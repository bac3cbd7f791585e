"""PGD against closed-form oracles, its invariants, and foolbox as the reference semantics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from asbound.attacks import PGD, foolbox_pgd, loss_objective, representation_shift
from asbound.errors import ConfigError
from asbound.losses import cross_entropy
from asbound.models import frozen


def linear_features(A: torch.Tensor):
    """``g(x) = A x`` on flattened inputs."""
    return lambda x: x.flatten(1) @ A.T


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


def test_linf_as_score_is_the_best_vertex_of_the_cube():
    torch.manual_seed(1)
    d = 6
    A = torch.randn(3, d, dtype=torch.float64)
    x = torch.full((2, d), 0.5, dtype=torch.float64)
    eps = 0.05
    vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64)
    exact = (eps * vertices @ A.T).norm(dim=1).max()  # a convex function peaks at a vertex
    attack = PGD(eps=eps, norm="inf", steps=50, rel_step=0.7, restarts=8)
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
    delta = (result.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "inf" else delta.norm(dim=1)
    assert torch.all(size <= eps + 1e-6)
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


def test_same_generator_same_result_and_best_beats_last():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 4))
    x = torch.rand(6, 10)
    objective = representation_shift(net, x)
    with frozen(net):
        a = PGD(eps=0.3, steps=8, rel_step=1.0)(objective, x, generator=torch.Generator().manual_seed(5))
        b = PGD(eps=0.3, steps=8, rel_step=1.0)(objective, x, generator=torch.Generator().manual_seed(5))
        last = PGD(eps=0.3, steps=8, rel_step=1.0, select="last")(objective, x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.x_adv, b.x_adv)
    assert torch.all(a.value >= last.value - 1e-7)


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
            theirs = foolbox_pgd(attack, objective, x, start=start - x)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


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
