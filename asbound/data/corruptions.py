"""Corrupted images (distribution shift, seed 001 B.5): CIFAR-10-C's own parameters, or ImageNet-C's.

Two parameter sets, each image labelled with the one it used:

* ``cifar``: Hendrycks and Dietterich's CIFAR-10-C constants and algorithms, as their script
  ``ImageNet-C/create_c/make_cifar_c.py`` (github.com/hendrycks/robustness, commit 8190fe3) runs
  them on 32x32 images: Gaussian noise sigma 0.04 / 0.06 / 0.08 / 0.09 / 0.10, zoom blur averaging
  the image with its zooms by ``np.arange(1, e, 0.01)`` for e = 1.06 / 1.11 / 1.16 / 1.21 / 1.26
  (bilinear ``scipy.ndimage.zoom`` of the central crop), shot, impulse and speckle noise, contrast,
  Gaussian blur, brightness and saturation (the last four and impulse noise through scikit-image, which
  comes with ``asbound[corruptions]``). Seed 001 Table 11 states the Gaussian noise and zoom blur
  values (severities 1, 2, 5). Brightness and saturation work in HSV: a one-channel image is repeated
  to three channels and the mean of the three taken back (brightness keeps them equal).
* ``imagenet``: the 19 corruptions of the ``imagecorruptions`` package (``pip install
  'asbound[corruptions]'``; the fork ``imagecorruptions-imaug`` runs all 19 with numpy 2), whose
  ImageNet-C parameters are about twice as strong (Gaussian noise sigma 0.08 ... 0.38). It works
  on HxWx3 uint8 images: a one-channel image is repeated to three channels and the mean of the
  three taken back. It draws from numpy's global generator, which is seeded per image and restored.

As the script, the result is stored as uint8 (``np.uint8`` truncates), so every corrupted pixel is
``k / 255``. Image ``i`` is corrupted with a generator seeded by ``seeds[i]`` alone: its corruption
does not depend on the batch it comes in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from asbound.errors import ConfigError, DataError, describe

SEVERITIES = (1, 2, 3, 4, 5)
PARAM_SETS = ("auto", "cifar", "imagenet")
_SOURCE = "make_cifar_c.py, hendrycks/robustness 8190fe3"


def _zooms(end: float) -> np.ndarray:
    # the script's own call: np.arange's float steps make [1, 1.06) end at 1.06 (7 zooms), the
    # others one step short of their end (1.11: 12 zooms to 1.11; 1.16: 16 to 1.15; ...)
    return np.arange(1, end, 0.01)


#: CIFAR-10-C constants per corruption, severities 1-5 (make_cifar_c.py)
CIFAR_C: "dict[str, tuple]" = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # np.arange(1, END, 0.01)
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation * a + b
}
#: the CIFAR-10-C corruptions that run through scikit-image
_SKIMAGE = ("impulse_noise", "gaussian_blur", "brightness", "saturate")


def imagenet_names() -> "tuple[str, ...]":
    """The corruptions of the ``imagecorruptions`` package (ImageNet-C parameters)."""
    return ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
            "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
            "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate")


@dataclass(frozen=True)
class Corruption:
    """A corruption, its severity (1-5) and its parameter set (``cifar`` or ``imagenet``)."""

    name: str
    severity: int
    params: str

    def describe(self) -> str:
        if self.params == "imagenet":
            return f"{self.name} severity {self.severity} (ImageNet-C parameters, {_imagecorruptions_version()})"
        c = CIFAR_C[self.name][self.severity - 1]
        if self.name == "zoom_blur":
            z = _zooms(c)
            value = f"zooms {z[0]:.2f}-{z[-1]:.2f} step 0.01 ({len(z)})"
        elif self.name == "saturate":
            value = f"HSV saturation * {c[0]:g} + {c[1]:g}"
        elif self.name == "brightness":
            value = f"HSV value + {c:g}"
        else:
            key = {"gaussian_noise": "sigma", "shot_noise": "photons", "impulse_noise": "amount",
                   "speckle_noise": "sigma", "contrast": "factor", "gaussian_blur": "sigma"}[self.name]
            value = f"{key} {c:g}"
        return f"{self.name} severity {self.severity} (CIFAR-10-C parameters: {value})"


def _imagecorruptions_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return f"imagecorruptions {version(dist)}"
        except PackageNotFoundError:
            continue
    return "imagecorruptions"


def check_available(corruption: Corruption) -> None:
    """A ConfigError (one line) if the packages a corruption needs are not installed."""
    import importlib.util

    if corruption.params == "imagenet":
        module, what = "imagecorruptions", f"{corruption.name} with ImageNet-C parameters"
    elif corruption.name in _SKIMAGE:
        module, what = "skimage", f"{corruption.name} (CIFAR-10-C parameters)"
    else:
        return
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"corruption {what} needs {module}, which is not installed; "
                          f"pip install 'asbound[corruptions]'")


def parse_corruption(name: object, severity: object, params: str = "auto") -> Corruption:
    """Check a corruption; ``auto`` takes CIFAR-10-C's parameters where they define it."""
    if params not in PARAM_SETS:
        raise ConfigError(f"corruption parameters {params!r} are not valid; valid: {', '.join(PARAM_SETS)}")
    every = set(imagenet_names()) | set(CIFAR_C)
    if not isinstance(name, str) or name not in every:
        raise ConfigError(f"unknown corruption {name!r}; valid: {', '.join(sorted(every))}")
    if params == "cifar" and name not in CIFAR_C:
        raise ConfigError(f"corruption {name!r} has no CIFAR-10-C parameter set; valid with "
                          f"--corruption-params cifar: {', '.join(sorted(CIFAR_C))} (every corruption "
                          f"with --corruption-params auto or imagenet)")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ConfigError(f"corruption severity {severity!r} is not valid; valid: 1, 2, 3, 4, 5")
    resolved = params if params != "auto" else ("cifar" if name in CIFAR_C else "imagenet")
    if resolved == "imagenet" and name not in imagenet_names():
        raise ConfigError(f"corruption {name!r} has no ImageNet-C parameter set; valid: {', '.join(imagenet_names())}")
    return Corruption(name, int(severity), resolved)


# --- CIFAR-10-C, one image x: float64 [H, W, C] in [0, 1] --------------------------------------


def _clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    from scipy.ndimage import zoom

    # the script crops and trims a square of the height; rows and columns apart here, which is the
    # same on square images and keeps the shape of others
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / zoom_factor)), int(np.ceil(w / zoom_factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    img = zoom(img[top:top + ch, left:left + cw], (zoom_factor, zoom_factor, 1), order=1)
    trim_top, trim_left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[trim_top:trim_top + h, trim_left:trim_left + w]


def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.RandomState) -> np.ndarray:
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)


def _shot_noise(x: np.ndarray, c: float, rng: np.random.RandomState) -> np.ndarray:
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def _skimage(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError("this corruption needs scikit-image, which is not installed; "
                          "pip install 'asbound[corruptions]'") from None


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.RandomState) -> np.ndarray:
    random_noise = _skimage("skimage.util").random_noise

    return np.clip(random_noise(x, mode="s&p", amount=c, rng=int(rng.randint(0, 2**31 - 1))), 0, 1)


def _speckle_noise(x: np.ndarray, c: float, rng: np.random.RandomState) -> np.ndarray:
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1)


def _contrast(x: np.ndarray, c: float, rng: np.random.RandomState) -> np.ndarray:
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1)


def _gaussian_blur(x: np.ndarray, c: float, rng: np.random.RandomState) -> np.ndarray:
    # the script's gaussian(..., multichannel=True): per channel; scikit-image's defaults (mode
    # 'nearest', truncate 4) are unchanged since
    return np.clip(_skimage("skimage.filters").gaussian(x, sigma=c, channel_axis=-1), 0, 1)


def _hsv(x: np.ndarray, change: Callable[[np.ndarray], None]) -> np.ndarray:
    """RGB -> HSV, ``change`` it in place, back to RGB; one channel repeated to three and averaged back."""
    color = _skimage("skimage.color")
    grey = x.shape[2] == 1
    hsv = color.rgb2hsv(np.repeat(x, 3, axis=2) if grey else x)
    change(hsv)
    out = color.hsv2rgb(hsv)
    if grey:  # the mean of the three; where they are equal (brightness: everywhere) the value itself
        same = (out[:, :, :1] == out[:, :, 1:2]) & (out[:, :, :1] == out[:, :, 2:])
        out = np.where(same, out[:, :, :1], out.mean(axis=2, keepdims=True))
    return np.clip(out, 0, 1)


def _brightness(x: np.ndarray, c: float, rng: np.random.RandomState) -> np.ndarray:
    def change(hsv: np.ndarray) -> None:
        hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)

    return _hsv(x, change)


def _saturate(x: np.ndarray, c: "tuple[float, float]", rng: np.random.RandomState) -> np.ndarray:
    def change(hsv: np.ndarray) -> None:
        hsv[:, :, 1] = np.clip(hsv[:, :, 1] * c[0] + c[1], 0, 1)

    return _hsv(x, change)


def _zoom_blur(x: np.ndarray, c: float, rng: np.random.RandomState) -> np.ndarray:
    x = x.astype(np.float32)  # the script zooms in float32
    out = np.zeros_like(x)
    zooms = _zooms(c)
    for z in zooms:
        out += _clipped_zoom(x, z)
    return np.clip((x + out) / (len(zooms) + 1), 0, 1)


_CIFAR_FNS: "dict[str, Callable[[np.ndarray, Any, np.random.RandomState], np.ndarray]]" = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise, "contrast": _contrast, "zoom_blur": _zoom_blur,
    "gaussian_blur": _gaussian_blur, "brightness": _brightness, "saturate": _saturate,
}


def _as_uint8_grid(x: torch.Tensor) -> np.ndarray:
    """[C, H, W] float -> [H, W, C] float64; pixels on the k/255 grid become exactly k/255, as the
    script's ``np.array(uint8) / 255.``."""
    a = x.permute(1, 2, 0).double().numpy()
    k = np.round(a * 255)
    return k / 255.0 if np.all(np.abs(a * 255 - k) < 1e-3) else a


def _imagenet(x: np.ndarray, c: Corruption, seed: int) -> np.ndarray:
    try:
        from imagecorruptions import corrupt
    except ImportError:
        raise ConfigError(f"corruption {c.name} with ImageNet-C parameters needs imagecorruptions, which is not "
                          f"installed; pip install 'asbound[corruptions]'") from None
    grey = x.shape[2] == 1
    img = np.uint8(np.clip(np.round(x * 255), 0, 255))
    if grey:
        img = np.repeat(img, 3, axis=2)
    state = np.random.get_state()  # imagecorruptions draws from numpy's global generator
    try:
        np.random.seed(seed % 2**32)
        if c.name == "glass_blur":  # it draws from its own unseeded generator unless given a seed
            from imagecorruptions.corruptions import glass_blur

            out = np.asarray(np.uint8(glass_blur(img, c.severity, seed=seed % 2**32)), dtype=np.float64)
        else:
            out = np.asarray(corrupt(img, corruption_name=c.name, severity=c.severity), dtype=np.float64)
    except Exception as exc:  # the library's own checks (e.g. its minimum image size)
        raise DataError(f"imagecorruptions could not apply {c.name} to a {x.shape[0]}x{x.shape[1]} image: "
                        f"{describe(exc)}") from None
    finally:
        np.random.set_state(state)
    out = out[: x.shape[0], : x.shape[1]]  # a few corruptions return a slightly larger array
    if grey:
        out = out.mean(axis=2, keepdims=True)  # back to one channel: the mean of the three
    return np.clip(out, 0, 255) / 255.0


def corrupt(x: torch.Tensor, corruption: Corruption, seeds: Sequence[int]) -> torch.Tensor:
    """Corrupt images ``x`` (float32 [b, C, H, W] in [0, 1]); image ``i`` draws from a generator
    seeded by ``seeds[i]`` only. Returns float32 [b, C, H, W], every pixel ``k / 255``."""
    if len(seeds) != len(x):
        raise ValueError(f"{len(seeds)} seeds for {len(x)} images")
    out = torch.empty_like(x, dtype=torch.float32)
    for i in range(len(x)):
        img = _as_uint8_grid(x[i])
        seed = int(seeds[i]) % 2**32
        if corruption.params == "cifar":
            fn = _CIFAR_FNS[corruption.name]
            res = fn(img, CIFAR_C[corruption.name][corruption.severity - 1], np.random.RandomState(seed))
        else:
            res = _imagenet(img, corruption, seed)
        res = np.uint8(np.clip(res, 0, 1) * 255)  # the script's storage: truncation to uint8
        out[i] = torch.from_numpy(res.astype(np.float32) / 255.0).permute(2, 0, 1)
    return out


def corruption_of(name: Optional[str], severity: Optional[int], params: str = "auto") -> Optional[Corruption]:
    """The corruption of a run's options: None without one; a severity without a name (or the
    reverse) is a ConfigError."""
    if name is None and severity is None:
        return None
    if name is None:
        raise ConfigError(f"--severity {severity} needs --corruption NAME")
    if severity is None:
        raise ConfigError(f"--corruption {name} needs --severity 1-5")
    corruption = parse_corruption(name, severity, params)
    check_available(corruption)
    return corruption
