"""The data-set record handed to the rest of asbound, and the checks every source goes through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from asbound.errors import DataError

#: A batch of images: one tensor [n, C, H, W], or a list of [C, H, W] tensors of different sizes.
Images = Union[torch.Tensor, "list[torch.Tensor]"]

#: Tolerance for pixel values just outside [0, 1] (rounding); they are clamped.
RANGE_TOL = 1e-6


@dataclass
class DataSet:
    """Images in [0, 1] (already transformed for the model) with their targets."""

    spec: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    task: str
    num_classes: Optional[int]
    class_names: Optional[list[str]]
    source: str
    transforms: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def target_dim(self) -> int:
        """``num_classes`` for classification, else 1 for [n] targets and k for [n, k]."""
        if self.task == "classification":
            return int(self.num_classes or 0)
        return 1 if self.y.dim() == 1 else int(self.y.shape[1])


@dataclass
class RawSource:
    """One split of a data source before subsetting and transforms.

    ``read(positions)`` returns the images (uint8 in [0, 255] or float in [0, 1]) and targets of
    the given sorted positions; ``members[positions]`` is the index reported for them (identity
    when ``None``).
    """

    size: int
    read: Callable[[torch.Tensor], "tuple[Images, torch.Tensor]"]
    task: str
    num_classes: Optional[int]
    class_names: Optional[list[str]]
    source: str
    members: Optional[torch.Tensor] = None


def check_values(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, what: str) -> None:
    """Raise :class:`DataError` for non-finite or out-of-range pixels and NaN targets."""
    if x.is_floating_point() and x.numel():
        bad = ~torch.isfinite(x)
        if bad.any():
            rows = bad.flatten(1).any(1).nonzero()[0, 0]
            raise DataError(
                f"{what}: {int(bad.sum())} pixel values are NaN or infinite "
                f"(first in row {int(index[rows])}); inputs must be finite pixels in [0, 1]"
            )
        out = (x < -RANGE_TOL) | (x > 1 + RANGE_TOL)
        if out.any():
            row = out.flatten(1).any(1).nonzero()[0, 0]
            raise DataError(
                f"{what}: {int(out.sum())} pixel values lie outside [0, 1] (range "
                f"[{float(x.min()):.4g}, {float(x.max()):.4g}], first in row {int(index[row])}); "
                f"inputs must be pixels in [0, 1] with normalisation inside the model"
            )
    if y.is_floating_point() and y.numel():
        bad = ~torch.isfinite(y)
        if bad.any():
            row = (bad if bad.dim() == 1 else bad.flatten(1).any(1)).nonzero()[0, 0]
            raise DataError(
                f"{what}: {int(bad.sum())} target values are NaN or infinite "
                f"(first in row {int(index[row])})"
            )
