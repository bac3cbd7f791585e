"""``load_data``: resolve a data spec, take a seeded subset, validate, transform for the model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from asbound.data.base import DataSet, Images, RawSource, check_values
from asbound.data.dsprites import dsprites_source
from asbound.data.sources import folder_source, tensors_source, torchvision_source
from asbound.errors import ConfigError, DataError
from asbound.specs import TORCHVISION_DATASETS, DataSpec, InputFormat, parse_data_spec

SPLITS = ("train", "test")
_RESIZE_BATCH = 512


def default_data_root() -> Path:
    """``$ASBOUND_DATA_ROOT`` if set, else ``<user cache dir>/asbound/data``."""
    env = os.environ.get("ASBOUND_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("asbound")) / "data"


def select_indices(size: int, n: Optional[int], seed: int) -> torch.Tensor:
    """All positions, or ``n`` of them drawn by a seeded permutation and sorted ascending."""
    if n is None or n >= size:
        return torch.arange(size)
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return perm[:n].sort().values


def load_data(
    spec: Union[DataSpec, str],
    *,
    root: Union[str, "os.PathLike[str]", None] = None,
    split: str = "test",
    n: Optional[int] = None,
    seed: int = 0,
    download: bool = False,
    input_format: Optional[InputFormat] = None,
    resize: Optional[int] = None,
) -> DataSet:
    """Load ``split`` of a data set as float32 pixels in [0, 1], shaped for ``input_format``.

    ``n`` rows are drawn by a permutation seeded with ``seed`` and kept in ascending order;
    ``resize`` (a square side) overrides the size of ``input_format``. ``folder:`` and
    ``tensors:`` sources have no splits: either split is the whole set. Raises
    :class:`~asbound.errors.DataError` for missing or invalid data and
    :class:`~asbound.errors.ConfigError` for invalid options.
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not valid; valid: {', '.join(SPLITS)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise ConfigError(f"n = {n!r} is not valid; give a positive number of data points")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int)
                               or resize <= 0):
        raise ConfigError(f"resize = {resize!r} is not valid; give a positive side length")
    data_root = Path(root).expanduser() if root is not None else default_data_root()

    raw = _raw_source(spec, data_root, split, download)
    pos = select_indices(raw.size, n, seed)
    index = raw.members[pos] if raw.members is not None else pos
    x, y = raw.read(pos)
    what = f"data set {spec} ({raw.source})"
    if isinstance(x, torch.Tensor):
        check_values(x, y, index, what)
    transforms: list[str] = []
    x = _transform(x, input_format, resize, transforms, what)
    return DataSet(
        spec=str(spec), split=split, x=x, y=y, index=index, task=raw.task,
        num_classes=raw.num_classes, class_names=raw.class_names, source=raw.source,
        transforms=transforms,
    )


def _raw_source(spec: DataSpec, root: Path, split: str, download: bool) -> RawSource:
    if spec.source in TORCHVISION_DATASETS:
        return torchvision_source(spec.source, root, split, download)
    if spec.source == "folder":
        return folder_source(str(spec.path))
    if spec.source == "tensors":
        return tensors_source(str(spec.path))
    if spec.source == "dsprites":
        return dsprites_source(spec.factor or "orientation", root, split)
    raise ConfigError(f"data source {spec.source!r} is not supported")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if not x.is_floating_point() else x.float().clamp(0, 1)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of float images [n, C, h, w], in batches, clamped to [0, 1]."""
    out = torch.empty(x.shape[0], x.shape[1], *size)
    for i in range(0, x.shape[0], _RESIZE_BATCH):
        out[i:i + _RESIZE_BATCH] = F.interpolate(
            _to_float(x[i:i + _RESIZE_BATCH]), size=size, mode="bilinear",
            antialias=True, align_corners=False,
        ).clamp_(0, 1)
    return out


def _hw(size: "torch.Size | tuple[int, ...]") -> str:
    return f"{size[-2]}x{size[-1]}"


def _transform(x: Images, fmt: Optional[InputFormat], resize: Optional[int],
               transforms: list[str], what: str) -> torch.Tensor:
    """Resize (``resize`` or the model's size) and turn grey into RGB; record each step."""
    target = (resize, resize) if resize is not None else (
        (fmt.height, fmt.width) if fmt is not None else None)
    note = "(bilinear, antialias)"
    if isinstance(x, list):
        sizes = sorted({tuple(t.shape[-2:]) for t in x})
        if len(sizes) > 1:
            if target is None:
                raise DataError(f"{what}: images have different sizes "
                                f"({', '.join(map(_hw, sizes[:4]))}, ...); pass --resize SIDE")
            x = torch.cat([_resize(t[None], target) for t in x])
            transforms.append(f"resize {len(sizes)} sizes -> {_hw(target)} {note}")
        elif x:
            x = torch.stack(x)
        else:
            x = torch.empty(0, 3, *(target or (0, 0)))
    if target is not None and tuple(x.shape[-2:]) != target:
        transforms.append(f"resize {_hw(x.shape)} -> {_hw(target)} {note}")
        x = _resize(x, target)
    else:
        x = _to_float(x)
    channels = x.shape[1]
    if fmt is not None and channels != fmt.channels:
        if channels == 1 and fmt.channels == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
            transforms.append("grey -> RGB (repeat channel)")
        else:
            kind = "grey" if fmt.channels == 1 else f"{fmt.channels}-channel"
            raise DataError(f"{what}: images have {channels} channels but the model expects "
                            f"{kind} images ({fmt}); give data with {fmt.channels} channel(s)")
    return x
