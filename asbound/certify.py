"""Certified sensitivity: an upper bound ``s_upper_i >= max over the ball of ||g(x') - g(x_i)||_2``
(SPEC.md sections 2 and 4). With it, ``s_upper_i < m_i`` certifies Theorem 2's criterion and
``mean(s_upper_i)`` is a sound Lemma 1 RHS; PGD only bounds ``s_i`` from below.

The representation is traced with ``torch.fx`` and bounded in float64, the tightest kept:

* interval bound propagation (IBP) of the input box ``[x - eps, x + eps] ∩ [0, 1]`` (which holds
  the L-inf ball and the L2 ball) to a box on ``g``; then ``s <= || max(u - g(x), g(x) - l) ||_2``;
* with ``method="crown"``, linear relaxation (CROWN with IBP bounds for the intermediate layers,
  Zhang et al. 2018, 2020): one backward pass per output coordinate and sign gives a linear
  function of ``x'`` above ``±g_j(x')``, maximised over the box (and, for L2, over the ball:
  ``<a, x> + eps ||a||_2``, the smaller kept); its box on ``g``, intersected with IBP's, gives the
  bound as above. ReLU relaxations: the chord above, ``alpha z`` below (``alpha = 1`` iff ``u > -l``);
* for chains of Linear / ReLU / batch norm / flatten / normalisation layers, the product of their
  L2 operator norms (exact spectral norms) times the ball's L2 radius (``eps``, or ``eps sqrt(d)``
  for L-inf): on a linear representation and an L2 ball this is the exact ``eps sigma_max(A)``.

Supported: Linear, Conv2d, ReLU, BatchNorm (eval), average pooling, flatten / view / reshape, the
normalisation layers models carry (affine arithmetic with constant tensors) and residual additions.
Any other module or operation is refused with its type named. Float64 throughout, with a relative
widening of ``1e-9`` against rounding.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch.fx

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asbound.errors import ModelError
from asbound.models.split import LayerOutput

METHODS = ("ibp", "crown")
_WIDEN = 1e-9
_CHUNK_BYTES = 256 * 2**20  # CROWN: the coefficients of one chunk of output coordinates


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


def _has_box(v: Any) -> bool:
    """Whether ``v`` is a box or holds one (in a list, tuple or dict)."""
    if isinstance(v, (list, tuple)):
        return any(_has_box(a) for a in v)
    if isinstance(v, dict):
        return any(_has_box(a) for a in v.values())
    return _is_box(v)


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


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    """The ``torch.fx`` graph of ``module``. A :class:`~asbound.models.split.LayerOutput` stops the
    forward pass with a hook on its layer, which tracing does not run on a leaf module (a Linear, a
    ReLU): there the whole model is traced and its graph cut at the layer's first call."""
    if isinstance(module, LayerOutput):
        graph = torch.fx.symbolic_trace(module.model)
        node = next((n for n in graph.graph.nodes if n.op == "call_module" and n.target == module.layer), None)
        if node is not None:
            next(n for n in graph.graph.nodes if n.op == "output").args = (node,)
            graph.graph.eliminate_dead_code()
            graph.recompile()
            return graph
    return torch.fx.symbolic_trace(module)


class Bounder:
    """Interval bounds of a module's output over boxes of inputs (its ``torch.fx`` graph, float64)."""

    def __init__(self, module: nn.Module) -> None:
        module = module.eval()
        try:
            # a float64 snapshot: every bound (IBP, CROWN, the operator norms, the cached domain box)
            # is about the weights at construction, whatever happens to ``module`` later
            self.graph = copy.deepcopy(_trace(module)).double().eval().requires_grad_(False)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is one reason to refuse
            raise ModelError(f"certify: the representation cannot be traced by torch.fx "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                             f"certify supports plain feed-forward and residual networks") from None
        self.modules = dict(self.graph.named_modules())
        self._check()
        self.output  # noqa: B018 - refuses a representation that does not return one tensor

    def _check(self) -> None:
        for node in self.graph.graph.nodes:
            inplace = node.kwargs.get("inplace") is True or (
                node.op == "call_module" and getattr(self.modules[node.target], "inplace", False) is True) or (
                node.op == "call_method" and str(node.target).endswith("_"))
            src = node.args[0] if node.args else None
            if inplace and isinstance(src, torch.fx.Node) and len(src.users) > 1:
                raise ModelError(f"certify: {node.target if node.op != 'call_function' else node.target.__name__} "
                                 f"works in place on a tensor that is used again ({src.name}); the network then "
                                 f"computes something else than its graph says: use inplace=False there")
            if node.op == "call_module":
                m = self.modules[node.target]
                probe = Box(torch.zeros(1), torch.zeros(1))
                if not isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d,
                                      nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)):
                    _module_box(m, probe)  # raises with the module's type named

    def __call__(self, lo: Tensor, hi: Tensor) -> Box:
        return self.output_box(self.boxes(lo, hi))

    def output_box(self, env: "dict[str, Any]") -> Box:
        """The output's box among the node bounds ``env`` of :meth:`boxes`."""
        out = env[self.output.name]
        if not _is_box(out):
            raise ModelError("certify: the representation's output does not depend on its input")
        return out

    @property
    def output(self) -> "torch.fx.Node":
        out = next(n for n in self.graph.graph.nodes if n.op == "output").args[0]
        if not isinstance(out, torch.fx.Node):
            raise ModelError(f"certify: the representation returns a {type(out).__name__}; it must return one tensor")
        return out

    def boxes(self, lo: Tensor, hi: Tensor) -> "dict[str, Any]":
        """Interval bounds of every node (boxes; constants as they are) over the box ``[lo, hi]``."""
        env: "dict[str, Any]" = {}
        for node in self.graph.graph.nodes:
            args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            if node.op == "placeholder":
                env[node.name] = Box(lo.double(), hi.double())
            elif node.op == "get_attr":
                obj = self._attr(node.target)
                env[node.name] = obj.double() if isinstance(obj, Tensor) and obj.is_floating_point() else obj
            elif node.op == "call_module":
                env[node.name] = _module_box(self.modules[node.target], args[0])
            elif node.op == "call_function":
                env[node.name] = self._function(node.target, args, kwargs)
            elif node.op == "call_method":
                env[node.name] = self._method(node.target, args, kwargs)
            value = env.get(node.name)
            if _is_box(value) and (value.lo.dim() == 0 or value.lo.shape[0] != lo.shape[0]):
                raise ModelError(f"certify: {node.name} changes the batch dimension ({lo.shape[0]} inputs, shape "
                                 f"{list(value.lo.shape)}); every operation must keep one row per input")
        return env

    @staticmethod
    def _function(fn: Any, args: tuple, kwargs: dict) -> Any:
        if fn in _MONOTONE_FN:
            box = args[0]
            if not _is_box(box):
                return fn(*args, **kwargs)
            if fn in (F.relu, torch.relu):  # not fn(box.lo, inplace=True): that would clamp the input's box
                return Box(box.lo.clamp(min=0), box.hi.clamp(min=0))
            return Box(fn(box.lo, *args[1:], **kwargs), fn(box.hi, *args[1:], **kwargs))
        if fn in (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                  torch.div) and len(args) == 2 and not kwargs:
            return _arith(fn, *args)
        if fn is getattr and not _is_box(args[0]):
            return getattr(*args)
        if fn is operator.getitem and not _has_box(args):
            return operator.getitem(*args)
        if _has_box(args) or _has_box(kwargs):  # also inside lists (torch.cat, torch.stack)
            raise ModelError(f"certify: function {getattr(fn, '__name__', fn)} is not supported on the representation")
        return fn(*args, **kwargs)

    @staticmethod
    def _method(name: str, args: tuple, kwargs: dict) -> Any:
        target = args[0]
        if not _is_box(target) and not _has_box(args[1:]) and not _has_box(kwargs):
            return getattr(target, name)(*args[1:], **kwargs)
        if not _is_box(target) and name not in ("add", "sub", "mul", "div"):
            raise ModelError(f"certify: method .{name}() of a constant on a bounded tensor is not supported")
        if name == "size" or name == "dim":
            return getattr(target.lo, name)(*args[1:], **kwargs)
        if name in _SHAPE_METHODS:
            return Box(getattr(target.lo, name)(*args[1:], **kwargs), getattr(target.hi, name)(*args[1:], **kwargs))
        if name == "relu":
            return Box(target.lo.clamp(min=0), target.hi.clamp(min=0))
        if name in ("add", "sub", "mul", "div"):
            if kwargs or len(args) != 2:
                raise ModelError(f"certify: method .{name}() with {', '.join(kwargs) or 'more arguments'} is not "
                                 f"supported on the representation (plain .{name}(other) is)")
            op = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}[name]
            return _arith(op, target, args[1])
        raise ModelError(f"certify: method .{name}() is not supported on the representation")

    def lipschitz(self, env: "dict[str, Any]") -> float:
        """An L2 -> L2 Lipschitz constant of the module when its graph is a chain of Linear, ReLU,
        batch norm, flatten and constant-affine layers; ``inf`` otherwise (convolutions, pooling,
        residual additions). ``env``: node bounds from :meth:`boxes`, for the shapes: arithmetic
        with a constant that broadcasts the input to ``k`` times its size copies every coordinate
        ``k`` times, which multiplies the constant by ``sqrt(k)``."""

        def copies(node: "torch.fx.Node") -> float:
            src = [a for a in node.args if isinstance(a, torch.fx.Node) and _is_box(env.get(a.name))]
            if not src:  # arithmetic among constants
                return 1.0
            return env[node.name].lo[0].numel() / env[src[0].name].lo[0].numel()

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
                    lip *= math.sqrt(copies(node))
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
                    lip *= math.sqrt(copies(node))
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



# --- CROWN: linear relaxation, backward from the output (IBP bounds for the intermediate layers) ---


def _sum_k(t: Tensor) -> Tensor:
    """``[N, k, ...] -> [N, k]``: the inner product's sum over a node's coordinates."""
    return t.flatten(2).sum(2)


def _affine_back(fn: Any, lam: Tensor, in_shape: "tuple[int, ...]") -> "tuple[Tensor, Tensor]":
    """For a per-sample affine map ``fn(z) = J z + c``: ``(J^T lam, <lam, c>)``, ``lam`` ``[N, k, *out]``
    (the ``k`` coefficient rows fold into the batch; ``J^T lam`` by autograd)."""
    n, k = lam.shape[:2]
    z = torch.zeros((n * k,) + in_shape, dtype=lam.dtype, device=lam.device, requires_grad=True)
    with torch.enable_grad():
        out = fn(z)
        flat = lam.reshape((n * k,) + tuple(out.shape[1:]))
        (back,) = torch.autograd.grad(out, z, grad_outputs=flat)
    return back.view((n, k) + in_shape), (out.detach() * flat).flatten(1).sum(1).view(n, k)


def _unbroadcast(lam: Tensor, shape: "tuple[int, ...]") -> Tensor:
    """Coefficients ``[N, k, *out]`` of a node that broadcast its input of shape ``shape`` to
    ``out``: every input coordinate feeds each of its copies, so its coefficient is their sum."""
    target = tuple(lam.shape[:2]) + shape
    if tuple(lam.shape) == target:
        return lam
    try:
        return lam.sum_to_size(target)
    except RuntimeError:
        raise ModelError(f"certify: an operation broadcasts a bounded tensor of shape {list(shape)} to "
                         f"{list(lam.shape[2:])} in a way CROWN does not follow; use --certify ibp") from None


def _relu_back(lam: Tensor, box: Box) -> "tuple[Tensor, Tensor]":
    """``lam`` through a ReLU whose input lies in ``box``, for an upper bound of ``<lam, relu(z)>``:
    positive coefficients take the chord above, negative ones the line ``alpha z`` below."""
    l, u = box.lo.unsqueeze(1), box.hi.unsqueeze(1)
    active, dead = l >= 0, u <= 0
    unstable = ~(active | dead)
    width = torch.where(unstable, u - l, torch.ones_like(u))
    up_slope = torch.where(active, 1.0, torch.where(unstable, u / width, 0.0))
    up_offset = torch.where(unstable, -u * l / width, 0.0)
    low_slope = torch.where(active | (unstable & (u > -l)), 1.0, 0.0)
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    return pos * up_slope + neg * low_slope, _sum_k(pos * up_offset)


class _Backward:
    """One CROWN backward pass: an upper bound ``[N, k]`` of ``<lam_j, g(x')>`` over the set."""

    def __init__(self, bounder: Bounder, env: "dict[str, Any]") -> None:
        self.bounder, self.env = bounder, env

    def __call__(self, lam_out: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
        env, nodes = self.env, list(self.bounder.graph.graph.nodes)
        self.lams: "dict[str, Tensor]" = {self.bounder.output.name: lam_out}
        self.const = torch.zeros(lam_out.shape[:2], dtype=torch.float64, device=lam_out.device)
        bound: Optional[Tensor] = None
        for node in reversed(nodes):
            if node.name not in self.lams:
                continue
            lam = self.lams.pop(node.name)
            if node.op == "placeholder":
                box = env[node.name]
                bound = _sum_k(lam * box.mid.unsqueeze(1)) + _sum_k(lam.abs() * box.rad.unsqueeze(1))
                if norm == "2":  # the set also lies in the L2 ball
                    ball = _sum_k(lam * x.unsqueeze(1)) + eps * lam.flatten(2).norm(dim=2)
                    bound = torch.minimum(bound, ball)
                bound = bound + self.const
            elif node.op == "call_module":
                self._module(node, self.bounder.modules[node.target], lam)
            elif node.op == "call_function":
                self._function(node, lam)
            elif node.op == "call_method":
                self._method(node, lam)
        if bound is None:
            raise ModelError("certify: the representation's output does not depend on its input")
        return bound

    def _push(self, arg: Any, lam: Tensor) -> None:
        if isinstance(arg, torch.fx.Node) and _is_box(self.env.get(arg.name)):
            lam = _unbroadcast(lam, tuple(self.env[arg.name].lo.shape[1:]))
            self.lams[arg.name] = self.lams[arg.name] + lam if arg.name in self.lams else lam

    def _in(self, node: "torch.fx.Node") -> "tuple[Any, Box, tuple[int, ...]]":
        src = node.args[0]
        box = self.env[src.name]
        return src, box, tuple(box.lo.shape[1:])

    def _reshape(self, node: "torch.fx.Node", lam: Tensor) -> None:
        src, _, shape = self._in(node)
        self._push(src, lam.reshape(tuple(lam.shape[:2]) + shape))

    def _relu(self, node: "torch.fx.Node", lam: Tensor) -> None:
        src, box, _ = self._in(node)
        lam, offset = _relu_back(lam, box)
        self.const += offset
        self._push(src, lam)

    def _affine(self, node: "torch.fx.Node", fn: Any, lam: Tensor) -> None:
        src, _, shape = self._in(node)
        lam, offset = _affine_back(fn, lam, shape)
        self.const += offset
        self._push(src, lam)

    def _module(self, node: "torch.fx.Node", m: nn.Module, lam: Tensor) -> None:
        if isinstance(m, nn.ReLU):
            self._relu(node, lam)
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            self._push(node.args[0], lam)
        elif isinstance(m, nn.Flatten):
            self._reshape(node, lam)
        else:  # Linear, Conv2d, batch norm, average pooling: affine, in float64
            self._affine(node, self.bounder.modules[node.target], lam)  # of the float64 snapshot

    def _function(self, node: "torch.fx.Node", lam: Tensor) -> None:
        fn = node.target
        if fn in (F.relu, torch.relu):
            self._relu(node, lam)
        elif fn in (torch.flatten, torch.Tensor.flatten):
            self._reshape(node, lam)
        elif fn in (F.avg_pool2d, F.adaptive_avg_pool2d):
            rest = torch.fx.node.map_arg(node.args[1:], lambda n: self.env[n.name])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: self.env[n.name])
            self._affine(node, lambda z: fn(z, *rest, **kwargs), lam)
        elif fn in _ARITH:
            self._arith(node, _ARITH[fn], lam)
        else:
            raise ModelError(f"certify: function {getattr(fn, '__name__', fn)} is not supported on the representation")

    def _method(self, node: "torch.fx.Node", lam: Tensor) -> None:
        if node.target in _SHAPE_METHODS:
            self._reshape(node, lam)
        elif node.target == "relu":
            self._relu(node, lam)
        elif node.target in ("add", "sub", "mul", "div"):
            self._arith(node, node.target, lam)
        else:
            raise ModelError(f"certify: method .{node.target}() is not supported on the representation")

    def _arith(self, node: "torch.fx.Node", op: str, lam: Tensor) -> None:
        a, b = node.args[0], node.args[1]
        value = lambda v: self.env[v.name] if isinstance(v, torch.fx.Node) else v  # noqa: E731
        box_a, box_b = _is_box(value(a)), _is_box(value(b))
        if box_a and box_b:  # residual additions (IBP refused the rest already)
            self._push(a, lam)
            self._push(b, lam if op == "add" else -lam)
            return
        arg, c = (a, value(b)) if box_a else (b, value(a))
        c = torch.as_tensor(_const(c), dtype=torch.float64, device=lam.device)
        if c.dim() == self.env[node.name].lo.dim():  # a constant with a batch axis [N or 1, ...]: lam is [N, k, ...]
            c = c.unsqueeze(1)
        if op == "add":
            self.const += _sum_k(lam * c)
            self._push(arg, lam)
        elif op == "sub":  # box - c, or c - box
            self.const += _sum_k(lam * c) * (-1 if box_a else 1)
            self._push(arg, lam if box_a else -lam)
        elif op == "mul":
            self._push(arg, lam * c)
        else:  # box / c (IBP refused c / box)
            self._push(arg, lam / c)


_ARITH = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub", operator.mul: "mul",
          torch.mul: "mul", operator.truediv: "div", torch.div: "div"}


def _input_box(x: Tensor, eps: float) -> "tuple[Tensor, Tensor, Tensor]":
    """``x`` in float64 and the box ``[x - eps, x + eps] ∩ [0, 1]`` that holds both balls."""
    x = x.double()
    return x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def crown_box(bounder: Bounder, x: Tensor, eps: float, norm: str, env: "Optional[dict[str, Any]]" = None) -> Box:
    """CROWN (IBP intermediate bounds) bounds on every output coordinate of the representation
    over ``B_norm(x, eps) ∩ [0, 1]^d``, intersected with IBP's; ``[N, m]`` each. ``env``: the IBP
    node bounds over that set (:meth:`Bounder.boxes`) when the caller has them."""
    x, lo, hi = _input_box(x, eps)
    if env is None:
        with torch.no_grad():
            env = bounder.boxes(lo, hi)
    out = bounder.output_box(env)
    shape = tuple(out.lo.shape[1:])
    n, m = x.shape[0], out.lo[0].numel()
    widest = max(v.lo[0].numel() for v in env.values() if _is_box(v))
    k = max(1, min(m, _CHUNK_BYTES // (8 * 4 * n * widest)))
    backward = _Backward(bounder, env)
    uppers, lowers = [], []
    for start in range(0, m, k):
        rows = torch.arange(start, min(m, start + k), device=x.device)
        basis = torch.zeros(len(rows), m, dtype=torch.float64, device=x.device)
        basis[torch.arange(len(rows)), rows] = 1.0
        lam = basis.view((1, len(rows)) + shape).expand((n, len(rows)) + shape)
        uppers.append(backward(lam, x, eps, norm))
        lowers.append(-backward(-lam, x, eps, norm))
    return Box(torch.maximum(torch.cat(lowers, 1), out.lo.flatten(1)),
               torch.minimum(torch.cat(uppers, 1), out.hi.flatten(1)))


def _box_shift(g: Tensor, box: Box) -> Tensor:
    """``|| max(u - g, g - l) ||_2`` per row: the largest distance from ``g`` to a point of the box."""
    return torch.maximum(box.hi.flatten(1) - g, g - box.lo.flatten(1)).clamp(min=0).norm(dim=1)


def sensitivity_upper(bounder: Bounder, x: Tensor, eps: float, norm: str,
                      lipschitz: Optional[float] = None, method: str = "ibp") -> "dict[str, Tensor]":
    """Per datapoint: ``s_upper`` (the tightest of the sound bounds computed), ``s_ibp``, ``s_lip``,
    with ``method="crown"`` also ``s_crown``, ``s_domain`` (the method's bound over all of
    [0, 1]^d: a certificate that is not below it says nothing the input domain does not already say)
    and ``g``, the float64 ``g(x)`` the bounds are centred on (``[N, m]``)."""
    if method not in METHODS:
        raise ModelError(f"certify method {method!r} is not valid; valid: {', '.join(METHODS)}")
    x, lo, hi = _input_box(x, eps)
    with torch.no_grad():
        g = bounder(x, x).mid.flatten(1)  # g(x) in float64: the certificate is about the exact function
        env = bounder.boxes(lo, hi)  # every node's IBP bounds: CROWN's intermediate bounds too
        s_ibp = _box_shift(g, bounder.output_box(env))
        s_domain = _box_shift(g, _domain_box(bounder, x, method))
    lip = bounder.lipschitz(env) if lipschitz is None else lipschitz
    d = x[0].numel()
    radius = eps if norm == "2" else eps * math.sqrt(d)
    s_lip = torch.full_like(s_ibp, lip * radius if radius > 0 else 0.0)  # not inf * 0
    s_ibp = s_ibp * (1 + _WIDEN) + 1e-12
    s_upper = torch.minimum(s_ibp, s_lip)
    if method == "crown":
        s_crown = _box_shift(g, crown_box(bounder, x, eps, norm, env)) * (1 + _WIDEN) + 1e-12
        s_upper = torch.minimum(s_upper, s_crown)
    out = {"s_upper": s_upper, "s_ibp": s_ibp, "s_lip": s_lip, "s_domain": s_domain * (1 + _WIDEN), "g": g}
    if method == "crown":
        out["s_crown"] = s_crown
    return out


def _domain_box(bounder: Bounder, x: Tensor, method: str) -> Box:
    """The method's box on ``g`` over all of ``[0, 1]^d``, one row (the same for every datapoint;
    computed once per input shape): at eps >= 1 the ball is the domain and the bound is vacuous.
    CROWN's is intersected with IBP's over the same set already."""
    cache = bounder.__dict__.setdefault("_domain", {})
    key = (method, tuple(x.shape[1:]), str(x.device))
    if key not in cache:
        centre = torch.full((1,) + tuple(x.shape[1:]), 0.5, dtype=torch.float64, device=x.device)
        with torch.no_grad():
            cache[key] = crown_box(bounder, centre, 1.0, "inf") if method == "crown" else bounder(centre - 0.5, centre + 0.5)
    return cache[key]
