"""Certified sensitivity: an upper bound ``s_upper_i >= max over the ball of ||g(x') - g(x_i)||_2``
(SPEC.md sections 2 and 4). With it, ``s_upper_i < m_i`` certifies Theorem 2's criterion and
``mean(s_upper_i)`` is a sound Lemma 1 RHS; PGD only bounds ``s_i`` from below.

The representation is traced with ``torch.fx`` and bounded in float64, the tightest kept:

* interval bound propagation (IBP) of the input box ``[x - eps, x + eps] ∩ [0, 1]`` (which holds
  the L-inf ball and the L2 ball) to a box on ``g``; then ``s <= || max(u - g(x), g(x) - l) ||_2``;
* with ``method="crown-ibp"``, linear relaxation over IBP's intermediate bounds (CROWN-IBP, Zhang
  et al. 2018, 2020): one backward pass per output coordinate and sign gives a linear function of
  ``x'`` above ``±g_j(x')``, maximised over the box (and, for L2, over the ball:
  ``<a, x> + eps ||a||_2``, the dual norm; the smaller kept: the set lies in both); its box on
  ``g``, intersected with IBP's, gives the bound as above. ReLU relaxations: the chord above,
  ``alpha z`` below (``alpha = 1`` iff ``u > -l``);
* with ``method="crown"``, full CROWN: the same, over bounds on every ReLU's input that are
  CROWN's own, layer by layer in graph order (:func:`crown_bounds`): a backward pass for each
  coordinate that interval arithmetic leaves unstable, over the bounds refined before it,
  intersected with the interval (auto_LiRPA's CROWN with sparse intermediate bounds does the
  same; its bounds on the digits CNNs are matched to 1e-9 or beaten: ``benchmarks/
  certify_reference.py``), and the output box with crown-ibp's (CROWN is not monotone in its
  intermediate bounds). A network over :data:`CROWN_BUDGET` (a CIFAR ResNet-18) gets crown-ibp
  from ``score``, which says so;
* for chains of Linear / ReLU / batch norm / flatten / normalisation layers, the product of their
  L2 operator norms (exact spectral norms) times the ball's L2 radius (``eps``, or ``eps sqrt(d)``
  for L-inf): on a linear representation and an L2 ball this is the exact ``eps sigma_max(A)``.

A method is a function from the node bounds to a box on ``g`` (:data:`OUTPUT_BOXES`); adding one
is adding an entry there.

Supported: Linear, Conv2d, ReLU, BatchNorm (eval), average pooling, flatten / view / reshape,
dropout and identity layers (eval), the normalisation layers models carry (affine arithmetic with
constant tensors) and residual additions, each as the ``torch.nn`` class itself (a subclass may
compute something else). Any other module or operation is refused with its type named, and so is
everything that would make the traced graph another function than the network: forward hooks and
pre-hooks (on any module, or global), random draws inside ``forward`` (a random op in the graph, a
draw frozen into it as a constant, dropout in training mode), a module in training mode, and an
in-place operation (``relu_``, ``inplace=True``, ``o += h``) on a tensor that is read again after
it, directly or through an alias (a view, ``flatten``, ``contiguous``, an eval dropout or an
identity return the same storage). Float64 throughout, with a relative widening of ``1e-9``
against rounding.

Every bound is checked against the network (:func:`sensitivity_upper`: the graph's ``g(x)`` and the
network's own forward pass, both in float64), and every scored batch checks its records
(:func:`check_attack_points`, :func:`check_records`): at each attack's kept point the network
is its graph (float64), the scored network is no further from it than float32 rounding allows,
and the float64 shift stays below ``s_upper``; no recorded (float32) shift exceeds ``s_upper`` by
more than float32 rounding (:func:`record_slack`: modelled and measured), and no certified point
is fooled.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from asbound.devices import float32_exact
from asbound.errors import ModelError
from asbound.models.split import LayerOutput

_WIDEN = 1e-9
_CHUNK_BYTES = 256 * 2**20  # CROWN: the coefficients of one chunk of output coordinates


class CheckFailed(ModelError):
    """A scored batch disagrees with its certificate at row ``row``: nothing of it may be recorded."""

    def __init__(self, row: int, what: str) -> None:
        super().__init__(what)
        self.row, self.what = row, what


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


# --- the supported leaf modules -------------------------------------------------------------------

_AFFINE_MODULES = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
#: the identity in eval mode (dropout with ``inplace=True`` too: it does nothing then)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
_SUPPORTED_MODULES = _AFFINE_MODULES + _IDENTITY_MODULES + (nn.ReLU, nn.Flatten)
_SUPPORTED_TEXT = ("Linear, Conv2d, ReLU, BatchNorm1d/2d (eval), AvgPool2d, AdaptiveAvgPool2d, Flatten, Identity, "
                   "Dropout (eval), normalisation arithmetic, residual additions")


def _module_type(module: nn.Module) -> type:
    """The class that computes ``module``'s forward: its own, or for a module with
    ``torch.nn.utils.parametrize`` parametrizations (whose class is generated) the class it extends."""
    cls = type(module)
    if torch.nn.utils.parametrize.is_parametrized(module) and cls.__bases__:
        return cls.__bases__[0]
    return cls


def _refuse_module(module: nn.Module) -> None:
    cls = _module_type(module)
    if cls in _SUPPORTED_MODULES:
        return
    base = next((b.__name__ for b in cls.__mro__[1:] if b in _SUPPORTED_MODULES), None)
    also = f" (a subclass of {base}, whose forward may differ: only {base} itself is bounded)" if base else ""
    raise ModelError(f"certify: module type {cls.__name__} is not supported{also}; supported: {_SUPPORTED_TEXT}")


def _affine(box: Box, fn: "Any", abs_fn: "Any") -> Box:
    """A linear map ``fn`` (with bias) applied to a box; ``abs_fn`` is the map of ``|W|`` without bias."""
    mid, rad = fn(box.mid), abs_fn(box.rad)
    return Box(mid - rad, mid + rad)


def _module_box(module: nn.Module, box: Box) -> Box:
    _refuse_module(module)
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
    if isinstance(module, nn.ReLU):
        return Box(box.lo.clamp(min=0), box.hi.clamp(min=0))
    if isinstance(module, _IDENTITY_MODULES):
        return box
    return Box(module(box.lo), module(box.hi))  # pooling and flatten: monotone (positive linear)


# --- operations: what is bounded, what is random, what works in place ----------------------------

_MONOTONE_FN = {F.relu, torch.relu, torch.flatten, F.avg_pool2d, F.adaptive_avg_pool2d, torch.Tensor.flatten}
_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze"}
#: in-place operations that the bounds model as their out-of-place value (whether that is sound is
#: decided for the whole graph: :func:`_stale_read`)
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu}
_OUT_OF_PLACE_METHODS = {"relu_": "relu", "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}
#: augmented assignments: ``o += h`` changes ``o``'s storage (torch.fx's own proxy records ``o + h``)
_AUGMENTED = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor",
              "ilshift", "irshift")
_INPLACE_OPERATORS = {getattr(operator, name) for name in _AUGMENTED} | {operator.setitem}
_AUGMENTED_TEXT = {operator.iadd: "+=", operator.isub: "-=", operator.imul: "*=", operator.itruediv: "/="}
#: draws from a random number generator, whatever their arguments
_RANDOM = frozenset({"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
                     "bernoulli_", "multinomial", "normal", "normal_", "poisson", "binomial", "uniform_", "random_",
                     "exponential_", "geometric_", "log_normal_", "cauchy_", "gumbel_softmax", "rrelu_with_noise"})
#: dropout functions: random in training mode, the identity otherwise
_DROPOUTS = frozenset({"dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "alpha_dropout_",
                       "feature_alpha_dropout", "feature_alpha_dropout_", "feature_dropout", "feature_dropout_"})
#: random only in training mode
_TRAINING_RANDOM = _DROPOUTS | {"native_dropout", "rrelu", "rrelu_"}
#: outputs that never share storage with an input (an in-place operation on them is then local)
_FRESH_MODULES = _AFFINE_MODULES
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                    torch.mul, torch.div, torch.relu, F.relu, F.avg_pool2d, F.adaptive_avg_pool2d, torch.cat,
                    torch.stack}
_FRESH_METHODS = {"add", "sub", "mul", "div", "relu", "sum", "mean", "clone"}
_NOT_TENSOR_METHODS = {"size", "dim", "numel"}
_NOT_TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


def _target_name(node: "torch.fx.Node") -> str:
    return str(node.target) if node.op in ("call_method", "call_module") else getattr(node.target, "__name__", "")


def _arguments(fn: Any, args: tuple, kwargs: dict) -> "Optional[dict[str, Any]]":
    """``fn``'s arguments by name, defaults included; None where ``fn`` has no Python signature."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _training_flag(fn: Any, args: tuple, kwargs: dict) -> bool:
    """A dropout's (or rrelu's) ``training`` argument; True where it cannot be read."""
    named = _arguments(fn, args, kwargs)
    if named is not None:
        return named.get("training", named.get("train", True)) is not False
    for key in ("training", "train"):
        if key in kwargs:
            return kwargs[key] is not False
    return not (len(args) >= 3 and args[2] is False)  # torch.dropout(input, p, train)


def _random(node: "torch.fx.Node") -> bool:
    """Whether ``node`` draws random numbers when the network runs."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = _target_name(node)
    if name in _RANDOM:
        return True
    if name in _TRAINING_RANDOM:
        fn = node.target if node.op == "call_function" else getattr(torch.Tensor, name, None)
        return _training_flag(fn, node.args, node.kwargs)
    return False


def _on(flag: Any) -> bool:
    """Whether an ``inplace`` value makes torch work in place: any true value (``1``, ``np.True_``
    too, as torch's ``if inplace:`` reads it); a value that cannot be read here counts as true."""
    if isinstance(flag, torch.fx.Node):
        return True
    try:
        return bool(flag)
    except Exception:  # noqa: BLE001 - unreadable: assume the worst
        return True


def _mutates(node: "torch.fx.Node", modules: "dict[str, nn.Module]") -> bool:
    """Whether ``node`` changes its first argument's storage (its output is then that storage)."""
    if node.op == "call_module":
        m = modules[node.target]
        return _on(getattr(m, "inplace", False)) and not (isinstance(m, _IDENTITY_MODULES) and not m.training)
    name = _target_name(node)
    if node.op == "call_method":
        return (name.endswith("_") and not name.startswith("__")) or name == "__setitem__" or (
            name.startswith("__i") and name.endswith("__") and name[3:-2] in {a[1:] for a in _AUGMENTED})
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("__")):
        return True
    if _on(node.kwargs.get("inplace", False)):
        return True
    named = _arguments(node.target, node.args, node.kwargs)
    return named is not None and _on(named.get("inplace", False))


def _aliases(node: "torch.fx.Node", modules: "dict[str, nn.Module]") -> "list[torch.fx.Node]":
    """The inputs whose storage ``node``'s output may share (all of them unless known otherwise)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return []
    if _mutates(node, modules):
        return [node.args[0]] if node.args and isinstance(node.args[0], torch.fx.Node) else []
    if node.op == "call_module" and (_module_type(modules[node.target]) in _FRESH_MODULES
                                     or _module_type(modules[node.target]) is nn.ReLU):
        return []
    if node.op == "call_function" and (node.target in _FRESH_FUNCTIONS or (
            node.target is getattr and len(node.args) > 1 and node.args[1] in _NOT_TENSOR_ATTRIBUTES)):
        return []
    if node.op == "call_method" and node.target in _FRESH_METHODS | _NOT_TENSOR_METHODS:
        return []
    return list(node.all_input_nodes)


def _describe_op(node: "torch.fx.Node", modules: "dict[str, nn.Module]") -> str:
    if node.op == "call_module":
        m = modules[node.target]
        flag = f"(inplace={m.inplace!r})" if hasattr(m, "inplace") else ""
        return f"{node.target} ({type(m).__name__}{flag})"
    if node.target in _AUGMENTED_TEXT:
        return f"'{_AUGMENTED_TEXT[node.target]}' ({node.name})"
    return f".{node.target}()" if node.op == "call_method" else _target_name(node)


def _stale_read(graph: "torch.fx.Graph", modules: "dict[str, nn.Module]") -> Optional[str]:
    """Why an in-place operation makes the network compute something else than the graph says, or
    None. The graph gives every node the value it had when it was computed; an in-place operation
    changes that storage, so the graph is the network only where no node sharing the storage
    (the tensor itself or an alias: a view, ``flatten``, ``contiguous``, an eval dropout, an
    identity, an earlier in-place result) is read after it, and where the storage is not the input
    or a parameter or buffer (the caller's data, the next call's weights)."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    parent: "dict[torch.fx.Node, torch.fx.Node]" = {n: n for n in nodes}

    def find(n: "torch.fx.Node") -> "torch.fx.Node":
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in nodes:
        for a in _aliases(n, modules):
            parent[find(n)] = find(a)
    storage: "dict[torch.fx.Node, list[torch.fx.Node]]" = defaultdict(list)
    for n in nodes:
        storage[find(n)].append(n)
    for n in nodes:
        if not _mutates(n, modules) or not n.args or not isinstance(n.args[0], torch.fx.Node):
            continue
        what = _describe_op(n, modules)
        shared = storage[find(n.args[0])]
        owner = next((m for m in shared if m.op in ("placeholder", "get_attr")), None)
        if owner is not None:
            whose = "the input" if owner.op == "placeholder" else f"the parameter or buffer {owner.target}"
            return f"{what} changes {whose} in place; the network then changes with every call: work on a copy"
        for m in shared:
            if order[m] >= order[n]:
                continue
            reader = next((u for u in m.users if u is not n and order[u] > order[n]), None)
            if reader is not None:
                via = "" if m is n.args[0] else f", an alias of {n.args[0].name}"
                return (f"{what} works in place on a tensor that is used again ({m.name}{via}, read by "
                        f"{reader.name} after it); the network then computes something else than its graph says: "
                        f"use inplace=False there, or o = o + h for o += h")
    return None


# --- tracing: a graph that is the network -----------------------------------------------------------


class _Proxy(torch.fx.Proxy):
    """torch.fx's proxy, with augmented assignment recorded as the in-place operator it is: the
    plain proxy has no ``__iadd__``, so ``o += h`` becomes ``o = o + h`` in the graph while the
    network changes ``o``'s storage (and every alias of it) in place."""


def _augmented(name: str) -> Callable[[torch.fx.Proxy, Any], torch.fx.Proxy]:
    op = getattr(operator, name)

    def impl(self: torch.fx.Proxy, other: Any) -> torch.fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    impl.__name__ = f"__{name}__"
    return impl


for _name in _AUGMENTED:
    setattr(_Proxy, f"__{_name}__", _augmented(_name))


class _Tracer(torch.fx.Tracer):
    def proxy(self, node: "torch.fx.Node") -> torch.fx.Proxy:
        return _Proxy(node, self)


def _symbolic_trace(module: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` with :class:`_Proxy`, leaving ``module`` as it was: tracing
    stores its tensor constants on it (``_tensor_constant0`` ...) and runs ``forward``'s
    assignments with proxies (``self.total += x`` would leave a proxy as the buffer), so every
    submodule's attributes, parameters, buffers and children are put back once the graph holds
    what it needs. (An object changed in place, a generator drawn from, stays changed: a second
    trace then differs.)"""
    saved = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in module.modules()]
    try:
        tracer = _Tracer()
        graph = tracer.trace(module)
        return torch.fx.GraphModule(tracer.root, graph, type(module).__name__)
    finally:
        for m, attrs, params, buffers, children in saved:
            for table, old in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
                table.clear()
                table.update(old)
            vars(m).clear()
            vars(m).update(attrs)


def _trace_once(module: nn.Module) -> torch.fx.GraphModule:
    """The ``torch.fx`` graph of ``module``. A :class:`~asbound.models.split.LayerOutput` stops the
    forward pass with a hook on its layer, which tracing does not run on a leaf module (a Linear, a
    ReLU): there the whole model is traced and its graph cut at the layer's first call."""
    if isinstance(module, LayerOutput):
        graph = _symbolic_trace(module.model)
        node = next((n for n in graph.graph.nodes if n.op == "call_module" and n.target == module.layer), None)
        if node is not None:
            next(n for n in graph.graph.nodes if n.op == "output").args = (node,)
            graph.graph.eliminate_dead_code()
            graph.recompile()
            return graph
    return _symbolic_trace(module)


def _rng_states() -> "tuple[Any, ...]":
    """Every random number generator a ``forward`` could draw from without a generator argument."""
    cuda = ()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = tuple(bytes(s.numpy()) for s in torch.cuda.get_rng_state_all())
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (bytes(torch.random.get_rng_state().numpy()), cuda, (kind, keys.tobytes(), pos, has_gauss, cached),
            random.getstate())


@contextlib.contextmanager
def no_random_draws(what: str) -> Iterator[None]:
    """Refuse (after the block) if the block drew from torch's, numpy's or Python's global random
    number generator: ``what`` then is not one function of its input."""
    before = _rng_states()
    yield
    if _rng_states() != before:
        raise ModelError(f"certify: {what} draws random numbers (torch.rand, randn, dropout in training mode, numpy "
                         f"or Python random ...): a bound holds for one function of the input; draw outside "
                         f"forward, or remove the draw")


def _refuse_hooks(module: nn.Module) -> None:
    """Forward hooks change what a module returns without being part of its graph (IBP would ignore
    them, CROWN run them); the root's ``__call__`` is not traced either."""
    registry = torch.nn.modules.module
    if getattr(registry, "_global_forward_hooks", None) or getattr(registry, "_global_forward_pre_hooks", None):
        raise ModelError("certify: a global forward hook is registered (register_module_forward_hook or "
                         "register_module_forward_pre_hook); the bounds follow each module's own computation: "
                         "remove the hook")
    for name, m in module.named_modules():
        kinds = [k for k, hooks in (("forward hook", m._forward_hooks), ("forward pre-hook", m._forward_pre_hooks))
                 if hooks]
        if kinds:
            raise ModelError(f"certify: module {name or '(the representation)'} ({type(m).__name__}) has a "
                             f"{' and a '.join(kinds)}; the bounds follow the module's own computation, not what a "
                             f"hook does: remove it (spectral_norm / weight_norm: use "
                             f"torch.nn.utils.parametrizations)")
    if type(module).__call__ is not nn.Module.__call__:
        raise ModelError(f"certify: {type(module).__name__} overrides __call__, which tracing does not see; "
                         f"put the computation in forward")


def _same_constants(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    for node in a.graph.nodes:
        if node.op != "get_attr":
            continue
        x, y = _attr(a, node.target), _attr(b, node.target)
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)):
                return False
    return True


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    """The graph of ``module``, refused where it need not be the network: hooks, random draws
    while tracing (frozen into the graph as constants), or two traces that differ."""
    _refuse_hooks(module)
    try:
        with no_random_draws("the representation's forward"):
            first = _trace_once(module)
        second = _trace_once(module)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure is one reason to refuse
        raise ModelError(f"certify: the representation cannot be traced by torch.fx "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         f"certify supports plain feed-forward and residual networks") from None
    if first.code != second.code or not _same_constants(first, second):
        raise ModelError("certify: two traces of the representation differ (a random draw or other state inside "
                         "forward); a bound holds for one function of the input")
    return first


class Bounder:
    """Interval bounds of a module's output over boxes of inputs (its ``torch.fx`` graph, float64)."""

    def __init__(self, module: nn.Module) -> None:
        module = module.eval()
        traced = _trace(module)
        self._check(traced.graph, dict(traced.named_modules()))
        # a float64 snapshot: every bound (IBP, CROWN, the operator norms, the cached domain box)
        # is about the weights at construction, whatever happens to ``module`` later
        self.graph = copy.deepcopy(traced).double().eval().requires_grad_(False)
        self.modules = dict(self.graph.named_modules())
        # the network itself, in float64 at the same moment: every bound is checked against it
        self.network = copy.deepcopy(module).double().eval().requires_grad_(False)
        self.output  # noqa: B018 - refuses a representation that does not return one tensor
        #: the nodes whose bounds a ReLU's relaxation uses (full CROWN bounds them by backward passes)
        self.relu_inputs = {n.args[0].name for n in self.graph.graph.nodes
                            if _is_relu(n, self.modules) and n.args and isinstance(n.args[0], torch.fx.Node)}

    @staticmethod
    def _check(graph: "torch.fx.Graph", modules: "dict[str, nn.Module]") -> None:
        """Refuse a graph that need not compute what the network computes."""
        for node in graph.nodes:
            if node.op == "call_module":
                m = modules[node.target]
                _refuse_module(m)
                if "forward" in vars(m):  # m(x) runs the instance's forward; the bounds follow the class's
                    raise ModelError(f"certify: module {node.target} ({type(m).__name__}) has its forward "
                                     f"replaced on the instance; the bounds follow {type(m).__name__}'s own "
                                     f"computation: put the computation in a module's forward")
                if any(sub.training for sub in m.modules()):
                    raise ModelError(f"certify: module {node.target} ({type(m).__name__}) stays in training mode "
                                     f"after eval(); bounds need the function eval mode computes")
            if _random(node):
                raise ModelError(f"certify: {_describe_op(node, modules)} draws random numbers in forward "
                                 f"(dropout in training mode, torch.rand ...); a bound holds for one function of the "
                                 f"input: call it with training=False, or remove it")
            if "out" in node.kwargs:
                raise ModelError(f"certify: {_describe_op(node, modules)} writes into out=; use its result")
        stale = _stale_read(graph, modules)
        if stale is not None:
            raise ModelError(f"certify: {stale}")

    def __call__(self, lo: Tensor, hi: Tensor) -> Box:
        return self.output_box(self.boxes(lo, hi))

    def check_supported(self, x: Tensor) -> None:
        """Refuse an operation the bounds do not support (a ``torch.cat``, ``alpha=``, a change of
        the batch dimension) on example inputs ``x``, before anything is run or written: the
        module checks of construction see the modules only."""
        x = x.double()
        with torch.no_grad():
            self.output_box(self.boxes(x, x))

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

    def boxes(self, lo: Tensor, hi: Tensor,
              refine: "Optional[Callable[[torch.fx.Node, dict[str, Any]], Box]]" = None) -> "dict[str, Any]":
        """Interval bounds of every node (boxes; constants as they are) over the box ``[lo, hi]``.
        ``refine(node, env)``: a box of its own (full CROWN) for each node that feeds a ReLU, which
        replaces the interval before any later node is bounded (``env`` holds every node before)."""
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
            if refine is not None and _is_box(value) and node.name in self.relu_inputs:
                env[node.name] = refine(node, env)
        return env

    @staticmethod
    def _function(fn: Any, args: tuple, kwargs: dict) -> Any:
        fn = _OUT_OF_PLACE.get(fn, fn)
        if getattr(fn, "__name__", "") in _DROPOUTS and _is_box(args[0] if args else None):
            return args[0]  # dropout with training=False (Bounder refuses it in training mode): the identity
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
        name = _OUT_OF_PLACE_METHODS.get(name, name)
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
                elif not isinstance(m, (nn.ReLU, nn.Flatten) + _IDENTITY_MODULES):
                    return math.inf
            elif node.op == "call_function":
                target = _OUT_OF_PLACE.get(node.target, node.target)
                if target in (F.relu, torch.relu, torch.flatten, torch.Tensor.flatten) or (
                        getattr(target, "__name__", "") in _DROPOUTS):  # dropout in eval: the identity
                    continue
                if target in (operator.sub, operator.add, torch.sub, torch.add):
                    if sum(isinstance(a, torch.fx.Node) and a.op != "get_attr" for a in node.args) > 1:
                        return math.inf
                    lip *= math.sqrt(copies(node))
                    continue
                if target in (operator.truediv, operator.mul, torch.div, torch.mul):
                    const = [a for a in node.args if not (isinstance(a, torch.fx.Node) and a.op != "get_attr")]
                    if len(const) != 1:
                        return math.inf
                    c = const[0]
                    if isinstance(c, torch.fx.Node):
                        c = self._attr(c.target)
                    c = torch.as_tensor(c, dtype=torch.float64).abs()
                    lip *= float((1 / c).max() if target in (operator.truediv, torch.div) else c.max())
                    lip *= math.sqrt(copies(node))
                    continue
                if node.target is getattr or node.target is operator.getitem:
                    continue
                return math.inf
            elif node.op == "call_method":
                if node.target not in _SHAPE_METHODS | {"size", "dim", "relu", "relu_"}:
                    return math.inf
        return lip * (1 + _WIDEN)

    def _attr(self, target: str) -> Any:
        return _attr(self.graph, target)


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


# --- CROWN: linear relaxation, backward passes ----------------------------------------------------


def _is_relu(node: "torch.fx.Node", modules: "dict[str, nn.Module]") -> bool:
    if node.op == "call_module":
        return _module_type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return _OUT_OF_PLACE.get(node.target, node.target) in (F.relu, torch.relu)
    return node.op == "call_method" and _OUT_OF_PLACE_METHODS.get(node.target, node.target) == "relu"


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


def _module_back(m: nn.Module, lam: Tensor, in_shape: "tuple[int, ...]") -> "tuple[Tensor, Tensor]":
    """:func:`_affine_back` of a float64 Linear, Conv2d or batch norm by its transposed map (no
    forward pass); average pooling by autograd."""
    n, k = lam.shape[:2]
    if isinstance(m, nn.Linear):
        const = _sum_k(lam * m.bias) if m.bias is not None else lam.new_zeros(n, k)
        return lam @ m.weight, const
    if isinstance(m, nn.Conv2d) and not isinstance(m.padding, str):
        back = torch.nn.grad.conv2d_input((n * k,) + in_shape, m.weight, lam.flatten(0, 1), m.stride, m.padding,
                                          m.dilation, m.groups)
        const = lam.sum((-1, -2)).flatten(2) @ m.bias if m.bias is not None else lam.new_zeros(n, k)
        return back.view((n, k) + in_shape), const.view(n, k)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, shift = _bn_affine(m)
        shape = (-1,) + (1,) * (lam.dim() - 3)
        return lam * scale.view(shape), _sum_k(lam * shift.view(shape))
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)) and lam.dim() == 5:  # (no bias: a positive linear map)
        size = (n * k,) + in_shape
        grad, shape = lam.flatten(0, 1), lam.new_zeros(()).expand(size)  # (only the input's size is read)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            back = torch.ops.aten._adaptive_avg_pool2d_backward(grad, shape)
        else:
            pair = torch.nn.modules.utils._pair
            back = torch.ops.aten.avg_pool2d_backward(grad, shape, pair(m.kernel_size), pair(m.stride), pair(m.padding),
                                                      m.ceil_mode, m.count_include_pad, m.divisor_override)
        return back.view((n, k) + in_shape), lam.new_zeros(n, k)
    return _affine_back(m, lam, in_shape)


def _bn_affine(m: nn.Module) -> "tuple[Tensor, Tensor]":
    """An eval batch norm as ``scale * z + shift`` per channel (float64)."""
    scale = (m.running_var.double() + m.eps).rsqrt()
    if m.weight is not None:
        scale = scale * m.weight.detach().double()
    shift = -m.running_mean.double() * scale + (m.bias.detach().double() if m.bias is not None else 0)
    return scale, shift


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
    positive coefficients take the chord above, negative ones the line ``alpha z`` below
    (``alpha = 1`` iff ``u > -l``, the adaptive choice of Zhang et al. 2018); a stable ReLU is
    linear (slope 1 or 0). The relaxation is computed on the coordinates unstable at some
    datapoint only (gathered)."""
    n, k = lam.shape[:2]
    l, u = box.lo.flatten(1), box.hi.flatten(1)
    active = l >= 0
    out = lam * active.view((n, 1) + tuple(lam.shape[2:])).to(lam.dtype)
    cols = torch.nonzero(((l < 0) & (u > 0)).any(0)).flatten()
    if len(cols) == 0:
        return out, lam.new_zeros(n, k)
    l, u, active = l[:, cols].unsqueeze(1), u[:, cols].unsqueeze(1), active[:, cols].unsqueeze(1)
    unstable = (l < 0) & (u > 0)
    width = torch.where(unstable, u - l, torch.ones_like(u))
    up_slope = torch.where(active, 1.0, torch.where(unstable, u / width, 0.0))
    up_offset = torch.where(unstable, -u * l / width, 0.0)
    low_slope = torch.where(active | (unstable & (u > -l)), 1.0, 0.0)
    part = lam.reshape(n, k, -1)[:, :, cols]
    out.view(n, k, -1)[:, :, cols] = torch.where(part >= 0, part * up_slope, part * low_slope)
    return out, (part.clamp(min=0) * up_offset).sum(2)


class _Backward:
    """One CROWN backward pass: an upper bound ``[N, k]`` of ``<lam_j, v(x')>`` over the set, for
    ``v`` the output (or the node ``start``), from the node bounds ``env`` (the ReLUs' relaxations)."""

    def __init__(self, bounder: Bounder, env: "dict[str, Any]") -> None:
        self.bounder, self.env = bounder, env
        self.nodes = list(bounder.graph.graph.nodes)

    def __call__(self, lam_out: Tensor, x: Tensor, eps: float, norm: str,
                 start: "Optional[torch.fx.Node]" = None) -> Tensor:
        env, nodes = self.env, self.nodes
        start = self.bounder.output if start is None else start
        self.lams: "dict[str, Tensor]" = {start.name: lam_out}
        self.const = torch.zeros(lam_out.shape[:2], dtype=torch.float64, device=lam_out.device)
        bound: Optional[Tensor] = None
        for node in reversed(nodes[: nodes.index(start) + 1]):
            if node.name not in self.lams:
                continue
            lam = self.lams.pop(node.name)
            if node.op == "placeholder":
                bound = _concretize(lam, env[node.name], x, eps, norm) + self.const
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
        lam, offset = _module_back(fn, lam, shape) if isinstance(fn, nn.Module) else _affine_back(fn, lam, shape)
        self.const += offset
        self._push(src, lam)

    def _module(self, node: "torch.fx.Node", m: nn.Module, lam: Tensor) -> None:
        if isinstance(m, nn.ReLU):
            self._relu(node, lam)
        elif isinstance(m, _IDENTITY_MODULES):
            self._push(node.args[0], lam)
        elif isinstance(m, nn.Flatten):
            self._reshape(node, lam)
        else:  # Linear, Conv2d, batch norm, average pooling: affine, in float64
            self._affine(node, m, lam)  # of the float64 snapshot

    def _function(self, node: "torch.fx.Node", lam: Tensor) -> None:
        fn = _OUT_OF_PLACE.get(node.target, node.target)
        if fn in (F.relu, torch.relu):
            self._relu(node, lam)
        elif getattr(fn, "__name__", "") in _DROPOUTS:  # in eval (Bounder refuses training mode): the identity
            self._push(node.args[0], lam)
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
        name = _OUT_OF_PLACE_METHODS.get(node.target, node.target)
        if name in _SHAPE_METHODS:
            self._reshape(node, lam)
        elif name == "relu":
            self._relu(node, lam)
        elif name in ("add", "sub", "mul", "div"):
            self._arith(node, name, lam)
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
          torch.mul: "mul", operator.truediv: "div", torch.div: "div"}  # (in-place operators: _OUT_OF_PLACE first)


def _concretize(lam: Tensor, box: Box, x: Tensor, eps: float, norm: str) -> Tensor:
    """``max <lam_j, x'>`` over ``x'`` in the input box, ``[N, k]``; for L2 also over the ball
    ``||x' - x||_2 <= eps`` (``<lam_j, x> + eps ||lam_j||_2``, the dual norm): the set lies in
    both, so the smaller of the two bounds it."""
    bound = _sum_k(lam * box.mid.unsqueeze(1)) + _sum_k(lam.abs() * box.rad.unsqueeze(1))
    if norm == "2":
        ball = _sum_k(lam * x.unsqueeze(1)) + eps * lam.flatten(2).norm(dim=2)
        bound = torch.minimum(bound, ball)
    return bound


def _output_pass(bounder: Bounder, env: "dict[str, Any]", x: Tensor, eps: float, norm: str) -> Box:
    """CROWN's box on the output (``[N, m]`` each, intersected with the interval in ``env``): one
    backward pass per output coordinate and sign, the ReLUs relaxed over their bounds in ``env``."""
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
        both = backward(torch.cat([lam, -lam], 1), x, eps, norm)
        uppers.append(both[:, :len(rows)])
        lowers.append(-both[:, len(rows):])
    return Box(torch.maximum(torch.cat(lowers, 1), out.lo.flatten(1)),
               torch.minimum(torch.cat(uppers, 1), out.hi.flatten(1)))


def _exact_interval(bounder: Bounder, env: "dict[str, Any]") -> "set[str]":
    """The nodes whose interval over an input box is already CROWN's (exact): an affine function
    of the input through at most one map that mixes coordinates (Linear, Conv2d, pooling, a
    broadcasting constant), the rest coordinate-wise (batch norm, constant arithmetic, reshapes):
    ``|D W D'| = |D| |W| |D'|``. No ReLU, no branch, no node that reads a bounded tensor twice
    (``h + h`` is ``2 h``, ``h - h`` is 0: neither the intervals nor the squared rows see that)."""
    mixes: "dict[str, int]" = {}
    for node in bounder.graph.graph.nodes:
        if not _is_box(env.get(node.name)):
            continue
        if node.op == "placeholder":
            mixes[node.name] = 0
            continue
        src: "list[torch.fx.Node]" = []  # every use: ``h + h`` reads h twice (all_input_nodes: once)
        torch.fx.node.map_arg((node.args, node.kwargs), lambda a: _is_box(env.get(a.name)) and src.append(a))
        if len(src) != 1 or src[0].name not in mixes or _is_relu(node, bounder.modules):
            continue
        mixing = env[node.name].lo[0].numel() != env[src[0].name].lo[0].numel()
        if node.op == "call_module":
            m = bounder.modules[node.target]
            mixing = mixing or isinstance(m, (nn.Linear, nn.Conv2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))
        elif node.op == "call_function":
            mixing = mixing or _OUT_OF_PLACE.get(node.target, node.target) in (F.avg_pool2d, F.adaptive_avg_pool2d)
        mixes[node.name] = mixes[src[0].name] + int(mixing)
    return {name for name, count in mixes.items() if count <= 1}


def _refine(bounder: Bounder, node: "torch.fx.Node", env: "dict[str, Any]", x: Tensor, eps: float,
            norm: str) -> Box:
    """Full CROWN's bounds on ``node`` (a ReLU's input), intersected with its interval: a backward
    pass for each coordinate that the interval leaves unstable (``l < 0 < u``; a stable ReLU is
    linear, tighter bounds do not change it), one sign each, batched per datapoint."""
    box = env[node.name]
    n, shape = box.lo.shape[0], tuple(box.lo.shape[1:])
    lo, hi = box.lo.flatten(1).clone(), box.hi.flatten(1).clone()
    unstable = (lo < 0) & (hi > 0)
    counts = unstable.sum(1)
    most = int(counts.max()) if n else 0
    if most == 0:
        return box
    order = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)[:, :most]  # the unstable ones first
    widest = max(v.lo[0].numel() for v in env.values() if _is_box(v))
    k = max(1, min(most, _CHUNK_BYTES // (8 * 4 * n * widest)))
    backward = _Backward(bounder, env)
    for start in range(0, most, k):
        idx = order[:, start:start + k]
        rows = idx.shape[1]
        valid = torch.arange(start, start + rows, device=lo.device) < counts.unsqueeze(1)
        lam = torch.zeros(n, rows, lo.shape[1], dtype=torch.float64, device=lo.device)
        lam.scatter_(2, idx.unsqueeze(2), valid.unsqueeze(2).double())
        lam = lam.view((n, rows) + shape)
        both = backward(torch.cat([lam, -lam], 1), x, eps, norm, start=node)
        upper, lower = both[:, :rows], -both[:, rows:]
        hi.scatter_(1, idx, torch.where(valid, torch.minimum(hi.gather(1, idx), upper), hi.gather(1, idx)))
        lo.scatter_(1, idx, torch.where(valid, torch.maximum(lo.gather(1, idx), lower), lo.gather(1, idx)))
    return Box(lo.view((n,) + shape), hi.view((n,) + shape))


def _squared_rows(bounder: Bounder, point: "dict[str, Any]", exact: "set[str]") -> "dict[str, Tensor]":
    """For the nodes of ``exact`` (:func:`_exact_interval`) whose maps are all Linear, Conv2d, batch
    norm, constant arithmetic or reshapes: the squared L2 norm of each row of the node's Jacobian
    in the input, ``(J ∘ J) 1``, by the same maps with squared weights (``J = D W D'`` gives
    ``J ∘ J = D² (W ∘ W) D'²``). ``point``: the node values at ``x`` (:meth:`Bounder.boxes`
    ``(x, x)``), for the constants and shapes."""
    rows: "dict[str, Tensor]" = {}
    value = lambda v: point[v.name] if isinstance(v, torch.fx.Node) else v  # noqa: E731
    for node in bounder.graph.graph.nodes:
        if node.name not in exact:
            continue
        if node.op == "placeholder":
            rows[node.name] = torch.ones_like(point[node.name].lo)
            continue
        src = next(a for a in node.all_input_nodes if _is_box(point.get(a.name)))
        if src.name not in rows:
            continue
        v, out = rows[src.name], None
        rest = [value(a) for a in node.args[1:]]
        if node.op == "call_module":
            m = bounder.modules[node.target]
            if isinstance(m, nn.Linear):
                out = F.linear(v, m.weight ** 2)
            elif isinstance(m, nn.Conv2d):
                out = F.conv2d(v, m.weight ** 2, None, m.stride, m.padding, m.dilation, m.groups)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                scale, _ = _bn_affine(m)
                out = v * scale.view((-1,) + (1,) * (v.dim() - 2)) ** 2
            elif isinstance(m, _IDENTITY_MODULES):
                out = v
            elif isinstance(m, nn.Flatten):
                out = m(v)
        else:
            fn = _OUT_OF_PLACE.get(node.target, node.target) if node.op == "call_function" else None
            name = _OUT_OF_PLACE_METHODS.get(node.target, node.target) if node.op == "call_method" else None
            op = _ARITH.get(fn) if fn is not None else (name if name in ("add", "sub", "mul", "div") else None)
            if fn is not None and getattr(fn, "__name__", "") in _DROPOUTS:
                out = v
            elif fn in (torch.flatten, torch.Tensor.flatten) or name in _SHAPE_METHODS:
                out = getattr(v, "flatten" if fn is not None else name)(*rest, **node.kwargs)
            elif op in ("add", "sub"):
                out = v * torch.ones_like(point[node.name].lo)  # (a broadcast copies)
            elif op in ("mul", "div"):
                c = value(node.args[1] if node.args[0] is src else node.args[0])
                c = torch.as_tensor(_const(c), dtype=torch.float64, device=v.device)
                out = v * c ** 2 if op == "mul" else v / c ** 2
        if out is not None and out.shape == point[node.name].lo.shape:
            rows[node.name] = out
    return rows


def crown_bounds(bounder: Bounder, x: Tensor, eps: float, norm: str) -> "dict[str, Any]":
    """Every node's bounds over ``B_norm(x, eps) ∩ [0, 1]^d`` by full CROWN: in graph order, each
    ReLU's input by backward passes of its own (:func:`_refine`), over the bounds already refined
    before it, and every other node by interval arithmetic over those. Where a ReLU's input is an
    affine map of the input that interval arithmetic bounds exactly over the box
    (:func:`_exact_interval`), no backward pass is needed: in L-inf its interval is CROWN's, in L2
    CROWN's is that interval intersected with ``v(x) ± eps ||J_j||_2`` (:func:`_squared_rows`)."""
    x, lo, hi = _input_box(x, eps)
    with torch.no_grad():
        point = bounder.boxes(x, x)
    exact = _exact_interval(bounder, point)
    rows = _squared_rows(bounder, point, exact) if norm == "2" else {}

    def refine(node: "torch.fx.Node", env: "dict[str, Any]") -> Box:
        box = env[node.name]
        if norm == "inf" and node.name in exact:
            return box
        if node.name in rows:
            centre, radius = point[node.name].lo, eps * rows[node.name].sqrt()
            return Box(torch.maximum(box.lo, centre - radius), torch.minimum(box.hi, centre + radius))
        return _refine(bounder, node, env, x, eps, norm)

    with torch.no_grad():
        return bounder.boxes(lo, hi, refine=refine)


#: full CROWN's budget: multiply-adds a datapoint's backward passes may take with every ReLU unstable
#: (:func:`crown_cost`); above it ``score --certify crown`` computes crown-ibp and says so. Set on one
#: CPU thread (benchmarks/certify_timing.py, 2026-12-05): the dSprites LeNets (64x64) need 2.5e10 (0.74 s
#: per point at L-inf 2/255: 1% of their ReLUs are unstable), a CIFAR ResNet-18 3.9e11 at 8x8 inputs
#: (250 s), 6.1e12 at 16x16 (1,900 s) and 9.6e13 at 32x32; the representation of a 3072-h-h-10 MLP
#: with every ReLU unstable 2.4e11 at h = 4096 (32 s) and 1.5e12 at h = 8192 (166 s).
CROWN_BUDGET = 2e11


#: multiply-adds charged for each node a backward pass visits, whatever its size: the Python and
#: dispatch work of a step (about 125 us on one CPU thread, where the calibration networks run at
#: 1.6e9 multiply-adds per second); a deep, narrow network is made of it (width 10, depth 200: 5 s)
_VISIT = 2e5


def _area(kernel: "int | tuple[int, ...] | list[int]") -> int:
    return math.prod(kernel) if isinstance(kernel, (tuple, list)) else kernel * kernel


def _row_work(bounder: Bounder, node: "torch.fx.Node", size: "dict[str, int]") -> int:
    """Multiply-adds that carrying one row of a backward pass back through ``node`` costs: a Linear's
    ``out * in``, a Conv2d's ``out * in_channels * kernel area`` (grouped ones too: on the CPU a
    depthwise chain took 0.8-0.95 times a dense one's time, not 1 / groups), an average pooling's
    (module or function) ``out * kernel area`` (adaptive: its input's size); else the larger of its
    own and its inputs' sizes (the input, coordinate-wise maps, reshapes, sums, concatenations)."""
    own = size[node.name]
    if node.op == "call_module":
        m = bounder.modules[node.target]
        if isinstance(m, nn.Linear):
            return own * m.in_features
        if isinstance(m, nn.Conv2d):
            return own * m.in_channels * math.prod(m.kernel_size)
        if isinstance(m, nn.AvgPool2d):
            return own * _area(m.kernel_size)
    elif node.op == "call_function" and _OUT_OF_PLACE.get(node.target, node.target) is F.avg_pool2d:
        return own * _area(node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"])
    return max([own] + [size[a.name] for a in node.all_input_nodes if a.name in size])


def crown_cost(bounder: Bounder, x: Tensor, norm: str) -> float:
    """The multiply-adds of full CROWN's backward passes per datapoint of ``x``'s shape in ``norm``,
    one sign each, with every coordinate unstable (an upper bound of that): for every ReLU input it
    refines (:func:`crown_bounds`) and for the output, its size times the work of carrying one row
    back through each node a pass goes through (:func:`_row_work`: a Linear's ``J^T lam`` costs
    ``in * out`` per row), plus :data:`_VISIT` per node visited. An exact interval needs no pass in
    L-inf, and in L2 none where its rows' norms are computed directly (:func:`_squared_rows`; not
    behind pooling). What :func:`crown_box` does is 2 to 4 times this (both signs of every pass, and
    crown-ibp's output pass too); :data:`CROWN_BUDGET` is set in this count."""
    x = x[:1].double()
    with torch.no_grad():
        env = bounder.boxes(x, x)
    exact = _exact_interval(bounder, env)
    if norm == "2":
        exact = set(_squared_rows(bounder, env, exact))
    size = {name: v.lo[0].numel() for name, v in env.items() if _is_box(v)}
    work: "dict[str, int]" = {}
    through: "dict[str, set[str]]" = {}  # a node and every bounded node before it
    total = 0.0
    for node in bounder.graph.graph.nodes:
        if node.name not in size:
            continue
        work[node.name] = _row_work(bounder, node, size)
        ancestors = {node.name}
        for a in node.all_input_nodes:
            ancestors |= through.get(a.name, set())
        through[node.name] = ancestors
        if (node.name in bounder.relu_inputs and node.name not in exact) or node is bounder.output:
            total += size[node.name] * sum(work[a] for a in ancestors) + _VISIT * len(ancestors)
    return total


def method_for(bounder: Bounder, method: str, x: Tensor, norm: str) -> "tuple[str, Optional[str]]":
    """The method a run computes for ``method`` on inputs of ``x``'s shape, and a one-line note
    where that is not ``method``: full CROWN over its budget (:data:`CROWN_BUDGET`) in ``norm`` (the
    run's: no default, its cost differs between the norms) falls back to crown-ibp."""
    if method != "crown":
        return method, None
    cost = crown_cost(bounder, x, norm)
    if cost <= CROWN_BUDGET:
        return method, None
    return "crown-ibp", (f"--certify crown: full CROWN would take about {cost:.0e} multiply-adds per point "
                         f"(budget {CROWN_BUDGET:.0e}); crown-ibp is computed instead")


# --- the methods: node bounds -> a box on g -------------------------------------------------------


def _input_box(x: Tensor, eps: float) -> "tuple[Tensor, Tensor, Tensor]":
    """``x`` in float64 and the box ``[x - eps, x + eps] ∩ [0, 1]`` that holds both balls."""
    x = x.double()
    return x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def ibp_box(bounder: Bounder, x: Tensor, eps: float, norm: str, env: "Optional[dict[str, Any]]" = None) -> Box:
    """IBP's bounds on every output coordinate over ``[x - eps, x + eps] ∩ [0, 1]`` (``norm`` plays
    no part: the box holds both balls). ``env``: the node bounds over that box when the caller has them."""
    if env is None:
        _, lo, hi = _input_box(x, eps)
        with torch.no_grad():
            env = bounder.boxes(lo, hi)
    out = bounder.output_box(env)
    return Box(out.lo.flatten(1), out.hi.flatten(1))


def crown_ibp_box(bounder: Bounder, x: Tensor, eps: float, norm: str,
                  env: "Optional[dict[str, Any]]" = None) -> Box:
    """CROWN-IBP: CROWN's backward pass from the output over IBP's bounds on the intermediate
    layers, over ``B_norm(x, eps) ∩ [0, 1]^d``, intersected with IBP's box; ``[N, m]`` each.
    ``env``: the IBP node bounds over the input box (:meth:`Bounder.boxes`) when the caller has them."""
    x, lo, hi = _input_box(x, eps)
    if env is None:
        with torch.no_grad():
            env = bounder.boxes(lo, hi)
    with torch.no_grad():
        return _output_pass(bounder, env, x, eps, norm)


def crown_box(bounder: Bounder, x: Tensor, eps: float, norm: str, env: "Optional[dict[str, Any]]" = None) -> Box:
    """Full CROWN: the backward pass from the output over CROWN's own bounds on every ReLU's
    input (:func:`crown_bounds`), intersected with the intervals over those and with CROWN-IBP's
    box (:func:`crown_ibp_box`; ``env`` as there); ``[N, m]`` each. CROWN is not monotone in its
    intermediate bounds: a tighter one can flip an unstable ReLU's adaptive lower slope (``alpha =
    1`` iff ``u > -l``) to the worse of the two (1.7 times CROWN-IBP's bound on a 3-input MLP,
    ``test_full_crown_is_never_looser_than_crown_ibp``)."""
    full = crown_bounds(bounder, x, eps, norm)
    ibp = crown_ibp_box(bounder, x, eps, norm, env)
    with torch.no_grad():
        out = _output_pass(bounder, full, x.double(), eps, norm)
    return Box(torch.maximum(out.lo, ibp.lo), torch.minimum(out.hi, ibp.hi))


#: each method's box on ``g`` over ``B_norm(x, eps) ∩ [0, 1]^d``, from the IBP node bounds over the
#: input box: ``fn(bounder, x, eps, norm, env) -> Box`` (``[N, m]`` each); sound, and at least as
#: tight as IBP's (a method intersects with it, or is IBP)
#: the bound methods, a literal so that the command line reads it without importing torch
METHODS = ("ibp", "crown-ibp", "crown")
OUTPUT_BOXES: "dict[str, Callable[..., Box]]" = {"ibp": ibp_box, "crown-ibp": crown_ibp_box, "crown": crown_box}
assert tuple(OUTPUT_BOXES) == METHODS


def _box_shift(g: Tensor, box: Box) -> Tensor:
    """``|| max(u - g, g - l) ||_2`` per row: the largest distance from ``g`` to a point of the box."""
    return torch.maximum(box.hi.flatten(1) - g, g - box.lo.flatten(1)).clamp(min=0).norm(dim=1)


def sensitivity_upper(bounder: Bounder, x: Tensor, eps: float, norm: str,
                      lipschitz: Optional[float] = None, method: str = "ibp") -> "dict[str, Tensor]":
    """Per datapoint: ``s_upper`` (the tightest of the sound bounds computed), ``s_ibp``, ``s_lip``,
    with another method ``s_<method>`` too; ``s_domain`` (the method's bound over all of
    [0, 1]^d: a certificate that is not below it says nothing the input domain does not already
    say); ``g``, the float64 ``g(x)`` the bounds are centred on (``[N, m]``); and ``slack``, the
    modelled float32 rounding a recorded shift may carry (:func:`float32_slack`).

    Raises :class:`CheckFailed` where the graph's ``g(x)`` is not the network's (both in float64):
    the bounds would be about another function."""
    if method not in OUTPUT_BOXES:
        raise ModelError(f"certify method {method!r} is not valid; valid: {', '.join(METHODS)}")
    x, lo, hi = _input_box(x, eps)
    with torch.no_grad():
        g = bounder(x, x).mid.flatten(1)  # g(x) in float64: the certificate is about the exact function
        env = bounder.boxes(lo, hi)  # every node's IBP bounds: the other methods' intermediate bounds too
        s_ibp = _box_shift(g, ibp_box(bounder, x, eps, norm, env))
        s_domain = _box_shift(g, _domain_box(bounder, x, method))
    lip = bounder.lipschitz(env) if lipschitz is None else lipschitz
    d = x[0].numel()
    radius = eps if norm == "2" else eps * math.sqrt(d)
    s_lip = torch.full_like(s_ibp, lip * radius if radius > 0 else 0.0)  # not inf * 0
    s_ibp = s_ibp * (1 + _WIDEN) + 1e-12
    s_upper = torch.minimum(s_ibp, s_lip)
    out = {"s_ibp": s_ibp, "s_lip": s_lip}
    if method != "ibp":
        s_method = _box_shift(g, OUTPUT_BOXES[method](bounder, x, eps, norm, env)) * (1 + _WIDEN) + 1e-12
        s_upper = torch.minimum(s_upper, s_method)
        out[f"s_{method.replace('-', '_')}"] = s_method
    _check_graph(bounder, x, g, s_upper)
    out.update(s_upper=s_upper, s_domain=s_domain * (1 + _WIDEN), g=g,
               slack=float32_slack(g, s_upper, eps, norm, d))
    return out


def _domain_box(bounder: Bounder, x: Tensor, method: str) -> Box:
    """The method's box on ``g`` over all of ``[0, 1]^d``, one row (the same for every datapoint;
    computed once per input shape): at eps >= 1 the ball is the domain and the bound is vacuous."""
    cache = bounder.__dict__.setdefault("_domain", {})
    key = (method, tuple(x.shape[1:]), str(x.device))
    if key not in cache:
        centre = torch.full((1,) + tuple(x.shape[1:]), 0.5, dtype=torch.float64, device=x.device)
        with torch.no_grad():
            cache[key] = OUTPUT_BOXES[method](bounder, centre, 1.0, "inf")
    return cache[key]


# --- a run checks itself ------------------------------------------------------------------------------
#
# The bounds are about the float64 function of the traced graph; the attacks evaluate the network
# in float32 at float32 points. Checked on every batch: the graph is the network (in float64, where
# rounding cannot hide a difference); the float64 shift at each attack's kept point is below
# s_upper (exact); and what is recorded (float32) is below s_upper + slack, where the slack is the
# float32 rounding, modelled and measured; a certified point needs s_upper + slack below its margins.

#: the graph against the network, both in float64: ``(||g(x)||_2 + s_upper)`` times this
FLOAT64_RTOL = 1e-9
#: modelled float32 rounding of ``g``, relative to ``||g(x)||_2 + s_upper`` (which bounds
#: ``||g(x')||_2``): 2^-16, 256 units in the last place (measured up to 3e-7 on ResNet-18,
#: PreActResNet-18 and WideResNet-16-2, channels-last included)
FLOAT32_RTOL = 2.0**-16
#: a float32 network further than this from its float64 self (relative as above) is refused:
#: it does not compute the function that is bounded (TF32, a low-precision cast inside forward)
FLOAT32_LIMIT = 2.0**-8


def _check_graph(bounder: Bounder, x: Tensor, g: Tensor, s_upper: Tensor, at: str = "") -> None:
    """The graph's float64 ``g(x)`` against the network's own forward pass in float64 (``at``: where
    ``x`` is, for the message)."""
    with torch.no_grad():
        try:
            g_net = bounder.network(x).flatten(1)
        except Exception as exc:  # noqa: BLE001 - a network that cannot run in float64 cannot be checked
            raise ModelError(f"certify: the representation cannot run in float64 ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); the bounds are computed in "
                             f"float64") from None
    if g_net.shape != g.shape:
        raise CheckFailed(0, f"the network's g(x) has shape {list(g_net.shape)}, its traced graph's "
                             f"{list(g.shape)}: the graph certify bounds is not the network")
    err = (g_net - g).norm(dim=1)
    tol = FLOAT64_RTOL * (g.norm(dim=1) + s_upper) + 1e-12 * float(g.norm(dim=1).max())
    row = _first(~(err <= tol))
    if row is not None:
        raise CheckFailed(row, f"the network's g(x) differs from its traced graph's{at} by {float(err[row]):.3g} "
                               f"in float64 (rounding allows {float(tol[row]):.3g}): the graph certify bounds is "
                               f"not the network")


def float32_slack(g: Tensor, s_upper: Tensor, eps: float, norm: str, d: int) -> Tensor:
    """The modelled part of the float32 rounding a recorded shift may carry above ``s_upper``, ``[N]``:
    of ``g`` at ``x`` and ``x'``, :data:`FLOAT32_RTOL` ``(||g(x)||_2 + s_upper)`` each; and of the
    point, which may lie outside the ball by a unit in the last place per coordinate (at most
    ``eta = 2^-23`` in L-inf, ``2^-22 eps + 2^-23 sqrt(d)`` in L2), which scales the set about
    ``x`` by ``1 + eta / eps`` and a (piecewise) linear shift by as much: ``s_upper eta / eps``.
    :func:`record_slack` adds what is measured."""
    rounding_g = 2 * FLOAT32_RTOL * (g.norm(dim=1) + s_upper)
    if eps <= 0:  # the attacks evaluate x itself
        return rounding_g
    eta = 2.0**-23 if norm == "inf" else 2.0**-22 * eps + 2.0**-23 * math.sqrt(d)
    return rounding_g + s_upper * (eta / eps)


def float32_deviation(bound: "dict[str, Tensor]", g32: Tensor) -> Tensor:
    """``||g32(x) - g(x)||_2``, ``[N]``: how far the scored (float32) network is from the float64
    graph at ``x``; beyond :data:`FLOAT32_LIMIT` it is refused (:class:`CheckFailed`)."""
    g = bound["g"]
    dev = (g32.detach().flatten(1).double().to(g.device) - g).norm(dim=1)
    limit = FLOAT32_LIMIT * (g.norm(dim=1) + bound["s_upper"])
    row = _first(~(dev <= limit))
    if row is not None:
        raise CheckFailed(row, f"the scored network's g(x) is {float(dev[row]):.3g} from its float64 value "
                               f"(float32 rounding stays below {float(limit[row]):.3g}): it does not compute the "
                               f"function that is bounded (TF32? a low-precision cast in forward?)")
    return dev


def _first(bad: Tensor) -> Optional[int]:
    rows = torch.nonzero(bad.reshape(-1)).flatten()
    return int(rows[0]) if len(rows) else None


def check_attack_points(bounder: Bounder, bound: "dict[str, Tensor]", x: Tensor, x_adv: Tensor, g32_adv: Tensor,
                        g32: Tensor, eps: float, norm: str) -> Tensor:
    """The certificate itself, in float64, at the points an attack kept: each projected onto the
    float64 set (the float32 point may lie an ulp outside), its shift must not exceed ``s_upper``
    (else :class:`CheckFailed`). The graph is the network there too: the network's float64 ``g``
    equals the graph's (as :func:`sensitivity_upper` checks at ``x``: a network that equals its
    graph at ``x`` only is not the function that is bounded), and the scored float32 ``g`` is no
    further from it than :data:`FLOAT32_LIMIT` allows (as :func:`float32_deviation` at ``x``), so
    that what is measured below is rounding. Returns the measured float32 rounding there, ``[N]``:
    the float32 shift ``||g32(x_adv) - g32(x)||`` against that float64 shift."""
    x64, lo, hi = _input_box(x, eps)
    z = torch.minimum(torch.maximum(x_adv.detach().double().to(x64.device).contiguous(), lo), hi)
    if norm == "2":
        delta = z - x64
        length = delta.flatten(1).norm(dim=1)
        scale = torch.where(length > eps, eps / length.clamp(min=1e-300), torch.ones_like(length))
        z = x64 + delta * scale.view((-1,) + (1,) * (x64.dim() - 1))
    with torch.no_grad():
        g_z = bounder(z, z).mid.flatten(1)
        shift = (g_z - bound["g"]).norm(dim=1)
    _check_graph(bounder, z, g_z, bound["s_upper"], at=" at an attack's point")
    dev = (g32_adv.detach().flatten(1).double().to(g_z.device) - g_z).norm(dim=1)
    limit = FLOAT32_LIMIT * (bound["g"].norm(dim=1) + bound["s_upper"]) + bound.get("slack", 0)
    row = _first(~(dev <= limit))
    if row is not None:
        raise CheckFailed(row, f"the scored network's g at an attack's point is {float(dev[row]):.3g} from its "
                               f"float64 value (float32 rounding stays below {float(limit[row]):.3g}): it does not "
                               f"compute the function that is bounded")
    row = _first(shift > bound["s_upper"])
    if row is not None:
        raise CheckFailed(row, f"an attack's point shifts the float64 g(x) by {float(shift[row]):.6g}, above "
                               f"s_upper {float(bound['s_upper'][row]):.6g}: the certificate is wrong")
    shift32 = (g32_adv.detach().flatten(1).double() - g32.detach().flatten(1).double()).norm(dim=1)
    return (shift32.to(shift.device) - shift).abs()


def record_slack(bound: "dict[str, Tensor]", measured: "list[Tensor]") -> Tensor:
    """The float32 slack of a batch's records, ``[N]``: the modelled one (:func:`float32_slack`)
    plus twice the largest rounding measured (:func:`float32_deviation`, :func:`check_attack_points`),
    which holds a network whose rounding follows its intermediate values rather than ``g``."""
    return bound["slack"] + 2 * torch.stack([m.to(bound["slack"].device) for m in measured]).amax(0)


def certified(bound: "dict[str, Tensor]", slack: Tensor, margins: "list[Tensor]") -> Tensor:
    """Theorem 2's criterion certified, ``[N]``: ``s_upper`` plus the float32 ``slack`` below every
    margin given (the float64 margin of the graph's ``g(x)`` and the recorded one of the network's),
    so that no float32 point of the ball can be classified otherwise either."""
    upper = bound["s_upper"] + slack
    return torch.stack([upper < m.to(upper.device, torch.float64) for m in margins]).all(0)


def check_records(bound: "dict[str, Tensor]", slack: Tensor, sensitivity: Tensor,
                  certified: Optional[Tensor] = None, robust: Optional[Tensor] = None) -> None:
    """What a batch records against its certificate: no shift above ``s_upper`` beyond the
    float32 ``slack``, and no certified point that an attack fooled (:class:`CheckFailed`)."""
    s = sensitivity.detach().double().to(bound["s_upper"].device)
    row = _first(s > bound["s_upper"] + slack)
    if row is not None:
        raise CheckFailed(row, f"the attacks' shift {float(s[row]):.6g} exceeds s_upper "
                               f"{float(bound['s_upper'][row]):.6g} beyond float32 rounding "
                               f"({float(slack[row]):.3g}): the certificate is wrong")
    if certified is not None and robust is not None:
        row = _first(certified.to(s.device) & ~robust.to(s.device))
        if row is not None:
            raise CheckFailed(row, "certified, yet an attack changed the class: the certificate is wrong")
