"""Readers for the file-based sources: torchvision data sets, ImageFolder trees, tensors files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asbound.data.base import RawSource, check_values
from asbound.errors import DataError, describe

# name -> (torchvision class, sub-folder under root, files expected there)
_TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta"),
    "cifar100": ("CIFAR100", "cifar-100-python", "train, test, meta"),
    "fashion-mnist": (
        "FashionMNIST",
        "FashionMNIST/raw",
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte",
    ),
    "mnist": (
        "MNIST",
        "MNIST/raw",
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte",
    ),
}

_TENSORS_FORMAT = (
    "expected torch.save({'x': float N×C×H×W (or N×H×W) in [0, 1], "
    "'y': int64 labels [N] or float targets [N] / [N, k]}) or an .npz with x, y"
)

_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def torchvision_source(name: str, root: Path, split: str, download: bool) -> RawSource:
    """One split of CIFAR-10/100, Fashion-MNIST or MNIST, read through torchvision."""
    import torchvision.datasets as tvd

    cls_name, sub, files = _TORCHVISION[name]
    folder = root / sub
    try:
        ds = getattr(tvd, cls_name)(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as err:
        how = (f"could not be downloaded into {folder} ({describe(err)})" if download
               else f"not found (or corrupted) in {folder}")
        raise DataError(
            f"data set {name} {how}; run with --download when online, or copy the files "
            f"({files}) into {folder}/"
        ) from None
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(ds.data)
    targets = torch.as_tensor(ds.targets, dtype=torch.int64)
    classes = [str(c) for c in ds.classes]

    def read(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = data[pos]
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # MNIST NHW / CIFAR NHWC
        return x.contiguous(), targets[pos]

    return RawSource(len(targets), read, "classification", len(classes), classes, str(folder))


def folder_source(path: str) -> RawSource:
    """An ImageFolder tree ``PATH/<class>/<image>``; only the selected images are decoded."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = Path(path).expanduser()
    layout = f"expected an image folder tree {root}/<class>/<image> (one sub-folder per class)"
    if not root.is_dir():
        raise DataError(f"folder {root} does not exist; {layout}")
    try:
        ds = ImageFolder(str(root), loader=lambda p: p)  # decode lazily, below
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"folder {root}: {describe(err)}; {layout}") from None
    paths = [p for p, _ in ds.samples]
    targets = torch.as_tensor(ds.targets, dtype=torch.int64)

    def read(pos: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        images = []
        for i in pos.tolist():
            try:
                with Image.open(paths[i]) as im:
                    im.load()
                    images.append(im)
            except OSError as err:
                raise DataError(f"cannot read image {paths[i]}: {describe(err)}") from None
        grey = all(im.mode in _GREY_MODES for im in images)
        arrays = [np.asarray(im.convert("L" if grey else "RGB")) for im in images]
        x = [torch.from_numpy(a.copy()).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)
             for a in arrays]
        return x, targets[pos]

    return RawSource(len(paths), read, "classification", len(ds.classes), list(ds.classes),
                     str(root))


def _load_tensors_file(p: Path) -> Any:
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as err:  # any failure means: not an npz of plain arrays
            raise DataError(
                f"not a tensors file: {p} ({describe(err)}); {_TENSORS_FORMAT}") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to load safely means: not a tensors file
        msg = describe(err).split(". ")[0][:200]
        raise DataError(f"not a tensors file: {p} ({msg}); "
                        f"{_TENSORS_FORMAT}") from None


def _as_tensor(value: Any, key: str, p: Path) -> torch.Tensor:
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        return value
    raise DataError(f"tensors file {p}: {key!r} is a {type(value).__name__}, not a numeric "
                    f"tensor or array; {_TENSORS_FORMAT}")


def tensors_source(path: str) -> RawSource:
    """A ``torch.save({'x', 'y'[, 'num_classes', 'class_names']})`` file or an .npz with x, y."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"tensors file {p} does not exist; {_TENSORS_FORMAT}")
    obj = _load_tensors_file(p)
    if not isinstance(obj, Mapping):
        raise DataError(f"not a tensors file: {p} holds a {type(obj).__name__}, not a dict; "
                        f"{_TENSORS_FORMAT}")
    missing = [k for k in ("x", "y") if k not in obj]
    if missing:
        raise DataError(f"tensors file {p} lacks key(s) {', '.join(map(repr, missing))} "
                        f"(found: {', '.join(map(repr, obj)) or 'none'}); {_TENSORS_FORMAT}")
    x, y = _as_tensor(obj["x"], "x", p), _as_tensor(obj["y"], "y", p)
    if not x.is_floating_point():
        raise DataError(f"tensors file {p}: x has dtype {x.dtype}; save float pixels in [0, 1] "
                        f"(e.g. x.float() / 255); {_TENSORS_FORMAT}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise DataError(f"tensors file {p}: x has shape {tuple(x.shape)}; {_TENSORS_FORMAT}")
    if y.dtype == torch.bool or y.dim() not in ((1, 2) if y.is_floating_point() else (1,)):
        raise DataError(f"tensors file {p}: y has shape {tuple(y.shape)} and dtype {y.dtype}; "
                        f"{_TENSORS_FORMAT}")
    if len(x) != len(y):
        raise DataError(f"tensors file {p}: x has {len(x)} rows but y has {len(y)}; "
                        f"they must match")
    x = x.float()
    check_values(x, y.float(), torch.arange(len(x)), f"tensors file {p}")
    num_classes, names = None, None
    if y.is_floating_point():
        task, y = "regression", y.float()
    else:
        task, y = "classification", y.long()
        num_classes, names = _classes(obj, y, p)
    return RawSource(len(x), lambda pos: (x[pos], y[pos]), task, num_classes, names, str(p))


def _classes(obj: Mapping, y: torch.Tensor, p: Path) -> tuple[int, "list[str] | None"]:
    lo, hi = (int(y.min()), int(y.max())) if len(y) else (0, -1)
    if lo < 0:
        raise DataError(f"tensors file {p}: labels must be >= 0, found {lo}")
    num_classes = hi + 1
    if "num_classes" in obj:
        num_classes = int(np.asarray(obj["num_classes"]).item())
        if num_classes <= hi:
            raise DataError(f"tensors file {p}: num_classes = {num_classes} but labels reach {hi}")
    names = obj.get("class_names")
    if names is not None:
        names = [str(n) for n in (names.tolist() if isinstance(names, np.ndarray) else names)]
        if len(names) != num_classes:
            raise DataError(f"tensors file {p}: {len(names)} class_names for {num_classes} classes")
    return num_classes, names

