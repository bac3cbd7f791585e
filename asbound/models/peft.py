"""Parameter-efficient tuning of a split model's representation: what trains, and how it is built.

Variants (``--peft``; seed 000 section 4, ``METHODS.md`` 2.6 and P-R1, P-R2, P-R8):

========= ==================================================================================
full      every backbone parameter (and the head)
lora      LoRA (the ``peft`` library) on every ``Conv2d`` and ``Linear`` of the backbone:
          ``W + (alpha / r) B A``, ``A`` kaiming-uniform and ``B`` zero (peft's default). The
          reference's RoLI configs start ``A`` at zero too, and then nothing but the head ever
          trains (P-R1); here ``A`` is never zero. Saved merged: ``run:DIR`` is a plain model.
adapter   a bottleneck adapter after every ``Conv2d`` and ``Linear`` of the backbone:
          ``y + Up(GELU(Down(y)))`` with ``Down`` torch's default init and ``Up`` zero, so the
          adapted model starts as the pretrained one and every adapter parameter can learn (the
          reference's all-zero adapters only ever train ``Up``'s bias, P-R2). 1x1 convolutions
          (after a conv) or linear maps (after a linear) of width ``max(1, C // reduction)``.
bias      the parameters named ``bias`` of the backbone's layers (convolutions, linear maps,
          normalisation shifts), and nothing else: not, e.g., a transformer's
          ``relative_position_bias_table`` (P-R8)
prompt    visual prompt tuning (VPT, Jia et al. 2022) of a ViT (timm's ``VisionTransformer``):
          ``tokens`` learnable prompt tokens enter the sequence after the class (and register)
          tokens, once the patch and position embeddings are in, before the first block; VPT-deep
          (``deep``, the reference's configs: 10 tokens, 20 for CUB) replaces them with the
          block's own prompts before every later block, VPT-shallow keeps the first ones. The
          prompts leave the sequence after the last block, so the model's own pooling (class
          token, or the average of the patch tokens) reads the same tokens as before: the prompts
          act through attention only. Drawn U(-v, v), v = sqrt(6 / (C p^2 + d)) (the reference's
          init; C channels, p the patch side, d the width). No prompt dropout (the reference's
          0.1): like every PEFT variant here the representation stays in eval mode while it trains.
========= ==================================================================================

AutoLoRa's natural branch (seed 002) is LoRA too (``natural_branch``): rank 8, alpha 1 (scale
1/8), ``A`` drawn from N(0, 1) as the reference's ConvLoRA and ``B`` zero, on the same layers.
Two differences from the reference remain: peft's convolutional LoRA has rank r where the
reference's ConvLoRA factorises the kernel at rank ``r k``, and the branch goes on every
``Conv2d`` and ``Linear`` of the representation, the stem included (the reference leaves the stem
and the downsampling shortcut of the high-resolution ResNets out). It is *disabled* except inside
:func:`lora_branch`, so the model is the feature-extractor branch everywhere else (attacks,
validation, the saved model).

The head is always trained. A PEFT model keeps its backbone in eval mode while it trains (the
reference's ``froze_enc``), so batch-norm statistics do not drift: nothing outside the PEFT set
changes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from asbound.errors import ConfigError, ModelError
from asbound.models.split import LayerOutput, SplitModel

VARIANTS = ("full", "lora", "adapter", "bias", "prompt")
#: variants saved unmerged, whose structure ``run:DIR`` rebuilds before loading the weights
REBUILT = ("adapter", "prompt")
#: the fields of :class:`PeftSpec` that only ``prompt`` records
_PROMPT_FIELDS = ("tokens", "deep")
#: the module types LoRA and adapters are put on
ADAPTED_TYPES = (nn.Conv2d, nn.Linear)
_TYPE_NAMES = ", ".join(t.__name__ for t in ADAPTED_TYPES)


@dataclass(frozen=True)
class PeftSpec:
    """A PEFT structure: ``variant`` in :data:`VARIANTS` or ``natural-branch`` (AutoLoRa)."""

    variant: str
    rank: int = 16
    alpha: float = 16.0
    reduction: int = 8
    init: str = "kaiming"  # LoRA's A: "kaiming" (peft's default) or "normal" (N(0, 1): AutoLoRa)
    tokens: int = 10  # prompt tokens per block (prompt)
    deep: bool = True  # prompt: VPT-deep (new prompts before every block) or VPT-shallow

    def as_record(self) -> dict:
        """The spec as ``config.json`` records it (the prompt fields only for ``prompt``, so the
        records of the other variants are those written before prompts existed)."""
        record = asdict(self)
        if self.variant != "prompt":
            for name in _PROMPT_FIELDS:
                del record[name]
        return record

    @staticmethod
    def from_record(record: "dict | None") -> "Optional[PeftSpec]":
        return None if not record else PeftSpec(**record)


def natural_branch(rank: int = 8, alpha: float = 1.0) -> PeftSpec:
    """AutoLoRa's low-rank natural branch (seed 002: r_nat 8, alpha 1)."""
    return PeftSpec("natural-branch", rank=rank, alpha=alpha, init="normal")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown --peft variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return variant


def adapted_layers(backbone: nn.Module) -> "list[str]":
    """Names of the backbone's modules that LoRA or adapters go on: every ``Conv2d`` and ``Linear``
    (subclasses included), except a ``MultiheadAttention``'s projection (the attention reads its
    weight without calling the module) and the bottleneck layers of adapters already there."""
    inside_attention = {f"{name}.{child}" if name else child
                        for name, m in backbone.named_modules() if isinstance(m, nn.MultiheadAttention)
                        for child, _ in m.named_children()}
    # a chained model's earlier adapters: their bottlenecks are not adapted again
    bottlenecks = tuple(f"{name}.adapter" if name else "adapter"
                        for name, m in backbone.named_modules() if isinstance(m, Adapter))
    return [name for name, m in backbone.named_modules()
            if name and isinstance(m, ADAPTED_TYPES) and name not in inside_attention
            and not any(name == b or name.startswith(b + ".") for b in bottlenecks)]


def check_peft(split: SplitModel, spec: PeftSpec) -> None:
    """Raise the error :func:`apply_peft` would raise for a model with nothing to adapt, without
    building anything (checked before any run directory is written)."""
    if spec.variant == "bias" and not bias_names(split.backbone):
        raise _no_layers(spec, "parameters named 'bias'")
    if spec.variant in ("lora", "adapter", "natural-branch") and not adapted_layers(split.backbone):
        raise _no_layers(spec, f"modules of type {_TYPE_NAMES}")
    if spec.variant == "prompt":
        prompt_sites(split.backbone)


def bias_names(backbone: nn.Module) -> "list[str]":
    """Parameter names of the backbone whose own name is ``bias``."""
    return [name for name, _ in backbone.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]


# --- building -----------------------------------------------------------------------------------------


class Adapter(nn.Module):
    """``layer`` followed by a residual bottleneck: ``y + Up(GELU(Down(y)))``, ``y = layer(x)``."""

    def __init__(self, layer: nn.Module, reduction: int) -> None:
        super().__init__()
        self.layer = layer
        if isinstance(layer, nn.Conv2d):
            width = layer.out_channels
            hidden = max(1, width // reduction)
            down, up = nn.Conv2d(width, hidden, 1), nn.Conv2d(hidden, width, 1)
        else:
            width = layer.out_features
            hidden = max(1, width // reduction)
            down, up = nn.Linear(width, hidden), nn.Linear(hidden, width)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter = nn.Sequential(down, nn.GELU(), up)
        ref = layer.weight
        self.adapter.to(device=ref.device, dtype=ref.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.layer(x)
        return y + self.adapter(y)


def _no_layers(spec: PeftSpec, what: str) -> ModelError:
    return ModelError(f"--peft {spec.variant} finds no layer to adapt in this model: it looks for {what} "
                      f"in the representation (not the head); choose --peft full or another model")


def apply_peft(split: SplitModel, spec: PeftSpec, *, seed: int = 0) -> SplitModel:
    """Build ``spec``'s structure into ``split`` (in place; new weights drawn from ``seed``) and
    record it as ``split.peft``. ``full`` and ``bias`` change no structure."""
    if spec.variant not in (*VARIANTS, "natural-branch"):
        check_variant(spec.variant)
    check_peft(split, spec)
    backbone = split.backbone
    existing = {id(p) for p in split.parameters()}
    if spec.variant in ("lora", "adapter", "natural-branch"):
        names = adapted_layers(backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if spec.variant == "adapter":
                for name in names:
                    parent, _, child = name.rpartition(".")
                    owner = backbone.get_submodule(parent) if parent else backbone
                    setattr(owner, child, Adapter(owner.get_submodule(child), spec.reduction))
            else:
                split.backbone = _lora(backbone, names, spec)
    elif spec.variant == "prompt":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name in prompt_sites(backbone):
                prompted = PromptedViT(backbone.get_submodule(name), spec.tokens, spec.deep)
                if name:
                    parent, _, child = name.rpartition(".")
                    setattr(backbone.get_submodule(parent) if parent else backbone, child, prompted)
                else:
                    split.backbone = prompted
    split.peft = spec
    # what this structure added, by identity: a chained model's own adapters or LoRA layers (a
    # run:DIR base) are part of the representation, whatever their names
    split.peft_added = sorted(n for n, p in split.named_parameters() if id(p) not in existing)
    split.__dict__.pop("_base_names", None)
    return split


def _lora(backbone: nn.Module, names: "list[str]", spec: PeftSpec) -> nn.Module:
    import logging
    import warnings

    from peft import LoraConfig, LoraModel

    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
        target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$",
        init_lora_weights=True,  # A kaiming-uniform, B zero; AutoLoRa's A is redrawn below
    )
    logging.getLogger("peft").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LoraModel(backbone, config, "default")
    ref = next(backbone.parameters())
    model.to(device=ref.device)
    if spec.init == "normal":  # seed 002's ConvLoRA: A ~ N(0, 1) (peft's "gaussian" draws N(0, 1 / r^2))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    p.normal_(0.0, 1.0)
    if spec.variant == "natural-branch":
        _set_branch(model, False)  # the feature-extractor branch, except inside lora_branch
    return model


def _set_branch(backbone: nn.Module, enabled: bool) -> None:
    """Switch the LoRA layers on or off *without* touching ``requires_grad``: peft's own
    ``enable_adapter_layers`` / ``disable_adapter`` also set the adapters' ``requires_grad``, so
    toggling the branch through them would freeze the LoRA factors after the first natural pass
    (P-A8). The flag is peft's ``BaseTunerLayer._disable_adapters`` (peft pinned in constraints.txt)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or not all(hasattr(m, "_disable_adapters") for m in layers):
        raise ModelError("this peft version has no per-layer adapter switch (_disable_adapters); "
                         "install the peft version in constraints.txt")
    for m in layers:
        m._disable_adapters = not enabled


# --- visual prompts ------------------------------------------------------------------------------------


def _vit_class() -> type:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def prompt_sites(backbone: nn.Module) -> "list[str]":
    """Names (in ``backbone``) of the ViTs that prompts go into: each timm ``VisionTransformer``
    whose forward is timm's own (``forward_features`` then ``forward_head``), not inside another.
    Raises :class:`ModelError` naming what is missing."""
    vit_class = _vit_class()
    if any(isinstance(m, PromptedViT) for m in backbone.modules()):
        raise ModelError("--peft prompt: this model already holds prompts (a prompt run as the base); its "
                         "prompts are part of the representation: choose --peft full, lora, adapter or bias")
    sites: "list[str]" = []
    for name, module in backbone.named_modules():
        if isinstance(module, vit_class) and not any(name.startswith(s + ".") or not s for s in sites):
            sites.append(name)
    if not sites:
        raise ModelError("--peft prompt needs a ViT (timm's VisionTransformer) in the representation and this "
                         "model has none; choose --peft full, lora, adapter or bias")
    own = ("forward", "forward_features", "forward_head", "_pos_embed")
    for name in sites:
        kind = type(backbone.get_submodule(name))
        changed = [f for f in own if getattr(kind, f) is not getattr(vit_class, f)]
        if changed:
            raise ModelError(f"--peft prompt: {kind.__name__} changes timm's VisionTransformer.{changed[0]}, so "
                             f"where prompts go is not defined for it; choose --peft full, lora, adapter or bias")
    layer = getattr(backbone, "layer", None)
    if isinstance(backbone, LayerOutput) and any(f"model.{layer}".startswith(s + ".") for s in sites):
        raise ModelError(f"--peft prompt: --feature-layer {layer} lies inside the ViT, where the prompt tokens "
                         f"are still in the sequence; leave --feature-layer out (the ViT's own head split)")
    return sites


class PromptedViT(nn.Module):
    """A timm ``VisionTransformer`` with ``tokens`` learnable prompt tokens (see the module's table).

    ``forward`` is timm's ``forward_features`` then ``forward_head`` (timm 1.0) with the prompts
    inserted after the prefix (class, register) tokens before the first block (and, ``deep``,
    replaced before every later block) and removed after the last block, before the final norm
    and the pooling. With 0 tokens it computes the ViT's own output.
    """

    def __init__(self, vit: nn.Module, tokens: int, deep: bool) -> None:
        super().__init__()
        self.vit = vit
        self.tokens = int(tokens)
        self.deep = bool(deep)
        width = int(vit.embed_dim)
        patch = math.prod(vit.patch_embed.patch_size)
        channels = int(vit.patch_embed.proj.in_channels)
        bound = math.sqrt(6.0 / (channels * patch + width))
        ref = next(vit.parameters())
        layers = len(vit.blocks) if self.deep else 1
        prompts = torch.empty(layers, self.tokens, width).uniform_(-bound, bound)
        self.prompts = nn.Parameter(prompts.to(device=ref.device, dtype=ref.dtype))

    def forward(self, x: Tensor) -> Tensor:
        vit, n = self.vit, self.tokens
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        k = int(vit.num_prefix_tokens)
        for i, block in enumerate(vit.blocks):
            if i < len(self.prompts):
                prompt = self.prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat((x[:, :k], prompt, x[:, k + (n if i else 0):]), dim=1)
            x = block(x)
        x = torch.cat((x[:, :k], x[:, k + n:]), dim=1)  # the prompts leave before the norm and the pooling
        x = vit.norm(x)
        return vit.forward_head(x)


# --- what trains ----------------------------------------------------------------------------------------


def peft_parameter_names(split: SplitModel) -> "list[str]":
    """The names (in ``split.named_parameters()``) of the PEFT parameters, head excluded."""
    spec: Optional[PeftSpec] = getattr(split, "peft", None)
    if spec is None or spec.variant == "full":
        return [n for n, _ in split.backbone.named_parameters(prefix="backbone")]
    if spec.variant == "bias":
        return [f"backbone.{n}" for n in bias_names(split.backbone)]
    return list(split.peft_added)


def base_parameter_names(split: SplitModel) -> "list[str]":
    """The backbone's own parameters: everything in the backbone that the PEFT structure did not add."""
    added = set(getattr(split, "peft_added", ()))
    return [n for n, _ in split.backbone.named_parameters(prefix="backbone") if n not in added]


@contextlib.contextmanager
def lora_branch(split: SplitModel) -> Iterator[None]:
    """AutoLoRa's natural branch enabled for the duration (disabled again afterwards)."""
    _set_branch(split.backbone, True)
    try:
        yield
    finally:
        _set_branch(split.backbone, False)


def natural_forward(split: SplitModel, x: Tensor) -> Tensor:
    """Logits of AutoLoRa's natural branch, ``W + delta W`` with the backbone's own weights
    *detached*: its gradient reaches the LoRA factors and the head only, never the backbone's
    weights (routing by detached tensors, not by toggling ``requires_grad``: P-A8). Batch-norm
    statistics are shared with the other branch (P-A9)."""
    detached = {n: p.detach() for n, p in split.named_parameters() if n in _base_set(split)}
    with lora_branch(split):
        return torch.func.functional_call(split, detached, (x,), strict=False)


def _base_set(split: SplitModel) -> "set[str]":
    cached = getattr(split, "_base_names", None)
    if cached is None:
        cached = set(base_parameter_names(split))
        split._base_names = cached
    return cached


# --- saving ------------------------------------------------------------------------------------------------


def saved_model(split: SplitModel) -> "tuple[SplitModel, Optional[dict]]":
    """What a run saves: a copy with LoRA merged into the weights (``lora``) or dropped
    (AutoLoRa's natural branch: inference uses the feature-extractor branch), and the structure
    ``run:DIR`` must rebuild before loading (adapters, prompts: part of the representation), or
    ``None``."""
    spec: Optional[PeftSpec] = getattr(split, "peft", None)
    out = copy.deepcopy(split)
    if spec is not None and spec.variant == "lora":
        out.backbone = out.backbone.merge_and_unload()
    elif spec is not None and spec.variant == "natural-branch":
        out.backbone = out.backbone.unload()
    out.__dict__.pop("_base_names", None)
    out.__dict__.pop("peft_added", None)
    structure = spec.as_record() if spec is not None and spec.variant in REBUILT else None
    out.peft = None
    return out, structure


def rebuild_structure(split: SplitModel, structure: "dict | None") -> SplitModel:
    """Rebuild a saved run's structure (adapters, prompts) so its ``model.pt`` loads strictly."""
    spec = PeftSpec.from_record(structure)
    if spec is None:
        return split
    if spec.variant not in REBUILT:
        raise ModelError(f"a saved structure {spec.variant!r} cannot be rebuilt (only adapters and prompts "
                         f"are saved unmerged)")
    return apply_peft(split, spec)

