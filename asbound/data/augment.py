"""Training augmentation on model-ready float images: random crop, and random horizontal flip.

``crop``: zero-pad by ``p = max(1, round(side / 8))`` pixels on every side (32 px -> 4, 28 px ->
4, 8 px -> 1) and take a random ``side x side`` crop (torchvision's ``RandomCrop(side,
padding=p)``); for inputs larger than 64 px instead resize up to ``round(side * 8 / 7)``
(bilinear, antialias; 224 -> 256) and take a random ``side x side`` crop (``Resize(256)`` then
``RandomCrop(224)``). Height and width are treated alike, each with its own side.
``crop-flip``: the same crop, then a horizontal flip with probability 1/2.

Every random draw of a row comes from a ``torch.Generator`` seeded by :func:`row_seed` ``(seed,
position)``, a stable hash of the loader's seed and the row's position in its view: the draws are
the crop's row offset, its column offset, then (crop-flip only) the flip bit. A row's crop is
therefore the same under ``crop`` and ``crop-flip``, and the batches do not depend on how rows are
spread over worker processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from asbound.errors import ConfigError

if TYPE_CHECKING:
    from asbound.data.base import DataSet

AUGMENTS = ("none", "crop", "crop-flip")
#: Inputs above this side (px) are resized up and cropped instead of padded and cropped.
LARGE_SIDE = 64

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def row_seed(seed: int, position: int) -> int:
    """The seed of row ``position``'s generator under loader seed ``seed``: a stable 63-bit hash
    (splitmix64), the same on every machine, process and Python version."""
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(position) & _MASK64)) >> 1


def check_augment(augment: str) -> str:
    if augment not in AUGMENTS:
        raise ConfigError(f"augment {augment!r} is not valid; valid: {', '.join(AUGMENTS)}")
    return augment


def pad_of(side: int) -> int:
    """The zero padding of the crop for a side of ``side`` pixels."""
    return max(1, round(side / 8))


def grown(side: int) -> int:
    """The side a large input is resized to before its crop (224 -> 256)."""
    return round(side * 8 / 7)


def augment_batch(x: torch.Tensor, positions: Sequence[int], augment: str, seed: int) -> torch.Tensor:
    """Crop (and flip) each image of ``x`` [b, C, H, W] (floats in [0, 1]) with the draws of its
    row's generator; ``positions`` are the rows' positions in their view."""
    check_augment(augment)
    if augment == "none" or len(x) == 0:
        return x
    if len(positions) != len(x):
        raise ValueError(f"{len(positions)} positions for {len(x)} images")
    _, _, h, w = x.shape
    large = max(h, w) > LARGE_SIDE
    if large:
        gh, gw = grown(h), grown(w)
        src = F.interpolate(x.float(), size=(gh, gw), mode="bilinear", antialias=True,
                            align_corners=False).clamp_(0, 1)
    else:
        ph, pw = pad_of(h), pad_of(w)
        src = F.pad(x, (pw, pw, ph, ph))  # zeros
        gh, gw = h + 2 * ph, w + 2 * pw
    crops = []
    for i, pos in enumerate(positions):
        g = torch.Generator().manual_seed(row_seed(seed, int(pos)))
        top = int(torch.randint(0, gh - h + 1, (1,), generator=g))
        left = int(torch.randint(0, gw - w + 1, (1,), generator=g))
        crop = src[i, :, top:top + h, left:left + w]
        if augment == "crop-flip" and bool(torch.randint(0, 2, (1,), generator=g)):
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.stack(crops)


#: What ``--augment auto`` picks for each data source (others: none).
AUTO_AUGMENT = {"cifar10": "crop-flip", "cifar100": "crop-flip", "fashion-mnist": "crop-flip",
                "folder": "crop-flip", "mnist": "crop", "digits": "crop"}


def resolve_augment(data: "DataSet", augment: str) -> str:
    """``none``, ``crop``, ``crop-flip`` as given; ``auto``: crop-flip for natural images (CIFAR,
    Fashion-MNIST, image folders), crop for digits (MNIST, digits), none otherwise (dSprites,
    tensors files, regression targets)."""
    if augment == "auto":
        if data.task != "classification":
            return "none"
        from asbound.specs import parse_data_spec

        return AUTO_AUGMENT.get(parse_data_spec(data.spec).source, "none")
    if augment not in AUGMENTS:
        raise ConfigError(f"augment {augment!r} is not valid; valid: auto, {', '.join(AUGMENTS)}")
    return augment
