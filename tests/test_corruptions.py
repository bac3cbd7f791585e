"""Corruptions against the published CIFAR-10-C script (hendrycks/robustness make_cifar_c.py) on
fixed seeds, per-image determinism, the ImageNet-C set, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import zoom as scizoom

from asbound.cli import main
from asbound.data import load_data
from asbound.data.corruptions import CIFAR_C, Corruption, corrupt, corruption_of, parse_corruption
from asbound.errors import ConfigError, DataError

# --- the script's own formulas, written out here as the reference ------------------------------


def _script_clipped_zoom(img, z):
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    img = scizoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
    t = (img.shape[0] - h) // 2
    return img[t:t + h, t:t + h]


def _script(name, img_uint8, severity, seed):
    """make_cifar_c.py on one HxWxC uint8 image with numpy's global generator seeded, stored as uint8."""
    np.random.seed(seed)
    x = np.array(img_uint8) / 255.0
    if name == "gaussian_noise":
        c = [0.04, 0.06, .08, .09, .10][severity - 1]
        out = np.clip(x + np.random.normal(size=x.shape, scale=c), 0, 1) * 255
    elif name == "zoom_blur":
        c = [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
             np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)][severity - 1]
        x = x.astype(np.float32)
        acc = np.zeros_like(x)
        for z in c:
            acc += _script_clipped_zoom(x, z)
        out = np.clip((x + acc) / (len(c) + 1), 0, 1) * 255
    elif name == "contrast":
        c = [.75, .5, .4, .3, 0.15][severity - 1]
        means = np.mean(x, axis=(0, 1), keepdims=True)
        out = np.clip((x - means) * c + means, 0, 1) * 255
    elif name == "shot_noise":
        c = [500, 250, 100, 75, 50][severity - 1]
        out = np.clip(np.random.poisson(x * c) / c, 0, 1) * 255
    elif name == "speckle_noise":
        c = [.06, .1, .12, .16, .2][severity - 1]
        out = np.clip(x + x * np.random.normal(size=x.shape, scale=c), 0, 1) * 255
    elif name == "gaussian_blur":
        from skimage.filters import gaussian

        c = [.4, .6, 0.7, .8, 1][severity - 1]
        out = np.clip(gaussian(x, sigma=c, channel_axis=-1), 0, 1) * 255  # multichannel=True then
    elif name in ("brightness", "saturate"):
        import skimage.color

        hsv = skimage.color.rgb2hsv(x)
        if name == "brightness":
            c = [.05, .1, .15, .2, .3][severity - 1]
            hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
        else:
            c = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][severity - 1]
            hsv[:, :, 1] = np.clip(hsv[:, :, 1] * c[0] + c[1], 0, 1)
        out = np.clip(skimage.color.hsv2rgb(hsv), 0, 1) * 255
    return np.uint8(out)


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def _ours(name, img_uint8, severity, seed):
    x = torch.from_numpy(img_uint8).permute(2, 0, 1).float()[None] / 255
    out = corrupt(x, parse_corruption(name, severity, "cifar"), [seed])[0]
    return np.round(out.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["gaussian_noise", "zoom_blur", "contrast", "shot_noise", "speckle_noise",
                                  "gaussian_blur", "brightness", "saturate"])
@pytest.mark.parametrize("severity", [1, 2, 5])
def test_cifar_c_corruptions_match_the_published_script(image, name, severity):
    expected = _script(name, image, severity, seed=123)
    # our per-image generator is a RandomState seeded the same way as the script's global one
    np.testing.assert_array_equal(_ours(name, image, severity, 123), expected)


def test_the_published_cifar_c_parameters():
    # seed 001 Table 11: Gaussian noise sigma 0.04 / 0.06 / 0.10 at severities 1 / 2 / 5, zoom
    # blur [1, 1.06] / [1, 1.11] / [1, 1.26]
    assert CIFAR_C["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert "sigma 0.06" in parse_corruption("gaussian_noise", 2).describe()
    assert "zooms 1.00-1.06 step 0.01 (7)" in parse_corruption("zoom_blur", 1).describe()
    assert "zooms 1.00-1.11 step 0.01 (12)" in parse_corruption("zoom_blur", 2).describe()
    assert "zooms 1.00-1.25 step 0.01 (26)" in parse_corruption("zoom_blur", 5).describe()
    assert "CIFAR-10-C" in parse_corruption("zoom_blur", 5).describe()
    # the script's np.arange(1, END, 0.01): END itself at 1.06 and 1.11 (float steps), else one short
    for severity, (count, last) in enumerate([(7, 1.06), (12, 1.11), (16, 1.15), (21, 1.20), (26, 1.25)], 1):
        assert f"zooms 1.00-{last:.2f} step 0.01 ({count})" in parse_corruption("zoom_blur", severity).describe()
    assert CIFAR_C["zoom_blur"] == (1.06, 1.11, 1.16, 1.21, 1.26)
    assert parse_corruption("brightness", 3).describe() == (
        "brightness severity 3 (CIFAR-10-C parameters: HSV value + 0.15)")


def test_one_channel_and_non_square_images_keep_their_shape():
    x = torch.rand(2, 1, 12, 20)
    for name in ("zoom_blur", "brightness", "saturate", "gaussian_blur", "contrast"):
        out = corrupt(x, parse_corruption(name, 5), [0, 1])
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    # brightness on a grey image: HSV value + c on every pixel, i.e. the grey level + c (truncated to k/255)
    grey = torch.randint(0, 200, (1, 1, 8, 8)).float() / 255
    out = corrupt(grey, parse_corruption("brightness", 5), [0])
    np.testing.assert_array_equal(np.round(out.numpy() * 255), np.floor(np.clip(grey.double().numpy() + 0.3, 0, 1) * 255 + 1e-9))


def test_missing_packages_are_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("skimage", "imagecorruptions")
                        else real(name, *a))
    for args in (("brightness", 1), ("fog", 1)):
        with pytest.raises(ConfigError, match=r"^corruption .* needs \w+, which is not installed; "
                                              r"pip install 'asbound\[corruptions\]'$"):
            corruption_of(*args)
    assert corruption_of("zoom_blur", 1) == Corruption("zoom_blur", 1, "cifar")  # numpy and scipy only


@pytest.mark.parametrize("severity, sigma", [(1, 0.04), (2, 0.06), (5, 0.10)])
def test_gaussian_noise_has_the_severitys_sigma(severity, sigma):
    x = torch.full((16, 3, 32, 32), 0.5)  # far from the clipping bounds
    out = corrupt(x, parse_corruption("gaussian_noise", severity), list(range(16)))
    noise = (out - x).flatten()
    assert float(noise.std()) == pytest.approx(sigma, rel=0.03)
    assert float(noise.mean()) == pytest.approx(-0.5 / 255, abs=0.002)  # truncation to uint8 loses half a level
    assert torch.equal(torch.round(out * 255) / 255, out)  # stored as k / 255


def test_each_image_is_corrupted_the_same_in_any_batch():
    full = load_data("digits", n=20, corruption=parse_corruption("gaussian_noise", 5))
    x = full.batch(torch.arange(20))
    assert torch.equal(full.batch(torch.tensor([7, 3])), x[[7, 3]])
    assert torch.equal(full.subset(torch.arange(5, 10)).batch(torch.arange(5)), x[5:10])
    other = load_data("digits", n=20, seed=1, corruption=parse_corruption("gaussian_noise", 5))
    assert not torch.equal(other.batch(torch.arange(20)), x)  # another seed, other noise
    clean = load_data("digits", n=20).batch(torch.arange(20))
    assert not torch.equal(clean, x)
    assert "corrupt: gaussian_noise severity 5 (CIFAR-10-C parameters: sigma 0.1)" in full.transforms[-1]


@pytest.mark.parametrize("channels", [1, 3])
def test_imagenet_parameter_set(channels):
    pytest.importorskip("imagecorruptions")
    from importlib.metadata import version
    x = torch.rand(3, channels, 32, 32)
    for name in ("glass_blur", "fog", "gaussian_noise"):
        c = parse_corruption(name, 2, "imagenet")
        assert c.params == "imagenet" and "ImageNet-C parameters" in c.describe()
        assert c.describe().endswith(f"imagecorruptions {version('imagecorruptions-imaug')})")
        a = corrupt(x, c, [1, 2, 3])
        b = corrupt(x[1:], c, [2, 3])
        assert a.shape == x.shape and torch.equal(a[1:], b)  # glass blur too: its seed is passed
        assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    # ImageNet-C's Gaussian noise is the stronger one (sigma 0.12 vs CIFAR-10-C's 0.06 at severity 2)
    mid = torch.full((4, 3, 32, 32), 0.5)
    strong = corrupt(mid, parse_corruption("gaussian_noise", 2, "imagenet"), [0, 1, 2, 3]) - mid
    weak = corrupt(mid, parse_corruption("gaussian_noise", 2, "cifar"), [0, 1, 2, 3]) - mid
    assert float(strong.std()) == pytest.approx(2 * float(weak.std()), rel=0.1)


def test_auto_takes_cifar_c_where_it_exists():
    assert parse_corruption("zoom_blur", 1).params == "cifar"
    assert parse_corruption("fog", 1).params == "imagenet"
    assert parse_corruption("brightness", 1).params == "cifar"  # CIFAR-10-C's, ported from the script
    assert parse_corruption("zoom_blur", 1, "imagenet").params == "imagenet"
    assert corruption_of(None, None) is None
    assert corruption_of("contrast", 3) == Corruption("contrast", 3, "cifar")


@pytest.mark.parametrize(
    "args, message",
    [
        (("blur", 1), "unknown corruption 'blur'; valid: brightness, contrast, defocus_blur"),
        (("blur", 1, "cifar"), "unknown corruption 'blur'; valid: brightness, contrast, defocus_blur"),
        (("fog", 1, "cifar"), "corruption 'fog' has no CIFAR-10-C parameter set; valid with "
                              "--corruption-params cifar: brightness, contrast, gaussian_blur"),
        (("zoom_blur", 0), "severity 0 is not valid; valid: 1, 2, 3, 4, 5"),
        (("zoom_blur", 6), "severity 6 is not valid"),
        (("zoom_blur", 2.5), "severity 2.5 is not valid"),
        (("zoom_blur", 1, "tiny"), "corruption parameters 'tiny' are not valid; valid: auto, cifar, imagenet"),
    ],
)
def test_bad_corruptions(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_corruption(*args)


def test_imagenet_corruptions_need_32_pixels():
    with pytest.raises(DataError, match="needs images of at least 32x32, these are 8x8; give --resize 32"):
        load_data("digits", n=4, corruption=parse_corruption("fog", 1))


def test_score_with_a_corruption_records_it_and_changes_the_points(tmp_path):
    common = ["score", "--model", "builtin:digits-adversarial", "--data", "digits", "--classes", "0-4", "--n", "20",
              "--steps", "2", "--device", "cpu", "--no-progress", "--json"]
    assert main([*common, "--out", str(tmp_path / "clean")]) == 0
    assert main([*common, "--corruption", "gaussian_noise", "--severity", "5", "--out", str(tmp_path / "c5")]) == 0
    config = json.loads((tmp_path / "c5" / "config.json").read_text())
    assert config["corruption"] == "gaussian_noise" and config["severity"] == 5
    assert any("gaussian_noise severity 5 (CIFAR-10-C parameters: sigma 0.1)" in t for t in config["transforms"])
    clean = (tmp_path / "clean" / "points.csv").read_text()
    assert clean != (tmp_path / "c5" / "points.csv").read_text()
    # a run recorded before the corruption options existed resumes (they count as their defaults)
    old = json.loads((tmp_path / "clean" / "config.json").read_text())
    for key in ("corruption", "severity", "corruption_params"):
        del old[key]
    (tmp_path / "clean" / "config.json").write_text(json.dumps(old))
    assert main([*common, "--out", str(tmp_path / "clean")]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--corruption", "zoom_blur"], "--corruption zoom_blur needs --severity 1-5"),
        (["--severity", "2"], "--severity 2 needs --corruption NAME"),
        (["--corruption", "zoom", "--severity", "2"], "unknown corruption 'zoom'"),
        (["--corruption", "zoom_blur", "--severity", "9"], "severity 9 is not valid"),
    ],
)
@pytest.mark.parametrize("command", ["score", "transfer"])
def test_bad_corruption_options_are_one_line(tmp_path, capsys, extra, message, command):
    out = tmp_path / "out"
    argv = [command, "--model", "builtin:digits-adversarial", "--data", "digits", *extra, "--out", str(out)]
    if command == "transfer":
        argv += ["--method", "lp"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("asbound: error:")
    assert not out.exists()


def test_corrupted_images_are_kept_and_stay_the_same(monkeypatch):
    import asbound.data.base as base
    import asbound.data.corruptions as corruptions

    calls = []
    real = corruptions.corrupt
    monkeypatch.setattr(corruptions, "corrupt", lambda x, c, seeds: calls.append(len(x)) or real(x, c, seeds))
    data = load_data("digits", n=12, corruption=parse_corruption("zoom_blur", 3))
    first = data.batch(torch.arange(12))
    again = data.subset(torch.arange(4, 12)).batch(torch.tensor([3, 0, 3]))
    assert calls == [12] and torch.equal(again, first[[7, 4, 7]])
    # beyond the cache's bytes every batch is corrupted afresh, with the same result
    monkeypatch.setattr(base, "CORRUPTED_CACHE_BYTES", 0)
    fresh = load_data("digits", n=12, corruption=parse_corruption("zoom_blur", 3))
    assert torch.equal(fresh.batch(torch.arange(12)), first) and torch.equal(fresh.batch(torch.arange(12)), first)
    assert calls == [12, 12, 12]


def test_transfer_corrupts_training_evaluation_and_scores(tmp_path):
    from asbound.transfer import TransferConfig, transfer

    cfg = TransferConfig(model="builtin:digits-adversarial", data="digits", classes="5-9", method="lp", epochs=1,
                         n=60, n_test=20, score_n=10, score_steps=2, eval_steps=(2,), attack_steps=2, batch_size=64,
                         corruption="zoom_blur", severity=2, device="cpu")
    transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)
    described = "corrupt: zoom_blur severity 2 (CIFAR-10-C parameters: zooms 1.00-1.11 step 0.01 (12))"
    for where in ("", "score/before/", "score/after/"):
        config = json.loads((tmp_path / "run" / f"{where}config.json").read_text())
        assert config["corruption"] == "zoom_blur" and config["severity"] == 2, where
        assert any(t.startswith(described) for t in config["transforms"]), where
