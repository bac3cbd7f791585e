"""The representation contract: ``f(x) = W g(x) + b`` (SPEC section 1).

A :class:`SplitModel` exposes ``features(x) -> [N, m]`` (the representation ``g``) and its
linear ``head``; ``head(features(x)) == model(x)``. The split adapts a *copy* of the user's
module (a hook, or its final linear replaced by an identity) and never edits the original.

Two ways to split:

* automatic: hook every ``nn.Linear`` during one forward pass and take the last one called
  exactly once whose output *is* the model's output (this covers ``fc``, ``logits``,
  ``linear``, ``model.fc``, ``head.fc`` ... without special-casing names);
* ``feature_layer=NAME``: the representation is the flattened output of module ``NAME`` and the
  head is the ``nn.Linear`` that consumes exactly that tensor.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from asbound.errors import ModelError


class SplitModel(nn.Module):
    """A model split into a representation ``g`` and a linear head: ``f(x) = W g(x) + b``."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, *, split_note: str = "") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.split_note = split_note

    def features(self, x: Tensor) -> Tensor:
        """The representation ``g(x)``, flattened to ``[N, m]``."""
        return self.backbone(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @property
    def W(self) -> Tensor:  # noqa: N802 - the paper's name
        return self.head.weight

    @property
    def b(self) -> Tensor:
        if self.head.bias is None:
            return torch.zeros(self.head.out_features, device=self.W.device, dtype=self.W.dtype)
        return self.head.bias

    def exact_head(self) -> "Callable[[Tensor], Tensor]":
        """``g -> W g + b`` in float64: the head that predictions, losses and margins are judged by.

        The model's own float32 head can pick another class at a near-tie than the float64
        Theorem 2 margin implies; judging both in float64 keeps them consistent.
        """
        W = self.W.detach().double()
        b = self.b.detach().double()
        return lambda g: g.detach().double().flatten(1) @ W.T + b

    @property
    def num_outputs(self) -> int:
        return self.head.out_features

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def with_head(self, head: nn.Linear) -> "SplitModel":
        """The same representation with another linear head (e.g. a trained probe)."""
        if head.in_features != self.feature_dim:
            raise ModelError(
                f"the head takes {head.in_features} features but the representation has "
                f"{self.feature_dim}; a head for this model must be Linear({self.feature_dim}, K)"
            )
        return SplitModel(self.backbone, head, split_note=self.split_note)


class _StopForward(Exception):
    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


class LayerOutput(nn.Module):
    """Run ``model`` up to module ``layer`` and return that module's output (the rest is skipped)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        model.get_submodule(layer)  # fail early on a wrong name

    def forward(self, x: Tensor) -> Tensor:
        def stop(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            raise _StopForward(output)

        # looked up per call (not stored as an attribute: that would register the layer twice)
        handle = self.model.get_submodule(self.layer).register_forward_hook(stop)
        try:
            self.model(x)
        except _StopForward as caught:
            return caught.output
        finally:
            handle.remove()
        raise ModelError(f"layer {self.layer!r} was not called in the forward pass")


@dataclass
class _Call:
    name: str
    module: nn.Linear
    inputs: Tensor
    output: Tensor


@contextmanager
def _record_linear_calls(model: nn.Module) -> Iterator[list[_Call]]:
    calls: list[_Call] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def hook(mod: nn.Module, inputs: tuple, output: Tensor, name: str = name) -> None:
                calls.append(_Call(name, mod, inputs[0].detach(), output.detach()))

            handles.append(module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = max(float(b.abs().max()), 1.0)
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _layer_names(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, m in model.named_modules() if n and not isinstance(m, nn.Sequential)]
    shown = names[-limit:]
    more = f" (last {limit} of {len(names)})" if len(names) > limit else ""
    return ", ".join(shown) + more


def _copy_frozen_eval(model: nn.Module) -> nn.Module:
    try:
        clone = copy.deepcopy(model)
    except Exception as exc:  # a module holding an un-copyable object
        raise ModelError(f"the model cannot be copied for splitting ({exc})") from None
    return clone.eval()


def split_model(
    model: nn.Module, probe: Tensor, *, feature_layer: Optional[str] = None
) -> SplitModel:
    """Split ``model`` into representation and linear head, verified on the ``probe`` batch.

    Raises :class:`ModelError` if no linear head reproduces the model's output (then
    ``feature_layer`` picks the representation layer explicitly).
    """
    work = _copy_frozen_eval(model)
    _refuse_non_finite(work)
    if feature_layer is not None:
        return _split_at_layer(work, probe, feature_layer)
    with torch.no_grad(), _record_linear_calls(work) as calls:
        output = work(probe)
    _refuse_non_finite(work, output)
    if not isinstance(output, Tensor) or output.dim() != 2:
        raise ModelError(
            f"the model's output is {_describe(output)}, not a [N, K] tensor of logits or targets; "
            f"pass --feature-layer NAME to pick the representation layer (layers: {_layer_names(work)})"
        )
    counts: dict[str, int] = {}
    for call in calls:
        counts[call.name] = counts.get(call.name, 0) + 1
    candidates = [c for c in calls if counts[c.name] == 1 and _close(c.output, output)]
    if not candidates:
        raise ModelError(
            "the model's last layer is not a linear layer (no nn.Linear called once produces its "
            "output), so it cannot be split as f(x) = W g(x) + b; pass --feature-layer NAME to "
            f"pick the representation layer (layers: {_layer_names(work)})"
        )
    last = candidates[-1]
    if last.inputs.dim() != 2:
        raise ModelError(
            f"the head {last.name!r} receives a {tuple(last.inputs.shape)} tensor, not [N, m] "
            f"features; pass --feature-layer NAME to pick a flat representation layer"
        )
    head = copy.deepcopy(last.module)
    _set_submodule(work, last.name, nn.Identity())
    split = SplitModel(work, head, split_note=f"head = {last.name} (auto)")
    _verify(split, probe, output, last.name)
    return split


def _refuse_non_finite(model: nn.Module, output: object = None) -> None:
    """A model whose weights (or, given, whose ``output`` on the probe) are not finite cannot be
    split or scored: say which, rather than fail later on a NaN. (A buffer may hold -inf, as an
    attention mask does; never nan.)"""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, value in named:
            if not value.is_floating_point():
                continue
            nan = bool(torch.isnan(value).any())
            if nan or (kind == "parameter" and not bool(torch.isfinite(value).all())):
                raise ModelError(f"the model's {kind} {name} holds {'nan' if nan else 'inf'}: asbound scores "
                                 f"models whose weights are finite numbers")
    if isinstance(output, Tensor) and output.is_floating_point() and not bool(torch.isfinite(output).all()):
        raise ModelError("the model's output on the first inputs is not finite (nan or inf) although its weights "
                         "are: it overflows on these inputs; asbound scores models that compute finite values")


def _split_at_layer(work: nn.Module, probe: Tensor, layer: str) -> SplitModel:
    names = dict(work.named_modules())
    if layer not in names or layer == "":
        raise ModelError(
            f"--feature-layer {layer!r} is not a module of this model; layers: {_layer_names(work)}"
        )
    captured: list[Tensor] = []
    handle = names[layer].register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad(), _record_linear_calls(work) as calls:
            output = work(probe)
    finally:
        handle.remove()
    _refuse_non_finite(work, output)
    if not captured:
        raise ModelError(f"--feature-layer {layer!r} is never called in the model's forward pass")
    rep = captured[0].flatten(1)
    consumers = [c for c in calls if c.inputs.dim() == 2 and _close(c.inputs, rep)]
    if not consumers:
        raise ModelError(
            f"the output of --feature-layer {layer!r} ({rep.shape[1]} features) feeds no "
            f"nn.Linear; asbound needs f(x) = W g(x) + b with g the layer's output"
        )
    head = copy.deepcopy(consumers[0].module)
    note = f"representation = {layer}, head = {consumers[0].name}"
    if not (isinstance(output, Tensor) and _close(consumers[0].output, output)):
        note += " (the model post-processes the head's output; f is the head's output)"
    split = SplitModel(LayerOutput(work, layer), head, split_note=note)
    _verify(split, probe, consumers[0].output, consumers[0].name)
    return split


def _verify(split: SplitModel, probe: Tensor, expected: Tensor, head_name: str) -> None:
    with torch.no_grad():
        got = split(probe)
    if not _close(got, expected):
        err = float((got - expected).abs().max()) if got.shape == expected.shape else float("nan")
        raise ModelError(
            f"splitting at {head_name!r} does not reproduce the model's output "
            f"(max abs error {err:.3g}); pass --feature-layer NAME to pick the representation layer"
        )


def _describe(obj: object) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the duration; both restored afterwards.

    Each submodule gets its own mode back (a model may keep, e.g., frozen BatchNorm layers in
    eval mode inside a module in training mode).
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
