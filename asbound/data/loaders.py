"""``load_data``: resolve a data spec, select classes and a seeded subset, validate the targets,
and plan the transform for the model; the images are read later, batch by batch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from asbound.data.base import DataSet, RawSource, check_values
from asbound.data.corruptions import CIFAR_C, Corruption, check_available
from asbound.data.dsprites import dsprites_source
from asbound.data.sources import digits_source, folder_source, tensors_source, torchvision_source
from asbound.data.transforms import plan_transform
from asbound.defaults import default_data_root
from asbound.errors import ConfigError, DataError
from asbound.specs import (
    TORCHVISION_DATASETS,
    DataSpec,
    InputFormat,
    format_classes,
    parse_classes,
    parse_data_spec,
)

SPLITS = ("train", "test")


def select_indices(size: int, n: Optional[int], seed: int) -> torch.Tensor:
    """All positions, or ``n`` of them drawn by a seeded permutation and sorted ascending."""
    if n is None or n >= size:
        return torch.arange(size)
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return perm[:n].sort().values


def validation_split(size: int, fraction: float, seed: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """``(train, val)`` positions of a set of ``size`` rows: a permutation seeded with ``seed``
    (``torch.Generator().manual_seed(seed)``), its first ``max(1, round(fraction * size))``
    positions for validation and the rest for training, each sorted ascending (int64)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise DataError(f"a validation split needs at least 2 rows, got {size}")
    if not 0 < fraction < 1:
        raise ConfigError(f"validation fraction must lie in (0, 1), got {fraction}")
    k = max(1, round(fraction * size))
    if k >= size:
        raise DataError(f"a validation fraction of {fraction} takes {k} of {size} rows and leaves "
                        f"none for training; give more rows or a smaller fraction")
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


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
    classes: Union[str, Sequence[int], None] = None,
    corruption: "Optional[Corruption]" = None,
) -> DataSet:
    """Open ``split`` of a data set as a lazy :class:`DataSet`: pixels in [0, 1], shaped for
    ``input_format``, read batch by batch.

    ``classes`` (``"5-9"``, ``"0,2,4"`` or a sequence of labels) keeps the rows with those labels
    and relabels each to its position in the list. Then ``n`` rows are drawn by a permutation
    seeded with ``seed`` and kept in ascending order. ``resize`` (a square side) overrides the
    size of ``input_format``. ``corruption`` (:func:`~asbound.data.corruptions.parse_corruption`)
    corrupts every image after that transform, image by image, seeded by ``seed`` and the image's
    index in its source (the same image gets the same corruption in any selection). ``folder:`` and ``tensors:`` sources have no splits: either split
    is the whole set. The transform is decided here for the whole selection (from image sizes
    and channels, no pixels). Raises :class:`~asbound.errors.DataError` for missing or invalid
    data and :class:`~asbound.errors.ConfigError` for invalid options.
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
    wanted = parse_classes(classes) if classes is not None else None
    data_root = Path(root).expanduser() if root is not None else default_data_root()

    raw = _raw_source(spec, data_root, split, download)
    what = f"data set {spec} ({raw.source})"
    num_classes, names = raw.num_classes, raw.class_names
    if wanted is None:
        pos = select_indices(raw.size, n, seed)
        y = raw.targets(pos)
    else:
        pos, y = _select_classes(raw, wanted, n, seed, spec, split)
        num_classes = len(wanted)
        names = [names[c] for c in wanted] if names is not None else [str(c) for c in wanted]
    index = raw.index_of(pos)
    check_values(torch.empty(0), y, index, what)
    plan, transforms = plan_transform(raw.channels, raw.sizes_of(pos), input_format, resize, what)
    rows = pos
    if raw.preload is not None:
        raw, rows = raw.preload(pos), torch.arange(len(pos))
    if corruption is not None:
        if corruption.params == "imagenet" and min(plan.shape[1:]) < 32:
            raise DataError(f"{what}: {corruption.name} with ImageNet-C parameters (imagecorruptions) needs images of "
                            f"at least 32x32, these are {plan.shape[1]}x{plan.shape[2]}; give --resize 32 or more, "
                            f"or a CIFAR-10-C corruption ({', '.join(sorted(CIFAR_C))})")
        check_available(corruption)
        resized = any(t.startswith("resize") for t in transforms)
        transforms.append(f"corrupt: {corruption.describe()}" + (", after resizing" if resized else "")
                          + f", per image seeded by (seed {seed}, index)")
    return DataSet(
        spec=str(spec), split=split,
        task=raw.task, num_classes=num_classes, class_names=names, source=raw.source, transforms=transforms,
        index=index, y=y, raw=raw, rows=rows, plan=plan, corruption=corruption, corruption_seed=seed,
    )


def _select_classes(raw: RawSource, wanted: "tuple[int, ...]", n: Optional[int], seed: int,
                    spec: DataSpec, split: str) -> "tuple[torch.Tensor, torch.Tensor]":
    """Positions (``n`` drawn after the filter) and relabelled targets of the rows whose label is
    in ``wanted``."""
    if raw.task != "classification":
        raise ConfigError(f"classes select classes of classification data; {spec} has "
                          f"{raw.task} targets")
    targets = raw.targets(torch.arange(raw.size))
    present = torch.unique(targets).tolist()
    missing = [c for c in wanted if c not in set(present)]
    if missing:
        raise DataError(
            f"data set {spec} ({split} split) has no class {format_classes(missing)} "
            f"(classes {format_classes(wanted)} asked for); classes present: "
            f"{format_classes(present) or 'none'}")
    keep = torch.isin(targets, torch.tensor(wanted)).nonzero().squeeze(1)
    pos = keep[select_indices(len(keep), n, seed)]
    relabel = torch.full((max([*wanted, *present]) + 1,), -1, dtype=torch.int64)
    relabel[torch.tensor(wanted)] = torch.arange(len(wanted))
    return pos, relabel[targets[pos]]


def _raw_source(spec: DataSpec, root: Path, split: str, download: bool) -> RawSource:
    if spec.source in TORCHVISION_DATASETS:
        return torchvision_source(spec.source, root, split, download)
    if spec.source == "digits":
        return digits_source(split)
    if spec.source == "folder":
        return folder_source(str(spec.path))
    if spec.source == "tensors":
        return tensors_source(str(spec.path))
    if spec.source == "dsprites":
        return dsprites_source(spec.factor or "orientation", root, split)
    raise ConfigError(f"data source {spec.source!r} is not supported")
