"""The model transform (resize, grey -> RGB), decided once for a whole selection, applied per batch.

:func:`plan_transform` looks only at the image sizes and the channel count of the selection (no
pixels), records every step in ``transforms`` and returns a :class:`TransformPlan`; the plan turns
each batch of raw images (uint8 in [0, 255] or float in [0, 1]) into float32 [b, C, H, W] in
[0, 1], the same for every batch whatever rows it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from asbound.data.base import Images
from asbound.errors import DataError
from asbound.specs import InputFormat

#: Images resized in one call at most (bounds the float copy of a batch while resizing).
_RESIZE_BATCH = 512
_NOTE = "(bilinear, antialias)"


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 k / 255 exactly; float -> float32 clamped to [0, 1]."""
    return x.float().div_(255) if not x.is_floating_point() else x.float().clamp(0, 1)


def resize(x: torch.Tensor, size: "tuple[int, int]") -> torch.Tensor:
    """Bilinear, antialiased resize of images [n, C, h, w] (uint8 or float) to float32 in [0, 1],
    in chunks of ``_RESIZE_BATCH`` images, clamped to [0, 1]."""
    out = torch.empty(x.shape[0], x.shape[1], *size)
    for i in range(0, x.shape[0], _RESIZE_BATCH):
        out[i:i + _RESIZE_BATCH] = F.interpolate(
            to_float(x[i:i + _RESIZE_BATCH]), size=size, mode="bilinear",
            antialias=True, align_corners=False,
        ).clamp_(0, 1)
    return out


def _hw(size: "tuple[int, ...]") -> str:
    return f"{size[-2]}x{size[-1]}"


@dataclass(frozen=True)
class TransformPlan:
    """What every batch goes through: ``target`` (H, W) to resize to (None: keep the size),
    ``each``: images of several sizes, each resized on its own; ``rgb``: repeat a grey channel.
    ``shape`` is the (C, H, W) of every output image."""

    target: Optional[tuple[int, int]]
    each: bool
    rgb: bool
    shape: tuple[int, int, int]

    def apply(self, x: Images) -> torch.Tensor:
        """Raw images (a tensor [b, c, h, w] or a list of [c, h, w]) -> float32 [b, C, H, W]."""
        if isinstance(x, list):
            if not x:
                return torch.empty(0, *self.shape)
            if self.each:
                assert self.target is not None
                x = torch.cat([resize(t[None], self.target) for t in x])
            else:
                x = torch.stack(x)
        if len(x) == 0:
            return torch.empty(0, *self.shape)
        if not self.each and self.target is not None and tuple(x.shape[-2:]) != self.target:
            x = resize(x, self.target)
        else:
            x = to_float(x)
        if self.rgb:
            x = x.expand(-1, 3, -1, -1).contiguous()
        return x


def plan_transform(channels: int, sizes: "Iterable[tuple[int, int]]", fmt: Optional[InputFormat],
                   side: Optional[int], what: str) -> "tuple[TransformPlan, list[str]]":
    """The plan for images with ``channels`` channels and the (H, W) ``sizes`` of the selection:
    resize to ``side`` x ``side`` (else to the model's size, else keep), grey -> RGB where the
    model wants colour. Returns the plan and the steps to record."""
    target = (side, side) if side is not None else (
        (fmt.height, fmt.width) if fmt is not None else None)
    distinct = sorted(set(sizes))
    transforms: list[str] = []
    each = len(distinct) > 1
    resize_to: Optional[tuple[int, int]] = None
    if each:
        if target is None:
            raise DataError(f"{what}: images have different sizes "
                            f"({', '.join(map(_hw, distinct[:4]))}, ...); pass --resize SIDE")
        transforms.append(f"resize {len(distinct)} sizes -> {_hw(target)} {_NOTE}")
        resize_to = target
    elif distinct and target is not None and distinct[0] != target:
        transforms.append(f"resize {_hw(distinct[0])} -> {_hw(target)} {_NOTE}")
        resize_to = target
    out = resize_to or (distinct[0] if distinct else (target or (0, 0)))
    rgb = False
    if fmt is not None and channels != fmt.channels:
        if channels == 1 and fmt.channels == 3:
            rgb = True
            transforms.append("grey -> RGB (repeat channel)")
        else:
            kind = "grey" if fmt.channels == 1 else f"{fmt.channels}-channel"
            raise DataError(f"{what}: images have {channels} channels but the model expects "
                            f"{kind} images ({fmt}); give data with {fmt.channels} channel(s)")
    plan = TransformPlan(target=resize_to, each=each, rgb=rgb, shape=(3 if rgb else channels, *out))
    return plan, transforms
