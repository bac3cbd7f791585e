"""asbound.data: fabricated on-disk formats, subsets, transforms, validation and dSprites."""

from __future__ import annotations

import math
import pickle
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asbound.data import (
    DSPRITES_SIZE,
    DataSet,
    default_data_root,
    dsprites_index,
    dsprites_latents,
    load_data,
    render_dsprites,
    resolve_augment,
    validation_split,
)
import asbound.data.sources as data_sources
import asbound.data.transforms as data_transforms
from asbound.data.augment import augment_batch, grown, pad_of, row_seed
from asbound.data.dsprites import _read_npy_rows, split_members
from asbound.errors import ConfigError, DataError, SpecError
from asbound.specs import InputFormat, parse_data_spec
from fabricate import (
    bypass_cifar_md5,
    make_cifar10,
    make_cifar100,
    make_dsprites_npz,
    make_fashion_mnist,
    make_image_folder,
    make_mnist,
    make_tensors_file,
    write_npz,
)


@pytest.fixture
def no_md5(monkeypatch):
    bypass_cifar_md5(monkeypatch)


# --- torchvision sets -----------------------------------------------------------------------


def test_cifar10_pixels_labels_and_names(tmp_path, no_md5):
    written = make_cifar10(tmp_path, n_per_split=12)
    x, y = written["test"]
    x[3, 1, 4, 5] = 17  # a known pixel, channel-major: channel 1, row 4, column 5
    make_cifar10_with(tmp_path, written)
    ds = load_data("cifar10", root=tmp_path)
    assert isinstance(ds, DataSet) and len(ds) == 12 and ds.split == "test"
    assert ds.x.dtype == torch.float32 and ds.x.shape == (12, 3, 32, 32)
    assert ds.x[3, 1, 4, 5] == pytest.approx(17 / 255)
    assert torch.equal(ds.x, torch.from_numpy(x).float() / 255)
    assert torch.equal(ds.y, torch.from_numpy(y).long()) and ds.y.dtype == torch.int64
    assert torch.equal(ds.index, torch.arange(12))
    assert ds.task == "classification" and ds.num_classes == 10 == ds.target_dim
    assert ds.class_names == [f"class{i}" for i in range(10)]
    assert ds.source == str(tmp_path / "cifar-10-batches-py") and ds.transforms == []
    train = load_data("cifar10", root=tmp_path, split="train")
    assert torch.equal(train.x, torch.from_numpy(written["train"][0]).float() / 255)


def make_cifar10_with(root: Path, written: dict) -> None:
    """Rewrite the test batch with edited images."""
    import pickle

    x, y = written["test"]
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": x.reshape(len(x), 3072), "labels": y.tolist()}, f)


def test_cifar100_fine_labels(tmp_path, no_md5):
    written = make_cifar100(tmp_path, n_per_split=6)
    ds = load_data(parse_data_spec("cifar100"), root=tmp_path, split="train")
    assert torch.equal(ds.y, torch.from_numpy(written["train"][1]).long())
    assert torch.equal(ds.x, torch.from_numpy(written["train"][0]).float() / 255)
    assert ds.num_classes == 100 and ds.class_names[7] == "fine7"


@pytest.mark.parametrize("name,make", [("fashion-mnist", make_fashion_mnist),
                                       ("mnist", make_mnist)])
def test_idx_sets(tmp_path, name, make):
    written = make(tmp_path, n_per_split=9)
    ds = load_data(name, root=tmp_path, split="train")
    x, y = written["train"]
    assert ds.x.shape == (9, 1, 28, 28)
    assert torch.equal(ds.x[:, 0], torch.from_numpy(x).float() / 255)
    assert torch.equal(ds.y, torch.from_numpy(y).long()) and ds.num_classes == 10


def test_resize_and_grey_to_rgb_recorded(tmp_path):
    written = make_fashion_mnist(tmp_path, n_per_split=5)
    ds = load_data("fashion-mnist", root=tmp_path, input_format=InputFormat(3, 32, 32))
    assert ds.x.shape == (5, 3, 32, 32)
    grey = torch.from_numpy(written["test"][0]).float()[:, None] / 255
    expected = F.interpolate(grey, size=(32, 32), mode="bilinear", antialias=True,
                             align_corners=False).clamp(0, 1)
    for c in range(3):  # each channel is the resized grey image
        torch.testing.assert_close(ds.x[:, c:c + 1], expected, rtol=0, atol=1e-6)
    assert ds.transforms == ["resize 28x28 -> 32x32 (bilinear, antialias)",
                             "grey -> RGB (repeat channel)"]
    explicit = load_data("fashion-mnist", root=tmp_path, input_format=InputFormat(1, 32, 32),
                         resize=16)
    assert explicit.x.shape == (5, 1, 16, 16) and len(explicit.transforms) == 1
    same = load_data("fashion-mnist", root=tmp_path, input_format=InputFormat(1, 28, 28))
    assert same.transforms == []


def test_rgb_data_for_grey_model_is_an_error(tmp_path, no_md5):
    make_cifar10(tmp_path, n_per_split=2)
    with pytest.raises(DataError, match="grey"):
        load_data("cifar10", root=tmp_path, input_format=InputFormat(1, 32, 32))


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python"),
                                         ("mnist", "MNIST/raw"),
                                         ("fashion-mnist", "FashionMNIST/raw")])
def test_missing_offline_names_folder_and_download(tmp_path, name, folder):
    with pytest.raises(DataError) as err:
        load_data(name, root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "--download" in msg
    assert str(tmp_path / folder) in msg


def test_cifar_md5_is_checked_in_production(tmp_path):
    make_cifar10(tmp_path, n_per_split=2)  # fabricated files cannot match the MD5
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_data("cifar10", root=tmp_path)


# --- subsets and options --------------------------------------------------------------------


def test_subset_is_seeded_sorted_and_deterministic(tmp_path):
    written = make_mnist(tmp_path, n_per_split=50)
    a = load_data("mnist", root=tmp_path, n=10, seed=3)
    b = load_data("mnist", root=tmp_path, n=10, seed=3)
    c = load_data("mnist", root=tmp_path, n=10, seed=4)
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(3))[:10].sort().values
    assert torch.equal(a.index, expected) and torch.equal(a.index, b.index)
    assert not torch.equal(a.index, c.index)
    assert torch.equal(a.x[:, 0], torch.from_numpy(written["test"][0])[a.index].float() / 255)
    assert torch.equal(a.y, torch.from_numpy(written["test"][1])[a.index].long())
    assert len(load_data("mnist", root=tmp_path, n=500)) == 50


def test_bad_split_and_n(tmp_path):
    make_mnist(tmp_path, n_per_split=3)
    with pytest.raises(ConfigError, match="train, test"):
        load_data("mnist", root=tmp_path, split="val")
    for bad in (0, -2):
        with pytest.raises(ConfigError):
            load_data("mnist", root=tmp_path, n=bad)


def test_bad_specs():
    with pytest.raises(SpecError, match="shape, scale"):
        load_data("dsprites:colour")
    with pytest.raises(SpecError):
        load_data("imagenet-x")


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ASBOUND_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("ASBOUND_DATA_ROOT")
    import platformdirs

    assert default_data_root() == Path(platformdirs.user_cache_dir("asbound")) / "data"


# --- folder ---------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    written = make_image_folder(tmp_path / "imgs", classes=("cat", "dog"), n_per_class=3,
                                size=(10, 12))
    ds = load_data(f"folder:{tmp_path / 'imgs'}")
    assert ds.x.shape == (6, 3, 10, 12) and ds.class_names == ["cat", "dog"]
    assert torch.equal(ds.y, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.equal(ds.x[4], torch.from_numpy(written["dog"][1]).permute(2, 0, 1).float() / 255)
    sub = load_data(f"folder:{tmp_path / 'imgs'}", n=2, seed=1, resize=8)
    assert sub.x.shape == (2, 3, 8, 8) and sub.transforms[0].startswith("resize 10x12 -> 8x8")


def test_image_folder_grey_and_mixed_sizes(tmp_path):
    a = make_image_folder(tmp_path / "g", classes=("a",), n_per_class=2, size=9, mode="L")
    b = make_image_folder(tmp_path / "g", classes=("b",), n_per_class=1, size=7, mode="L")
    with pytest.raises(DataError, match="--resize"):
        load_data(f"folder:{tmp_path / 'g'}")
    ds = load_data(f"folder:{tmp_path / 'g'}", input_format=InputFormat(3, 8, 8))
    assert ds.x.shape == (3, 3, 8, 8) and ds.transforms[-1] == "grey -> RGB (repeat channel)"
    assert ds.transforms[0] == "resize 2 sizes -> 8x8 (bilinear, antialias)"
    for i, img in enumerate(a["a"] + b["b"]):  # each image resized on its own, then repeated
        grey = torch.from_numpy(img).float()[None, None] / 255
        expected = F.interpolate(grey, size=(8, 8), mode="bilinear", antialias=True,
                                 align_corners=False).clamp(0, 1)[0]
        torch.testing.assert_close(ds.x[i], expected.expand(3, 8, 8), rtol=0, atol=1e-6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="<class>/<image>"):
        load_data(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        load_data(f"folder:{tmp_path / 'empty'}")


# --- tensors --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_tensors_classification(tmp_path, suffix):
    obj = make_tensors_file(tmp_path / f"d{suffix}", n=8, num_classes=4)
    ds = load_data(f"tensors:{tmp_path / f'd{suffix}'}", n=5, seed=2)
    assert torch.equal(ds.x, torch.as_tensor(obj["x"])[ds.index])
    assert torch.equal(ds.y, torch.as_tensor(obj["y"])[ds.index]) and ds.y.dtype == torch.int64
    assert ds.task == "classification" and ds.num_classes == int(obj["y"].max()) + 1


def test_tensors_regression_grey_and_num_classes(tmp_path):
    obj = make_tensors_file(tmp_path / "r.pt", target="float2", shape=(6, 6))
    ds = load_data(f"tensors:{tmp_path / 'r.pt'}")
    assert ds.task == "regression" and ds.y.shape == (8, 2) and ds.target_dim == 2
    assert ds.x.shape == (8, 1, 6, 6) and ds.num_classes is None
    assert torch.equal(ds.x[:, 0], obj["x"]) and torch.equal(ds.y, obj["y"])
    make_tensors_file(tmp_path / "c.pt", num_classes=3, extra={"num_classes": 7})
    assert load_data(f"tensors:{tmp_path / 'c.pt'}").num_classes == 7
    obj = make_tensors_file(tmp_path / "f.pt", target="float")
    ds = load_data(f"tensors:{tmp_path / 'f.pt'}")
    assert ds.target_dim == 1 and ds.y.shape == (8,) and torch.equal(ds.y, obj["y"])


@pytest.mark.parametrize("extra,match", [
    ({"y": torch.zeros(7, dtype=torch.long)}, "8 rows but y has 7"),
    ({"x": torch.rand(8, 2, 3, 4, 5)}, "shape"),
    ({"x": torch.zeros(8, 3, 8, 8, dtype=torch.uint8)}, "float"),
    ({"num_classes": 2, "y": torch.full((8,), 5)}, "num_classes"),
    ({"y": torch.tensor([0, 1, 2, -1, 0, 1, 2, 0])}, "labels must be >= 0, found -1"),
    ({"num_classes": 4, "class_names": ["a", "b"]}, "2 class_names for 4 classes"),
])
def test_tensors_bad_contents(tmp_path, extra, match):
    make_tensors_file(tmp_path / "b.pt", extra=extra)
    with pytest.raises(DataError, match=match):
        load_data(f"tensors:{tmp_path / 'b.pt'}")


def test_tensors_bad_files(tmp_path):
    torch.save({"x": torch.rand(2, 1, 4, 4)}, tmp_path / "noy.pt")
    with pytest.raises(DataError, match="lacks key.*'y'"):
        load_data(f"tensors:{tmp_path / 'noy.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(DataError, match="not a tensors file"):
        load_data(f"tensors:{tmp_path / 'junk.pt'}")
    torch.save({"x": torch.rand(2, 1, 4, 4), "y": torch.zeros(2), "ns": _Unsafe()},
               tmp_path / "unsafe.pt")
    with pytest.raises(DataError, match=r"not a tensors file.*torch.save\(\{'x'"):
        load_data(f"tensors:{tmp_path / 'unsafe.pt'}")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(DataError, match="not a dict"):
        load_data(f"tensors:{tmp_path / 'list.pt'}")
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"tensors:{tmp_path / 'missing.pt'}")


class _Unsafe:
    """An object torch.load(weights_only=True) refuses."""


def test_nan_inf_and_range_errors(tmp_path):
    x = torch.rand(6, 1, 4, 4)
    x[4, 0, 1, 1] = float("nan")
    x[5, 0, 0, 0] = float("inf")
    torch.save({"x": x, "y": torch.zeros(6, dtype=torch.long)}, tmp_path / "nan.pt")
    with pytest.raises(DataError, match="2 pixel values are NaN or infinite.*row 4"):
        load_data(f"tensors:{tmp_path / 'nan.pt'}")
    x = torch.rand(6, 1, 4, 4)
    x[2] *= 255
    torch.save({"x": x, "y": torch.zeros(6, dtype=torch.long)}, tmp_path / "range.pt")
    with pytest.raises(DataError, match=r"row 2.*pixels in \[0, 1\] with normalisation inside"):
        load_data(f"tensors:{tmp_path / 'range.pt'}")
    x = torch.rand(6, 1, 4, 4)
    x[0, 0, 0, 0] = 1 + 1e-7  # rounding: accepted and clamped
    y = torch.rand(6)
    x[1, 0, 0, 0] = -1e-7
    torch.save({"x": x, "y": y}, tmp_path / "ok.pt")
    ok = load_data(f"tensors:{tmp_path / 'ok.pt'}").x
    assert ok[0, 0, 0, 0] == 1.0 and ok[1, 0, 0, 0] == 0.0
    assert torch.equal(ok, x.clamp(0, 1))
    y[3] = float("nan")
    torch.save({"x": x, "y": y}, tmp_path / "ynan.pt")
    with pytest.raises(DataError, match="target values are NaN.*row 3"):
        load_data(f"tensors:{tmp_path / 'ynan.pt'}")


# --- dSprites -------------------------------------------------------------------------------


def test_dsprites_latents_index_round_trip():
    idx = torch.tensor([0, 1, 31, 32, 1023, 1024, 40959, 40960, 245759, 245760, DSPRITES_SIZE - 1])
    classes, values = dsprites_latents(idx)
    assert torch.equal(dsprites_index(classes), idx)
    assert classes[1].tolist() == [0, 0, 0, 0, 0, 1]  # posY fastest
    assert classes[-1].tolist() == [0, 2, 5, 39, 31, 31]
    assert values[-1].tolist() == pytest.approx([1, 3, 1, 2 * math.pi, 1, 1])
    assert values[6, 2] == pytest.approx(0.5) and values[7, 2] == pytest.approx(0.6)
    all_classes = torch.cartesian_prod(*(torch.arange(k) for k in (1, 3, 6, 40, 32, 32)))[::997]
    assert torch.equal(dsprites_latents(dsprites_index(all_classes))[0], all_classes)


def _image(shape=0, scale=5, orient=0, posx=16, posy=16) -> torch.Tensor:
    return render_dsprites(torch.tensor([[0, shape, scale, orient, posx, posy]]))[0, 0]


def test_dsprites_render_shapes_and_values():
    classes, _ = dsprites_latents(torch.randint(0, DSPRITES_SIZE, (300,),
                                                generator=torch.Generator().manual_seed(0)))
    x = render_dsprites(classes)
    assert x.shape == (300, 1, 64, 64) and x.dtype == torch.float32
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert (x.sum((1, 2, 3)) > 10).all()  # every shape is visible
    edge = x[..., [0, -1], :].sum() + x[..., :, [0, -1]].sum()
    assert edge == 0  # the largest shape at the extreme positions stays inside


def test_dsprites_render_factors_act():
    cols = torch.arange(64.0)
    left, right = _image(posx=0), _image(posx=31)
    assert (right.sum(0) * cols).sum() / right.sum() > (left.sum(0) * cols).sum() / left.sum() + 25
    top, bottom = _image(posy=0), _image(posy=31)
    assert (bottom.sum(1) * cols).sum() / bottom.sum() > (top.sum(1) * cols).sum() / top.sum() + 25
    for shape in range(3):
        assert _image(shape, scale=5).sum() > 2 * _image(shape, scale=0).sum()
    heart = _image(2, orient=0)
    assert not torch.equal(heart, _image(2, orient=10))
    assert not torch.equal(heart, _image(2, orient=20))  # a heart has no 180° symmetry
    centre = 16 + 32 * 16 / 31 - 0.5  # in pixel indices
    assert (heart.sum(0) * cols).sum() / heart.sum() == pytest.approx(centre, abs=0.3)
    assert torch.equal(_image(0, orient=0), _image(0, orient=39))  # 0 and 2π
    assert not torch.equal(_image(0), _image(1)) and not torch.equal(_image(1), _image(2))


def test_dsprites_render_is_vectorised():
    """10,000 images in well under a second on an idle CPU; the bound only catches pixel loops."""
    import time

    classes, _ = dsprites_latents(torch.arange(0, DSPRITES_SIZE, 74))
    start = time.perf_counter()
    render_dsprites(classes)
    assert time.perf_counter() - start < 20


def test_dsprites_splits(tmp_path):
    train, test = split_members(DSPRITES_SIZE, "train"), split_members(DSPRITES_SIZE, "test")
    assert len(train) == 589_824 and len(test) == 147_456
    perm = torch.randperm(DSPRITES_SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train, perm[:589_824].sort().values)
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(DSPRITES_SIZE))
    ds = load_data("dsprites:orientation", root=tmp_path, split="test", n=40, seed=1)
    again = load_data("dsprites", root=tmp_path, split="test", n=40, seed=1)
    assert torch.equal(ds.index, again.index) and torch.equal(ds.x, again.x)
    assert ds.source == "procedural" and ds.task == "regression" and ds.y.shape == (40,)
    assert bool(torch.isin(ds.index, test).all()) and torch.equal(ds.index, ds.index.sort().values)
    classes, values = dsprites_latents(ds.index)
    assert torch.equal(ds.x, render_dsprites(classes))
    assert torch.allclose(ds.y, values[:, 3].float())
    shape = load_data("dsprites:shape", root=tmp_path, split="train", n=30)
    assert shape.task == "classification" and shape.class_names == ["square", "ellipse", "heart"]
    assert torch.equal(shape.y, dsprites_latents(shape.index)[0][:, 1])
    assert bool(torch.isin(shape.index, train).all())
    posx = load_data("dsprites:posx", root=tmp_path, n=5)
    assert torch.allclose(posx.y, dsprites_latents(posx.index)[1][:, 4].float())
    big = load_data("dsprites:scale", root=tmp_path, n=5, input_format=InputFormat(3, 32, 32))
    assert big.x.shape == (5, 3, 32, 32) and len(big.transforms) == 2


@pytest.mark.parametrize("subdir", [False, True])
def test_dsprites_official_file(tmp_path, subdir):
    full = torch.arange(0, DSPRITES_SIZE, 7373)[:100]
    path = make_dsprites_npz(tmp_path, full.tolist(), subdir=subdir)
    with np.load(path) as z:  # mark the file's images so that they are recognisably read
        imgs, lv, lc = z["imgs"].copy(), z["latents_values"], z["latents_classes"]
    imgs[:, 0, 0] = 1
    np.savez_compressed(path, imgs=imgs, latents_values=lv, latents_classes=lc)
    with _deadline(20):  # a broken chunk loop would never end
        ds = load_data("dsprites:posy", root=tmp_path, split="train", n=10, seed=5)
    members = split_members(100, "train")
    assert len(members) == 80 and ds.source == str(path)
    pos = torch.randperm(80, generator=torch.Generator().manual_seed(5))[:10].sort().values
    assert torch.equal(ds.index, members[pos])
    assert torch.equal(ds.x[:, 0], torch.from_numpy(imgs)[ds.index].float())
    assert torch.allclose(ds.y, torch.from_numpy(lv)[ds.index, 5].float())
    with _deadline(20):
        assert len(load_data("dsprites", root=tmp_path)) == 20


# --- pixel scaling, resizing, validation ------------------------------------------------------


def test_uint8_pixels_become_exact_unit_values(tmp_path):
    """Every byte value k comes out as k / 255 exactly: 0 -> 0.0, 255 -> 1.0 (torchvision source
    and image folder)."""
    imgs = np.zeros((3, 28, 28), dtype=np.uint8)
    imgs[1] = 255
    imgs[2].flat[:256] = np.arange(256)
    make_mnist(tmp_path, n_per_split=3, images=imgs)
    ds = load_data("mnist", root=tmp_path)
    assert torch.equal(ds.x[0], torch.zeros(1, 28, 28)) and torch.equal(ds.x[1], torch.ones(1, 28, 28))
    assert torch.equal(ds.x[2, 0].flatten()[:256], torch.arange(256, dtype=torch.float32) / 255)

    from PIL import Image

    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    ramp = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8)).save(folder / "0.png")
    Image.fromarray(ramp).save(folder / "1.png")
    ds = load_data(f"folder:{tmp_path / 'imgs'}")
    assert torch.equal(ds.x[0], torch.ones(3, 16, 16))
    assert torch.equal(ds.x[1], torch.from_numpy(ramp).permute(2, 0, 1).float() / 255)
    assert ds.x[1].min() == 0.0 and ds.x[1].max() == 1.0


def test_resize_is_antialiased_bilinear_of_unit_pixels_in_batches(tmp_path, monkeypatch):
    """uint8 images are scaled to [0, 1] before resizing; a non-square target keeps height and
    width apart; resizing in batches (here 2, 2, 1) gives the one-shot result."""
    written = make_image_folder(tmp_path / "imgs", classes=("a",), n_per_class=5, size=(10, 12))
    monkeypatch.setattr(data_transforms, "_RESIZE_BATCH", 2)
    ds = load_data(f"folder:{tmp_path / 'imgs'}", input_format=InputFormat(3, 6, 9))
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in written["a"]]).float() / 255
    expected = F.interpolate(x, size=(6, 9), mode="bilinear", antialias=True,
                             align_corners=False).clamp(0, 1)
    assert ds.x.shape == (5, 3, 6, 9)
    assert ds.transforms == ["resize 10x12 -> 6x9 (bilinear, antialias)"]
    torch.testing.assert_close(ds.x, expected, rtol=0, atol=1e-6)
    again = load_data(f"folder:{tmp_path / 'imgs'}", resize=7)  # the explicit side
    assert again.x.shape == (5, 3, 7, 7)


def test_bad_resize_is_a_config_error(tmp_path):
    make_mnist(tmp_path, n_per_split=2)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ConfigError, match="resize"):
            load_data("mnist", root=tmp_path, resize=bad)


def test_negative_pixels_are_an_error(tmp_path):
    x = torch.rand(6, 1, 4, 4)
    x[3, 0, 2, 2] = -0.5
    torch.save({"x": x, "y": torch.zeros(6, dtype=torch.long)}, tmp_path / "neg.pt")
    with pytest.raises(DataError, match=r"1 pixel values lie outside \[0, 1\].*row 3"):
        load_data(f"tensors:{tmp_path / 'neg.pt'}")


def test_image_folder_of_grey_and_colour_images_is_colour(tmp_path):
    grey = make_image_folder(tmp_path / "m", classes=("a",), n_per_class=1, size=6, mode="L")
    rgb = make_image_folder(tmp_path / "m", classes=("b",), n_per_class=1, size=6, mode="RGB")
    ds = load_data(f"folder:{tmp_path / 'm'}")
    assert ds.x.shape == (2, 3, 6, 6)
    for c in range(3):  # the grey image in all three channels
        assert torch.equal(ds.x[0, c], torch.from_numpy(grey["a"][0]).float() / 255)
    assert torch.equal(ds.x[1], torch.from_numpy(rgb["b"][0]).permute(2, 0, 1).float() / 255)


def test_tensors_class_names(tmp_path):
    names = ["a", "b", "c", "d", "e"]
    extras = {".pt": {"num_classes": 5, "class_names": names},
              ".npz": {"num_classes": np.int64(5), "class_names": np.array(names)}}
    for suffix, extra in extras.items():
        path = tmp_path / f"names{suffix}"
        make_tensors_file(path, num_classes=3, extra=extra)
        ds = load_data(f"tensors:{path}")
        assert ds.num_classes == 5 and ds.class_names == names, suffix


# --- dSprites: factors, indices, the official file --------------------------------------------


@pytest.mark.parametrize("factor, column", [("shape", 1), ("scale", 2), ("orientation", 3),
                                            ("posx", 4), ("posy", 5)])
def test_dsprites_factor_targets(tmp_path, factor, column):
    ds = load_data(f"dsprites:{factor}", root=tmp_path, n=6, seed=2)
    classes, values = dsprites_latents(ds.index)
    if factor == "shape":
        assert ds.y.dtype == torch.int64 and torch.equal(ds.y, classes[:, 1])
    else:
        assert ds.y.dtype == torch.float32 and torch.equal(ds.y, values[:, column].float())
    grids = {"scale": torch.linspace(0.5, 1, 6), "orientation": torch.linspace(0, 2 * math.pi, 40),
             "posx": torch.linspace(0, 1, 32), "posy": torch.linspace(0, 1, 32)}
    if factor in grids:  # the values lie on the latent's published grid
        assert bool(torch.isclose(ds.y[:, None], grids[factor][None]).any(1).all())


def test_dsprites_indices_out_of_range():
    assert dsprites_latents([0, DSPRITES_SIZE - 1])[0].shape == (2, 6)
    for bad in ([DSPRITES_SIZE], [-1], [3, DSPRITES_SIZE + 5]):
        with pytest.raises(ConfigError, match="737280"):
            dsprites_latents(bad)


def _npz_arrays(n: int, seed: int = 0) -> "dict[str, np.ndarray]":
    rng = np.random.default_rng(seed)
    return {"imgs": rng.integers(0, 256, (n, 3, 5), dtype=np.uint8),
            "latents_values": rng.standard_normal((n, 6)),  # 8-byte items
            "flat": rng.integers(-2**40, 2**40, n)}  # one item per row


@contextmanager
def _deadline(seconds: float):
    """Turn a hang (a reading loop that never ends) into a failure, where SIGALRM exists."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)], ids=["npy1", "npy2", "npy3"])
@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_read_npy_rows_across_chunks(tmp_path, version, compressed):
    """Streaming rows chunk by chunk returns exactly np.load's rows: first and last rows, rows
    on both sides of every chunk boundary, a whole chunk, the short last chunk, no rows; for
    each .npy format version (their headers differ)."""
    n, chunk = 103, 10
    arrays = _npz_arrays(n)
    path = write_npz(tmp_path / "rows.npz", arrays, compressed=compressed, version=version)
    rng = np.random.default_rng(1)
    cases = {
        "all": np.arange(n), "first": [0], "last": [n - 1],
        "chunk edges": [0, 9, 10, 11, 19, 20, 21, 49, 50, 89, 90, 99, 100, 101, 102],
        "one whole chunk": np.arange(20, 30), "short last chunk": [100, 101, 102],
        "far apart": [5, 95], "none": [], "random": np.sort(rng.choice(n, 37, replace=False)),
    }
    with np.load(path) as z:
        expected = {key: z[key] for key in arrays}
    for key in arrays:
        for name, rows in cases.items():
            rows = np.asarray(rows, dtype=np.int64)
            for size in (chunk, 1, 7, n, 4096):
                with _deadline(5):
                    got = _read_npy_rows(path, key, rows, chunk=size)
                assert got.dtype == expected[key].dtype, (key, name, size)
                np.testing.assert_array_equal(got, expected[key][rows],
                                              err_msg=f"{key}, {name}, chunk {size}")
                assert got.shape == (len(rows),) + expected[key].shape[1:]


def test_read_npy_rows_of_a_fortran_order_array(tmp_path):
    arrays = {key: np.asfortranarray(a) for key, a in _npz_arrays(40, seed=3).items()}
    path = write_npz(tmp_path / "fortran.npz", arrays)
    rows = np.array([0, 7, 8, 21, 39])
    for key, array in arrays.items():
        np.testing.assert_array_equal(_read_npy_rows(path, key, rows, chunk=8), array[rows])


def test_dsprites_official_file_larger_than_one_chunk(tmp_path):
    """9,000 rows of tiny images: the default chunk of 4,096 rows is crossed twice; the two
    splits together read every row, boundary rows included."""
    n = 9000
    imgs = np.random.default_rng(2).integers(0, 2, (n, 2, 3), dtype=np.uint8)
    make_dsprites_npz(tmp_path, range(n), images=imgs)
    seen = []
    for split in ("train", "test"):
        with _deadline(20):
            ds = load_data("dsprites:shape", root=tmp_path, split=split)
        members = split_members(n, split)
        assert torch.equal(ds.index, members)
        assert torch.equal(ds.x[:, 0], torch.from_numpy(imgs)[members].float()), split
        assert torch.equal(ds.y, dsprites_latents(members)[0][:, 1])
        seen.append(members)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(n))


def test_dsprites_file_stored_as_0_255_is_scaled_to_0_1(tmp_path):
    idx = torch.arange(0, DSPRITES_SIZE, 9973)[:50]
    path = make_dsprites_npz(tmp_path, idx.tolist(), white=255)
    with np.load(path) as z:
        assert z["imgs"].max() == 255
    ds = load_data("dsprites:shape", root=tmp_path, split="train")
    assert torch.equal(ds.x, render_dsprites(dsprites_latents(idx[ds.index])[0]))
    assert set(ds.x.unique().tolist()) == {0.0, 1.0}


def test_invalid_pixels_in_the_file_are_reported_by_their_row(tmp_path):
    """The error names the row of the file (the reported index), not the position in the subset."""
    n = 40
    imgs = np.zeros((n, 2, 2), dtype=np.float32)
    test_rows = split_members(n, "test")
    bad = int(test_rows[3])
    assert bad != 3  # the row in the file differs from the position in the split
    imgs[bad, 1, 1] = np.nan
    make_dsprites_npz(tmp_path, range(n), images=imgs)
    ds = load_data("dsprites", root=tmp_path, split="test")  # a file: checked batch by batch
    assert ds.batch(torch.tensor([0, 1, 2, 4])).shape == (4, 1, 2, 2)  # rows without the NaN
    for read in (lambda: ds.x, lambda: ds.batch(torch.tensor([5, 3])),
                 lambda: list(ds.loader(3, shuffle=True))):
        with pytest.raises(DataError, match=rf"1 pixel values are NaN or infinite \(first in row {bad}\)"):
            read()



# --- streaming: lazy views read batch by batch -----------------------------------------------


def _streaming_sets(tmp_path: Path) -> "dict[str, DataSet]":
    """One small view of every kind of source, with transforms."""
    make_mnist(tmp_path, n_per_split=12)
    make_image_folder(tmp_path / "f", classes=("a",), n_per_class=3, size=9, mode="L")
    make_image_folder(tmp_path / "f", classes=("b",), n_per_class=3, size=(7, 5), mode="RGB")
    make_tensors_file(tmp_path / "t.pt", n=10)
    make_dsprites_npz(tmp_path / "ds", range(30))
    return {
        "mnist": load_data("mnist", root=tmp_path, input_format=InputFormat(3, 16, 16)),
        "folder": load_data(f"folder:{tmp_path / 'f'}", resize=8),
        "tensors": load_data(f"tensors:{tmp_path / 't.pt'}", n=9, seed=1),
        "digits": load_data("digits", n=40, seed=2),
        "dsprites": load_data("dsprites:shape", n=6, seed=0),
        "dsprites file": load_data("dsprites:shape", root=tmp_path / "ds", split="test"),
    }


def test_batch_is_the_materialised_rows_for_any_selection(tmp_path):
    """batch(sel) equals x[sel] exactly: any order, repeats, one row, none; subset views follow."""
    for name, ds in _streaming_sets(tmp_path).items():
        n, x = len(ds), ds.x
        assert x.dtype == torch.float32 and x.shape == (n, *ds.shape), name
        selections = {
            "all": torch.arange(n), "reversed": torch.arange(n).flip(0),
            "shuffled": torch.randperm(n, generator=torch.Generator().manual_seed(1)),
            "repeats": torch.tensor([1, 1, 0, n - 1, 1]), "one": torch.tensor([n - 1]),
            "none": torch.tensor([], dtype=torch.int64),
        }
        for what, sel in selections.items():
            got = ds.batch(sel)
            assert got.dtype == torch.float32 and torch.equal(got, x[sel]), (name, what)
            sub = ds.subset(sel)
            assert len(sub) == len(sel) and torch.equal(sub.x, x[sel]), (name, what)
            assert torch.equal(sub.index, ds.index[sel]) and torch.equal(sub.y, ds.y[sel])
            assert sub.transforms == ds.transforms and sub.num_classes == ds.num_classes
        again = ds.subset(torch.tensor([2, 0])).subset(torch.tensor([1]))  # a view of a view
        assert torch.equal(again.x, x[[0]]) and torch.equal(again.index, ds.index[[0]])


def test_load_reads_no_pixels_and_the_loader_reads_batch_by_batch(tmp_path, monkeypatch):
    """A large set: load_data reads no image; the loader reads each batch in one call of at most
    batch_size rows, every row once per epoch; the view holds no float image tensor."""
    make_mnist(tmp_path, n_per_split=3000)
    calls: "list[torch.Tensor]" = []
    read = data_sources._ChannelsFirst.__call__

    def spy(self, pos):
        calls.append(pos.clone())
        return read(self, pos)

    monkeypatch.setattr(data_sources._ChannelsFirst, "__call__", spy)
    ds = load_data("mnist", root=tmp_path, split="train", input_format=InputFormat(3, 32, 32))
    assert calls == [] and len(ds) == 3000
    assert not any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vars(ds).values())
    shapes = [(tuple(x.shape), len(y)) for x, y in ds.loader(256, shuffle=True, augment="crop")]
    assert shapes[0] == ((256, 3, 32, 32), 256) and shapes[-1] == ((3000 - 11 * 256, 3, 32, 32), 184)
    assert len(calls) == 12 and max(len(c) for c in calls) <= 256
    assert torch.equal(torch.cat(calls).sort().values, torch.arange(3000))


def test_folder_load_reads_image_headers_only(tmp_path, monkeypatch):
    from PIL import ImageFile

    written = make_image_folder(tmp_path / "f", classes=("a", "b"), n_per_class=2, size=(6, 9))

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("load_data decoded pixels")

    with monkeypatch.context() as patched:
        patched.setattr(ImageFile.ImageFile, "load", no_decoding)
        ds = load_data(f"folder:{tmp_path / 'f'}", resize=4, n=3, seed=0)
    assert ds.transforms == ["resize 6x9 -> 4x4 (bilinear, antialias)"] and ds.shape == (3, 4, 4)
    images = written["a"] + written["b"]
    x = torch.stack([torch.from_numpy(images[i]).permute(2, 0, 1) for i in ds.index]).float() / 255
    expected = F.interpolate(x, size=(4, 4), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(ds.x, expected.clamp(0, 1), rtol=0, atol=1e-6)


def test_folder_channels_are_decided_over_the_whole_folder(tmp_path):
    """A grey image drawn from a folder that also holds colour images comes out RGB, as when the
    whole folder is loaded; a folder of grey images only stays grey."""
    grey = make_image_folder(tmp_path / "m", classes=("a",), n_per_class=1, size=6, mode="L")
    make_image_folder(tmp_path / "m", classes=("b",), n_per_class=1, size=6, mode="RGB")
    one = load_data(f"folder:{tmp_path / 'm'}", n=1, seed=0)
    assert one.index.tolist() == [0] and one.y.tolist() == [0]  # the grey image
    assert one.x.shape == (1, 3, 6, 6) == (1, *load_data(f"folder:{tmp_path / 'm'}").shape)
    for c in range(3):
        assert torch.equal(one.x[0, c], torch.from_numpy(grey["a"][0]).float() / 255)
    make_image_folder(tmp_path / "g", classes=("a", "b"), n_per_class=1, size=6, mode="L")
    assert load_data(f"folder:{tmp_path / 'g'}", n=1).x.shape == (1, 1, 6, 6)


def test_data_sets_pickle_for_worker_processes(tmp_path):
    """Worker processes started by spawn or forkserver get a pickled copy of the view."""
    for name, ds in _streaming_sets(tmp_path).items():
        back = pickle.loads(pickle.dumps(ds))
        assert torch.equal(back.x, ds.x) and torch.equal(back.y, ds.y), name
        assert back.transforms == ds.transforms and torch.equal(back.index, ds.index)


# --- digits -----------------------------------------------------------------------------------


def test_digits_splits_shape_and_values():
    train, test = load_data("digits", split="train"), load_data("digits", split="test")
    assert len(train) == 1437 and len(test) == 360
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train.index, perm[:1437].sort().values)
    assert torch.equal(test.index, perm[1437:].sort().values)
    assert torch.equal(torch.cat([train.index, test.index]).sort().values, torch.arange(1797))
    for ds in (train, test):
        x = ds.x
        assert x.shape == (len(ds), 1, 8, 8) and x.dtype == torch.float32 and ds.shape == (1, 8, 8)
        k = x * 16  # every pixel is exactly k / 16, k = 0..16
        assert torch.equal(k, k.round()) and k.min() == 0 and k.max() == 16
        assert ds.task == "classification" and ds.num_classes == 10 and ds.y.dtype == torch.int64
        assert ds.class_names == [str(d) for d in range(10)] and ds.transforms == []
        assert ds.source.startswith("scikit-learn ") and ds.spec == "digits"
    # the real data: the class counts and the first image (a zero) of the set
    assert torch.bincount(torch.cat([train.y, test.y])).tolist() == [
        178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    home = train if bool((train.index == 0).any()) else test
    row = int((home.index == 0).nonzero()[0, 0])
    assert (home.x[row, 0, 0] * 16).tolist() == [0, 0, 5, 13, 9, 1, 0, 0] and home.y[row] == 0
    again = load_data("digits", split="train")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    sub = load_data("digits", n=50, seed=3)
    pos = torch.randperm(360, generator=torch.Generator().manual_seed(3))[:50].sort().values
    assert torch.equal(sub.index, test.index[pos]) and torch.equal(sub.x, test.x[pos])
    big = load_data("digits", n=4, input_format=InputFormat(3, 16, 16))
    assert big.x.shape == (4, 3, 16, 16) and len(big.transforms) == 2


def test_digits_are_scikit_learns_load_digits(monkeypatch, tmp_path):
    """The bundled file read directly gives load_digits()'s images / 16 and labels; where the
    file is not in its place, load_digits() itself is used."""
    from sklearn.datasets import load_digits

    reference = load_digits()
    x, y, _ = data_sources.digits_arrays()
    np.testing.assert_array_equal(x[:, 0].numpy() * 16, reference.images)
    np.testing.assert_array_equal(y.numpy(), reference.target)
    calls = []
    monkeypatch.setattr(data_sources, "digits_csv", lambda: (tmp_path / "moved.csv.gz", "9.9"))
    monkeypatch.setattr("sklearn.datasets.load_digits", lambda: calls.append(1) or reference)
    data_sources.digits_arrays.cache_clear()
    try:
        x2, y2, source = data_sources.digits_arrays()
    finally:
        data_sources.digits_arrays.cache_clear()
    assert calls == [1] and torch.equal(x2, x) and torch.equal(y2, y) and "9.9" in source


# --- classes ----------------------------------------------------------------------------------


def test_classes_select_and_relabel_in_the_order_given():
    full = load_data("digits")
    five = load_data("digits", classes="5-9")
    keep = full.y >= 5
    assert torch.equal(five.index, full.index[keep]) and torch.equal(five.y, full.y[keep] - 5)
    assert torch.equal(five.x, full.x[keep])
    assert five.num_classes == 5 == five.target_dim and five.class_names == ["5", "6", "7", "8", "9"]
    odd = load_data("digits", classes=(7, 2))  # a sequence of labels, in its order: 7 -> 0, 2 -> 1
    mask = (full.y == 7) | (full.y == 2)
    assert torch.equal(odd.index, full.index[mask]) and torch.equal(odd.y, (full.y[mask] == 2).long())
    assert odd.num_classes == 2 and odd.class_names == ["7", "2"]


def test_n_is_drawn_after_the_class_filter():
    full = load_data("digits", split="train")
    kept = (full.y <= 1).nonzero().squeeze(1)
    sub = load_data("digits", split="train", classes="0-1", n=10, seed=4)
    pos = kept[torch.randperm(len(kept), generator=torch.Generator().manual_seed(4))[:10].sort().values]
    assert torch.equal(sub.index, full.index[pos]) and torch.equal(sub.y, full.y[pos])
    assert len(load_data("digits", split="train", classes="0-1", n=10_000)) == len(kept)


def test_classes_of_a_tensors_file_and_errors(tmp_path):
    y = torch.tensor([0, 3, 1, 3, 2, 0, 1, 3])
    make_tensors_file(tmp_path / "c.pt", extra={"y": y, "num_classes": 5})
    ds = load_data(f"tensors:{tmp_path / 'c.pt'}", classes="3,1")
    assert ds.index.tolist() == [1, 2, 3, 6, 7] and ds.y.tolist() == [0, 1, 0, 1, 0]
    assert ds.class_names == ["3", "1"] and ds.num_classes == 2  # the file names no classes
    with pytest.raises(DataError) as err:
        load_data(f"tensors:{tmp_path / 'c.pt'}", classes="1,4")
    assert "no class 4" in str(err.value) and "classes present: 0-3" in str(err.value)
    with pytest.raises(DataError, match=r"no class 12.*present: 0-9"):
        load_data("digits", classes="3,12")
    with pytest.raises(ConfigError, match="regression"):
        load_data("dsprites:scale", classes="0-1")
    with pytest.raises(ConfigError, match="0-4, 5-9"):
        load_data("digits", classes="4-0")


# --- validation split ---------------------------------------------------------------------------


def test_validation_split():
    for size, fraction, seed in ((100, 0.05, 0), (10, 0.01, 3), (7, 0.5, 1), (2, 0.1, 5)):
        train, val = validation_split(size, fraction, seed)
        k = max(1, round(fraction * size))
        perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(val, perm[:k].sort().values), (size, fraction)
        assert torch.equal(train, perm[k:].sort().values), (size, fraction)
        assert train.dtype == val.dtype == torch.int64
    assert len(validation_split(100, 0.05, 0)[1]) == 5 and len(validation_split(10, 0.01, 0)[1]) == 1
    assert not torch.equal(validation_split(100, 0.1, 0)[1], validation_split(100, 0.1, 1)[1])
    for size in (0, 1):
        with pytest.raises(DataError, match="at least 2"):
            validation_split(size, 0.1, 0)


# --- loader and augmentation ------------------------------------------------------------------


def _indexed(tmp_path: Path, n: int = 23, shape: tuple = (3, 8, 8), name: str = "o") -> DataSet:
    """A tensors file whose labels are 0..n-1, so the labels of a batch show its rows."""
    path = tmp_path / f"{name}.pt"
    make_tensors_file(path, n=n, shape=shape, extra={"y": torch.arange(n)})
    return load_data(f"tensors:{path}")


def test_loader_order_is_torch_randperm_of_the_seed(tmp_path):
    ds = _indexed(tmp_path)
    x = ds.x
    loader = ds.loader(5, shuffle=True, seed=7)
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == 5
    batches = list(loader)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(7))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([y for _, y in batches]), order)
    assert torch.equal(torch.cat([b for b, _ in batches]), x[order])
    assert torch.equal(torch.cat([y for _, y in ds.loader(5)]), torch.arange(23))
    assert torch.equal(torch.cat([b for b, _ in ds.loader(5)]), x)
    assert [len(y) for _, y in ds.loader(5, drop_last=True)] == [5, 5, 5, 5]
    other = torch.cat([y for _, y in ds.loader(5, shuffle=True, seed=8)])
    assert not torch.equal(other, order)
    state = torch.random.get_rng_state()
    list(ds.loader(5, shuffle=True, augment="crop", seed=7))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is not used


def test_loader_batches_depend_on_the_seed_only(tmp_path):
    """Same seed: the same batches, twice, with 0 or 2 worker processes, and the same images
    whatever the batch size (each row's draws depend on its position); another seed differs."""
    ds = _indexed(tmp_path)

    def epoch(**kw):
        batches = list(ds.loader(kw.pop("batch_size", 4), shuffle=True, augment="crop-flip", **kw))
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    first = epoch(seed=3)
    for again in (epoch(seed=3), epoch(seed=3, workers=2), epoch(seed=3, batch_size=7)):
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    other = epoch(seed=4)
    by_row = other[0][torch.argsort(other[1])]  # labels are rows: the images row by row
    assert not torch.equal(by_row[first[1]], first[0])  # other crops, not only another order
    assert row_seed(3, 5) == row_seed(3, 5) != row_seed(3, 6) and row_seed(3, 5) != row_seed(4, 5)


def _shift_of(image: torch.Tensor, out: torch.Tensor, p: int) -> "list[tuple[int, int]]":
    """Every (dy, dx) in [-p, p]² for which ``out`` is ``image`` moved by (dy, dx), zero-filled."""
    h, w = image.shape[-2:]
    padded = F.pad(image, (p, p, p, p))
    return [(a - p, b - p) for a in range(2 * p + 1) for b in range(2 * p + 1)
            if torch.equal(padded[:, a:a + h, b:b + w], out)]


def test_crop_is_a_zero_filled_shift_by_at_most_the_padding(tmp_path):
    assert [pad_of(s) for s in (8, 28, 32, 64, 224)] == [1, 4, 4, 8, 28]
    assert grown(224) == 256 and grown(65) == 74
    for side, n in ((8, 120), (32, 30), (64, 8)):
        ds = _indexed(tmp_path, n=n, shape=(3, side, side), name=f"s{side}")
        x, (out, _) = ds.x, next(iter(ds.loader(n, augment="crop", seed=1)))
        assert out.shape == x.shape and out.dtype == torch.float32
        assert 0 <= float(out.min()) and float(out.max()) <= 1
        shifts = [_shift_of(x[i], out[i], pad_of(side)) for i in range(n)]
        assert all(len(s) == 1 for s in shifts), side  # each row: one shift within the padding
        moves = {s[0] for s in shifts}
        assert len(moves) > 1 and moves != {(0, 0)}, side  # the crop does change images
        if side == 8:  # every offset in [-1, 1]² is drawn
            assert moves == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}
        if side == 32:
            assert max(max(abs(a), abs(b)) for a, b in moves) > 2


def test_crop_flip_is_the_crop_or_its_horizontal_mirror(tmp_path):
    ds = _indexed(tmp_path, n=40, shape=(3, 12, 10))
    crop = next(iter(ds.loader(40, augment="crop", seed=2)))[0]
    flip = next(iter(ds.loader(40, augment="crop-flip", seed=2)))[0]
    mirrored = [not torch.equal(f, c) for f, c in zip(flip, crop)]
    for f, c, m in zip(flip, crop, mirrored):
        assert torch.equal(f, c.flip(-1) if m else c)
    assert 5 < sum(mirrored) < 35  # about half of the rows are mirrored


def test_augmentation_of_a_constant_image(tmp_path):
    """Flipping and the resize-crop of large inputs leave a constant image as it is; the padded
    crop keeps the constant everywhere but in the zero band it shifts in."""
    for side in (16, 72):
        const = torch.full((6, 3, side, side), 0.625)
        for augment in ("crop", "crop-flip"):
            out = augment_batch(const, range(6), augment, seed=0)
            if side > 64:
                assert torch.equal(out, const), (side, augment)
            else:
                p = pad_of(side)
                assert torch.equal(out[..., p:-p, p:-p], const[..., p:-p, p:-p])
                assert set(out.unique().tolist()) <= {0.0, 0.625}
                assert [len(_shift_of(c, o, p)) for c, o in zip(const, out)] != [0] * 6
        flip = augment_batch(torch.zeros(4, 1, 8, 8), range(4), "crop-flip", seed=0)
        assert torch.equal(flip, torch.zeros(4, 1, 8, 8))


def test_large_inputs_are_resized_up_then_cropped(tmp_path):
    """Above 64 px: resize to round(side * 8 / 7) (bilinear, antialias), then a side x side crop
    (Resize(256) -> RandomCrop(224)); 64 px and below: the padded crop."""
    ds = _indexed(tmp_path, n=6, shape=(3, 65, 65))
    x = ds.x
    out = next(iter(ds.loader(6, augment="crop", seed=5)))[0]
    assert out.shape == (6, 3, 65, 65)
    up = F.interpolate(x, size=(74, 74), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    offsets = []
    for i in range(6):
        found = [(a, b) for a in range(10) for b in range(10)
                 if torch.equal(up[i, :, a:a + 65, b:b + 65], out[i])]
        assert len(found) == 1, i
        offsets += found
    assert len(set(offsets)) > 1
    assert 0 <= float(out.min()) and float(out.max()) <= 1


def test_loader_and_augment_option_errors(tmp_path):
    ds = _indexed(tmp_path, n=4)
    with pytest.raises(ConfigError, match="none, crop, crop-flip"):
        ds.loader(2, augment="flip")
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="batch size"):
            ds.loader(bad)


def test_resolve_augment(tmp_path, no_md5):
    make_cifar10(tmp_path, n_per_split=2)
    make_cifar100(tmp_path, n_per_split=2)
    make_mnist(tmp_path, n_per_split=2)
    make_fashion_mnist(tmp_path, n_per_split=2)
    make_image_folder(tmp_path / "f", classes=("a",), n_per_class=1, size=4)
    make_tensors_file(tmp_path / "t.pt", n=2)
    expected = {"cifar10": "crop-flip", "cifar100": "crop-flip", "fashion-mnist": "crop-flip",
                f"folder:{tmp_path / 'f'}": "crop-flip", "mnist": "crop", "digits": "crop",
                f"tensors:{tmp_path / 't.pt'}": "none", "dsprites:shape": "none",
                "dsprites:orientation": "none"}
    for spec, auto in expected.items():
        ds = load_data(spec, root=tmp_path / ("ds" if spec.startswith("dsprites") else ""), n=2)
        assert resolve_augment(ds, "auto") == auto, spec
        for given in ("none", "crop", "crop-flip"):
            assert resolve_augment(ds, given) == given
    with pytest.raises(ConfigError, match="valid: auto, none, crop, crop-flip"):
        resolve_augment(ds, "flip")
