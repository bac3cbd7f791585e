"""``run:DIR``: a finished transfer run as a model.

A transfer run directory records the base model's spec and options in ``config.json`` and the
trained weights of the split model (``backbone.*``, ``head.*``) in ``model.pt``. Loading rebuilds
the base model from its spec, splits it as the run did, puts a ``Linear(m, K)`` head on it and
loads the trained weights with ``weights_only=True`` and ``strict=True``: no unpickling of the
run's files, no silently dropped weights. A base model given as ``file:PATH`` is unpickled, so
it needs ``--allow-pickle`` again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from asbound.errors import ModelError, describe
from asbound.specs import InputFormat, ModelSpec

if TYPE_CHECKING:
    from asbound.models.split import SplitModel

#: what a finished transfer run directory holds
RUN_CONFIG = "config.json"
RUN_WEIGHTS = "model.pt"
RUN_KIND = "transfer"


def read_run_config(path: "str | Path") -> dict:
    """The recorded configuration of the transfer run in ``path``, checked to be a finished run."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"run:{path}: {folder} is not a directory; run:DIR names an `asbound transfer` run directory")
    config_path = folder / RUN_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("kind") != RUN_KIND:
        raise ModelError(
            f"run:{path}: {folder} holds no `asbound transfer` run (no {RUN_CONFIG} of kind {RUN_KIND!r}); "
            f"run:DIR names the --out directory of one transfer method"
        )
    if not (folder / RUN_WEIGHTS).is_file():
        raise ModelError(
            f"run:{path}: the transfer run in {folder} has not finished training (no {RUN_WEIGHTS}); "
            f"rerun its `asbound transfer` command to resume it"
        )
    return config


def with_run_weights(split: SplitModel, num_classes: int, folder: Path, structure: "dict | None" = None) -> SplitModel:
    """``split`` with a ``Linear(m, num_classes)`` head, the run's saved ``structure`` (adapters)
    rebuilt, and the run's trained weights (``model.pt``, ``weights_only=True``) loaded into all of it."""
    from asbound.models.peft import rebuild_structure

    split = rebuild_structure(split.with_head(nn.Linear(split.feature_dim, num_classes)), structure)
    try:
        state = torch.load(folder / RUN_WEIGHTS, map_location="cpu", weights_only=True)
        split.load_state_dict(state, strict=True)
    except Exception as exc:  # an unloadable file, or weights that do not fit the rebuilt model
        raise ModelError(f"run:{folder}: the trained weights in {folder / RUN_WEIGHTS} do not load "
                         f"into the rebuilt model ({describe(exc)})") from None
    return split


def load_run(
    spec: ModelSpec, *, allow_pickle: bool = False, download: bool = False
) -> "tuple[nn.Module, Optional[InputFormat], list[str], dict]":
    """The trained split model of ``run:DIR``, its input format, notes for the record, and what it
    was trained on (``{"data", "classes"}``)."""
    from asbound.models.loaders import load_model
    from asbound.models.split import split_model

    folder = Path(spec.name).expanduser()
    config = read_run_config(folder)
    base = config["base"]
    loaded = load_model(
        base["model"], model_dir=base.get("model_dir"), weights=base.get("weights"),
        allow_pickle=allow_pickle, download=download, builtin_head=base.get("builtin_head"),
    )
    shape = tuple(int(s) for s in base["input_shape"])
    probe = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    split = split_model(loaded.module, probe, feature_layer=base.get("feature_layer"))
    split = with_run_weights(split, int(config["num_classes"]), folder, config.get("structure"))
    # the run trained on inputs of this shape (after its --resize, if any)
    input_format = InputFormat(*shape) if len(shape) == 3 else loaded.input_format
    notes = [f"transfer run {folder} ({config.get('method')}) on {base['model']}", *loaded.notes]
    return split.eval(), input_format, notes, {"data": config.get("data"), "classes": config.get("classes")}
