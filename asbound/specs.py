"""The one grammar for model and data specs, parsed here and nowhere else.

Model specs::

    robustbench:[DATASET/THREAT_MODEL/]NAME   e.g. robustbench:cifar100/Linf/Addepalli2022Efficient_WRN_34_10
    file:PATH                                 a whole nn.Module saved with torch.save(model, PATH)
    torchvision:ARCH                          e.g. torchvision:resnet18 (weights from --weights PATH)
    builtin:NAME[/HEAD]                       the small models shipped with asbound

Data specs::

    cifar10 | cifar100 | fashion-mnist | mnist  torchvision data sets under --data-root
    folder:PATH                                 an ImageFolder tree (one sub-folder per class)
    tensors:PATH                                torch.save({"x": ..., "y": ...}) or an .npz with x, y
    dsprites[:FACTOR]                           FACTOR in shape, scale, orientation, posx, posy

Eps is always in pixel units ([0, 1] inputs) and may be written as a fraction (``8/255``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from asbound.errors import ConfigError, SpecError

MODEL_SOURCES = ("robustbench", "file", "torchvision", "builtin")
TORCHVISION_DATASETS = ("cifar10", "cifar100", "fashion-mnist", "mnist")
DATA_SOURCES = TORCHVISION_DATASETS + ("folder", "tensors", "dsprites")
DSPRITES_FACTORS = ("shape", "scale", "orientation", "posx", "posy")
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")
ROBUSTBENCH_THREAT_MODELS = ("Linf", "L2", "corruptions", "corruptions_3d")
NORMS = ("inf", "2")


@dataclass(frozen=True)
class InputFormat:
    """The input a model expects: channels and spatial size (pixels in [0, 1])."""

    channels: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value."""

    source: str
    name: str
    dataset: Optional[str] = None  # robustbench only
    threat_model: Optional[str] = None  # robustbench only
    head: Optional[str] = None  # builtin only: which shipped head

    def __str__(self) -> str:
        if self.source == "robustbench":
            return f"robustbench:{self.dataset}/{self.threat_model}/{self.name}"
        if self.source == "builtin" and self.head:
            return f"builtin:{self.name}/{self.head}"
        return f"{self.source}:{self.name}"


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value."""

    source: str
    path: Optional[str] = None  # folder / tensors
    factor: Optional[str] = None  # dsprites

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.source}:{self.path}"
        if self.factor is not None:
            return f"{self.source}:{self.factor}"
        return self.source


def _split_prefix(text: str, what: str, valid: str) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"empty {what} spec; valid forms: {valid}")
    prefix, sep, rest = text.strip().partition(":")
    return prefix.lower(), rest if sep else ""


_MODEL_FORMS = (
    "robustbench:[DATASET/THREAT_MODEL/]NAME, file:PATH, torchvision:ARCH, builtin:NAME[/HEAD]"
)
_DATA_FORMS = (
    "cifar10, cifar100, fashion-mnist, mnist, folder:PATH, tensors:PATH, dsprites[:FACTOR]"
)


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``--model``; an unknown prefix or a malformed name lists the valid forms."""
    prefix, rest = _split_prefix(text, "model", _MODEL_FORMS)
    if prefix not in MODEL_SOURCES:
        raise SpecError(
            f"unknown model spec {text!r}: the prefix must be one of "
            f"{', '.join(p + ':' for p in MODEL_SOURCES)} (forms: {_MODEL_FORMS})"
        )
    if not rest:
        raise SpecError(f"model spec {text!r} names no model; forms: {_MODEL_FORMS}")
    if prefix == "robustbench":
        parts = rest.split("/")
        if len(parts) == 1:
            dataset, threat, name = "cifar10", "Linf", parts[0]
        elif len(parts) == 3:
            dataset, threat, name = parts
        else:
            raise SpecError(
                f"model spec {text!r}: expected robustbench:NAME or "
                f"robustbench:DATASET/THREAT_MODEL/NAME"
            )
        dataset = dataset.lower()
        if dataset not in ROBUSTBENCH_DATASETS:
            raise SpecError(
                f"model spec {text!r}: unknown RobustBench data set {dataset!r}; "
                f"valid: {', '.join(ROBUSTBENCH_DATASETS)}"
            )
        threat_lookup = {t.lower(): t for t in ROBUSTBENCH_THREAT_MODELS}
        if threat.lower() not in threat_lookup:
            raise SpecError(
                f"model spec {text!r}: unknown threat model {threat!r}; "
                f"valid: {', '.join(ROBUSTBENCH_THREAT_MODELS)}"
            )
        if not name:
            raise SpecError(f"model spec {text!r} names no RobustBench model")
        return ModelSpec("robustbench", name, dataset, threat_lookup[threat.lower()])
    if prefix == "builtin":
        name, _, head = rest.partition("/")
        return ModelSpec("builtin", name, head=head or None)
    return ModelSpec(prefix, rest)


def parse_data_spec(text: str) -> DataSpec:
    """Parse ``--data``; an unknown name lists the valid forms."""
    prefix, rest = _split_prefix(text, "data", _DATA_FORMS)
    if prefix not in DATA_SOURCES:
        raise SpecError(f"unknown data spec {text!r}; valid: {_DATA_FORMS}")
    if prefix in TORCHVISION_DATASETS:
        if rest:
            raise SpecError(f"data spec {text!r}: {prefix} takes no argument; valid: {_DATA_FORMS}")
        return DataSpec(prefix)
    if prefix in ("folder", "tensors"):
        if not rest:
            raise SpecError(f"data spec {text!r} names no path; use {prefix}:PATH")
        return DataSpec(prefix, path=rest)
    # dsprites
    factor = (rest or "orientation").lower()
    if factor not in DSPRITES_FACTORS:
        raise SpecError(
            f"data spec {text!r}: unknown dSprites factor {factor!r}; "
            f"valid: {', '.join(DSPRITES_FACTORS)}"
        )
    return DataSpec("dsprites", factor=factor)


def parse_eps(value: "str | float", norm: str = "inf") -> float:
    """Parse eps in pixel units: a number (``0.03``) or a fraction (``8/255``).

    An L-inf radius lies in [0, 1] (inputs are pixels in [0, 1]); an L2 radius may exceed 1
    (e.g. the L2 eps = 3 ImageNet models), so it only has to be a finite number >= 0.
    """
    text = str(value).strip()
    try:
        eps = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"eps {text!r} is not a number; give a value in [0, 1] such as 0.03 or 8/255"
        ) from None
    if norm == "2":
        if not math.isfinite(eps) or eps < 0:
            raise ConfigError(f"eps {text!r} = {eps:g} is not a valid L2 radius; give a finite number >= 0")
        return eps
    if not math.isfinite(eps) or not 0.0 <= eps <= 1.0:
        raise ConfigError(
            f"eps {text!r} = {eps:g} is outside [0, 1]; eps is in pixel units "
            f"(inputs in [0, 1]), e.g. 8/255"
        )
    return eps


def format_eps(eps: float) -> str:
    """Print eps as ``k/255`` when it is one, else as a short decimal."""
    k = eps * 255.0
    if 0 < eps < 1 and abs(k - round(k)) < 1e-6:
        return f"{int(round(k))}/255"
    return f"{eps:.6g}"


def parse_norm(value: "str | float") -> str:
    """Normalise ``--norm``: ``inf`` (also linf, Linf) or ``2`` (also l2, L2)."""
    text = str(value).strip().lower().lstrip("l")
    if text in ("inf", "infinity"):
        return "inf"
    if text in ("2", "2.0"):
        return "2"
    raise ConfigError(f"norm {value!r} is not supported; valid: inf, 2")
