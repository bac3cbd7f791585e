"""dSprites (Matthey et al. 2017), rendered procedurally or read from the official file.

The full set has 737,280 binary 64×64 images, one per combination of the latents, in the
official order ``color (1), shape (3), scale (6), orientation (40), posX (32), posY (32)``: the
index of an image is the mixed-radix number of its latent classes, posY fastest. Latent values:
shape 1 square, 2 ellipse, 3 heart; scale ``linspace(0.5, 1, 6)``; orientation
``linspace(0, 2π, 40)`` (radians); posX, posY ``linspace(0, 1, 32)``.

Rendering: the shape's centre is ``16 + 32·pos`` pixels from the left (posX) and from the top
(posY), its unit length ``10·scale`` pixels (a square of side 20 px at scale 1), rotated
counter-clockwise by the orientation; the largest rotated shape stays inside the image.

The split of the seed paper is 80/20: ``torch.randperm(N, generator=manual_seed(0))``, the first
80% train, the rest test; each split is reported in ascending index order. Two other splits
(``order``) reproduce the seed paper's code: ``ordered``, the first 80% of the official order
train and the rest test (so the test split holds only hearts of the larger scales), and
``whole``, every image in either split. The regression targets (``targets``) are the latent
values (``values``, radians for the orientation), the latent class index (``classes``, 0..39
for the orientation) or the latent value scaled to [0, 1] (``minmax``). When the official
``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` lies in the data root (or ``root/dsprites/``),
its images and latents are used instead. A file with fewer than 737,280 rows (a test fixture)
is taken as the full set: its rows are split the same way.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from asbound.data.base import RawSource, Tensors, split_members
from asbound.errors import ConfigError, DataError

LATENT_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
LATENT_SIZES = (1, 3, 6, 40, 32, 32)
DSPRITES_SIZE = math.prod(LATENT_SIZES)  # 737,280
DSPRITES_NPZ = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
SHAPE_NAMES = ["square", "ellipse", "heart"]
#: how the 80/20 split is drawn: seeded permutation (asbound), official order, no split
SPLIT_ORDERS = ("seeded", "ordered", "whole")
#: units of the regression targets: latent value, latent class index, value scaled to [0, 1]
TARGET_UNITS = ("values", "classes", "minmax")
#: Column of each ``dsprites:FACTOR`` in the latents.
FACTOR_COLUMN = {"shape": 1, "scale": 2, "orientation": 3, "posx": 4, "posy": 5}
IMAGE_SIZE = 64

_STRIDES = torch.tensor([math.prod(LATENT_SIZES[i + 1:]) for i in range(6)], dtype=torch.int64)
_VALUES = (
    torch.tensor([1.0]),
    torch.tensor([1.0, 2.0, 3.0]),
    torch.linspace(0.5, 1.0, 6, dtype=torch.float64),
    torch.linspace(0.0, 2 * math.pi, 40, dtype=torch.float64),
    torch.linspace(0.0, 1.0, 32, dtype=torch.float64),
    torch.linspace(0.0, 1.0, 32, dtype=torch.float64),
)


def dsprites_latents(
    indices: Union[torch.Tensor, Sequence[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent classes (int64 [n, 6]) and values (float64 [n, 6]) of images by their index."""
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= DSPRITES_SIZE):
        raise ConfigError(f"dSprites indices must lie in [0, {DSPRITES_SIZE})")
    classes = idx[:, None] // _STRIDES % torch.tensor(LATENT_SIZES)
    values = torch.stack([v.double()[classes[:, j]] for j, v in enumerate(_VALUES)], dim=1)
    return classes, values


def dsprites_index(latent_classes: torch.Tensor) -> torch.Tensor:
    """The index in the full set (int64 [n]) of latent classes [n, 6]; inverse of
    :func:`dsprites_latents`."""
    return (torch.as_tensor(latent_classes, dtype=torch.int64) * _STRIDES).sum(dim=1)


def _square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 1


def _ellipse(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u / 1.2) ** 2 + (v / 0.6) ** 2 <= 1  # aspect 2:1


def _heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    u2, v = (1.1 * u) ** 2, 1.1 * v + 0.1  # the curve spans v in [-1, 1.2]: centre it
    a = u2 + v * v - 1
    return a * a * a <= u2 * v * v * v  # (u² + v² - 1)³ - u² v³ <= 0


def render_dsprites(latent_classes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Render binary dSprites images (float32 [n, 1, 64, 64], values 0/1) from latent classes
    [n, 6] in the official order; vectorised over each batch of images."""
    classes = torch.as_tensor(latent_classes, dtype=torch.int64).reshape(-1, 6)
    out = torch.empty(len(classes), 1, IMAGE_SIZE, IMAGE_SIZE)
    grid = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5  # pixel centres
    for start in range(0, len(classes), batch_size):
        c = classes[start:start + batch_size]
        scale, theta, px, py = (_VALUES[j].float()[c[:, j]][:, None, None] for j in (2, 3, 4, 5))
        dx = grid[None, None, :] - (16 + 32 * px)  # columns, to the right
        dy = (16 + 32 * py) - grid[None, :, None]  # rows, up
        cos, sin = torch.cos(theta) / (10 * scale), torch.sin(theta) / (10 * scale)
        mask = torch.empty(len(c), IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
        for k, inside in enumerate((_square, _ellipse, _heart)):
            sel = (c[:, 1] == k).nonzero().squeeze(1)
            if len(sel):  # rotate back by -theta into the shape's frame, in units of 10·scale px
                u = cos[sel] * dx[sel] + sin[sel] * dy[sel]
                v = cos[sel] * dy[sel] - sin[sel] * dx[sel]
                mask[sel] = inside(u, v)
        out[start:start + batch_size, 0] = mask
    return out


def find_dsprites_npz(root: Path) -> Optional[Path]:
    """The official dSprites file in ``root`` or ``root/dsprites``, if present."""
    for p in (root / DSPRITES_NPZ, root / "dsprites" / DSPRITES_NPZ):
        if p.is_file():
            return p
    return None


def _read_npy_rows(path: Path, key: str, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Rows (sorted) of one array inside an .npz, streamed so the 3 GB image array of the
    official file never sits in memory whole."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
            np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = reader(f)
        if fortran or dtype.hasobject:
            return np.load(path, allow_pickle=False)[key][rows]
        row_items = math.prod(shape[1:])
        out = np.empty((len(rows),) + tuple(shape[1:]), dtype=dtype)
        done, start = 0, 0
        while done < len(rows):
            stop = min(start + chunk, shape[0])
            block = np.frombuffer(f.read((stop - start) * row_items * dtype.itemsize), dtype=dtype)
            block = block.reshape((stop - start,) + tuple(shape[1:]))
            take = rows[done:np.searchsorted(rows, stop)]
            out[done:done + len(take)] = block[take - start]
            done, start = done + len(take), stop
        return out


class _NpzImages:
    """Images of rows of the dSprites file, streamed (:func:`_read_npy_rows`); stored 0/255 images
    are scaled to 0/1."""

    def __init__(self, path: Path, members: torch.Tensor) -> None:
        self.path, self.members = path, members

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        rows = self.members[pos]
        imgs = torch.from_numpy(_read_npy_rows(self.path, "imgs", rows.numpy())).float()
        return _unit(imgs).unsqueeze(1)


def _unit(imgs: torch.Tensor) -> torch.Tensor:
    if imgs.numel() and float(imgs.max()) > 1:  # stored as 0/255 rather than the official 0/1
        imgs = imgs / 255
    return imgs


class _Preloaded:
    """Images of the selected rows of the dSprites file, read once (as stored) in one pass."""

    def __init__(self, imgs: torch.Tensor) -> None:
        self.imgs = imgs

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        return _unit(self.imgs[pos].float()).unsqueeze(1)


def members_of(total: int, split: str, order: str = "seeded") -> torch.Tensor:
    """Ascending indices of ``split`` among ``total`` rows for a split ``order``
    (:data:`SPLIT_ORDERS`)."""
    if order == "seeded":
        return split_members(total, split)
    if order == "whole":
        return torch.arange(total)
    if order != "ordered":
        raise ConfigError(f"dSprites split order {order!r} is not valid; valid: {', '.join(SPLIT_ORDERS)}")
    cut = int(total * 0.8)
    return torch.arange(cut) if split == "train" else torch.arange(cut, total)


def _npz_source(path: Path, factor: str, split: str, order: str = "seeded", units: str = "values") -> RawSource:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"imgs", "latents_values", "latents_classes"} - set(z.files)
            if missing:
                raise DataError(f"dSprites file {path} lacks {', '.join(sorted(missing))}; "
                                f"expected imgs (N×64×64), latents_values and "
                                f"latents_classes (N×6)")
            values = torch.from_numpy(z["latents_values"]).double()
            classes = torch.from_numpy(z["latents_classes"]).long()
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read dSprites file {path}: {' '.join(str(err).split())}") from None
    if values.shape != classes.shape or values.dim() != 2 or values.shape[1] != 6:
        raise DataError(f"dSprites file {path}: latents have shapes {tuple(values.shape)} and "
                        f"{tuple(classes.shape)}; expected N×6")
    members = members_of(len(values), split, order)
    targets = factor_targets(factor, classes[members], values[members], units)
    hw = _npz_image_size(path)
    source = _make_source(factor, len(members), _NpzImages(path, members), Tensors(targets),
                          str(path), members, hw)

    def preload(pos: torch.Tensor) -> RawSource:
        # The file is a zip: random access to a row costs a pass over the rows before it, so the
        # selection's images are read in one pass, kept as stored (uint8 in the official file).
        rows = members[pos]
        imgs = torch.from_numpy(_read_npy_rows(path, "imgs", rows.numpy()))
        return _make_source(factor, len(pos), _Preloaded(imgs), Tensors(targets[pos]),
                            str(path), rows, hw)

    source.preload = preload
    return source


def _npz_image_size(path: Path) -> "tuple[int, int]":
    """(H, W) of the file's images, from the .npy header of ``imgs``."""
    with zipfile.ZipFile(path) as zf, zf.open("imgs.npy") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
            np.lib.format.read_array_header_2_0)
        shape = reader(f)[0]
    if len(shape) != 3:
        raise DataError(f"dSprites file {path}: imgs has shape {shape}; expected N×H×W")
    return int(shape[1]), int(shape[2])


def factor_targets(factor: str, classes: torch.Tensor, values: torch.Tensor, units: str = "values") -> torch.Tensor:
    """The targets of ``factor`` for latent classes and values [n, 6]: class labels for the shape,
    else the latent in ``units`` (:data:`TARGET_UNITS`), float32."""
    col = FACTOR_COLUMN[factor]
    if factor == "shape":
        return classes[:, col].long()
    if units == "classes":
        return classes[:, col].float()
    if units == "minmax":  # (v - min) / (max - min) over the latent's values, in float64
        lo, hi = float(_VALUES[col].min()), float(_VALUES[col].max())
        return ((values[:, col].double() - lo) / (hi - lo)).float()
    return values[:, col].float()


def _make_source(factor: str, size: int, read, targets, source: str, members: torch.Tensor,
                 hw: "tuple[int, int]" = (IMAGE_SIZE, IMAGE_SIZE), checked: bool = False) -> RawSource:
    task, k, names = ("classification", 3, list(SHAPE_NAMES)) if factor == "shape" else (
        "regression", None, None)
    return RawSource(size, read, targets, task, k, names, source, channels=1, hw=hw,
                     members=members, checked=checked)


class _Rendered:
    """Procedural images of rows of a split."""

    def __init__(self, members: torch.Tensor) -> None:
        self.members = members

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        return render_dsprites(dsprites_latents(self.members[pos])[0])


class _LatentTargets:
    """The ``factor`` targets of rows of a split, from their latents."""

    def __init__(self, factor: str, members: torch.Tensor, units: str = "values") -> None:
        self.factor, self.members, self.units = factor, members, units

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        return factor_targets(self.factor, *dsprites_latents(self.members[pos]), self.units)


def dsprites_source(factor: str, root: Path, split: str, *, order: str = "seeded",
                    units: str = "values") -> RawSource:
    """One split of dSprites with the target ``factor`` (shape: classification, else the latent
    in ``units`` as a regression target), the split drawn as ``order`` says."""
    if factor not in FACTOR_COLUMN:
        raise ConfigError(f"unknown dSprites factor {factor!r}; valid: {', '.join(FACTOR_COLUMN)}")
    if units not in TARGET_UNITS:
        raise ConfigError(f"dSprites target units {units!r} are not valid; valid: {', '.join(TARGET_UNITS)}")
    npz = find_dsprites_npz(root)
    if npz is not None:
        return _npz_source(npz, factor, split, order, units)
    members = members_of(DSPRITES_SIZE, split, order)
    return _make_source(factor, len(members), _Rendered(members), _LatentTargets(factor, members, units),
                        "procedural", members, checked=True)
