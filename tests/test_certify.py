"""Certified sensitivity: on random small networks of every supported layer type and both norms,
PGD's estimate and densely sampled points never exceed ``s_upper``, on every datapoint; the closed
forms on linear representations (and through residual branches); certified implies robust;
unsupported modules are named. The graph that is bounded is the network that is scored: hooks,
random draws and in-place operations whose old value is read again (through aliases too) are
refused, and every run checks itself (graph against network, the bound at the attacks' points,
the records against the bound) and stops, naming the point, where a check fails."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from asbound.attacks import PGD, representation_shift
from asbound.certify import METHODS, OUTPUT_BOXES, Bounder, crown_box, sensitivity_upper
from asbound.cli import main
from asbound.errors import ModelError
from asbound.models.loaders import Normalize


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class ViewFlatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


def _bn_stats(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            if m.weight.data.min() >= 0:  # (_negative_bn's scales stay)
                m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval().double()


class Arith(nn.Module):
    """Every constant operation and branch CROWN follows: a one-channel input broadcast to three by
    the normalisation, an in-place ReLU, constant minus box, a negative factor, a residual
    subtraction and a constant that broadcasts each coordinate to three."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = Normalize((0.5, 0.4, 0.3), (0.5, 0.25, 0.2))
        self.l1, self.l2 = nn.Linear(36, 8), nn.Linear(8, 8)
        self.register_buffer("c", torch.tensor([[[-1.5, 0.5, 2.0]]]))

    def forward(self, x):
        h = torch.nn.functional.relu(self.l1(self.norm(x).flatten(1)), inplace=True)
        h = (0.3 - h) * -2.0 + 0.1
        h = torch.relu(self.l2(h) - h)
        return (h.unsqueeze(-1) * self.c).flatten(1)


def _negative_bn(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.weight.data = torch.linspace(-1.5, 1.2, m.num_features, dtype=m.weight.dtype)
    return net


NETS = {
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 5)),
    # a chain (the operator-norm bound applies) with negative batch-norm scales
    "negbn": lambda: _negative_bn(nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                                nn.Linear(8, 5))),
    # a chain whose normalisation broadcasts one channel to three (operator norm times sqrt(3))
    "broadcast": lambda: nn.Sequential(Normalize((0.5, 0.4, 0.3), (0.5, 0.5, 0.5)), nn.Flatten(), nn.Linear(36, 4)),
    "arith": Arith,
    "conv": lambda: nn.Sequential(Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)), nn.Conv2d(3, 4, 3, padding=1),
                                  nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), ViewFlatten(), nn.Linear(16, 6)),
    "residual": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=1, padding=1), Residual(4), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten()),
}
SHAPES = {"mlp": (1, 2, 6), "negbn": (1, 2, 6), "broadcast": (1, 2, 6), "arith": (1, 2, 6), "conv": (3, 4, 4),
          "residual": (3, 4, 4)}


def _ball_samples(x: torch.Tensor, eps: float, norm: str, k: int, gen: torch.Generator) -> torch.Tensor:
    """k points of B(x, eps) ∩ [0, 1]^d per datapoint (clamping never leaves the ball: it moves
    each coordinate toward x)."""
    n, shape = x.shape[0], x.shape[1:]
    if norm == "inf":
        d = (torch.rand((k, n, *shape), generator=gen, dtype=x.dtype) * 2 - 1).sign() * eps  # cube vertices
        d[: k // 2] = (torch.rand((k // 2, n, *shape), generator=gen, dtype=x.dtype) * 2 - 1) * eps
    else:
        d = torch.randn((k, n, *shape), generator=gen, dtype=x.dtype)
        d = d / d.flatten(2).norm(dim=2).view(k, n, *([1] * len(shape))) * eps
    return (x + d).clamp(0, 1)


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("method", METHODS)
def test_no_attack_and_no_sample_exceeds_the_certified_bound(name, norm, method):
    torch.manual_seed(0)
    net = _bn_stats(NETS[name]())
    x = torch.rand((6, *SHAPES[name]), dtype=torch.float64)
    x[0] = 0.0  # a corner: the box clips the ball
    eps = 0.05 if norm == "inf" else 0.2
    out = sensitivity_upper(Bounder(net), x, eps, norm, method=method)
    bound = out["s_upper"] if method == "ibp" else out[f"s_{method.replace('-', '_')}"]
    if method != "ibp":  # CROWN's box is intersected with IBP's: never looser
        assert torch.all(bound <= out["s_ibp"]) and torch.all(out["s_upper"] <= bound)
    g0 = net(x).flatten(1)
    result = PGD(eps=eps, norm=norm, steps=60, rel_step=0.5, restarts=4)(representation_shift(
        lambda z: net(z).flatten(1), x, g0), x, generator=torch.Generator().manual_seed(1))
    assert torch.all(result.value <= bound), (result.value, bound)
    samples = _ball_samples(x, eps, norm, 400, torch.Generator().manual_seed(2))
    with torch.no_grad():
        shifts = (net(samples.flatten(0, 1)).flatten(1).view(400, len(x), -1) - g0).norm(dim=2)
    assert torch.all(shifts.max(0).values <= bound)
    assert torch.all(bound < math.inf) and torch.all(bound > 0)


def test_the_bounds_forward_is_the_network():
    torch.manual_seed(3)
    for name, make in NETS.items():
        net = _bn_stats(make())
        x = torch.rand((3, *SHAPES[name]), dtype=torch.float64)
        box = Bounder(net)(x, x)
        torch.testing.assert_close(box.lo, net(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(box.hi, net(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_a_linear_representation_and_an_l2_ball_give_eps_sigma_max_exactly(method):
    """Every method keeps the exact ``eps sigma_max(A)`` on a linear map and an interior L2 ball
    (the operator norm; a method's own bound is above it, never below)."""
    torch.manual_seed(4)
    A = torch.randn(5, 12, dtype=torch.float64)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False)).double()
    net[1].weight.data = A.clone()
    x = torch.full((3, 1, 3, 4), 0.5, dtype=torch.float64)
    eps = 0.1
    out = sensitivity_upper(Bounder(net), x, eps, "2", method=method)
    exact = eps * float(torch.linalg.matrix_norm(A, ord=2))
    torch.testing.assert_close(out["s_upper"], torch.full((3,), exact, dtype=torch.float64), rtol=1e-8, atol=0)
    assert torch.all(out["s_upper"] >= exact)
    # L-inf: the IBP box bound is eps ||(|A| 1)||_2, at least the best vertex of the cube
    inf = sensitivity_upper(Bounder(net), x, eps, "inf", method=method)
    ibp = eps * float((A.abs() @ torch.ones(12, dtype=torch.float64)).norm())
    torch.testing.assert_close(inf["s_ibp"], torch.full((3,), ibp, dtype=torch.float64), rtol=1e-8, atol=0)
    assert float(inf["s_upper"][0]) == pytest.approx(min(ibp, exact / eps * eps * math.sqrt(12)), rel=1e-8)


def test_crown_is_exact_per_coordinate_on_a_linear_representation_where_ibp_is_not():
    # g = W2 (W1 x + b1) + b2, an interior L-inf ball: max g_j - g_j(x) = eps ||(W2 W1)_j||_1 exactly;
    # IBP bounds it by eps (|W2| |W1| 1)_j, which is larger when signs cancel
    torch.manual_seed(6)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Linear(7, 4)).double()
    x = torch.full((2, 1, 3, 4), 0.5, dtype=torch.float64)
    eps = 0.01
    W = net[2].weight.detach() @ net[1].weight.detach()
    box = crown_box(Bounder(net), x, eps, "inf")
    g = net(x)
    torch.testing.assert_close(box.hi - g, eps * W.abs().sum(1).expand(2, 4), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g - box.lo, eps * W.abs().sum(1).expand(2, 4), rtol=1e-10, atol=1e-14)
    out = sensitivity_upper(Bounder(net), x, eps, "inf", method="crown")
    exact = eps * float(W.abs().sum(1).norm())
    torch.testing.assert_close(out["s_crown"], torch.full((2,), exact, dtype=torch.float64), rtol=1e-8, atol=0)
    ibp = eps * float((net[2].weight.abs() @ net[1].weight.abs()).sum(1).norm())
    assert exact < ibp and float(out["s_ibp"][0]) == pytest.approx(ibp, rel=1e-8)


def test_crown_is_tighter_than_ibp_on_a_random_relu_network():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 8)).double().eval()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    out = sensitivity_upper(Bounder(net), x, 0.05, "inf", method="crown-ibp")
    assert float(out["s_crown_ibp"].mean()) < 0.6 * float(out["s_ibp"].mean())  # measured: about 0.3
    est = PGD(eps=0.05, steps=100, restarts=5)(representation_shift(net, x), x).value
    assert torch.all(est <= out["s_crown_ibp"])


def test_unsupported_modules_are_named():
    with pytest.raises(ModelError, match="module type Tanh is not supported"):
        Bounder(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    with pytest.raises(ModelError, match="module type MultiheadAttention|cannot be traced"):
        Bounder(nn.Sequential(nn.MultiheadAttention(4, 2)))

    class Max(nn.Module):
        def forward(self, x):
            return torch.maximum(x, -x)

    with pytest.raises(ModelError, match="function (neg|maximum) is not supported on the representation"):
        Bounder(Max())(torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(ModelError, match="function (neg|maximum) is not supported on the representation"):
        sensitivity_upper(Bounder(Max()), torch.full((1, 2), 0.5), 0.1, "inf", method="crown")
    with pytest.raises(ModelError, match="certify method 'lp' is not valid; valid: ibp, crown-ibp, crown$"):
        sensitivity_upper(Bounder(nn.Linear(2, 2)), torch.full((1, 2), 0.5), 0.1, "inf", method="lp")


@pytest.mark.parametrize("arch", ["wrn", "preact", "resnet"])
def test_robustbench_architectures_are_certified_soundly(arch):
    from asbound._compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.resnet import PreActResNet18, ResNet18
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    from asbound.models import split_model

    torch.manual_seed(5)
    net = {"wrn": lambda: WideResNet(depth=10, widen_factor=1), "preact": PreActResNet18, "resnet": ResNet18}[arch]()
    net = _bn_stats(net)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    split = split_model(net.float(), x.float())
    backbone = split.backbone.double()
    eps = 1 / 255
    # CROWN-IBP through ResNet-18 / PreActResNet-18 takes minutes per point on 2 CPU cores: IBP there in CI
    # (full CROWN, hours: score falls back to crown-ibp there, test_full_crown_over_its_budget_falls_back)
    method = "crown-ibp" if arch == "wrn" else "ibp"
    out = sensitivity_upper(Bounder(backbone), x, eps, "inf", method=method)
    bound = out["s_upper"]
    g0 = backbone(x).flatten(1)
    est = PGD(eps=eps, norm="inf", steps=5, rel_step=0.7)(representation_shift(
        lambda z: backbone(z).flatten(1), x, g0), x, generator=torch.Generator().manual_seed(0))
    assert torch.all(est.value <= bound) and torch.all(torch.isfinite(bound))
    if method == "crown-ibp":
        assert torch.all(est.value <= out["s_crown_ibp"]) and torch.all(out["s_crown_ibp"] <= out["s_ibp"])


def test_score_certify_records_and_certified_implies_robust(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["score", "--model", "builtin:digits-adversarial", "--data", "digits", "--classes", "0-4", "--eps", "1/255",
            "--n", "60", "--steps", "10", "--certify", "ibp", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "prop. certified (s_upper < m)" in capsys.readouterr().out
    import pandas as pd

    pts = pd.read_csv(out / "points.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert (pts["sensitivity"] <= pts["s_upper"] * (1 + 1e-5)).all()  # float32 attacks against the exact bound
    certified = pts["certified"].astype(bool)
    assert certified.any() and pts.loc[certified, "robust"].astype(bool).all()
    assert (pts.loc[certified, "s_upper"] < pts.loc[certified, "margin"]).all()
    assert certified.sum() <= pts["fulfilled"].astype(bool).sum()  # a certificate is at least as strict
    assert summary["rhs_certified"] == pytest.approx(pts["s_upper"].mean())
    assert summary["prop_certified"] == pytest.approx(certified.mean())
    assert summary["tightness"] == pytest.approx(pts["s_upper"].mean() / pts["sensitivity"].mean())
    assert summary["lemma1_certified"] and summary["lhs"] <= summary["rhs_certified"]
    assert json.loads((out / "config.json").read_text())["certify"] == "ibp"


def test_certify_bad_input_is_one_line(tmp_path, capsys):
    assert main(["score", "--model", "builtin:digits-adversarial", "--data", "digits", "--certify", "lp",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'lp' (choose from 'ibp', 'crown-ibp', 'crown')" in err and err.count("\n") == 1


def test_constant_arithmetic_bounds_every_sample():
    class Arith(nn.Module):
        def forward(self, x):
            y = (1.0 - x) * -2.0 + 0.5
            return (y / 4).relu() - x.mul(3.0)

    net = Arith()
    lo, hi = torch.tensor([[0.1, 0.4, 0.0]], dtype=torch.float64), torch.tensor([[0.3, 0.9, 1.0]], dtype=torch.float64)
    box = Bounder(net)(lo, hi)
    assert torch.all(box.lo <= box.hi)
    z = lo + torch.rand(2000, 3, dtype=torch.float64) * (hi - lo)
    out = net(z)
    assert torch.all(out >= box.lo - 1e-12) and torch.all(out <= box.hi + 1e-12)
    # the interval is exact at the ends of a monotone coordinate
    torch.testing.assert_close(Bounder(net)(lo, lo).lo, net(lo))


def test_a_constant_minus_a_box_flips_its_ends():
    class Flip(nn.Module):
        def forward(self, x):
            return 1.0 - x

    lo, hi = torch.tensor([[0.1, 0.4]], dtype=torch.float64), torch.tensor([[0.3, 0.9]], dtype=torch.float64)
    box = Bounder(Flip())(lo, hi)
    torch.testing.assert_close(box.lo, 1.0 - hi)
    torch.testing.assert_close(box.hi, 1.0 - lo)


def _jacobian_norm(net: nn.Module, x: torch.Tensor) -> float:
    """The exact L2 operator norm of a linear representation (its Jacobian's largest singular value)."""
    J = torch.autograd.functional.jacobian(lambda z: net(z.view(1, *x.shape[1:])).flatten(), x[:1].flatten())
    return float(torch.linalg.matrix_norm(J, ord=2))


@pytest.mark.parametrize("make,channels", [
    (lambda: nn.Sequential(Normalize((0.5, 0.4, 0.3), (0.5, 0.25, 0.2)), nn.Flatten(), nn.Linear(48, 4)), 3),
    # one channel in, three out: each pixel is copied three times
    (lambda: nn.Sequential(Normalize((0.5, 0.4, 0.3), (0.25, 0.25, 0.25)), nn.Flatten(), nn.Linear(48, 4)), 1),
    (lambda: _negative_bn(nn.Sequential(nn.Flatten(), nn.Linear(48, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))), 3),
], ids=["normalise", "normalise-broadcast", "negative-bn"])
def test_the_operator_norm_bound_is_at_least_the_exact_norm_of_a_linear_chain(make, channels):
    torch.manual_seed(3)
    net = _bn_stats(make())
    x = torch.rand(2, channels, 4, 4, dtype=torch.float64)
    bounder = Bounder(net)
    lip = bounder.lipschitz(bounder.boxes(x, x))
    assert math.isfinite(lip) and lip >= _jacobian_norm(net, x) * (1 - 1e-12)


def test_a_branching_representation_has_no_operator_norm_bound():
    class LinearResidual(nn.Module):  # x + A x: ||I + A|| is not ||A||
        def __init__(self):
            super().__init__()
            self.flat, self.lin = nn.Flatten(), nn.Linear(6, 6, bias=False)

        def forward(self, x):
            z = self.flat(x)
            return z + self.lin(z)

    torch.manual_seed(0)
    net = LinearResidual().double()
    net.lin.weight.data = 0.5 * torch.eye(6, dtype=torch.float64) + 0.05 * torch.randn(6, 6, dtype=torch.float64)
    x = torch.full((1, 1, 2, 3), 0.5, dtype=torch.float64)
    bounder = Bounder(net)
    assert bounder.lipschitz(bounder.boxes(x, x)) >= _jacobian_norm(net, x)


def test_crown_on_an_l2_ball_inside_the_box_is_the_exact_coordinate_bound():
    """Linear coordinates over an L2 ball that the box does not cut: max a.x' = a.x + eps ||a||_2."""
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()).double()
    x = torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64)
    eps = 0.1
    J = torch.autograd.functional.jacobian(lambda z: net(z.view(1, 3, 4, 4)).flatten(), x[:1].flatten())
    box = crown_box(Bounder(net), x, eps, "2")
    g = net(x).flatten(1)
    torch.testing.assert_close(box.hi, g + eps * J.norm(dim=1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(box.lo, g - eps * J.norm(dim=1), rtol=1e-10, atol=1e-12)


def test_crown_at_a_corner_of_the_domain_bounds_mixed_signs():
    """At x = 0 the box is [0, eps]: the ball term must be centred on x, not on the box's middle."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2, bias=False)).double()
    net[1].weight.data = torch.tensor([[1.0] + [-1.0] * 11, [-1.0] * 6 + [1.0] * 6], dtype=torch.float64)
    x, eps = torch.zeros(1, 1, 3, 4, dtype=torch.float64), 0.3
    box = crown_box(Bounder(net), x, eps, "2")
    W = net[1].weight
    exact = eps * W.clamp(min=0).norm(dim=1)  # max of w.x' over {x' >= 0, ||x'|| <= eps}: the positive part
    assert torch.all(box.hi[0] >= exact * (1 - 1e-12))
    assert torch.all(box.lo[0] <= -eps * (-W).clamp(min=0).norm(dim=1) * (1 - 1e-12))


def test_crown_is_exact_on_affine_constant_arithmetic():
    """An affine map of the box is bounded exactly (f(mid) +- |J| rad) through every constant operation."""

    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 3), nn.Linear(3, 3)
            self.register_buffer("c", torch.tensor([0.5, -2.0, 3.0]))

        def forward(self, x):
            h = (0.3 - self.l1(x)) * -2.0 + 0.1
            h = self.l2(h) - h
            h = h.mul(self.c) - 1.0
            return (h / 4).sub(self.c) + torch.tensor(0.25)

    torch.manual_seed(2)
    net = Affine().double()
    x, eps = torch.full((2, 4), 0.5, dtype=torch.float64), 0.1
    x[1] = torch.tensor([0.2, 0.7, 0.05, 0.95])  # the box is cut at 0 and 1
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    J = torch.autograd.functional.jacobian(lambda z: net(z.view(1, 4)).flatten(), x[0])
    box = crown_box(Bounder(net), x, eps, "inf")
    torch.testing.assert_close(box.hi, net(mid) + rad @ J.abs().T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(box.lo, net(mid) - rad @ J.abs().T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inplace_module", [False, True])
def test_an_in_place_relu_does_not_change_the_bounds_of_its_input(inplace_module):
    class Abs(nn.Module):  # |x - 0.5| = relu(x - 0.5) + relu(0.5 - x)
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.act = nn.Linear(1, 2), nn.Linear(2, 1, bias=False), nn.ReLU(inplace=True)
            self.l1.weight.data, self.l1.bias.data = torch.tensor([[1.0], [-1.0]]), torch.tensor([-0.5, 0.5])
            self.l2.weight.data = torch.ones(1, 2)

        def forward(self, x):
            z = self.l1(x)
            return self.l2(self.act(z) if inplace_module else torch.nn.functional.relu(z, inplace=True))

    net = Abs().double()
    out = sensitivity_upper(Bounder(net), torch.tensor([[0.5]], dtype=torch.float64), 0.1, "inf", method="crown")
    assert float(out["s_upper"][0]) >= 0.1  # |g(0.6) - g(0.5)| = 0.1


def test_arithmetic_with_keywords_and_concatenation_are_refused():
    class Alpha(nn.Module):
        def forward(self, x):
            return (x * 0).add(x, alpha=5.0)

    class Floor(nn.Module):
        def forward(self, x):
            return x.div(0.1, rounding_mode="floor")

    class Cat(nn.Module):
        def forward(self, x):
            return torch.cat([x, 2 * x], 1)

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    x = torch.full((1, 2), 0.5, dtype=torch.float64)
    with pytest.raises(ModelError, match=r"method .add\(\) with alpha is not supported"):
        Bounder(Alpha())(x, x)
    with pytest.raises(ModelError, match=r"method .div\(\) with rounding_mode is not supported"):
        Bounder(Floor())(x, x)
    with pytest.raises(ModelError, match="function cat is not supported"):
        Bounder(Cat())(x, x)
    with pytest.raises(ModelError, match="returns a tuple; it must return one tensor"):
        Bounder(Pair())


def _conv_bounds(eps: float, method: str) -> "dict[str, torch.Tensor]":
    torch.manual_seed(0)
    net = _bn_stats(NETS["conv"]())
    return sensitivity_upper(Bounder(net), torch.rand(3, 3, 4, 4, dtype=torch.float64), eps, "inf", method=method)


@pytest.mark.parametrize("method", METHODS)
def test_eps_zero_certifies_a_zero_shift(method):
    out = _conv_bounds(0.0, method)
    assert torch.all(torch.isfinite(out["s_upper"])) and torch.all(out["s_upper"] <= 1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_a_ball_that_covers_the_domain_is_vacuous(method):
    out = _conv_bounds(1.0, method)
    assert torch.all(out["s_upper"] >= out["s_domain"])
    small = _conv_bounds(0.01, method)
    assert torch.all(small["s_upper"] < small["s_domain"])


def test_a_refused_certificate_leaves_no_run_directory(tmp_path, capsys):
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)), tmp_path / "tanh.pt")
    out = tmp_path / "run"
    base = ["score", "--model", f"file:{tmp_path / 'tanh.pt'}", "--allow-pickle", "--data", "digits", "--n", "4",
            "--steps", "1", "--out", str(out), "--no-progress"]
    assert main(base + ["--certify", "ibp"]) == 2
    assert "module type Tanh is not supported" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    assert main(base) == 0  # the same directory, now without --certify


class CatHead(nn.Module):
    """Supported modules, an unsupported operation (``torch.cat``) between them."""

    def __init__(self) -> None:
        super().__init__()
        self.flat, self.lin, self.head = nn.Flatten(), nn.Linear(64, 4), nn.Linear(8, 10)

    def forward(self, x):
        h = self.lin(self.flat(x))
        return self.head(torch.cat([h, 2 * h], 1))


def test_an_unsupported_operation_is_refused_before_the_run_directory_exists(tmp_path, capsys):
    """Before: the refusal came at the first batch, after config.json was written (with certify
    'ibp'), and the same command without --certify was then refused ('holds a run with other
    settings (certify: 'ibp' -> None)')."""
    torch.save(CatHead(), tmp_path / "cat.pt")
    out = tmp_path / "run"
    base = ["score", "--model", f"file:{tmp_path / 'cat.pt'}", "--allow-pickle", "--data", "digits", "--n", "4",
            "--steps", "1", "--out", str(out), "--no-progress"]
    assert main(base + ["--certify", "ibp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "function cat is not supported on the representation" in err
    assert not (out / "config.json").exists()
    assert main(base) == 0


def test_a_negative_batch_norm_scale_counts_by_its_size():
    bn = nn.BatchNorm1d(4).double().eval()
    bn.weight.data = torch.tensor([-1.5, 1.2, 0.3, -0.2], dtype=torch.float64)
    net = nn.Sequential(nn.Flatten(), bn)
    x = torch.full((1, 4), 0.5, dtype=torch.float64)
    bounder = Bounder(net)
    exact = 1.5 / math.sqrt(1 + bn.eps)  # running_var 1: the largest |scale|
    assert bounder.lipschitz(bounder.boxes(x, x)) == pytest.approx(exact, rel=1e-8)
    out = sensitivity_upper(bounder, x, 0.1, "2")
    assert float(out["s_upper"][0]) == pytest.approx(0.1 * exact, rel=1e-8)


@pytest.mark.parametrize("layer", ["2", "3", "4"])  # Linear, ReLU, a Sequential
def test_a_feature_layer_is_certified_whether_or_not_it_is_a_leaf(layer):
    """--feature-layer NAME: a leaf module (Linear, ReLU) as well as a container ends the representation."""
    from asbound.models import LayerOutput

    torch.manual_seed(1)
    body = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Linear(6, 6), nn.ReLU(), body, nn.Linear(5, 3))
    model = model.double().eval()
    rep = LayerOutput(model, layer)
    x = torch.rand(4, 1, 3, 4, dtype=torch.float64)
    out = sensitivity_upper(Bounder(rep), x, 0.05, "inf", method="crown")
    torch.testing.assert_close(out["g"], rep(x).flatten(1))  # the bounds are centred on that layer's output
    g0 = rep(x).flatten(1)
    est = PGD(eps=0.05, steps=40, rel_step=0.5, restarts=3)(representation_shift(lambda z: rep(z).flatten(1), x, g0), x)
    assert torch.all(est.value <= out["s_upper"]) and torch.all(est.value > 0)


def _attack_value(net: nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    g0 = net(x).flatten(1)
    return PGD(eps=eps, steps=50, rel_step=0.5, restarts=3)(
        representation_shift(lambda z: net(z).flatten(1), x, g0), x, generator=torch.Generator().manual_seed(0)).value


def test_constants_on_the_left_and_with_a_batch_axis_are_bounded_soundly():
    class Left(nn.Module):  # a buffer's own methods: c.add(x), c.sub(x), c.mul(x)
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.tensor([0.5, 1.5, -1.0, 0.8]))
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(self.c * x) + self.lin(self.c.add(x)) - self.lin(self.c.sub(x)) + self.lin(self.c.mul(x))

    class BatchAxis(nn.Module):  # a constant expanded to the batch
        def __init__(self):
            super().__init__()
            self.s, self.lin = nn.Parameter(torch.tensor([[1.0, -2.0, 0.5, 3.0]])), nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(torch.relu(x * self.s.expand(x.size(0), -1) - 0.3))

    torch.manual_seed(0)
    x = torch.rand(3, 4, dtype=torch.float64)
    for net in (Left().double().eval(), BatchAxis().double().eval()):
        est = _attack_value(net, x, 0.1)
        for method in METHODS:
            assert torch.all(est <= sensitivity_upper(Bounder(net), x, 0.1, "inf", method=method)["s_upper"])


def test_mixing_the_batch_and_reusing_an_in_place_input_are_refused():
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x.view(1, -1))

    class Reuse(nn.Module):  # relu_(h) changes h itself: the network computes 2 relu(h), its graph relu(h) + h
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            h = self.lin(x)
            return torch.nn.functional.relu(h, inplace=True) + h

    with pytest.raises(ModelError, match="changes the batch dimension"):
        Bounder(Rows().double())(torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ModelError, match="works in place on a tensor that is used again"):
        Bounder(Reuse())


def test_the_bounds_are_about_the_weights_at_construction():
    net = nn.Sequential(nn.Linear(6, 3)).double().eval()
    x = torch.rand(1, 6, dtype=torch.float64)
    bounder = Bounder(net)
    before = sensitivity_upper(bounder, x, 0.05, "2", method="crown")
    net[0].weight.data.mul_(100)  # the caller's module changes; the bounder's float64 snapshot does not
    after = sensitivity_upper(bounder, x, 0.05, "2", method="crown")
    for key in ("s_upper", "s_crown", "s_domain", "g"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert float(sensitivity_upper(Bounder(net), x, 0.05, "2")["s_upper"][0]) > 50 * float(before["s_upper"][0])


# --- the graph that is bounded must be the network that is scored ---------------------------------


def _graph_value(net: nn.Module, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The graph's g(x) as the bounds see it, with the in-place check switched off (what the bounds
    were about before it existed)."""
    import asbound.certify as certify

    with monkeypatch.context() as mp:
        mp.setattr(certify, "_stale_read", lambda *args: None)
        return Bounder(net)(x, x).lo


class InPlaceThrough(nn.Module):
    """``h = lin(x)``; an in-place ReLU reaches ``h`` through ``alias``; ``out(h)`` reads ``h`` after it."""

    def __init__(self, alias) -> None:
        super().__init__()
        self.alias = alias
        self.lin, self.out = nn.Linear(4, 6), nn.Linear(6, 6)
        self.drop, self.ident, self.act = nn.Dropout(0.5), nn.Identity(), nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.lin(x)
        r = self.act(self.alias(self, h))
        return self.out(h) + 0 * r.flatten(1)


ALIASES = {
    "dropout": lambda m, h: m.drop(h),
    "identity": lambda m, h: m.ident(h),
    "view": lambda m, h: h.view(h.size(0), -1),
    "reshape": lambda m, h: h.reshape(h.size(0), 2, 3),
    "flatten": lambda m, h: torch.flatten(h, 1),
    "contiguous": lambda m, h: h.contiguous(),
    "unsqueeze": lambda m, h: h.unsqueeze(1),
    "functional-dropout": lambda m, h: torch.nn.functional.dropout(h, 0.5, training=False),
    "two-aliases": lambda m, h: m.ident(m.drop(h).view(h.size(0), -1)),
    # not bounded at all (refused before they are reached), the in-place check names them first
    "detach": lambda m, h: h.detach(),
    "transpose": lambda m, h: h.t(),
    "expand": lambda m, h: h.expand(2, -1),
}
UNBOUNDED = {"detach", "transpose", "expand"}


@pytest.mark.parametrize("alias", list(ALIASES))
def test_an_in_place_op_through_an_alias_is_refused(alias, monkeypatch):
    torch.manual_seed(0)
    net = InPlaceThrough(ALIASES[alias]).double().eval()
    with pytest.raises(ModelError, match="works in place on a tensor that is used again"):
        Bounder(net)
    if alias not in UNBOUNDED:  # why: the graph (out(h)) is not the network (out(relu(h)))
        x = torch.rand(2, 4, dtype=torch.float64)
        assert not torch.allclose(_graph_value(net, x, monkeypatch), net(x))


class TruthyInPlace(nn.Module):
    """``h = lin(x) = (x0 - .47, .53 - x0)``, positive at ``x0 = .5``; an in-place ReLU whose flag is
    true but not ``True`` (torch reads it with ``if inplace:``) reaches ``h`` through an eval
    dropout; ``out(h) = h0 + h1`` reads ``h`` after it. The graph (ReLU modelled out of place) is the
    constant ``0.06``; the network computes ``relu(h0) + relu(h1)``, which equals it at ``x0 = .5``
    and grows to ``0.13`` at ``x0 = .6``: the head (class 0 iff ``g0 < 0.1``) changes class there."""

    def __init__(self, flag, functional: bool = False) -> None:
        super().__init__()
        self.flat, self.lin, self.dropout = nn.Flatten(), nn.Linear(16, 2), nn.Dropout(0.5)
        self.act, self.out, self.head = nn.ReLU(inplace=flag), nn.Linear(2, 2), nn.Linear(2, 2)
        self.flag, self.functional = flag, functional
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.weight[:, 0] = torch.tensor([1.0, -1.0])
            self.lin.bias.copy_(torch.tensor([-0.47, 0.53]))
            self.out.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
            self.out.bias.zero_()
            self.head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
            self.head.bias.copy_(torch.tensor([0.1, -0.1]))

    def forward(self, x):
        h = self.lin(self.flat(x))
        d = self.dropout(h)
        r = torch.nn.functional.relu(d, self.flag) if self.functional else self.act(d)
        return self.head(self.out(h) + 0 * r)


@pytest.mark.parametrize("flag, functional", [(1, False), (np.True_, False), (torch.tensor(True), False),
                                              (1, True), (torch.tensor(True), True)],
                         ids=["module-int", "module-numpy", "module-tensor", "function-int", "function-tensor"])
def test_an_in_place_flag_that_is_true_but_not_True_is_refused(flag, functional, monkeypatch):
    """Before: ``inplace=1`` passed the in-place check (``is True``) and a score run recorded s_upper
    1e-12 against the attacks' shifts 0.05-0.09 (exit 0)."""
    net = TruthyInPlace(flag, functional).eval()
    with pytest.raises(ModelError, match="works in place on a tensor that is used again"):
        Bounder(net)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    x[:, 0, 0, 0] = torch.tensor([0.5, 0.6], dtype=torch.float64)
    with torch.no_grad():  # why: the graph (out(h), constant) is not the network at x0 = .6
        graph, network = _graph_value(net.double(), x, monkeypatch), net.double()(x)
    assert torch.allclose(graph[0], network[0]) and not torch.allclose(graph[1], network[1])


@pytest.mark.parametrize("method", METHODS)
def test_a_graph_that_is_the_network_at_x_only_stops_the_run_at_the_attacks_point(tmp_path, method, monkeypatch,
                                                                                   capsys):
    """Without the static in-place refusal, TruthyInPlace's graph equals the network at every clean
    point (``x0`` in ``[.48, .52]``, both ``h`` positive), so the check at ``x`` passes; the network is
    checked against its graph at the attacks' points too, and the run stops there. Before: exit 0,
    every row recorded with s_upper 1e-12 (crown) below the attacks' shifts 0.05-0.09, the measured
    difference taken for float32 rounding."""
    import asbound.certify as certify

    monkeypatch.setattr(certify, "_stale_read", lambda *args: None)
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = torch.tensor([0.50, 0.49, 0.51, 0.52, 0.48, 0.50])
    torch.save(TruthyInPlace(True).eval(), tmp_path / "net.pt")
    torch.save({"x": x, "y": torch.zeros(6, dtype=torch.long), "num_classes": 2}, tmp_path / "data.pt")
    run = tmp_path / "run"
    argv = ["score", "--model", f"file:{tmp_path / 'net.pt'}", "--allow-pickle", "--data",
            f"tensors:{tmp_path / 'data.pt'}", "--n", "all", "--eps", "0.1", "--batch-size", "3", "--device", "cpu",
            "--no-progress", "--out", str(run), "--certify", method]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(r"certify: point \d+ \(position \d+\): the network's g\(x\) differs from its traced "
                     r"graph's at an attack's point by 0\.0\d+ in float64", err), err
    assert not (run / "points.csv").exists()


def test_a_scored_network_far_from_the_graph_at_an_attacks_point_is_refused():
    """The float32 network at an attack's kept point against the graph there: beyond FLOAT32_LIMIT
    it is not rounding (before, the difference was measured into the slack, which then let the
    recorded shift exceed s_upper by as much)."""
    from asbound.certify import CheckFailed, check_attack_points

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    bounder = Bounder(net)
    x = torch.rand(3, 1, 2, 2)
    bound = sensitivity_upper(bounder, x, 0.05, "inf")
    x_adv = (x + 0.05).clamp(0, 1)
    with torch.no_grad():
        g32, g32_adv = net(x), net(x_adv)
    rounding = check_attack_points(bounder, bound, x, x_adv, g32_adv, g32, 0.05, "inf")
    assert torch.all(rounding < 1e-5)
    far = g32_adv.clone()
    far[1] += 0.05 * (bound["g"][1].norm() + bound["s_upper"][1]).float()
    with pytest.raises(CheckFailed, match="the scored network's g at an attack's point is") as caught:
        check_attack_points(bounder, bound, x, x_adv, far, g32, 0.05, "inf")
    assert caught.value.row == 1


def test_a_leaf_module_whose_forward_is_replaced_on_the_instance_is_refused(monkeypatch):
    """``act.forward = relu(z) + 100 relu(z - 0.5)`` on an nn.ReLU: tracing records the ReLU (a leaf),
    the bounds follow nn.ReLU, the network runs the replacement. Equal wherever ``z < 0.5`` (the
    graph check at x passes there), 100 times steeper above: before, Bounder accepted it."""
    import types

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
    net[2].forward = types.MethodType(lambda self, z: torch.relu(z) + 100 * torch.relu(z - 0.5), net[2])
    with pytest.raises(ModelError, match=r"module 2 \(ReLU\) has its forward replaced on the instance"):
        Bounder(net)
    import copy

    net[1].bias.data = 0.49 - net[1].weight.data.clamp(min=0).sum(1) - 0.2  # z < 0.5 at x = 0, not at x = 1
    net[1].weight.data[:, 0] = 1.0
    plain = copy.deepcopy(net)  # what the graph computes: the class's forward
    del plain[2].forward
    with torch.no_grad():
        x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
        assert torch.all(net[1](net[0](x)) < 0.5)
        assert torch.equal(plain(x), net(x)) and not torch.allclose(plain(x + 1), net(x + 1))


class Augmented(nn.Module):
    """``o = h; o op= c``: the network changes ``h`` in place, torch.fx's plain trace records
    ``o = o op c`` and keeps ``h`` as it was."""

    def __init__(self, op: str, read_h: bool) -> None:
        super().__init__()
        self.op, self.read_h = op, read_h
        self.lin, self.out = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        o = h
        if self.op == "+=":
            o += h
        elif self.op == "-=":
            o -= 0.5
        elif self.op == "*=":
            o *= 3.0
        else:
            o /= 4.0
        return self.out(h) + o if self.read_h else self.out(o)


@pytest.mark.parametrize("op", ["+=", "-=", "*=", "/="])
def test_augmented_assignment_is_modelled_in_place(op, monkeypatch):
    """torch 2.14's fx proxy has no __iadd__: Python falls back to ``o = o + h`` and the graph reads
    the old ``h`` where the network reads the changed one. asbound's trace records the in-place
    operator; reading ``h`` after it is refused, the rest is bounded as the network computes it."""
    import operator

    from asbound.certify import _trace

    torch.manual_seed(1)
    plain = {n.target for n in torch.fx.symbolic_trace(Augmented(op, True)).graph.nodes if n.op == "call_function"}
    ours = {n.target for n in _trace(Augmented(op, True)).graph.nodes if n.op == "call_function"}
    name = {"+=": "add", "-=": "sub", "*=": "mul", "/=": "truediv"}[op]
    assert getattr(operator, name) in plain and getattr(operator, "i" + name) not in plain
    assert getattr(operator, "i" + name) in ours
    net = Augmented(op, True).double().eval()
    x = torch.rand(3, 4, dtype=torch.float64)
    with pytest.raises(ModelError, match="works in place on a tensor that is used again"):
        Bounder(net)
    assert not torch.allclose(_graph_value(net, x, monkeypatch), net(x))
    safe = Augmented(op, False).double().eval()  # out(o) alone: the in-place result is all that is read
    torch.testing.assert_close(Bounder(safe)(x, x).lo, safe(x), rtol=1e-12, atol=1e-12)
    est = _attack_value(safe, x, 0.05)
    for method in METHODS:
        assert torch.all(est <= sensitivity_upper(Bounder(safe), x, 0.05, "inf", method=method)["s_upper"])


class TorchvisionBlock(nn.Module):
    """``out = bn(conv(x)); out += identity; relu_(out)`` and an in-place ReLU on a fresh tensor:
    in place, but nothing reads the old values."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = self.act(self.stem(x))
        out = self.bn(self.conv(identity))
        out += identity
        return self.act(out).flatten(1)


def test_in_place_operations_whose_old_value_nobody_reads_are_bounded():
    torch.manual_seed(2)
    net = _bn_stats(TorchvisionBlock())
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64)
    bounder = Bounder(net)
    torch.testing.assert_close(bounder(x, x).lo, net(x), rtol=1e-12, atol=1e-12)
    est = _attack_value(net, x, 0.02)
    for method in METHODS:
        assert torch.all(est <= sensitivity_upper(bounder, x, 0.02, "inf", method=method)["s_upper"])


def test_in_place_changes_of_the_input_or_of_a_buffer_are_refused():
    class Input(nn.Module):
        def forward(self, x):
            x += 1.0
            return x

    class Buffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("total", torch.zeros(3))
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            self.total += x.sum()
            return self.lin(x) + self.total

    with pytest.raises(ModelError, match="changes the input in place"):
        Bounder(Input())
    with pytest.raises(ModelError, match="changes the parameter or buffer"):
        Bounder(Buffer())


@pytest.mark.parametrize("where", ["leaf", "leaf-pre", "container", "root", "global"])
def test_forward_hooks_are_refused(where):
    net = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 3), nn.ReLU()), nn.Linear(3, 2))
    double = lambda m, i, o: 2 * o  # noqa: E731
    handle = {
        "leaf": lambda: net[1][0].register_forward_hook(double),
        "leaf-pre": lambda: net[2].register_forward_pre_hook(lambda m, i: (2 * i[0],)),
        "container": lambda: net[1].register_forward_hook(double),
        "root": lambda: net.register_forward_hook(double),
        "global": lambda: torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None),
    }[where]()
    try:
        with pytest.raises(ModelError, match="global forward hook" if where == "global" else "has a forward"):
            Bounder(net)
    finally:
        handle.remove()
    Bounder(net)  # without the hook


class Draw(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(4, 3)
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        import random

        import numpy as np

        h = self.lin(x)
        noise = {
            "rand": lambda: torch.rand(3),  # drawn while tracing: frozen into the graph as a constant
            "randn_like": lambda: torch.randn_like(h),
            "normal_": lambda: torch.zeros_like(h).normal_(),
            "bernoulli": lambda: torch.bernoulli(torch.sigmoid(h)),
            "dropout": lambda: torch.nn.functional.dropout(h, 0.5) - h,  # training=True by default
            "dropout-positional": lambda: torch.nn.functional.dropout(h, 0.5, True) - h,
            "numpy": lambda: torch.from_numpy(np.random.rand(3)).float(),
            "python": lambda: random.random(),
            "generator": lambda: torch.rand(3, generator=self.gen),  # no global state: two traces differ
            # a random branch (stochastic depth): both traces may take the same one, the draw is seen
            "branch": lambda: h if torch.rand(1).item() < 0.999 else -h,
        }[self.kind]()
        return h + 0.01 * noise


@pytest.mark.parametrize("kind", ["rand", "randn_like", "normal_", "bernoulli", "dropout", "dropout-positional",
                                  "numpy", "python", "generator", "branch"])
def test_random_draws_in_forward_are_refused(kind):
    torch.manual_seed(0)
    with pytest.raises(ModelError, match="random|two traces of the representation differ"):
        Bounder(Draw(kind))


def test_dropout_in_eval_is_the_identity():
    class Eval(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(4, 3), nn.Dropout1d(0.3)

        def forward(self, x):
            h = torch.nn.functional.dropout(self.lin(x), 0.5, training=self.training)
            return self.drop(h.unsqueeze(-1)).flatten(1)

    torch.manual_seed(0)
    net = Eval().double().eval()
    x = torch.rand(3, 4, dtype=torch.float64)
    torch.testing.assert_close(Bounder(net)(x, x).lo, net(x))
    for method in METHODS:
        assert torch.all(_attack_value(net, x, 0.05) <= sensitivity_upper(Bounder(net), x, 0.05, "inf",
                                                                           method=method)["s_upper"])


def test_a_subclass_of_a_supported_layer_is_refused_and_a_parametrized_one_is_bounded():
    class Doubled(nn.Linear):  # torch.fx keeps classes of torch.nn's namespace whole, as leaves
        __module__ = "torch.nn.custom"

        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ModelError, match="module type Doubled is not supported .a subclass of Linear"):
        Bounder(nn.Sequential(Doubled(4, 3)))
    torch.manual_seed(3)
    net = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 3)), nn.ReLU()).double().eval()
    x = torch.rand(3, 4, dtype=torch.float64)
    torch.testing.assert_close(Bounder(net)(x, x).lo, net(x))
    assert torch.all(_attack_value(net, x, 0.05) <= sensitivity_upper(Bounder(net), x, 0.05, "inf")["s_upper"])


def test_tracing_leaves_the_module_as_it_was():
    class Const(nn.Module):
        def forward(self, x):
            return x * torch.tensor(2.0)

    net = Const()
    Bounder(net)
    assert not [k for k in vars(net) if k.startswith("_tensor_constant")]


# --- every run checks itself -----------------------------------------------------------------------


class AliasedRelu(nn.Module):
    """``h = lin(x); r = relu_(dropout(h)); g = out(h) + 0 * r``, ``h = (x0 - .5, .5 - x0)``: the graph
    (in-place ops modelled out of place) is ``out(h) = h0 + h1 = 0``, constant; the network computes
    ``out(relu(h)) = |x0 - .5|`` and its head (class 0 iff ``g0 < .05``) changes class within 0.1."""

    def __init__(self) -> None:
        super().__init__()
        self.flat, self.lin, self.dropout = nn.Flatten(), nn.Linear(16, 2), nn.Dropout(0.5)
        self.act, self.out, self.head = nn.ReLU(inplace=True), nn.Linear(2, 2), nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.weight[:, 0] = torch.tensor([1.0, -1.0])
            self.lin.bias.copy_(torch.tensor([-0.5, 0.5]))
            self.out.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
            self.out.bias.zero_()
            self.head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
            self.head.bias.copy_(torch.tensor([0.05, -0.05]))

    def forward(self, x):
        h = self.lin(self.flat(x))
        r = self.act(self.dropout(h))
        return self.head(self.out(h) + 0 * r)


@pytest.fixture
def aliased_files(tmp_path):
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = torch.tensor([0.52, 0.47, 0.53, 0.46, 0.2, 0.9])
    torch.save(AliasedRelu().eval(), tmp_path / "net.pt")
    torch.save({"x": x, "y": torch.zeros(6, dtype=torch.long), "num_classes": 2}, tmp_path / "data.pt")
    return ["score", "--model", f"file:{tmp_path / 'net.pt'}", "--allow-pickle", "--data",
            f"tensors:{tmp_path / 'data.pt'}", "--n", "all", "--eps", "0.1", "--batch-size", "2",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("method", METHODS)
def test_an_aliased_in_place_relu_is_refused_before_the_run(aliased_files, method, capsys):
    """Before: 4 rows certified=True, robust=False (s_upper 1e-12, the attacks' shifts 0.04-0.10)."""
    run = aliased_files[-1]
    assert main(aliased_files + ["--certify", method]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "act (ReLU(inplace=True)) works in place on a tensor that is used again" in err
    assert not (Path(run) / "config.json").exists()


@pytest.mark.parametrize("method", METHODS)
def test_a_graph_that_is_not_the_network_stops_the_run_at_its_first_point(aliased_files, method, monkeypatch,
                                                                          capsys):
    """Without the static refusal, the first batch's graph-versus-network check stops the run, naming
    the point; nothing of the batch is recorded."""
    import asbound.certify as certify

    monkeypatch.setattr(certify, "_stale_read", lambda *args: None)
    run = Path(aliased_files[-1])
    assert main(aliased_files + ["--certify", method]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "certify: point 0 (position 0): the network's g(x) differs from its traced graph's by 0.02 in float64" in err
    assert not (run / "points.csv").exists()


@pytest.fixture
def relu_files(tmp_path):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(6, 1, 4, 4)
    with torch.no_grad():
        y = net(x).argmax(1)
    torch.save(net, tmp_path / "net.pt")
    torch.save({"x": x, "y": y, "num_classes": 3}, tmp_path / "data.pt")
    return ["score", "--model", f"file:{tmp_path / 'net.pt'}", "--allow-pickle", "--data",
            f"tensors:{tmp_path / 'data.pt'}", "--n", "all", "--eps", "0.05", "--batch-size", "3",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]


def test_a_bound_below_an_attacks_shift_stops_the_run(relu_files, monkeypatch, capsys):
    """A method whose box is too narrow (here: none at all) is caught in float64 at the attack's own
    point; without that check, by the recorded shifts; nothing of the batch is written."""
    import asbound.certify as certify
    import asbound.scoring as scoring

    monkeypatch.setitem(certify.OUTPUT_BOXES, "crown", lambda bounder, x, eps, norm, env=None: certify.Box(
        *(2 * [bounder(*2 * [x.double()]).mid.flatten(1)])))
    run = Path(relu_files[-1])
    # both attacks; the AS attack alone; the loss attack's point alone (without a random start the AS
    # attack never leaves x: its gradient there is zero)
    for extra, out in (([], run), (["--as-only"], run.with_name("as-only")),
                       (["--no-random-start"], run.with_name("loss-only"))):
        assert main(relu_files[:-1] + [str(out), "--certify", "crown"] + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the certificate is wrong" in err
        assert "certify: point 0 (position 0): an attack's point shifts the float64 g(x)" in err
        assert not (out / "points.csv").exists()
    unchecked = lambda bounder, bound, *args: torch.zeros_like(bound["s_upper"])  # noqa: E731
    monkeypatch.setattr(scoring, "check_attack_points", unchecked)
    assert main(relu_files + ["--certify", "crown"]) == 2
    err = capsys.readouterr().err
    assert "certify: point 0 (position 0): the attacks' shift" in err and "exceeds s_upper" in err
    assert not (run / "points.csv").exists()
    monkeypatch.undo()
    assert main(relu_files + ["--certify", "crown"]) == 0  # the same directory, with the sound bound


def test_the_record_checks_name_the_first_bad_row():
    from asbound.certify import CheckFailed, certified, check_records, record_slack

    bound = {"s_upper": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
             "slack": torch.tensor([1e-6, 1e-6, 1e-6], dtype=torch.float64)}
    slack = record_slack(bound, [torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 1e-6, 0.0])])
    torch.testing.assert_close(slack, torch.tensor([1e-6, 3e-6, 1e-6], dtype=torch.float64))
    check_records(bound, slack, torch.tensor([0.5, 1.0 + 3e-6, 0.0]))  # within the slack
    with pytest.raises(CheckFailed) as caught:
        check_records(bound, slack, torch.tensor([0.5, 1.0 + 3e-6, 1.0 + 2e-6]))
    assert caught.value.row == 2
    sure = certified(bound, slack, [torch.tensor([2.0, 2.0, 1.0 + 5e-7]), torch.tensor([2.0, 1.0 + 2e-6, 2.0])])
    assert sure.tolist() == [True, False, False]  # s_upper + slack (not s_upper alone) below every margin
    with pytest.raises(CheckFailed, match="certified, yet an attack changed the class") as caught:
        check_records(bound, slack, torch.zeros(3), sure, torch.tensor([False, True, True]))
    assert caught.value.row == 0
    check_records(bound, slack, torch.zeros(3), sure, torch.tensor([True, False, False]))


def test_float32_shifts_exceed_an_exact_bound_by_rounding_never_by_more_than_the_slack():
    """One output coordinate, an interior L-inf ball: CROWN's bound is the exact float64 maximum
    (a vertex). The float32 attack reaches it, and its rounding (of the point and of g) puts about
    of the recorded shifts above the bound (64 of 128 at d = 64): the slack must hold them."""
    torch.manual_seed(0)
    for d, bias in ((64, 0.0), (768, 1000.0)):
        net = nn.Sequential(nn.Flatten(), nn.Linear(d, 1)).eval()
        net[1].bias.data += bias
        x = torch.rand(128, d).clamp(0.05, 0.95)
        eps = 1 / 255
        out = sensitivity_upper(Bounder(net), x, eps, "inf", method="crown")
        exact = eps * float(net[1].weight.detach().double().abs().sum())
        torch.testing.assert_close(out["s_upper"], torch.full((128,), exact, dtype=torch.float64), rtol=2e-9, atol=0)
        s = PGD(eps=eps, steps=10, rel_step=0.5)(representation_shift(net, x), x).value.double()
        excess = s - out["s_upper"]
        assert (excess > 0).any()  # rounding alone: a check without a slack would stop sound runs
        assert torch.all(excess <= out["slack"])
        assert torch.all(out["slack"] < 1e-3 * out["s_upper"] + 1e-4 * out["g"].norm(dim=1))


def test_float32_exact_turns_tf32_off_and_restores_it():
    from asbound.devices import float32_exact

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with float32_exact():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --- certified means below the recorded margin too; CROWN follows residual branches ---------------


def test_a_near_tie_is_certified_only_below_the_recorded_margin(tmp_path):
    """g = A x + 1000 (float32 rounds g by 6e-5), head the identity: at a near-tie the float32
    margin and the float64 one differ by about that much. Eps puts s_upper (= eps sigma_max(A),
    exact on an L2 ball) between them at one point: certified from the float64 margin alone, that
    point would be recorded as certified with s_upper above its recorded margin."""
    from asbound import ScoreConfig, score
    from asbound.bounds import margins

    torch.manual_seed(0)
    feat, head = nn.Linear(4, 2), nn.Linear(2, 2)
    feat.weight.data = torch.tensor([[0.3, -0.2, 0.5, 0.1]]).repeat(2, 1) + 0.2 * torch.randn(2, 4)
    feat.bias.data = torch.full((2,), 1000.0)
    head.weight.data, head.bias.data = torch.eye(2), torch.zeros(2)
    pool = torch.rand(400, 4)
    with torch.no_grad():
        g32, g64 = feat(pool), feat.double()(pool.double())
    feat.float()
    y = g64.argmax(1)
    m32, m64 = margins(g32, y, head.weight, head.bias), margins(g64, y, head.weight, head.bias)
    tie = int(torch.where((m32 > 0) & (m32 < 0.02), m64 - m32, torch.zeros_like(m32)).argmax())
    far = torch.nonzero(m32 > 0.15).flatten()[:5]
    assert m64[tie] - m32[tie] > 1e-5 and len(far) == 5
    keep = torch.cat([torch.tensor([tie]), far])
    torch.save(nn.Sequential(nn.Flatten(), feat, head), tmp_path / "net.pt")
    torch.save({"x": pool[keep].view(-1, 1, 2, 2), "y": y[keep], "num_classes": 2}, tmp_path / "data.pt")
    sigma = float(torch.linalg.matrix_norm(feat.weight.detach().double(), ord=2))
    eps = float(m32[tie] + m64[tie]) / 2 / sigma
    pts = score(ScoreConfig(model=f"file:{tmp_path / 'net.pt'}", data=f"tensors:{tmp_path / 'data.pt'}"),
                allow_pickle=True, eps=eps, norm="2", n=None, steps=5, certify="ibp", batch_size=6,
                progress=False).points
    with torch.no_grad():
        exact = margins(feat.double()(torch.tensor(pool[keep].numpy(), dtype=torch.float64)), y[keep],
                        head.weight, head.bias).numpy()
    inside = (pts["margin"] < pts["s_upper"]) & (pts["s_upper"] < exact)
    assert inside.tolist() == [True] + [False] * 5  # the near tie: float32 margin < s_upper < float64 margin
    certified = pts["certified"].astype(bool)
    assert certified.any() and not certified[0]
    assert (pts.loc[certified, "s_upper"] < pts.loc[certified, "margin"]).all()
    assert pts.loc[certified, "robust"].astype(bool).all()


class LinearResidual(nn.Module):
    def __init__(self, weight: torch.Tensor, subtract: bool = False) -> None:
        super().__init__()
        self.flat, self.lin, self.subtract = nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]), subtract
        self.lin.weight.data = weight.clone()

    def forward(self, x):
        z = self.flat(x)
        return z - self.lin(z) if self.subtract else z + self.lin(z)


@pytest.mark.parametrize("subtract", [False, True])
def test_crown_alone_is_exact_and_tighter_than_ibp_through_a_residual_branch(subtract):
    """g = z +- W z on an interior L-inf ball: max g_j - g_j(x) = eps ||(I +- W)_j||_1 exactly, which
    CROWN must give (its box, before the intersection with IBP's); IBP gives eps (1 + |W| 1)_j,
    larger where W's diagonal cancels the identity. A CROWN that drops or mis-signs the branch
    misses the closed form, and its s_crown is not below s_ibp."""
    torch.manual_seed(9)
    d = 6
    W = -0.8 * torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, dtype=torch.float64)
    W = W if not subtract else -W  # I - W is I + (0.8 I - ...): the same cancellation
    net = LinearResidual(W, subtract).double().eval()
    x = torch.full((2, 1, 2, 3), 0.5, dtype=torch.float64)
    eps = 0.01
    jac = torch.eye(d, dtype=torch.float64) + (-W if subtract else W)
    bounder = Bounder(net)
    _, lo, hi = (x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    env = bounder.boxes(lo, hi)
    from asbound.certify import _Backward

    backward = _Backward(bounder, env)
    lam = torch.eye(d, dtype=torch.float64).unsqueeze(0).expand(2, d, d)
    g = net(x)
    upper = backward(lam, x.double(), eps, "inf")  # CROWN alone, no intersection
    lower = -backward(-lam, x.double(), eps, "inf")
    torch.testing.assert_close(upper - g, eps * jac.abs().sum(1).expand(2, d), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g - lower, eps * jac.abs().sum(1).expand(2, d), rtol=1e-10, atol=1e-14)
    out = sensitivity_upper(bounder, x, eps, "inf", method="crown")
    assert torch.all(out["s_crown"] < 0.5 * out["s_ibp"])
    torch.testing.assert_close(out["s_crown"], torch.full((2,), eps * float(jac.abs().sum(1).norm()),
                                                          dtype=torch.float64), rtol=1e-8, atol=0)


def test_crown_is_sound_and_tighter_than_ibp_through_relu_residual_blocks():
    """Two ReLU residual blocks: every attack and sample stays below CROWN's bound, which is well
    below IBP's (so the intersection with IBP does not decide it)."""

    class Block(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, z):
            return torch.relu(z + self.b(torch.relu(self.a(z))))

    torch.manual_seed(10)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), Block(10), Block(10), nn.Linear(10, 6)).double().eval()
    x = torch.rand(6, 1, 3, 4, dtype=torch.float64)
    eps = 0.03
    out = sensitivity_upper(Bounder(net), x, eps, "inf", method="crown")
    assert torch.all(out["s_crown"] < 0.8 * out["s_ibp"])
    est = _attack_value(net, x, eps)
    samples = _ball_samples(x, eps, "inf", 400, torch.Generator().manual_seed(2))
    with torch.no_grad():
        shifts = (net(samples.flatten(0, 1)).view(400, len(x), -1) - net(x)).norm(dim=2).max(0).values
    assert torch.all(est <= out["s_crown"]) and torch.all(shifts <= out["s_crown"])


def test_rounding_that_follows_the_intermediate_values_is_measured_into_the_slack(tmp_path):
    """g = relu(h - c) with h = w (x + 10) ~ 700 stored in float32 (ulp 2^-14) and g ~ 0.04: the
    float32 shift is a whole number of those ulps, and eps puts the exact shift half-way between two,
    so on the points whose h rounds that way the float32 shift exceeds the exact bound by about
    3e-5 (1e-3 of it), far more than a rounding relative to |g| allows. The slack measured at the
    clean and the attacks' points holds them (modelled alone, it would stop this sound run)."""
    import asbound.certify as certify
    from asbound import ScoreConfig, score

    torch.manual_seed(0)
    d, ulp = 64, 2.0**-14
    w, x0 = torch.rand(d) + 0.5, 0.5 + torch.rand(d) * 0.4
    total = float(w.double().sum())
    eps = (round(0.1 / 255 * total / ulp) + 0.5) * ulp / total  # exact shift eps * sum(w): k + 1/2 ulps
    c = float(w.double() @ (x0.double() + 10)) - 1.5 * eps * total  # active throughout every ball
    # h is stored in float32 before c is subtracted (a kernel that adds the bias inside its
    # accumulator can round less), and the points spread h over several ulps
    feat, shift, head = nn.Linear(d, 1, bias=False), nn.Linear(1, 1), nn.Linear(1, 2)
    feat.weight.data = w.view(1, d).clone()
    shift.weight.data, shift.bias.data = torch.ones(1, 1), torch.tensor([-c])
    head.weight.data, head.bias.data = torch.tensor([[1.0], [-1.0]]), torch.tensor([0.0, 0.0])
    net = nn.Sequential(Normalize((-10.0,), (1.0,)), nn.Flatten(), feat, shift, nn.ReLU(), head)
    x = (x0.view(1, d) + torch.randint(-40, 41, (48, d)) * 2.0**-20).view(48, 1, 8, 8)
    torch.save(net, tmp_path / "net.pt")
    torch.save({"x": x, "y": torch.zeros(48, dtype=torch.long), "num_classes": 2}, tmp_path / "data.pt")
    pts = score(ScoreConfig(model=f"file:{tmp_path / 'net.pt'}", data=f"tensors:{tmp_path / 'data.pt'}"),
                allow_pickle=True, eps=eps, n=None, steps=10, certify="ibp", batch_size=48, progress=False).points
    exact = eps * total  # IBP is exact here
    upper, recorded = pts["s_upper"].to_numpy(), pts["sensitivity"].to_numpy()
    # the recorded s_upper is the float64 bound, raised to the recorded float32 shift where that is above it
    assert (upper >= exact * (1 - 1e-12)).all() and (upper >= recorded).all()
    assert abs(upper - np.maximum(exact, recorded)).max() < 2e-9 * exact + 1e-12  # the widening: 1e-9 relative + 1e-12
    with torch.no_grad():
        g = torch.relu((torch.tensor(x.view(48, d).numpy(), dtype=torch.float64) + 10) @ w.double() - c).view(48, 1)
    modelled = certify.float32_slack(g, torch.full((48,), exact, dtype=torch.float64), eps, "inf", d).numpy()
    assert (recorded - exact > modelled).sum() > 5, (recorded - exact, modelled)


class LowPrecision(nn.Module):
    """bf16 inside forward: tracing does not see the autocast region, and float64 tensors are
    not cast, so the graph is the float64 network but not the float32 one that is scored."""

    def __init__(self) -> None:
        super().__init__()
        self.flat, self.lin, self.head = nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 3)
        self.register_buffer("zero", torch.zeros(8))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.lin(self.flat(x))
        return self.head(torch.relu(h) - self.zero)  # back in float32


def test_a_scored_network_far_from_its_float64_self_stops_the_run(tmp_path, capsys):
    from asbound.certify import CheckFailed, float32_deviation

    bound = {"g": torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64),
             "s_upper": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    dev = float32_deviation(bound, torch.tensor([[3.0, 4.01], [0.0, 0.0]]))
    torch.testing.assert_close(dev, torch.tensor([0.01, 0.0], dtype=torch.float64), rtol=1e-4, atol=1e-9)
    with pytest.raises(CheckFailed, match="it does not compute the function that is bounded") as caught:
        float32_deviation(bound, torch.tensor([[3.0, 4.0], [0.0, 0.01]]))
    assert caught.value.row == 1
    torch.manual_seed(5)
    torch.save(LowPrecision(), tmp_path / "net.pt")
    torch.save({"x": torch.rand(4, 1, 4, 4), "y": torch.arange(4) % 3, "num_classes": 3}, tmp_path / "data.pt")
    argv = ["score", "--model", f"file:{tmp_path / 'net.pt'}", "--allow-pickle", "--data",
            f"tensors:{tmp_path / 'data.pt'}", "--n", "all", "--eps", "0.01", "--steps", "2", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "run"), "--certify", "ibp"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(r"certify: point \d+ \(position \d+\): the scored network's g\(x\) is", err)


def test_a_random_draw_that_tracing_missed_stops_the_run(tmp_path, monkeypatch, capsys):
    """The scored forward pass is watched too: a draw the trace-time checks did not see (switched
    off here) stops the run before anything is recorded."""
    import contextlib

    import asbound.certify as certify

    monkeypatch.setattr(certify, "no_random_draws", lambda what: contextlib.nullcontext())
    net = nn.Sequential(nn.Flatten(), Draw("branch"), nn.Linear(3, 2))
    net[1].lin = nn.Linear(16, 3)
    torch.save(net, tmp_path / "net.pt")
    torch.save({"x": torch.rand(4, 1, 4, 4), "y": torch.arange(4) % 2, "num_classes": 2}, tmp_path / "data.pt")
    torch.manual_seed(0)
    argv = ["score", "--model", f"file:{tmp_path / 'net.pt'}", "--allow-pickle", "--data",
            f"tensors:{tmp_path / 'data.pt'}", "--n", "all", "--eps", "0.01", "--steps", "2", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "run"), "--certify", "ibp"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the representation's forward draws random numbers" in err
    assert not (tmp_path / "run" / "points.csv").exists()


# --- full CROWN: every ReLU's input bounded by backward passes of its own -------------------------


def _dense_crown(weights, biases, x, eps, norm):
    """An independent full CROWN on ``z_0 = W_0 x + b_0``, ``z_j = W_j relu(z_{j-1}) + b_j``, output
    ``z_L``, with explicit matrices: every layer's bounds by backward passes (adaptive lower slope,
    chord above) over every earlier layer's, intersected with interval arithmetic over those, where
    that interval leaves the ReLU unstable (auto_LiRPA's sparse intermediate bounds; a stable ReLU
    is linear whatever its bounds); the input set ``[x - eps, x + eps] ∩ [0, 1]``, for L2 also the
    ball. Returns the output box."""
    lo_in, hi_in = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    mid, rad = (lo_in + hi_in) / 2, (hi_in - lo_in) / 2

    def concretize(A, c):  # max of A x' + c over the set, per row; A [m, d]
        bound = A @ mid + A.abs() @ rad
        if norm == "2":
            bound = torch.minimum(bound, A @ x + eps * A.norm(dim=1))
        return bound + c

    def upper(L, i, bounds):  # max of L z_i over the set
        A, c = L, torch.zeros(L.shape[0], dtype=torch.float64)
        for j in range(i, 0, -1):
            c, A = c + A @ biases[j], A @ weights[j]  # coefficients on relu(z_{j-1})
            l, u = bounds[j - 1]
            unstable = (l < 0) & (u > 0)
            slope = torch.where(l >= 0, 1.0, torch.where(unstable, u / torch.where(unstable, u - l, 1.0), 0.0))
            offset = torch.where(unstable, -u * l / torch.where(unstable, u - l, 1.0), 0.0)
            low = torch.where((l >= 0) | (unstable & (u > -l)), 1.0, 0.0)
            c = c + A.clamp(min=0) @ offset
            A = A.clamp(min=0) * slope + A.clamp(max=0) * low
        return concretize(A @ weights[0], c + A @ biases[0])

    bounds = []
    for i, W in enumerate(weights):
        eye = torch.eye(W.shape[0], dtype=torch.float64)
        hi, lo = upper(eye, i, bounds), -upper(-eye, i, bounds)
        if i == 0:
            m, r = W @ mid + biases[0], W.abs() @ rad
        else:
            pl, pu = bounds[-1][0].clamp(min=0), bounds[-1][1].clamp(min=0)
            m, r = W @ ((pl + pu) / 2) + biases[i], W.abs() @ ((pu - pl) / 2)
        last = i == len(weights) - 1
        keep = ((m - r < 0) & (m + r > 0)) | last
        bounds.append((torch.where(keep, torch.maximum(lo, m - r), m - r),
                       torch.where(keep, torch.minimum(hi, m + r), m + r)))
    return bounds[-1]


@pytest.mark.parametrize("norm,eps", [("inf", 0.06), ("2", 0.3)])
def test_full_crown_is_an_independent_dense_crown(norm, eps):
    """A random MLP with a first hidden layer of two Linear maps (interval arithmetic is not exact
    there): full CROWN's box on g equals an independent dense implementation to 1e-9 at every
    point, corners of the domain included, and is tighter than crown-ibp."""
    torch.manual_seed(11)
    net = nn.Sequential(nn.Flatten(), nn.Linear(10, 12), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)).double().eval()
    linears = [m for m in net if isinstance(m, nn.Linear)]
    weights = [linears[1].weight @ linears[0].weight] + [m.weight.detach() for m in linears[2:]]
    biases = [linears[1].weight @ linears[0].bias + linears[1].bias] + [m.bias.detach() for m in linears[2:]]
    x = torch.rand(6, 1, 2, 5, dtype=torch.float64)
    x[0], x[1, 0, 0] = 0.0, 1.0
    bounder = Bounder(net)
    box = crown_box(bounder, x, eps, norm)
    for i in range(len(x)):
        lo, hi = _dense_crown([w.detach() for w in weights], [b.detach() for b in biases], x[i].flatten(), eps, norm)
        torch.testing.assert_close(box.lo[i], lo, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(box.hi[i], hi, rtol=1e-9, atol=1e-12)
    out = sensitivity_upper(bounder, x, eps, norm, method="crown")
    ibp = sensitivity_upper(bounder, x, eps, norm, method="crown-ibp")
    assert torch.all(out["s_crown"] <= ibp["s_crown_ibp"]) and out["s_crown"].mean() < 0.8 * ibp["s_crown_ibp"].mean()


class StableFirst(nn.Module):
    """``z = B relu(A x + a) (+ x)``: the first layer's ReLUs are active over the ball, so ``z`` is
    linear there (``B A x + c``, with the residual branch ``(I + B A) x + c``) and CROWN's bounds
    on it are exact; interval arithmetic's are not."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.flat, self.a, self.b, self.residual = nn.Flatten(), nn.Linear(6, 8), nn.Linear(8, 6), residual
        self.a.bias.data += 5.0

    def forward(self, x):
        x = self.flat(x)
        z = self.b(torch.relu(self.a(x)))
        return torch.relu(z + x if self.residual else z)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_intermediate_bounds_are_crowns_own_not_intervals(residual, norm):
    """The second ReLU's input is bounded exactly (max of a linear map: ``eps ||J_j||_1`` over an
    interior L-inf ball, ``eps ||J_j||_2`` over an interior L2 ball), where interval arithmetic is
    several times wider; so is the output."""
    from asbound.certify import crown_bounds

    torch.manual_seed(12)
    net = StableFirst(residual).double().eval()
    x = torch.full((2, 1, 2, 3), 0.5, dtype=torch.float64)
    x[1] += torch.linspace(-0.005, 0.005, 6, dtype=torch.float64).view(1, 2, 3)
    with torch.no_grad():  # z near 0 at x: unstable by interval arithmetic, so bounded by backward passes
        net.b.bias -= net.b(torch.relu(net.a(x[:1].flatten(1))))[0] + (x[0].flatten() if residual else 0)
    eps = 0.02 if norm == "inf" else 0.1
    J = net.b.weight.detach() @ net.a.weight.detach() + (torch.eye(6, dtype=torch.float64) if residual else 0)
    dual = J.abs().sum(1) if norm == "inf" else J.norm(dim=1)
    bounder = Bounder(net)
    env = crown_bounds(bounder, x, eps, norm)
    pre = next(n for n in bounder.graph.graph.nodes if n.name in bounder.relu_inputs and n.name != "a")
    with torch.no_grad():
        z = (net.b(torch.relu(net.a(x.flatten(1)))) + (x.flatten(1) if residual else 0))
    torch.testing.assert_close(env[pre.name].hi, z + eps * dual, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(env[pre.name].lo, z - eps * dual, rtol=1e-10, atol=1e-12)
    ibp = bounder.boxes((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))[pre.name]
    assert torch.all((ibp.hi - ibp.lo) > 1.2 * (env[pre.name].hi - env[pre.name].lo))
    out = crown_box(bounder, x, eps, norm)
    torch.testing.assert_close(out.hi, torch.relu(z + eps * dual), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.lo, torch.relu(z - eps * dual), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 0.2)])
@pytest.mark.parametrize("method", ["crown-ibp", "crown"])
def test_a_relu_whose_input_is_bounded_below_by_exactly_zero_is_the_identity_there(method, norm, eps):
    """At the corner ``x = 0`` a ReLU on the input has ``l = 0 < u``, and one after average pooling
    of ReLUs has ``l = 0`` from the clamped intervals: both are the identity over the set, not
    zero (a relaxation that took ``l = 0`` for inactive bounded the shift by 0). The bound is
    above the shift the corner reaches along each coordinate and dense samples."""
    torch.manual_seed(21)
    net = nn.Sequential(nn.ReLU(), nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8, 3)).double().eval()
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    x[1] = torch.rand(1, 4, 4, dtype=torch.float64)
    bounder = Bounder(net)
    env = bounder.boxes((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    assert any(bool(((env[n].lo == 0) & (env[n].hi > 0)).any()) for n in bounder.relu_inputs)
    bound = sensitivity_upper(bounder, x, eps, norm, method=method)[f"s_{method.replace('-', '_')}"]
    samples = _ball_samples(x, eps, norm, 400, torch.Generator().manual_seed(3))
    g0 = net(x).flatten(1)
    with torch.no_grad():
        shifts = (net(samples.flatten(0, 1)).flatten(1).view(400, len(x), -1) - g0).norm(dim=2).max(0).values
    assert torch.all(shifts > 0) and torch.all(shifts <= bound), (shifts, bound)


@pytest.mark.parametrize("norm,eps", [("inf", 0.3), ("2", 0.6)])
def test_full_crowns_intermediate_bounds_lie_inside_the_intervals(norm, eps):
    """A backward pass can be looser than interval arithmetic on some coordinates (on a random MLP
    at a large eps): every node's full CROWN bounds are intersected with its interval, so none is
    wider than IBP's over the box, and some are narrower."""
    from asbound.certify import crown_bounds

    torch.manual_seed(22)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6),
                        nn.ReLU(), nn.Linear(6, 2)).double().eval()
    for m in net:
        if isinstance(m, nn.Linear):
            m.weight.data.normal_()
    x = torch.rand(4, 1, 4, dtype=torch.float64)
    bounder = Bounder(net)
    full = crown_bounds(bounder, x, eps, norm)
    ibp = bounder.boxes((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    narrower = False
    for name in bounder.relu_inputs:
        tol = 1e-12 * (1 + ibp[name].hi.abs().max())  # (the same intervals, computed in another order)
        assert torch.all(full[name].lo >= ibp[name].lo - tol) and torch.all(full[name].hi <= ibp[name].hi + tol), name
        narrower |= bool(((full[name].hi - full[name].lo) < (ibp[name].hi - ibp[name].lo) - 1e-9).any())
    assert narrower


def test_full_crown_at_its_budget_is_computed_and_one_coefficient_over_it_is_not(monkeypatch):
    import asbound.certify as certify

    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    bounder = Bounder(net.double().eval())
    x = torch.rand(3, 1, 2, 3, dtype=torch.float64)
    cost = certify.crown_cost(bounder, x, "inf")
    # the second ReLU's input (4 rows, each carried back through the nodes on its path: the input
    # and the flatten (6 each), the first Linear (5 x 6 multiply-adds), its ReLU (5), itself (4 x 5))
    # and the output (3 rows, through those, the second ReLU (4) and itself (3 x 4)); the first
    # ReLU's input is an exact interval: no pass; and a constant per node visited (5 and 7)
    assert cost == 4 * (6 + 6 + 30 + 5 + 20) + 3 * (6 + 6 + 30 + 5 + 20 + 4 + 12) + certify._VISIT * (5 + 7)
    assert certify.crown_cost(bounder, x, "2") == cost  # in L2 the first ReLU's input needs no pass either
    monkeypatch.setattr(certify, "CROWN_BUDGET", cost)
    assert certify.method_for(bounder, "crown", x, "inf") == ("crown", None)
    monkeypatch.setattr(certify, "CROWN_BUDGET", cost - 1)
    used, note = certify.method_for(bounder, "crown", x, "inf")
    assert used == "crown-ibp" and "crown-ibp is computed instead" in note
    assert certify.method_for(bounder, "crown-ibp", x, "inf") == ("crown-ibp", None)


@pytest.mark.parametrize("method", METHODS)
def test_every_bound_is_widened_against_rounding(method):
    """Where a bound is exact (an L2 ball on a linear representation: ``eps sigma_max``; over an
    L-inf box each coordinate's range ``eps ||W_j||_1``, which IBP and CROWN both reach), float64
    rounding could put it an ulp below the shift it bounds: every bound is widened by 1e-9."""
    torch.manual_seed(23)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double().eval()
    x = torch.full((1, 1, 2, 3), 0.5, dtype=torch.float64)
    W = net[1].weight.detach()
    for norm, eps, exact in (("2", 0.1, 0.1 * float(torch.linalg.matrix_norm(W, ord=2))),
                             ("inf", 0.1, 0.1 * float(W.abs().sum(1).norm()))):
        out = sensitivity_upper(Bounder(net), x, eps, norm, method=method)
        key = "s_upper" if norm == "2" else "s_ibp" if method == "ibp" else f"s_{method.replace('-', '_')}"
        assert exact * (1 + 5e-10) <= float(out[key]) <= exact * (1 + 2e-9) + 2e-12, (norm, out[key], exact)


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 0.3)])
def test_full_crown_in_chunks_of_one_coordinate_equals_it_in_one_chunk(monkeypatch, norm, eps):
    """The backward passes run in chunks of coordinates (:data:`asbound.certify._CHUNK_BYTES`), and
    each point has its own unstable coordinates (here 0-1 to 8-12 per layer: a batch that mixes stable
    and unstable points). One coordinate per chunk gives the same boxes as one chunk for all."""
    import asbound.certify as certify

    torch.manual_seed(24)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                        nn.Linear(12, 5)).double().eval()
    for m in net:
        if isinstance(m, nn.Linear):
            m.weight.data.normal_()
    x = torch.rand(4, 1, 2, 3, dtype=torch.float64)
    x[3] = 0.0
    bounder = Bounder(net)
    whole = crown_box(bounder, x, eps, norm)
    env = certify.crown_bounds(bounder, x, eps, norm)
    counts = torch.stack([((env[n].lo < 0) & (env[n].hi > 0)).flatten(1).sum(1) for n in bounder.relu_inputs])
    assert int(counts.min()) <= 1 and int(counts.max()) > 4 and len(set(counts.flatten().tolist())) > 3
    monkeypatch.setattr(certify, "_CHUNK_BYTES", 1)
    parts = crown_box(bounder, x, eps, norm)
    torch.testing.assert_close(parts.lo, whole.lo, rtol=0, atol=0)
    torch.testing.assert_close(parts.hi, whole.hi, rtol=0, atol=0)

def test_full_crown_is_never_looser_than_crown_ibp():
    """CROWN is not monotone in its intermediate bounds: at ``x = 0`` and an L2 ball of 0.5 the
    ball makes the first ReLU's lower bound tighter than the box's (-0.32 for -0.39, upper 0.35),
    which flips its adaptive lower slope (``alpha = 1`` iff ``u > -l``) from 0 to 1, and the output
    pass over those tighter bounds gave 0.342 where CROWN-IBP's gives 0.1998 (the shift reaches
    0.1998 at an attack's point). Full CROWN's box is intersected with CROWN-IBP's."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 1), nn.ReLU(), nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 5),
                        nn.ReLU(), nn.Linear(5, 1)).double().eval()
    layers = [([[-1.24, 0.085, -0.14]], [0.30]), ([[-0.82], [0.52]], [0.66, -0.43]),
              ([[1.74, -1.07], [-0.13, -0.35], [1.73, 0.45], [0.085, 2.45], [-0.81, 1.27]],
               [-0.86, 0.066, -0.073, 0.45, 0.20]), ([[0.49, -0.21, -0.87, 1.27, 0.53]], [-0.88])]
    for lin, (w, b) in zip([m for m in net if isinstance(m, nn.Linear)], layers):
        lin.weight.data, lin.bias.data = torch.tensor(w, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x = torch.zeros(1, 1, 3, dtype=torch.float64)
    bounder = Bounder(net)
    for norm, eps in (("2", 0.5), ("2", 0.3), ("inf", 0.2)):
        full = sensitivity_upper(bounder, x, eps, norm, method="crown")
        ibp = sensitivity_upper(bounder, x, eps, norm, method="crown-ibp")
        assert torch.all(full["s_crown"] <= ibp["s_crown_ibp"]), (norm, eps, full["s_crown"], ibp["s_crown_ibp"])
    # the shift reaches CROWN-IBP's bound: at the point of the ball where the first ReLU is off
    v = torch.tensor([[[1.24, 0.0, 0.14]]], dtype=torch.float64)
    z = 0.45 * v / v.norm()
    assert float(net[1](z.flatten(1))) < 0
    with torch.no_grad():
        shift = float((net(z) - net(x)).norm())
    full = sensitivity_upper(bounder, x, 0.5, "2", method="crown")["s_crown"]
    assert shift <= float(full) <= shift * (1 + 1e-6)


class Twice(nn.Module):
    """``relu(h + h)`` (or ``h - h``) with ``h = w . x + b``: one node read twice by an addition,
    which torch.fx lists as one input."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.flat, self.lin, self.op = nn.Flatten(), nn.Linear(3, 1), op
        self.lin.weight.data = torch.tensor([[0.6, -0.3, 0.2]])
        self.lin.bias.data = torch.tensor([1.0])

    def forward(self, x):
        h = self.lin(self.flat(x))
        return torch.relu(torch.add(h, h) if self.op == "add" else h + h if self.op == "+" else h - h)


@pytest.mark.parametrize("op", ["+", "add", "-"])
@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_a_node_added_to_itself_counts_twice(op, norm, method):
    """``h + h`` is ``2 h``: over an interior ball where the ReLU stays active the shift is exactly
    ``2 eps ||w||_1`` (L-inf) or ``2 eps ||w||_2`` (L2), and ``h - h`` is 0. Full CROWN's L2
    closed form for affine ReLU inputs counted ``h + h``'s Jacobian once (s_upper 0.070 where the
    shift reaches 0.140) and took the interval of ``h - h`` as exact (0.11 in L-inf for 0)."""
    net = Twice(op).double().eval()
    x, eps = torch.full((2, 1, 1, 3), 0.5, dtype=torch.float64), 0.1
    x[1, 0, 0] = torch.tensor([0.45, 0.55, 0.5], dtype=torch.float64)
    w = net.lin.weight.detach()[0]
    exact = 0.0 if op == "-" else 2 * eps * float(w.abs().sum() if norm == "inf" else w.norm())
    out = sensitivity_upper(Bounder(net), x, eps, norm, method=method)
    assert torch.all(out["s_upper"] >= exact), (out["s_upper"], exact)
    # an attack's point: the corner (L-inf) or the direction of w (L2)
    d = eps * (w.sign() if norm == "inf" else w / w.norm())
    with torch.no_grad():
        shift = (net(x + d.view(1, 1, 1, 3)) - net(x)).norm(dim=1)
    torch.testing.assert_close(shift, torch.full_like(shift, exact), rtol=1e-12, atol=1e-12)
    assert torch.all(out["s_upper"] >= shift)
    if method == "crown":  # and full CROWN is exact here
        torch.testing.assert_close(out["s_crown"], torch.full_like(shift, exact), rtol=1e-8, atol=1e-11)


def test_l2_first_layer_bounds_are_the_ball_and_the_box_whichever_is_tighter():
    """At ``x = 0`` the set is ``{x' >= 0, ||x'||_2 <= eps}``: a first-layer coordinate ``w . x' + b``
    reaches ``eps ||w_+||_2 + b``. Its bound is the smaller of the box's (``eps sum w_+``) and the
    ball's (``eps ||w||_2``), each row chosen so that one or the other is smaller; through a
    normalisation, a convolution and a negative batch-norm scale, the closed form (squared weights)
    equals a backward pass per coordinate and the exact ball bound ``eps ||J_j||_2`` at an interior
    point."""
    from asbound.certify import crown_bounds

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
    net[1].weight.data = torch.tensor([[1.0, 0.1, 0.1, 0.1], [1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, 1.0, 0.2]],
                                      dtype=torch.float64)
    net[1].bias.data = torch.tensor([-0.05, -0.1, -0.05], dtype=torch.float64)
    x, eps = torch.zeros(1, 1, 2, 2, dtype=torch.float64), 0.3
    W, b = net[1].weight.detach(), net[1].bias.detach()
    box_side, ball_side = eps * W.clamp(min=0).sum(1), eps * W.norm(dim=1)
    assert (box_side < ball_side).any() and (ball_side < box_side).any()
    bounder = Bounder(net)
    hi = crown_bounds(bounder, x, eps, "2")["_1"].hi[0]
    torch.testing.assert_close(hi, torch.minimum(box_side, ball_side) + b, rtol=1e-12, atol=1e-14)
    assert torch.all(hi >= eps * W.clamp(min=0).norm(dim=1) + b - 1e-14)

    torch.manual_seed(13)
    conv = _negative_bn(nn.Sequential(Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)), nn.Conv2d(3, 4, 3, padding=1),
                                      nn.Flatten(), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3)))
    conv = _bn_stats(conv)
    x, eps = torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64), 0.05
    x[1] = torch.rand(3, 4, 4, dtype=torch.float64) * 0.2 + 0.4  # interior: the box does not cut the ball
    bounder = Bounder(conv)
    pre = next(iter(bounder.relu_inputs))
    closed = crown_bounds(bounder, x, eps, "2")[pre]
    J = torch.autograd.functional.jacobian(lambda z: conv[:4](z.view(1, 3, 4, 4)).flatten(), x[0].flatten())
    with torch.no_grad():
        centre = conv[:4](x)
    torch.testing.assert_close(closed.hi, centre + eps * J.norm(dim=1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(closed.lo, centre - eps * J.norm(dim=1), rtol=1e-10, atol=1e-12)
    import asbound.certify as certify

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(certify, "_squared_rows", lambda *args: {})
        passes = crown_bounds(bounder, x, eps, "2")[pre]
    unstable = (closed.lo < 0) & (closed.hi > 0)
    assert unstable.any()  # (a backward pass is computed for unstable coordinates only)
    torch.testing.assert_close(passes.hi[unstable], closed.hi[unstable], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(passes.lo[unstable], closed.lo[unstable], rtol=1e-10, atol=1e-12)


def test_full_crown_through_residual_relu_blocks_and_convolutions_is_tighter_than_crown_ibp():
    torch.manual_seed(14)
    net = _bn_stats(nn.Sequential(Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)), nn.Conv2d(3, 4, 3, padding=1),
                                  nn.ReLU(), Residual(4), nn.AvgPool2d(2), Residual(4), nn.Flatten(),
                                  nn.Linear(16, 6)))
    x = torch.rand(4, 3, 4, 4, dtype=torch.float64)
    for norm, eps in (("inf", 0.01), ("2", 0.05)):
        full = sensitivity_upper(Bounder(net), x, eps, norm, method="crown")
        ibp = sensitivity_upper(Bounder(net), x, eps, norm, method="crown-ibp")
        assert torch.all(full["s_crown"] <= ibp["s_crown_ibp"]) and full["s_crown"].mean() < 0.8 * ibp["s_crown_ibp"].mean()
        est = _attack_value(net, x, eps) if norm == "inf" else PGD(eps=eps, norm="2", steps=50, rel_step=0.5,
                                                                    restarts=3)(representation_shift(
            lambda z: net(z).flatten(1), x, net(x).flatten(1)), x).value
        assert torch.all(est <= full["s_crown"])


def test_full_crown_over_its_budget_falls_back_to_crown_ibp_and_says_so(tmp_path, monkeypatch, capsys):
    import pandas as pd

    import asbound.certify as certify

    argv = ["score", "--model", "builtin:digits-adversarial", "--data", "digits", "--classes", "0-4", "--eps",
            "2/255", "--n", "12", "--steps", "5", "--certify", "crown", "--device", "cpu", "--no-progress"]
    full = tmp_path / "full"
    assert main(argv + ["--out", str(full)]) == 0
    config = json.loads((full / "config.json").read_text())
    assert config["certify_used"] == "crown" and config["certify_note"] is None
    assert json.loads((full / "summary.json").read_text())["certify_used"] == "crown"
    capsys.readouterr()
    monkeypatch.setattr(certify, "CROWN_BUDGET", 1e5)  # the digits CNN needs 5.9e7
    fallback = tmp_path / "fallback"
    assert main(argv + ["--out", str(fallback)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    config = json.loads((fallback / "config.json").read_text())
    assert config["certify_used"] == "crown-ibp" and "crown-ibp is computed instead" in config["certify_note"]
    assert "--certify crown: full CROWN would take about 6e+07 multiply-adds" in printed
    assert json.loads((fallback / "summary.json").read_text())["certify_used"] == "crown-ibp"
    a, b = pd.read_csv(full / "points.csv"), pd.read_csv(fallback / "points.csv")
    assert (a["s_upper"] <= b["s_upper"]).all() and (a["s_upper"] < b["s_upper"]).mean() > 0.5
    # a run recorded before full CROWN (its crown was crown-ibp) is not resumed as full CROWN
    old = json.loads((full / "config.json").read_text())
    for key in ("certify_used", "certify_note"):
        del old[key]
    (full / "config.json").write_text(json.dumps(old))
    monkeypatch.undo()
    assert main(argv + ["--out", str(full)]) == 2
    assert "certify_used: None -> 'crown'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["crown-ibp", "crown"])
def test_crown_is_exact_through_padded_and_adaptive_average_pooling(method):
    """An affine chain (convolution, padded average pooling that does not count the padding,
    batch norm, adaptive pooling with uneven windows) is bounded exactly: ``g(mid) ± |J| rad``."""
    torch.manual_seed(15)
    net = _bn_stats(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(3, stride=2, padding=1,
                                                                            count_include_pad=False, ceil_mode=True),
                                  nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten()))
    x, eps = torch.rand(2, 2, 5, 5, dtype=torch.float64), 0.1
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    box = OUTPUT_BOXES[method](Bounder(net), x, eps, "inf")
    for i in range(len(x)):
        J = torch.autograd.functional.jacobian(lambda z: net(z.view(1, 2, 5, 5)).flatten(), x[i].flatten())
        with torch.no_grad():
            centre = net(mid[i:i + 1]).flatten()
        torch.testing.assert_close(box.hi[i], centre + J.abs() @ rad[i].flatten(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(box.lo[i], centre - J.abs() @ rad[i].flatten(), rtol=1e-10, atol=1e-12)


def test_a_sound_run_records_no_shift_above_s_upper(tmp_path):
    """A linear representation on an L2 ball: the bound is the exact eps sigma_max and the attack
    reaches it; float32 rounding put 15 of 64 recorded sensitivities above the float64 bound (by up
    to 8.4e-8, 1.9e-6 of it). The recorded s_upper is raised to them: never below a recorded shift,
    and above the exact bound by no more than that rounding."""
    from asbound import ScoreConfig, score

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Linear(4, 3))
    x = torch.rand(64, 1, 4, 4).clamp(0.2, 0.8)
    with torch.no_grad():
        y = net(x).argmax(1)
    torch.save(net, tmp_path / "net.pt")
    torch.save({"x": x, "y": y, "num_classes": 3}, tmp_path / "data.pt")
    pts = score(ScoreConfig(model=f"file:{tmp_path / 'net.pt'}", data=f"tensors:{tmp_path / 'data.pt'}"),
                allow_pickle=True, eps=0.05, norm="2", n=None, steps=20, certify="ibp", batch_size=64,
                progress=False).points
    assert (pts["sensitivity"] <= pts["s_upper"]).all()
    exact = 0.05 * torch.linalg.matrix_norm(net[1].weight.double(), 2).item()  # g = W1 x; the last Linear is the head
    assert (pts["s_upper"] >= exact * (1 - 1e-9)).all() and (pts["s_upper"] <= exact * (1 + 1e-5)).all()
    assert (pts["s_upper"] > exact * (1 + 1e-12)).any()  # some rows were raised (else the case shows nothing)


def test_full_crown_cost_counts_each_maps_multiply_adds_per_row():
    """A row carried back through a map costs its fan-in per output: a Linear ``out * in``, a
    Conv2d ``out * in_channels * kernel area`` (grouped too), an average pooling ``out * kernel area``,
    an adaptive one its input's size, anything else the larger of its own and its inputs' sizes.
    (Counted by sizes alone, a 3072-16384-16384 MLP came out below a CIFAR ResNet-18 at 8x8 inputs
    that it outlasts: 371 s against 248 s per point.)"""
    import asbound.certify as certify

    class Maps(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.grouped = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, (3, 1), padding=(1, 0), groups=2)
            self.pool, self.adaptive, self.lin = nn.AvgPool2d(3, 1, 1), nn.AdaptiveAvgPool2d(2), nn.Linear(16, 5)

        def forward(self, x):
            h = torch.nn.functional.avg_pool2d(self.pool(self.grouped(self.conv(x))), (3, 1), 1, (1, 0))
            return self.lin(torch.relu(self.adaptive(h)).flatten(1))

    bounder = Bounder(Maps().double().eval())
    env = bounder.boxes(torch.rand(1, 2, 4, 4, dtype=torch.float64), torch.ones(1, 2, 4, 4, dtype=torch.float64))
    size = {n: v.lo[0].numel() for n, v in env.items() if certify._is_box(v)}
    work = {n.target if n.op == "call_module" else n.name: certify._row_work(bounder, n, size)
            for n in bounder.graph.graph.nodes if n.op in ("call_module", "call_function")}
    assert work == {"conv": 64 * 2 * 9, "grouped": 64 * 4 * 3, "pool": 64 * 9, "avg_pool2d": 64 * 3, "adaptive": 64,
                    "relu": 16, "lin": 5 * 16}


def test_full_crown_cost_in_l2_counts_the_passes_behind_pooling(monkeypatch):
    # avg pooling at the input is an exact interval in L-inf (no pass), but in L2 its rows' norms
    # are not computed directly, so full CROWN refines it by backward passes: the cost counts them
    import asbound.certify as certify

    net = nn.Sequential(nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    bounder = Bounder(net.double().eval())
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    refined: "list[str]" = []
    real = certify._refine
    monkeypatch.setattr(certify, "_refine", lambda b, node, *a: refined.append(node.name) or real(b, node, *a))
    certify.crown_bounds(bounder, x, 0.1, "2")
    assert len(refined) == 2  # the pooled input and the Linear's output
    pooled, hidden = 1 * 2 * 2, 3
    pool = pooled * 4  # multiply-adds per row: each pooled value averages a 2x2 window
    upto = 16 + pool + pooled + pooled + hidden * pooled  # the input, pooling, ReLU, flatten, Linear(4, 3)
    linf = hidden * upto + 2 * (upto + hidden + 2 * hidden)
    linf += certify._VISIT * (5 + 7)  # the nodes each pass visits
    assert certify.crown_cost(bounder, x, "inf") == linf
    assert certify.crown_cost(bounder, x, "2") == linf + pooled * (16 + pool) + certify._VISIT * 2
    monkeypatch.setattr(certify, "CROWN_BUDGET", linf)
    assert certify.method_for(bounder, "crown", x, "inf")[0] == "crown"
    assert certify.method_for(bounder, "crown", x, "2")[0] == "crown-ibp"


def test_score_budgets_full_crown_in_the_runs_norm(tmp_path, monkeypatch):
    # full CROWN's cost differs between the norms (test above): score asks for the run's, and
    # records what that answer computes
    import asbound.scoring as scoring

    asked: "list[str]" = []
    real = scoring.method_for
    monkeypatch.setattr(scoring, "method_for", lambda b, m, x, norm: asked.append(norm) or real(b, m, x, norm))
    argv = ["score", "--model", "builtin:digits-adversarial", "--data", "digits", "--classes", "0-4", "--eps",
            "0.1", "--norm", "L2", "--n", "4", "--steps", "2", "--certify", "crown", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert asked == ["2"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["norm"] == "2" and config["certify_used"] == "crown"


def test_full_crown_cost_counts_both_branches_of_an_addition():
    import asbound.certify as certify

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            x = x.flatten(1)
            return self.head(torch.relu(self.a(x) + self.b(x)))

    bounder = Bounder(Branches().double().eval())
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    before = 4 + 4 + 5 * 4 + 5 * 4  # the input, its flatten and both Linears: a pass from the sum goes through all
    for norm in ("inf", "2"):
        visits = certify._VISIT * (5 + 7)
        assert certify.crown_cost(bounder, x, norm) == 5 * (before + 5) + 3 * (before + 5 + 5 + 3 * 5) + visits


class _FunctionalPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(32, 2)

    def forward(self, x):
        return self.head(torch.relu(torch.nn.functional.avg_pool2d(self.conv(x), 3, 1, 1)).flatten(1))


class _Scaled(nn.Module):
    """A one-channel input broadcast to three channels by constants of both signs, then a convolution:
    each output is an affine function of the input with kernel ``sum_c s_c W_c``, whose absolute
    value interval arithmetic does not see (it takes ``sum_c |s_c W_c|``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("s", torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1))
        self.conv, self.head = nn.Conv2d(3, 2, 3, padding=1), nn.Linear(32, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x * self.s)).flatten(1))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(3, stride=1, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32, 2)),  # pooling that keeps the size mixes as much as one that shrinks it
    _FunctionalPool,  # so does the function
    _Scaled,  # a constant that broadcasts the input mixes its copies
], ids=["same-size-pooling", "same-size-pooling-function", "broadcast"])
def test_a_second_mixing_map_is_not_an_exact_interval(make):
    # two maps that mix coordinates: the interval of the ReLU's input is not CROWN's, full CROWN
    # refines it by backward passes, and its cost counts them
    import asbound.certify as certify

    torch.manual_seed(3)
    bounder = Bounder(make().double().eval())
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    (pre,) = bounder.relu_inputs
    full = certify.crown_bounds(bounder, x, 0.1, "inf")
    ibp = bounder.boxes((x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1))
    assert ((full[pre].hi - full[pre].lo) < (ibp[pre].hi - ibp[pre].lo) - 1e-9).any()
    point = bounder.boxes(x[:1], x[:1])
    nodes = [n for n in bounder.graph.graph.nodes if certify._is_box(point.get(n.name))]
    size = {n.name: point[n.name].lo[0].numel() for n in nodes}
    work = [certify._row_work(bounder, n, size) for n in nodes]
    names = [n.name for n in nodes]
    upto = sum(work[: names.index(pre) + 1])  # a chain: every node before the ReLU's input is on its passes
    visits = certify._VISIT * (names.index(pre) + 1 + len(names))
    assert certify.crown_cost(bounder, x, "inf") == size[pre] * upto + size[names[-1]] * sum(work) + visits
