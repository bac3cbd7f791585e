"""The small models shipped with asbound, for offline runs and demos.

``builtin:lenet-{random,standard,adversarial}[/HEAD]``: the LeNet of seed 001 Table 6 on
64x64 dSprites, at random initialisation, trained on orientation regression, and adversarially
trained on it (L-inf PGD), as in seed 001 B.2. Each carries linear heads for the dSprites
factors (``orientation``, ``scale``, ``posx``, ``posy``: regression, one output; ``shape``: a
3-class classifier), trained by linear probing on the frozen representation. The weights and
the record of the run that made them come from ``analyses/train_builtin.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from asbound.builtin.lenet import LeNet
from asbound.errors import ModelError
from asbound.specs import InputFormat, ModelSpec

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILTINS = {
    "lenet-random": "LeNet (seed 001 Table 6), random initialisation, linear-probe heads",
    "lenet-standard": "LeNet trained on dSprites orientation regression, linear-probe heads",
    "lenet-adversarial": "LeNet adversarially trained (L-inf PGD) on dSprites orientation, linear-probe heads",
}
HEADS = ("orientation", "scale", "posx", "posy", "shape")
DEFAULT_HEAD = "orientation"
INPUT_FORMAT = InputFormat(1, 64, 64)


def list_builtins() -> "list[str]":
    return sorted(BUILTINS)


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.pt"


def load_checkpoint(name: str) -> dict:
    """The shipped state: ``{"features": state_dict, "heads": {factor: {weight, bias}}, "meta": {...}}``."""
    path = weights_path(name)
    if not path.is_file():
        raise ModelError(
            f"the weights of builtin:{name} are missing at {path}; reinstall asbound or "
            f"regenerate them with `python analyses/train_builtin.py`"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def load_builtin(name: str, head: Optional[str]) -> "tuple[nn.Module, InputFormat, list[str], ModelSpec]":
    """Build ``builtin:NAME/HEAD``; ``head`` defaults to ``orientation``."""
    if name not in BUILTINS:
        raise ModelError(f"unknown builtin model {name!r}; valid: {', '.join(list_builtins())}")
    head = head or DEFAULT_HEAD
    if head not in HEADS:
        raise ModelError(f"builtin:{name} has no head {head!r}; valid heads: {', '.join(HEADS)}")
    state = load_checkpoint(name)
    head_state = state["heads"][head]
    model = LeNet(num_outputs=head_state["weight"].shape[0])
    model.features.load_state_dict(state["features"], strict=True)
    model.head.load_state_dict(head_state, strict=True)
    notes = [f"builtin weights {weights_path(name).name}, head {head}"]
    return model.eval(), INPUT_FORMAT, notes, ModelSpec("builtin", name, head=head)
