"""Certified sensitivity against auto_LiRPA, a reference run from its source, never a dependency.

auto_LiRPA (Verified-Intelligence/auto_LiRPA, v0.7.1) is not on PyPI for the pinned torch; run
this script in a scratch environment that has it (FACTS.md: ``pip install --no-deps -e <src>``
plus graphviz and ninja). Without it, the script prints one line and exits 0.

Per network, norm and eps, on the same datapoints and networks, in float64, every bound is
reduced as asbound reduces it, ``s = ||max(u - g(x), g(x) - l)||_2``, and divided by a strong
attack's shift (per point the best of PGD and APGD with restarts): asbound's ``ibp``,
``crown-ibp`` and ``crown`` (each with the operator-norm bound where that is tighter) against
auto_LiRPA's CROWN and alpha-CROWN. The input set is ``[x - eps, x + eps] ∩ [0, 1]`` for L-inf;
for L2 auto_LiRPA bounds the ball ``||x' - x||_2 <= eps`` alone (it ignores a box in L2) and
asbound the ball intersected with ``[0, 1]^d`` (the threat set; each bound is sound for it).
Also: the largest per-point excess of asbound's ``crown`` over auto_LiRPA's CROWN (relative),
the share of points certified (``s_upper < margin``) and seconds per point (batched, one
thread). alpha-CROWN (on the first ``--alpha-n`` points: it costs hundreds of CROWN passes; its
column is its mean there over CROWN's mean there): ``--alpha-iterations`` Adam steps (learning
rate 0.1) on the lower ReLU slopes of the output's passes; on torch 2.14
the gradient of ``clamp(a, 0, 1)`` at exactly 0 or 1 is 0 and auto_LiRPA starts every slope
there, so the script restores the inclusive boundary gradient for that clamp (else alpha-CROWN
returns CROWN's bounds).

    python benchmarks/certify_reference.py [--n 200] [--models digits-adversarial,digits-standard]
        [--linf 1/255,2/255,4/255] [--l2 4/255,8/255,16/255] [--out reports/certify_reference.md]

With ``--out`` the table replaces its section of that file (the rest is kept).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import types
from fractions import Fraction
from pathlib import Path

try:
    import auto_LiRPA  # noqa: F401
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
except Exception as exc:  # noqa: BLE001 - any failure to import means: no reference here
    print(f"certify_reference: skipped, auto_LiRPA is not importable ({type(exc).__name__})")
    sys.exit(0)

import pandas as pd
import torch

from asbound.attacks import APGD, PGD, _keep_best, representation_shift
from asbound.bounds import margins
from asbound.certify import OUTPUT_BOXES, Bounder, sensitivity_upper
from asbound.data import load_data
from asbound.models import load_model, split_model
from timing import write_section  # benchmarks/timing.py

OURS = ("ibp", "crown-ibp", "crown")
HEADING = "## Certified sensitivity against auto_LiRPA v0.7.1"


class _InclusiveClamp(torch.autograd.Function):
    """``clamp(x, lo, hi)`` whose gradient passes at ``x = lo`` and ``x = hi`` too."""

    @staticmethod
    def forward(ctx, x, lo, hi):  # noqa: D102
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (x,) = ctx.saved_tensors
        inside = torch.ones_like(x, dtype=torch.bool)
        if ctx.lo is not None:
            inside &= x >= ctx.lo
        if ctx.hi is not None:
            inside &= x <= ctx.hi
        return grad * inside, None, None


def _inclusive_clamp(x, min=None, max=None):  # noqa: A002 - torch.clamp's keywords
    if isinstance(x, torch.Tensor) and x.requires_grad and not isinstance(min, torch.Tensor) \
            and not isinstance(max, torch.Tensor):
        return _InclusiveClamp.apply(x, min, max)
    return torch.clamp(x, min=min, max=max)


def _shim_alpha_clamp() -> None:
    """auto_LiRPA's ReLU clamps its slopes with ``torch.clamp``: give that module a torch whose
    clamp has the inclusive gradient (everything else is torch itself)."""
    from auto_LiRPA.operators import relu

    shim = types.ModuleType("torch_inclusive_clamp")
    shim.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[attr-defined]
    shim.clamp = _inclusive_clamp
    relu.torch = shim


def _eps(text: str) -> float:
    return float(Fraction(text))


def _strong_attack(net, x: torch.Tensor, eps: float, norm: str, seed: int) -> torch.Tensor:
    """Per point the best of PGD 200 steps x 5 restarts (step 0.1 eps) and APGD 100 x 5."""
    g0 = net(x).flatten(1)
    objective = representation_shift(lambda z: net(z).flatten(1), x, g0)
    best_x = best_v = None
    gen = torch.Generator().manual_seed(seed)
    for attack in (PGD(eps=eps, norm=norm, steps=200, rel_step=0.1, restarts=5),
                   APGD(eps=eps, norm=norm, steps=100, restarts=5)):
        res = attack(objective, x, generator=gen, clean_value=torch.zeros(len(x), dtype=x.dtype))
        best_x, best_v = _keep_best(best_x, best_v, res.x_adv, res.value)
    return best_v


def _lirpa(bounded: "BoundedModule", net, x: torch.Tensor, eps: float, norm: str, method: str,
           iterations: int) -> "tuple[torch.Tensor, float]":
    if norm == "inf":
        ptb = PerturbationLpNorm(norm=float("inf"), x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    else:
        ptb = PerturbationLpNorm(norm=2, eps=eps)
    if method == "alpha-CROWN":
        bounded.set_bound_opts({"optimize_bound_args": {"iteration": iterations, "lr_alpha": 0.1}})
    start = time.perf_counter()
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method=method)
    seconds = (time.perf_counter() - start) / len(x)
    g0 = net(x).flatten(1)
    return torch.maximum(ub.detach() - g0, g0 - lb.detach()).clamp(min=0).norm(dim=1), seconds


def _ours(bounder: Bounder, x: torch.Tensor, eps: float, norm: str, method: str) -> "tuple[torch.Tensor, float]":
    sensitivity_upper(bounder, x[:1], eps, norm, method=method)  # the domain box, once
    start = time.perf_counter()
    OUTPUT_BOXES[method](bounder, x, eps, norm)
    seconds = (time.perf_counter() - start) / len(x)
    return sensitivity_upper(bounder, x, eps, norm, method=method)["s_upper"], seconds


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits-adversarial,digits-standard")
    p.add_argument("--data", default="digits")
    p.add_argument("--classes", default="0-4")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--linf", default="1/255,2/255,4/255")
    p.add_argument("--l2", default="4/255,8/255,16/255")
    p.add_argument("--alpha-iterations", type=int, default=20)
    p.add_argument("--alpha-n", type=int, default=40, help="points for alpha-CROWN")
    p.add_argument("--no-alpha", action="store_true", help="skip auto_LiRPA's alpha-CROWN")
    p.add_argument("--out", help="markdown table")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # auto_LiRPA's CROWN needs it (FACTS.md)
    _shim_alpha_clamp()
    rows, worst = [], []
    for name in args.models.split(","):
        loaded = load_model(f"builtin:{name}")
        data = load_data(args.data, n=args.n, seed=0, classes=args.classes, input_format=loaded.input_format)
        x = data.batch(torch.arange(len(data))).double()
        split = split_model(loaded.module.float(), x[:8].float())
        net = copy.deepcopy(split.backbone).double().eval().requires_grad_(False)
        bounder = Bounder(split.backbone)
        bounded = BoundedModule(copy.deepcopy(net), torch.zeros_like(x[:1]), device="cpu")
        with torch.no_grad():
            m = margins(net(x).flatten(1), data.y, split.W, split.b)
        grid = [("inf", e) for e in args.linf.split(",")] + [("2", e) for e in args.l2.split(",") if e]
        for norm, text in grid:
            eps = _eps(text)
            attack = _strong_attack(net, x, eps, norm, seed=0)
            row = {"network": name, "norm": "L-inf" if norm == "inf" else "L2", "eps": text, "n": len(x),
                   "attack": float(attack.mean())}
            s = {}
            for method in OURS:
                s[method], row[f"{method} s"] = _ours(bounder, x, eps, norm, method)
                assert torch.all(attack <= s[method]), f"{name} {norm} {text} {method}: unsound"
            lirpa = {}
            lirpa["CROWN"], row["auto_LiRPA CROWN s"] = _lirpa(bounded, net, x, eps, norm, "CROWN", 0)
            for method in OURS:
                row[method] = float(s[method].mean()) / row["attack"]
            row["auto_LiRPA CROWN"] = float(lirpa["CROWN"].mean()) / row["attack"]
            if not args.no_alpha:
                k = min(args.alpha_n, len(x))
                fresh = BoundedModule(copy.deepcopy(net), torch.zeros_like(x[:1]), device="cpu")
                alpha, row["auto_LiRPA alpha-CROWN s"] = _lirpa(fresh, net, x[:k], eps, norm, "alpha-CROWN",
                                                                args.alpha_iterations)
                row["alpha-CROWN / CROWN"] = float(alpha.mean() / lirpa["CROWN"][:k].mean())
            row["crown / auto_LiRPA CROWN"] = float(s["crown"].mean() / lirpa["CROWN"].mean())
            excess = (s["crown"] - lirpa["CROWN"]) / lirpa["CROWN"]
            row["worst point excess"] = float(excess.max())
            worst.append(float(excess.max()))
            row["certified crown"] = float((s["crown"] < m).double().mean())
            row["certified auto_LiRPA CROWN"] = float((lirpa["CROWN"] < m).double().mean())
            rows.append(row)
            print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    table = pd.DataFrame(rows)
    text = table.to_markdown(index=False, floatfmt=".4g")
    print(text)
    print(f"largest per-point excess of crown over auto_LiRPA's CROWN: {max(worst):.3g} (relative)")
    if args.out:  # its section of the file (benchmarks/certify_timing.py writes another)
        write_section(Path(args.out), HEADING, "Mean s_upper / mean strong-attack shift; s: seconds per point, "
                      "batched, one thread.\n\n" + text + "\n\n"
                      f"`command: python benchmarks/certify_reference.py {' '.join(argv or sys.argv[1:])}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
