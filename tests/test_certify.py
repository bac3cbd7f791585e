"""Certified sensitivity: on random small networks of every supported layer type and both norms,
PGD's estimate and densely sampled points never exceed ``s_upper``, on every datapoint; the closed
forms on linear representations; certified implies robust; unsupported modules are named."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from asbound.attacks import PGD, representation_shift
from asbound.certify import Bounder, crown_box, sensitivity_upper
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
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_no_attack_and_no_sample_exceeds_the_certified_bound(name, norm, method):
    torch.manual_seed(0)
    net = _bn_stats(NETS[name]())
    x = torch.rand((6, *SHAPES[name]), dtype=torch.float64)
    x[0] = 0.0  # a corner: the box clips the ball
    eps = 0.05 if norm == "inf" else 0.2
    out = sensitivity_upper(Bounder(net), x, eps, norm, method=method)
    bound = out["s_crown"] if method == "crown" else out["s_upper"]
    if method == "crown":  # CROWN's box is intersected with IBP's: never looser
        assert torch.all(out["s_crown"] <= out["s_ibp"]) and torch.all(out["s_upper"] <= bound)
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


def test_a_linear_representation_and_an_l2_ball_give_eps_sigma_max_exactly():
    torch.manual_seed(4)
    A = torch.randn(5, 12, dtype=torch.float64)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False)).double()
    net[1].weight.data = A.clone()
    x = torch.full((3, 1, 3, 4), 0.5, dtype=torch.float64)
    eps = 0.1
    out = sensitivity_upper(Bounder(net), x, eps, "2")
    exact = eps * float(torch.linalg.matrix_norm(A, ord=2))
    torch.testing.assert_close(out["s_upper"], torch.full((3,), exact, dtype=torch.float64), rtol=1e-8, atol=0)
    assert torch.all(out["s_upper"] >= exact)
    # L-inf: the IBP box bound is eps ||(|A| 1)||_2, at least the best vertex of the cube
    inf = sensitivity_upper(Bounder(net), x, eps, "inf")
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
    out = sensitivity_upper(Bounder(net), x, 0.05, "inf", method="crown")
    assert float(out["s_crown"].mean()) < 0.6 * float(out["s_ibp"].mean())  # measured: about 0.3
    est = PGD(eps=0.05, steps=100, restarts=5)(representation_shift(net, x), x).value
    assert torch.all(est <= out["s_crown"])


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
    with pytest.raises(ModelError, match="certify method 'lp' is not valid; valid: ibp, crown"):
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
    # CROWN through ResNet-18 / PreActResNet-18 takes minutes per point on 2 CPU cores: IBP there in CI
    method = "crown" if arch == "wrn" else "ibp"
    out = sensitivity_upper(Bounder(backbone), x, eps, "inf", method=method)
    bound = out["s_upper"]
    g0 = backbone(x).flatten(1)
    est = PGD(eps=eps, norm="inf", steps=5, rel_step=0.7)(representation_shift(
        lambda z: backbone(z).flatten(1), x, g0), x, generator=torch.Generator().manual_seed(0))
    assert torch.all(est.value <= bound) and torch.all(torch.isfinite(bound))
    if method == "crown":
        assert torch.all(est.value <= out["s_crown"]) and torch.all(out["s_crown"] <= out["s_ibp"])


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
    assert "invalid choice: 'lp' (choose from 'ibp', 'crown')" in err and err.count("\n") == 1


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


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_eps_zero_certifies_a_zero_shift(method):
    out = _conv_bounds(0.0, method)
    assert torch.all(torch.isfinite(out["s_upper"])) and torch.all(out["s_upper"] <= 1e-9)


@pytest.mark.parametrize("method", ["ibp", "crown"])
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
        for method in ("ibp", "crown"):
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
