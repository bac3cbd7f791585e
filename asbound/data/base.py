"""The data-set view handed to the rest of asbound, its sources, and the checks every source goes
through.

A :class:`RawSource` is one split of a data source: it reports its size, targets and image sizes
without decoding pixels, and reads the images of given positions on demand. A :class:`DataSet` is
a lazy view on rows of a source: it holds the rows' indices and targets and the transform decided
at load time, and reads and transforms images batch by batch (:meth:`DataSet.batch`,
:meth:`DataSet.loader`), so memory stays bounded whatever the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Union

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from asbound.data.augment import augment_batch, check_augment, row_seed
from asbound.errors import ConfigError, DataError

if TYPE_CHECKING:
    from asbound.data.corruptions import Corruption
    from asbound.data.transforms import TransformPlan

#: A batch of images: one tensor [n, C, H, W], or a list of [C, H, W] tensors of different sizes.
Images = Union[torch.Tensor, "list[torch.Tensor]"]

#: Tolerance for pixel values just outside [0, 1] (rounding); they are clamped.
RANGE_TOL = 1e-6

#: Share of a seeded 80/20 split that is the train split (dSprites, digits).
TRAIN_FRACTION = 0.8


@lru_cache(maxsize=8)
def split_members(total: int, split: str) -> torch.Tensor:
    """Ascending indices of ``split`` in a set of ``total`` rows: ``torch.randperm(total,
    generator=manual_seed(0))``, the first 80% (``int(0.8 * total)``) train, the rest test."""
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(0))
    cut = int(total * TRAIN_FRACTION)
    return (perm[:cut] if split == "train" else perm[cut:]).sort().values


@dataclass
class RawSource:
    """One split of a data source before subsetting and transforms.

    ``read(positions)`` returns the images (uint8 in [0, 255] or float in [0, 1]; a tensor
    [b, C, H, W] or a list of [C, H, W]) at sorted, distinct positions; ``targets(positions)``
    their targets without reading images. Every image has ``channels`` channels; its (H, W) is
    ``hw`` for all rows, else ``sizes(positions)`` gives them (from file headers, no pixels).
    ``members[positions]`` is the index reported for rows (identity when ``None``). ``checked``:
    the pixels were validated when the source was opened (in-memory sources); otherwise each batch
    is checked as it is read. Every callable is picklable (worker processes get a copy).
    ``preload(positions)``, where set, is called once at load time with the selection: a source
    whose random access is slow (a compressed file) reads the selection in one pass and returns
    a source of just those rows (``members`` their index).
    """

    size: int
    read: Callable[[torch.Tensor], Images]
    targets: Callable[[torch.Tensor], torch.Tensor]
    task: str
    num_classes: Optional[int]
    class_names: Optional[list[str]]
    source: str
    channels: int
    hw: Optional[tuple[int, int]] = None
    sizes: Optional[Callable[[torch.Tensor], "list[tuple[int, int]]"]] = None
    members: Optional[torch.Tensor] = None
    checked: bool = False
    preload: Optional[Callable[[torch.Tensor], "RawSource"]] = None

    def index_of(self, positions: torch.Tensor) -> torch.Tensor:
        """The reported index of rows at ``positions``."""
        return self.members[positions] if self.members is not None else positions

    def sizes_of(self, positions: torch.Tensor) -> "list[tuple[int, int]]":
        """The (H, W) of the images at ``positions`` (one entry when all images share it)."""
        if self.hw is not None:
            return [self.hw]
        assert self.sizes is not None
        return self.sizes(positions)


class Tensors:
    """``read``/``targets`` of an in-memory tensor: rows ``data[positions]`` (picklable)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        return self.data[positions]


def check_values(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, what: str) -> None:
    """Raise :class:`DataError` for non-finite or out-of-range pixels and NaN targets; the message
    names the index of the first bad row (``index[row]``)."""
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


def _positions(sel: "torch.Tensor | Iterable[int]") -> torch.Tensor:
    sel = torch.as_tensor(sel)
    if sel.dtype == torch.bool or sel.is_floating_point():
        raise ConfigError(f"row positions must be integers, got {sel.dtype}")
    return sel.to(torch.int64).reshape(-1)


#: corrupted images kept per data set (and its subsets) at most
CORRUPTED_CACHE_BYTES = 1 << 30


class DataSet:
    """A lazy view on rows of a data source: images in [0, 1] transformed for the model, read batch
    by batch, with their targets.

    ``index`` [n] is each row's index in its source split, ``y`` [n] its target (classification:
    int64 labels, relabelled 0..k-1 after ``classes=``). ``transforms`` lists the steps every image
    goes through (decided at load time for the whole selection). Pixels are read only by
    :meth:`batch`, :attr:`x` and :meth:`loader`.
    """

    def __init__(self, *, spec: str, split: str, task: str, num_classes: Optional[int],
                 class_names: Optional[list[str]], source: str, transforms: list[str],
                 index: torch.Tensor, y: torch.Tensor, raw: RawSource, rows: torch.Tensor,
                 plan: "TransformPlan", corruption: "Optional[Corruption]" = None,
                 corruption_seed: int = 0) -> None:
        self.spec, self.split, self.task, self.source = spec, split, task, source
        self.num_classes, self.class_names = num_classes, class_names
        self.transforms = transforms
        self.index, self.y = index, y
        self.raw = raw  # the source (its ``read`` is what every batch calls)
        self.rows = rows  # each row's position in the source
        self.plan = plan
        # applied after the plan; image i's draw is seeded by (corruption_seed, its source index)
        self.corruption, self.corruption_seed = corruption, corruption_seed
        self._cache: "dict[int, torch.Tensor]" = {}  # source row -> corrupted image (shared by subsets)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __repr__(self) -> str:
        return (f"DataSet(spec={self.spec!r}, split={self.split!r}, n={len(self)}, task={self.task!r}, "
                f"num_classes={self.num_classes}, shape={tuple(self.shape)}, source={self.source!r}, "
                f"transforms={self.transforms})")

    @property
    def target_dim(self) -> int:
        """``num_classes`` for classification, else 1 for [n] targets and k for [n, k]."""
        if self.task == "classification":
            return int(self.num_classes or 0)
        return 1 if self.y.dim() == 1 else int(self.y.shape[1])

    @property
    def shape(self) -> "tuple[int, int, int]":
        """(C, H, W) of every image :meth:`batch` returns."""
        return self.plan.shape

    @property
    def what(self) -> str:
        return f"data set {self.spec} ({self.source})"

    def batch(self, sel: "torch.Tensor | Iterable[int]") -> torch.Tensor:
        """The images of rows ``sel`` (positions 0..n-1 of this view, any order, repeats allowed),
        read from the source and transformed: float32 [b, C, H, W] in [0, 1]. Sources not
        validated at load time are checked here (a :class:`DataError` naming the row's index)."""
        rows = self.rows[_positions(sel)]
        uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        images = self.raw.read(uniq)
        if not self.raw.checked and isinstance(images, torch.Tensor):
            check_values(images, torch.empty(0), self.raw.index_of(uniq), self.what)
        x = self.plan.apply(images)
        if self.corruption is not None:
            x = self._corrupted(uniq, x)
        if len(uniq) != len(rows) or not torch.equal(uniq, rows):
            x = x[inverse]
        return x

    def _corrupted(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The corrupted images of ``rows`` (their clean images ``x``): each computed once and kept
        (up to ``CORRUPTED_CACHE_BYTES``), since a corruption is deterministic per image and some
        (zoom blur) cost far more than a training step."""
        from asbound.data.corruptions import corrupt

        cache = self._cache
        todo = [i for i, r in enumerate(rows.tolist()) if r not in cache]
        if todo:
            sel = torch.tensor(todo)
            index = self.raw.index_of(rows[sel]).tolist()
            fresh = corrupt(x[sel], self.corruption, [row_seed(self.corruption_seed, i) for i in index])
            if (len(cache) + len(todo)) * fresh[0].numel() * 4 <= CORRUPTED_CACHE_BYTES:
                cache.update(zip(rows[sel].tolist(), fresh))
            else:
                out = x.clone()
                out[sel] = fresh
                for i, r in enumerate(rows.tolist()):
                    if r in cache:
                        out[i] = cache[r]
                return out
        return torch.stack([cache[r] for r in rows.tolist()]) if len(rows) else x

    @property
    def x(self) -> torch.Tensor:
        """Every image at once (``batch(arange(n))``): for small sets and tests; prefer
        :meth:`batch` and :meth:`loader`."""
        return self.batch(torch.arange(len(self)))

    def subset(self, sel: "torch.Tensor | Iterable[int]") -> "DataSet":
        """A view on rows ``sel`` of this view (their index, targets and transforms follow)."""
        sel = _positions(sel)
        view = DataSet(
            spec=self.spec, split=self.split, task=self.task, num_classes=self.num_classes,
            class_names=None if self.class_names is None else list(self.class_names),
            source=self.source, transforms=list(self.transforms), index=self.index[sel],
            y=self.y[sel], raw=self.raw, rows=self.rows[sel], plan=self.plan,
            corruption=self.corruption, corruption_seed=self.corruption_seed,
        )
        view._cache = self._cache
        return view

    def loader(self, batch_size: int, *, shuffle: bool = False, augment: str = "none", seed: int = 0,
               workers: int = 0, pin_memory: bool = False, drop_last: bool = False,
               shard: "tuple[int, int]" = (0, 1)) -> DataLoader:
        """A ``DataLoader`` of ``(x float32 [b, C, H, W], y)`` batches, each read whole (one
        vectorised read and transform per batch).

        The order is ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` with
        ``shuffle``, else 0..n-1. ``augment`` (``none``, ``crop``, ``crop-flip``; see
        :mod:`asbound.data.augment`) draws each row's crop and flip from a generator seeded by
        ``(seed, the row's position)``: the batches are the same for any ``workers``.

        ``shard=(rank, ranks)``: this rank's share ``batch[rank::ranks]`` of every batch (data-parallel
        training under torchrun); a batch with fewer rows than ranks is left out."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch size {batch_size!r} is not valid; give a positive integer")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"workers = {workers!r} is not valid; give an integer >= 0")
        check_augment(augment)
        n = len(self)
        order: "Iterable[int]" = (
            torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle
            else range(n))
        sampler: "Iterable[list[int]]" = BatchSampler(order, batch_size, drop_last)
        rank, ranks = shard
        if ranks > 1:
            sampler = _Shard(sampler, rank, ranks)
        return DataLoader(
            _Batches(self, augment, seed), batch_size=None,
            sampler=sampler, num_workers=workers,
            pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
        )


class _Shard:
    """Rank ``rank`` of ``ranks``: ``batch[rank::ranks]`` of each batch with at least ``ranks`` rows."""

    def __init__(self, batches: "Iterable[list[int]]", rank: int, ranks: int) -> None:
        self.batches, self.rank, self.ranks = batches, rank, ranks

    def __iter__(self) -> "Iterable[list[int]]":
        for batch in self.batches:
            if len(batch) >= self.ranks:
                yield batch[self.rank::self.ranks]

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Batches(Dataset):
    """The map-style data set behind :meth:`DataSet.loader`: ``[positions]`` -> one whole batch."""

    def __init__(self, data: DataSet, augment: str, seed: int) -> None:
        self.data, self.augment, self.seed = data, augment, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, positions: "list[int]") -> "tuple[torch.Tensor, torch.Tensor]":
        sel = torch.as_tensor(positions, dtype=torch.int64)
        x = augment_batch(self.data.batch(sel), positions, self.augment, self.seed)
        return x, self.data.y[sel]
