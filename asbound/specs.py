"""The one grammar for model and data specs, parsed here and nowhere else.

Model specs::

    robustbench:[DATASET/THREAT_MODEL/]NAME   e.g. robustbench:cifar100/Linf/Addepalli2022Efficient_WRN_34_10
    file:PATH                                 a whole nn.Module saved with torch.save(model, PATH)
    torchvision:ARCH                          e.g. torchvision:resnet18 (weights from --weights PATH)
    builtin:NAME[/HEAD]                       the small models shipped with asbound
    run:DIR                                   a finished `asbound transfer` run (its trained model)

Data specs::

    cifar10 | cifar100 | fashion-mnist | mnist  torchvision data sets under --data-root
    digits                                      scikit-learn's bundled 8x8 handwritten digits
    folder:PATH                                 an ImageFolder tree (one sub-folder per class)
    tensors:PATH                                torch.save({"x": ..., "y": ...}) or an .npz with x, y
    dsprites[:FACTOR]                           FACTOR in shape, scale, orientation, posx, posy

``--classes`` selects classes of a classification data set and relabels them 0..k-1 in the order
given: ``0-4``, ``5-9``, ``0,2,4``, ``1-3,7`` (see :func:`parse_classes`).

Eps is always in pixel units ([0, 1] inputs) and may be written as a fraction (``8/255``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

from asbound.errors import ConfigError, SpecError

MODEL_SOURCES = ("robustbench", "file", "torchvision", "builtin", "run")
TORCHVISION_DATASETS = ("cifar10", "cifar100", "fashion-mnist", "mnist")
DATA_SOURCES = TORCHVISION_DATASETS + ("digits", "folder", "tensors", "dsprites")
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


def absolute_path(path: str) -> str:
    """``path`` with ``~`` expanded, made absolute and resolved."""
    return str(Path(path).expanduser().resolve())


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

    def canonical(self) -> str:
        """The spec with an absolute path (``file:``/``run:``): the same model from any directory."""
        if self.source in ("file", "run"):
            return f"{self.source}:{absolute_path(self.name)}"
        return str(self)


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

    def canonical(self) -> str:
        """The spec with an absolute path (``folder:``/``tensors:``): the same data from any directory."""
        if self.path is None:
            return str(self)
        return f"{self.source}:{absolute_path(self.path)}"


def _split_prefix(text: str, what: str, valid: str) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"empty {what} spec; valid forms: {valid}")
    prefix, sep, rest = text.strip().partition(":")
    return prefix.lower(), rest if sep else ""


_MODEL_FORMS = (
    "robustbench:[DATASET/THREAT_MODEL/]NAME, file:PATH, torchvision:ARCH, builtin:NAME[/HEAD], run:DIR"
)
_DATA_FORMS = (
    "cifar10, cifar100, fashion-mnist, mnist, digits, folder:PATH, tensors:PATH, dsprites[:FACTOR]"
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
    if prefix in TORCHVISION_DATASETS or prefix == "digits":
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


_CLASSES_FORMS = (
    "class labels >= 0, each once, as numbers and inclusive ranges separated by commas, "
    "e.g. 0-4, 5-9, 0,2,4 or 1-3,7"
)
_CLASS_PART = re.compile(r"(\d+)(?:\s*-\s*(\d+))?", re.ASCII)
_MAX_CLASSES = 100_000


def parse_classes(text: "Union[str, Sequence[int]]") -> tuple[int, ...]:
    """Parse ``--classes``: ``"0-4"`` -> (0, 1, 2, 3, 4), ``"1-3,7"`` -> (1, 2, 3, 7), in the order
    given (class ``k`` of the list becomes label ``k``). A sequence of ints is checked the same way.
    Empty lists, negative labels, reversed ranges (``4-0``), repeated labels and non-numbers are a
    :class:`ConfigError` that shows the valid forms."""
    if not isinstance(text, str):
        try:
            items = list(text)
        except TypeError:
            raise ConfigError(f"classes {text!r} is not valid; give {_CLASSES_FORMS}") from None
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in items):
            raise ConfigError(f"classes {text!r} is not valid: labels must be integers; "
                              f"give {_CLASSES_FORMS}")
        labels = [int(c) for c in items]
        shown = repr(text)
    else:
        shown = repr(text)
        labels = []
        for part in text.split(","):
            part = part.strip()
            m = _CLASS_PART.fullmatch(part)
            if not m:
                why = ("an empty entry" if not part else
                       "a negative label" if part.startswith("-") else f"{part!r} is not a label or range")
                raise ConfigError(f"classes {shown} is not valid ({why}); give {_CLASSES_FORMS}")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise ConfigError(f"classes {shown} is not valid (the range {part!r} is reversed; "
                                  f"write {hi}-{lo}); give {_CLASSES_FORMS}")
            if hi - lo + len(labels) >= _MAX_CLASSES:
                raise ConfigError(f"classes {shown} is not valid (more than {_MAX_CLASSES} labels); "
                                  f"give {_CLASSES_FORMS}")
            labels.extend(range(lo, hi + 1))
    if not labels:
        raise ConfigError(f"classes {shown} is not valid (no classes); give {_CLASSES_FORMS}")
    negative = [c for c in labels if c < 0]
    if negative:
        raise ConfigError(f"classes {shown} is not valid (a negative label, {negative[0]}); "
                          f"give {_CLASSES_FORMS}")
    seen: set[int] = set()
    repeated = sorted({c for c in labels if c in seen or seen.add(c)})
    if repeated:
        raise ConfigError(f"classes {shown} is not valid (labels given twice: "
                          f"{', '.join(map(str, repeated))}); give {_CLASSES_FORMS}")
    return tuple(labels)


def format_classes(labels: "Sequence[int]") -> str:
    """Labels in the compact form :func:`parse_classes` reads: (0, 1, 2, 5) -> ``0-2,5``."""
    parts: list[str] = []
    i = 0
    labels = list(labels)
    while i < len(labels):
        j = i
        while j + 1 < len(labels) and labels[j + 1] == labels[j] + 1:
            j += 1
        parts.append(str(labels[i]) if j == i else f"{labels[i]}-{labels[j]}")
        i = j + 1
    return ",".join(parts)


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
