"""Readers for the sources: torchvision data sets, ImageFolder trees, tensors files, scikit-learn's
digits. Every reader is a picklable object (DataLoader workers get a copy)."""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from asbound.data.base import RawSource, Tensors, check_values, split_members
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


class _ChannelsFirst:
    """Rows of a torchvision set's uint8 array (MNIST N×H×W, CIFAR N×H×W×C) as [b, C, H, W]."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        x = self.data[pos]
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous()


def torchvision_source(name: str, root: Path, split: str, download: bool) -> RawSource:
    """One split of CIFAR-10/100, Fashion-MNIST or MNIST, read through torchvision; the images stay
    uint8 in memory until a batch is read."""
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
    channels = 1 if data.dim() == 3 else int(data.shape[3])
    return RawSource(len(targets), _ChannelsFirst(data), Tensors(targets), "classification",
                     len(classes), classes, str(folder), channels=channels,
                     hw=(int(data.shape[1]), int(data.shape[2])), checked=True)


class _FolderImages:
    """The images of an ImageFolder tree: headers (size, mode) on demand, pixels per batch, all
    converted to one mode (``L`` when every image of the folder is grey, else ``RGB``)."""

    def __init__(self, paths: "list[str]") -> None:
        self.paths = paths
        self.hw: "dict[int, tuple[int, int]]" = {}
        self.grey = True
        for i in range(len(paths)):  # any colour image makes the whole folder colour
            if self._header(i) not in _GREY_MODES:
                self.grey = False
                break

    def _header(self, i: int) -> str:
        """Open image ``i`` without decoding it; remember its (H, W); return its mode."""
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                self.hw[i] = (im.height, im.width)
                return im.mode
        except OSError as err:
            raise DataError(f"cannot read image {self.paths[i]}: {describe(err)}") from None

    def sizes(self, pos: torch.Tensor) -> "list[tuple[int, int]]":
        out = []
        for i in pos.tolist():
            if i not in self.hw:
                self._header(i)
            out.append(self.hw[i])
        return out

    def __call__(self, pos: torch.Tensor) -> "list[torch.Tensor]":
        from PIL import Image

        mode = "L" if self.grey else "RGB"
        images = []
        for i in pos.tolist():
            try:
                with Image.open(self.paths[i]) as im:
                    a = np.asarray(im.convert(mode))
            except OSError as err:
                raise DataError(f"cannot read image {self.paths[i]}: {describe(err)}") from None
            images.append(torch.from_numpy(a.copy()).reshape(a.shape[0], a.shape[1], -1)
                          .permute(2, 0, 1))
        return images


def folder_source(path: str) -> RawSource:
    """An ImageFolder tree ``PATH/<class>/<image>``. Opening it reads image headers only (sizes,
    modes: the folder is grey when every image is, else RGB); pixels are decoded per batch."""
    from torchvision.datasets import ImageFolder

    root = Path(path).expanduser()
    layout = f"expected an image folder tree {root}/<class>/<image> (one sub-folder per class)"
    if not root.is_dir():
        raise DataError(f"folder {root} does not exist; {layout}")
    try:
        ds = ImageFolder(str(root), loader=_path)  # decode lazily, below
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"folder {root}: {describe(err)}; {layout}") from None
    images = _FolderImages([p for p, _ in ds.samples])
    targets = torch.as_tensor(ds.targets, dtype=torch.int64)
    return RawSource(len(targets), images, Tensors(targets), "classification", len(ds.classes),
                     list(ds.classes), str(root), channels=1 if images.grey else 3,
                     sizes=images.sizes, checked=True)


def _path(p: str) -> str:
    return p


class _Rows:
    """``data[members[positions]]``: rows of an in-memory tensor through a split's members."""

    def __init__(self, data: torch.Tensor, members: torch.Tensor) -> None:
        self.data, self.members = data, members

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        return self.data[self.members[pos]]


DIGITS_SIZE = 1797


def digits_csv() -> "tuple[Optional[Path], str]":
    """Where scikit-learn keeps the digits (``sklearn/datasets/data/digits.csv.gz``), found
    without importing scikit-learn, and its version."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    try:
        spec = importlib.util.find_spec("sklearn")
        release = version("scikit-learn")
    except (ImportError, ValueError, PackageNotFoundError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data set digits needs scikit-learn, which is not installed; "
                        "pip install scikit-learn")
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder / "datasets" / "data" / "digits.csv.gz", release


@lru_cache(maxsize=1)
def digits_arrays() -> "tuple[torch.Tensor, torch.Tensor, str]":
    """scikit-learn's bundled handwritten digits: images float32 [1797, 1, 8, 8] (the values
    0..16 divided by 16), labels int64 [1797], and where they came from.

    The bundled ``digits.csv.gz`` is read directly, as ``sklearn.datasets.load_digits`` reads it
    (this avoids importing scikit-learn, a second or two); where the file is not in its place,
    ``load_digits()`` itself is called."""
    csv, release = digits_csv()
    if csv is not None and csv.is_file():
        with gzip.open(csv, "rt", encoding="utf-8") as f:
            table = np.loadtxt(f, delimiter=",")
        images, labels = table[:, :-1], table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, labels = bunch.images, bunch.target
    images = np.asarray(images, dtype=np.float64).reshape(-1, 1, 8, 8)
    if len(images) != DIGITS_SIZE or images.min() < 0 or images.max() > 16:
        raise DataError(f"scikit-learn {release}: the digits data has {len(images)} images with "
                        f"values in [{images.min():g}, {images.max():g}]; expected 1797 in [0, 16]")
    x = torch.from_numpy(images / 16).float()
    return x, torch.from_numpy(np.asarray(labels)).long(), f"scikit-learn {release} digits"


def digits_source(split: str) -> RawSource:
    """One split of scikit-learn's digits (1797 real 8×8 grey images, 10 classes "0".."9"):
    ``torch.randperm(1797, generator=manual_seed(0))``, the first 80% train, the rest test, each
    in ascending index order."""
    x, labels, source = digits_arrays()
    members = split_members(DIGITS_SIZE, split)
    return RawSource(len(members), _Rows(x, members), _Rows(labels, members), "classification",
                     10, [str(k) for k in range(10)], source, channels=1, hw=(8, 8),
                     members=members, checked=True)


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
    return RawSource(len(x), Tensors(x), Tensors(y), task, num_classes, names, str(p),
                     channels=int(x.shape[1]), hw=(int(x.shape[2]), int(x.shape[3])), checked=True)


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

