"""Devices and precision: CUDA when present, mixed precision for training only.

Every reported number (accuracies, losses, AS scores, margins) is computed in float32; low
precision (``--amp``) speeds up the training passes on a GPU and nothing else.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from asbound.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when torch sees a device, else the CPU; ``cuda`` without a device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not valid; valid: auto, cpu, cuda, cuda:N") from None


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for training: ``auto`` is bf16 on CUDA and off on the CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp {amp!r} is not valid; valid: auto, off, {', '.join(AMP_DTYPES)}")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or off")
    return AMP_DTYPES[amp]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (``avx512_bf16`` or ``amx_bf16``); without it torch
    emulates bf16 and autocast runs many times slower than float32 (30x on an AVX2 CPU here)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def attack_amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for an attack's gradient passes: ``auto`` is bf16 on CUDA (fp16 where
    the GPU has no bf16) and float32 on the CPU, so that a run's records are the same on every CPU
    whether or not it computes bf16 natively (``--amp bf16`` opts in). The objective at each kept
    point is re-evaluated in float32 (:class:`asbound.attacks.FastObjective`)."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return amp_dtype(amp, device)


def memory_format(amp: Optional[torch.dtype]) -> torch.memory_format:
    """Channels-last with mixed precision (tensor cores on CUDA, bf16 kernels on the CPU), where
    convolutions run fastest in it; the default layout in float32."""
    return torch.channels_last if amp is not None else torch.contiguous_format


def to_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``x`` in memory format ``fmt`` when it is an image batch ([N, C, H, W]), else unchanged."""
    return x.contiguous(memory_format=fmt) if x.dim() == 4 and fmt != torch.contiguous_format else x


@contextlib.contextmanager
def float32_exact() -> Iterator[None]:
    """IEEE float32 matrix products and convolutions on CUDA for the block: cuDNN and cuBLAS run
    float32 in TF32 by default, which rounds to 10 bits (about 3e-4), far above what a recorded
    float32 number may carry; nothing changes on the CPU."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
