"""Shims for third-party packages, applied in exactly one place.

* robustbench 1.1.1 imports ``autoattack``, which PyPI ships as ``pyautoattack``: alias the
  module before the first robustbench import.
* torch >= 2.6 loads checkpoints with ``weights_only=True``; zoo checkpoints that hold numpy
  scalars or an ``argparse.Namespace`` need those types allow-listed (never a silent fallback to
  unrestricted unpickling).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from asbound.errors import ModelError

_SAFE_GLOBALS_ADDED = False


def allow_checkpoint_types() -> None:
    """Allow-list the benign non-tensor types found in zoo checkpoints for ``weights_only`` loads."""
    global _SAFE_GLOBALS_ADDED
    if _SAFE_GLOBALS_ADDED:
        return
    import numpy as np
    import torch

    safe: list = [argparse.Namespace, np.dtype, np.ndarray]
    safe += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool")]
    safe += [np.float32, np.float64, np.int64, np.int32, np.bool_]
    core = getattr(np, "_core", None) or getattr(np, "core")
    safe.append(core.multiarray.scalar)
    safe.append(core.multiarray._reconstruct)
    torch.serialization.add_safe_globals(safe)
    _SAFE_GLOBALS_ADDED = True


def import_robustbench() -> ModuleType:
    """Import robustbench with the ``autoattack`` alias in place; a missing install gives a hint."""
    try:
        sys.modules.setdefault("autoattack", importlib.import_module("pyautoattack"))
    except ImportError:
        pass  # robustbench raises its own ImportError below if it needs the module
    try:
        robustbench = importlib.import_module("robustbench")
        importlib.import_module("robustbench.utils")
        importlib.import_module("robustbench.model_zoo")
    except ImportError as exc:
        raise ModelError(
            f"robustbench is not importable ({exc}); install it with "
            f"`pip install -c constraints.txt robustbench==1.1.1 pyautoattack 'setuptools<81'`"
        ) from None
    allow_checkpoint_types()
    return robustbench
