"""Tiny data sets in the exact on-disk formats, for offline tests (reusable by any test file).

Each ``make_*`` writes under ``root`` and returns what it wrote, so a test can check values.
CIFAR files carry no valid MD5: torchvision's integrity check has to be bypassed in the test
with :func:`bypass_cifar_md5` (never in production code).
"""

from __future__ import annotations

import contextlib
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, Path]


def bypass_cifar_md5(monkeypatch: Any) -> None:
    """Make torchvision accept fabricated CIFAR files (their MD5 cannot match)."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root: PathLike, n_per_split: int = 10, seed: int = 0) -> dict[str, tuple]:
    """``root/cifar-10-batches-py``: the train split spread over data_batch_1..5.

    Returns ``{"train": (images uint8 [n, 3, 32, 32], labels int64 [n]), "test": ...}``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        x = _images(rng, n_per_split, (3, 32, 32))
        y = rng.integers(0, 10, size=n_per_split)
        out[split] = (x, y)
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        parts = zip(names, np.array_split(x, len(names)), np.array_split(y, len(names)))
        for name, xs, ys in parts:
            _pickle(folder / name, {"data": xs.reshape(len(xs), 3072), "labels": ys.tolist()})
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return out


def make_cifar100(root: PathLike, n_per_split: int = 10, seed: int = 0) -> dict[str, tuple]:
    """``root/cifar-100-python/{train,test,meta}`` with fine labels; returns as make_cifar10."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        x = _images(rng, n_per_split, (3, 32, 32))
        y = rng.integers(0, 100, size=n_per_split)
        out[split] = (x, y)
        _pickle(folder / split, {"data": x.reshape(len(x), 3072), "fine_labels": y.tolist(),
                                 "coarse_labels": (y // 5).tolist()})
    _pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                              "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return out


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _make_idx_set(folder: Path, n_per_split: int, seed: int,
                  images: Optional[np.ndarray] = None) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _images(rng, n_per_split, (28, 28)) if images is None else np.asarray(images, np.uint8)
        y = rng.integers(0, 10, size=n_per_split).astype(np.uint8)
        out[split] = (x, y)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", y)
    return out


def make_fashion_mnist(root: PathLike, n_per_split: int = 10, seed: int = 0,
                       images: Optional[np.ndarray] = None) -> dict[str, tuple]:
    """``root/FashionMNIST/raw``: the four uncompressed IDX files (images uint8 [n, 28, 28];
    ``images`` replaces the random ones in both splits, ``n_per_split`` must match it)."""
    return _make_idx_set(Path(root) / "FashionMNIST" / "raw", n_per_split, seed, images)


def make_mnist(root: PathLike, n_per_split: int = 10, seed: int = 0,
               images: Optional[np.ndarray] = None) -> dict[str, tuple]:
    """``root/MNIST/raw``: the four uncompressed IDX files (images uint8 [n, 28, 28];
    ``images`` replaces the random ones in both splits, ``n_per_split`` must match it)."""
    return _make_idx_set(Path(root) / "MNIST" / "raw", n_per_split, seed, images)


def make_image_folder(
    root: PathLike,
    classes: Sequence[str] = ("cat", "dog"),
    n_per_class: int = 3,
    size: Union[int, tuple[int, int]] = 16,
    mode: str = "RGB",
    seed: int = 0,
) -> dict[str, list[np.ndarray]]:
    """``root/<class>/<k>.png`` PNG images (``mode`` RGB or L); returns the arrays per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    out: dict[str, list[np.ndarray]] = {}
    for name in classes:
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for k in range(n_per_class):
            arr = _images(rng, 1, (h, w, 3) if mode == "RGB" else (h, w))[0]
            Image.fromarray(arr).save(Path(root) / name / f"{k:03d}.png")
            out[name].append(arr)
    return out


def make_tensors_file(
    path: PathLike,
    n: int = 8,
    shape: tuple[int, ...] = (3, 8, 8),
    target: str = "int",
    num_classes: int = 4,
    seed: int = 0,
    extra: Optional[dict] = None,
) -> dict[str, Any]:
    """Write ``{"x": float [n, *shape] in [0, 1], "y": ...}`` with torch.save, or as .npz when
    ``path`` ends in .npz. ``target``: "int" (labels < num_classes), "float" ([n]) or
    "float2" ([n, 2]). ``extra`` entries are added (or override x / y). Returns the dict."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n,) + tuple(shape), generator=g)
    if target == "int":
        y = torch.randint(0, num_classes, (n,), generator=g)
    else:
        y = torch.randn((n,) if target == "float" else (n, 2), generator=g)
    obj: dict[str, Any] = {"x": x, "y": y, **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, **{k: np.asarray(v) for k, v in obj.items()})
    else:
        torch.save(obj, path)
    return obj


def make_dsprites_npz(
    root: PathLike,
    indices: Sequence[int],
    subdir: bool = False,
    white: int = 1,
    images: Optional[np.ndarray] = None,
) -> Path:
    """A small file with the official dSprites name and keys (imgs uint8 0/1 [N, 64, 64],
    latents_values, latents_classes [N, 6]) holding the images of ``indices``, rendered.

    ``white``: the stored value of a set pixel (1 in the official file; 255 for a file saved as
    0/255 images). ``images`` replaces the rendered images (any [N, ...] array, e.g. tiny
    images so that a file can hold many rows cheaply)."""
    from asbound.data import dsprites_latents, render_dsprites

    classes, values = dsprites_latents(torch.as_tensor(list(indices)))
    if images is None:
        imgs = render_dsprites(classes)[:, 0].to(torch.uint8).numpy() * np.uint8(white)
    else:
        assert len(images) == len(classes), "one image per index"
        imgs = images
    folder = Path(root) / "dsprites" if subdir else Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
    np.savez_compressed(path, imgs=imgs, latents_values=values.numpy(),
                        latents_classes=classes.numpy())
    return path


def write_npz(
    path: PathLike,
    arrays: "dict[str, np.ndarray]",
    compressed: bool = False,
    version: Optional[tuple[int, int]] = None,
) -> Path:
    """An .npz like ``np.savez[_compressed]``, with the .npy format ``version`` of each member
    chosen ((1, 0), (2, 0) or None: numpy's choice); arrays keep their memory order."""
    import zipfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for key, array in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), version=version,
                                          allow_pickle=False)
    return path


@contextlib.contextmanager
def run_held_by_another_process(out: PathLike) -> "Iterator[int]":
    """Another process holds the run directory's lock for the duration; yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from asbound.records import RunDir\n"
         f"with RunDir({str(out)!r}).locked():\n print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.communicate("", timeout=60)


def digits_cnn(outputs: int = 5) -> "torch.nn.Module":
    """A small CNN for 8x8 digits: conv, batch norm, a hidden linear layer and a linear head."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, outputs),
    )


def interrupt_training(monkeypatch: Any, run_module: Any, step: int) -> "tuple[type, Any]":
    """Patch ``run_module.train_stage`` so that training raises ``Stop`` (a KeyboardInterrupt) when
    the ``step``-th training batch of the run is drawn; returns ``(Stop, the original train_stage)``."""
    original = run_module.train_stage
    calls = {"n": 0}

    class Stop(KeyboardInterrupt):
        pass

    def interrupted(model, plan, settings, train_batches, *args, **kwargs):  # noqa: ANN001, ANN202
        def batches(seed, training):  # noqa: ANN001, ANN202
            for batch in train_batches(seed, training):
                calls["n"] += training
                if calls["n"] == step:
                    raise Stop
                yield batch

        return original(model, plan, settings, batches, *args, **kwargs)

    monkeypatch.setattr(run_module, "train_stage", interrupted)
    return Stop, original
