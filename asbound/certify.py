"""Certified sensitivity: an upper bound ``s_upper_i >= max over the ball of ||g(x') - g(x_i)||_2``
(SPEC.md sections 2 and 4). With it, ``s_upper_i < m_i`` certifies Theorem 2's criterion and
``mean(s_upper_i)`` is a sound Lemma 1 RHS; PGD only bounds ``s_i`` from below.

The representation is traced with ``torch.fx`` and bounded in float64, two ways, the tighter kept:

* interval bound propagation (IBP) of the input box ``[x - eps, x + eps] ∩ [0, 1]`` (which holds
  the L-inf ball and the L2 ball) to a box on ``g``; then ``s <= || max(u - g(x), g(x) - l) ||_2``;
* for chains of Linear / ReLU / batch norm / flatten / normalisation layers, the product of their
  L2 operator norms (exact spectral norms) times the ball's L2 radius (``eps``, or ``eps sqrt(d)``
  for L-inf): on a linear representation and an L2 ball this is the exact ``eps sigma_max(A)``.

Supported: Linear, Conv2d, ReLU, BatchNorm (eval), average pooling, flatten / view / reshape, the
normalisation layers models carry (affine arithmetic with constant tensors) and residual additions.
Any other module or operation is refused with its type named. Float64 throughout, with a relative
widening of ``1e-9`` against rounding.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch.fx

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asbound.errors import ModelError

METHODS = ("ibp",)
_WIDEN = 1e-9


@dataclass
class Box:
    lo: Tensor
    hi: Tensor

    @property
    def mid(self) -> Tensor:
        return (self.lo + self.hi) / 2

    @property
    def rad(self) -> Tensor:
        return (self.hi - self.lo) / 2


def _affine(box: Box, fn: "Any", abs_fn: "Any") -> Box:
    """A linear map ``fn`` (with bias) applied to a box; ``abs_fn`` is the map of ``|W|`` without bias."""
    mid, rad = fn(box.mid), abs_fn(box.rad)
    return Box(mid - rad, mid + rad)


def _module_box(module: nn.Module, box: Box) -> Box:
    if isinstance(module, nn.Linear):
        W = module.weight.detach().double()
        b = module.bias.detach().double() if module.bias is not None else None
        return _affine(box, lambda x: F.linear(x, W, b), lambda r: F.linear(r, W.abs()))
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ModelError(f"certify: Conv2d with padding_mode={module.padding_mode!r} is not supported (zeros only)")
        W = module.weight.detach().double()
        b = module.bias.detach().double() if module.bias is not None else None
        kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        return _affine(box, lambda x: F.conv2d(x, W, b, **kw), lambda r: F.conv2d(r, W.abs(), None, **kw))
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if module.training or module.running_mean is None:
            raise ModelError("certify: batch norm must be in eval mode with running statistics")
        scale = (module.running_var.double() + module.eps).rsqrt()
        if module.weight is not None:
            scale = scale * module.weight.detach().double()
        shift = -module.running_mean.double() * scale + (module.bias.detach().double() if module.bias is not None else 0)
        shape = (1, -1) + (1,) * (box.lo.dim() - 2)
        s, t = scale.view(shape), shift.view(shape)
        return _affine(box, lambda x: x * s + t, lambda r: r * s.abs())
    if isinstance(module, (nn.ReLU,)):
        return Box(box.lo.clamp(min=0), box.hi.clamp(min=0))
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)):
        return Box(module(box.lo), module(box.hi))  # monotone (positive linear) or the identity in eval
    raise ModelError(f"certify: module type {type(module).__name__} is not supported; supported: Linear, Conv2d, "
                     f"ReLU, BatchNorm1d/2d (eval), AvgPool2d, AdaptiveAvgPool2d, Flatten, Identity, Dropout, "
                     f"normalisation arithmetic, residual additions")


_MONOTONE_FN = {F.relu, torch.relu, torch.flatten, F.avg_pool2d, F.adaptive_avg_pool2d, torch.Tensor.flatten}
_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze"}


def _is_box(v: Any) -> bool:
    return isinstance(v, Box)


def _arith(op: Any, a: Any, b: Any) -> Any:
    """``a op b`` where at most one side is a box, the other a constant (tensor or number)."""
    if _is_box(a) and _is_box(b):
        if op in (operator.add, torch.add):
            return Box(a.lo + b.lo, a.hi + b.hi)
        if op in (operator.sub, torch.sub):
            return Box(a.lo - b.hi, a.hi - b.lo)
        raise ModelError(f"certify: {getattr(op, '__name__', op)} of two bounded tensors is not supported")
    if not _is_box(a) and not _is_box(b):
        return op(a, b)
    if op in (operator.add, torch.add):
        c, box = (b, a) if _is_box(a) else (a, b)
        c = _const(c)
        return Box(box.lo + c, box.hi + c)
    if op in (operator.sub, torch.sub):
        if _is_box(a):
            c = _const(b)
            return Box(a.lo - c, a.hi - c)
        c = _const(a)
        return Box(c - b.hi, c - b.lo)
    if op in (operator.mul, torch.mul):
        c, box = (b, a) if _is_box(a) else (a, b)
        c = _const(c)
        x, y = box.lo * c, box.hi * c
        return Box(torch.minimum(x, y), torch.maximum(x, y))
    if op in (operator.truediv, torch.div) and _is_box(a):
        c = _const(b)
        if torch.any(torch.as_tensor(c) == 0):
            raise ModelError("certify: division by zero in the representation")
        x, y = a.lo / c, a.hi / c
        return Box(torch.minimum(x, y), torch.maximum(x, y))
    raise ModelError(f"certify: operation {getattr(op, '__name__', op)} on a bounded tensor is not supported")


def _const(c: Any) -> Any:
    return c.double() if isinstance(c, Tensor) else c


class Bounder:
    """Interval bounds of a module's output over boxes of inputs (its ``torch.fx`` graph, float64)."""

    def __init__(self, module: nn.Module) -> None:
        module = module.eval()
        try:
            self.graph = torch.fx.symbolic_trace(module)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is one reason to refuse
            raise ModelError(f"certify: the representation cannot be traced by torch.fx "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                             f"certify supports plain feed-forward and residual networks") from None
        self.modules = dict(self.graph.named_modules())
        self._check()

    def _check(self) -> None:
        for node in self.graph.graph.nodes:
            if node.op == "call_module":
                m = self.modules[node.target]
                probe = Box(torch.zeros(1), torch.zeros(1))
                if not isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d,
                                      nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)):
                    _module_box(m, probe)  # raises with the module's type named

    def __call__(self, lo: Tensor, hi: Tensor) -> Box:
        env: "dict[str, Any]" = {}
        out = None
        for node in self.graph.graph.nodes:
            args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            if node.op == "placeholder":
                env[node.name] = Box(lo.double(), hi.double())
            elif node.op == "get_attr":
                obj: Any = self.graph
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                env[node.name] = obj.double() if isinstance(obj, Tensor) and obj.is_floating_point() else obj
            elif node.op == "call_module":
                env[node.name] = _module_box(self.modules[node.target], args[0])
            elif node.op == "call_function":
                env[node.name] = self._function(node.target, args, kwargs)
            elif node.op == "call_method":
                env[node.name] = self._method(node.target, args, kwargs)
            elif node.op == "output":
                out = args[0]
        if not _is_box(out):
            raise ModelError("certify: the representation's output does not depend on its input")
        return out

    @staticmethod
    def _function(fn: Any, args: tuple, kwargs: dict) -> Any:
        if fn in _MONOTONE_FN:
            box = args[0]
            if not _is_box(box):
                return fn(*args, **kwargs)
            return Box(fn(box.lo, *args[1:], **kwargs), fn(box.hi, *args[1:], **kwargs))
        if fn in (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                  torch.div) and len(args) == 2 and not kwargs:
            return _arith(fn, *args)
        if fn is getattr and not _is_box(args[0]):
            return getattr(*args)
        if fn is operator.getitem and not any(_is_box(a) for a in args):
            return operator.getitem(*args)
        if any(_is_box(a) for a in args):
            raise ModelError(f"certify: function {getattr(fn, '__name__', fn)} is not supported on the representation")
        return fn(*args, **kwargs)

    @staticmethod
    def _method(name: str, args: tuple, kwargs: dict) -> Any:
        target = args[0]
        if not _is_box(target):
            return getattr(target, name)(*args[1:], **kwargs)
        if name == "size" or name == "dim":
            return getattr(target.lo, name)(*args[1:], **kwargs)
        if name in _SHAPE_METHODS:
            return Box(getattr(target.lo, name)(*args[1:], **kwargs), getattr(target.hi, name)(*args[1:], **kwargs))
        if name == "relu":
            return Box(target.lo.clamp(min=0), target.hi.clamp(min=0))
        if name in ("add", "sub", "mul", "div"):
            op = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}[name]
            return _arith(op, target, args[1])
        raise ModelError(f"certify: method .{name}() is not supported on the representation")

    def lipschitz(self) -> float:
        """An L2 -> L2 Lipschitz constant of the module when its graph is a chain of Linear, ReLU,
        batch norm, flatten and constant-affine layers; ``inf`` otherwise (convolutions, pooling,
        residual additions)."""
        lip = 1.0
        nodes = list(self.graph.graph.nodes)
        for node in nodes:
            users = len(node.users)
            if node.op in ("placeholder", "call_module", "call_function", "call_method") and users > 1:
                return math.inf  # a branch: not a chain
            if node.op == "call_module":
                m = self.modules[node.target]
                if isinstance(m, nn.Linear):
                    lip *= float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
                elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    scale = (m.running_var.double() + m.eps).rsqrt()
                    if m.weight is not None:
                        scale = scale * m.weight.detach().double()
                    lip *= float(scale.abs().max())
                elif not isinstance(m, (nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout)):
                    return math.inf
            elif node.op == "call_function":
                if node.target in (F.relu, torch.relu, torch.flatten, torch.Tensor.flatten):
                    continue
                if node.target in (operator.sub, operator.add, torch.sub, torch.add):
                    if sum(isinstance(a, torch.fx.Node) and a.op != "get_attr" for a in node.args) > 1:
                        return math.inf
                    continue
                if node.target in (operator.truediv, operator.mul, torch.div, torch.mul):
                    const = [a for a in node.args if not (isinstance(a, torch.fx.Node) and a.op != "get_attr")]
                    if len(const) != 1:
                        return math.inf
                    c = const[0]
                    if isinstance(c, torch.fx.Node):
                        c = self._attr(c.target)
                    c = torch.as_tensor(c, dtype=torch.float64).abs()
                    lip *= float((1 / c).max() if node.target in (operator.truediv, torch.div) else c.max())
                    continue
                if node.target is getattr or node.target is operator.getitem:
                    continue
                return math.inf
            elif node.op == "call_method":
                if node.target not in _SHAPE_METHODS | {"size", "dim", "relu"}:
                    return math.inf
        return lip * (1 + _WIDEN)

    def _attr(self, target: str) -> Any:
        obj: Any = self.graph
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj


def sensitivity_upper(bounder: Bounder, x: Tensor, eps: float, norm: str,
                      lipschitz: Optional[float] = None) -> "dict[str, Tensor]":
    """Per datapoint: ``s_upper`` (the tighter of the IBP box bound and the Lipschitz bound),
    ``s_ibp``, ``s_lip`` and ``s_domain`` (the IBP bound over all of [0, 1]^d: a certificate that
    is not below it says nothing the input domain does not already say)."""
    x = x.double()
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    with torch.no_grad():
        g = bounder(x, x).mid.flatten(1)  # g(x) in float64: the certificate is about the exact function
        box = bounder(lo, hi)
        l, u = box.lo.flatten(1), box.hi.flatten(1)
        s_ibp = torch.maximum(u - g, g - l).clamp(min=0).norm(dim=1)
        whole = bounder(torch.zeros_like(x), torch.ones_like(x))
        s_domain = torch.maximum(whole.hi.flatten(1) - g, g - whole.lo.flatten(1)).clamp(min=0).norm(dim=1)
    lip = bounder.lipschitz() if lipschitz is None else lipschitz
    d = x[0].numel()
    radius = eps if norm == "2" else eps * math.sqrt(d)
    s_lip = torch.full_like(s_ibp, lip * radius)
    s_ibp = s_ibp * (1 + _WIDEN) + 1e-12
    s_upper = torch.minimum(s_ibp, s_lip)
    return {"s_upper": s_upper, "s_ibp": s_ibp, "s_lip": s_lip, "s_domain": s_domain * (1 + _WIDEN)}
