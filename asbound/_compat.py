"""Shims for third-party packages, applied in exactly one place.

* robustbench 1.1.1 imports ``autoattack``, which PyPI ships as ``pyautoattack``: alias the
  module before the first robustbench import.
* importing robustbench warns about ``pkg_resources``, ``torch.jit`` and timm's moved modules:
  those warnings are silenced for the import only.
* torch >= 2.6 loads checkpoints with ``weights_only=True``; zoo checkpoints that hold numpy
  scalars or an ``argparse.Namespace`` need those types allow-listed (never a silent fallback to
  unrestricted unpickling).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
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


def _quiet_import_warnings() -> None:
    """Filters for the deprecation noise that importing robustbench (and timm, torch.jit) emits."""
    warnings.filterwarnings("ignore", message=r".*pkg_resources", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*pkg_resources", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"Importing from timm", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(robustbench|timm|pyautoattack|autoattack)")


def import_robustbench() -> ModuleType:
    """Import robustbench with the ``autoattack`` alias in place; a missing install gives a hint."""
    with warnings.catch_warnings():
        _quiet_import_warnings()
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
