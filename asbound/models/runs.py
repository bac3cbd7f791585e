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

from asbound.errors import AsboundError, ModelError, describe
from asbound.specs import InputFormat, ModelSpec

if TYPE_CHECKING:
    from asbound.models.split import SplitModel

#: what a finished transfer run directory holds
RUN_CONFIG = "config.json"
RUN_WEIGHTS = "model.pt"
RUN_KIND = "transfer"


def read_run_config(path: "str | Path") -> dict:
    """The recorded configuration of the transfer run in ``path``, checked to be a finished run
    whose config holds what rebuilding its model reads."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"run:{path}: {folder} is not a directory; run:DIR names an `asbound transfer` run directory")
    config_path = folder / RUN_CONFIG
    lost = "the run cannot be rebuilt without it; rerun its `asbound transfer` command into another --out"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        config = None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"run:{path}: {config_path} cannot be read ({describe(exc)}); {lost}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"run:{path}: {config_path} is damaged (not JSON: {exc.msg.removesuffix(' at')} at line "
                         f"{exc.lineno} column {exc.colno}); {lost}") from None
    if not isinstance(config, dict) or config.get("kind") != RUN_KIND:
        found = next((what for marker, what in _OTHER_RUNS if (folder / marker).exists()), None) or (
            f"no {RUN_CONFIG}" if config is None else f"its {RUN_CONFIG} is of kind {config.get('kind')!r}"
            if isinstance(config, dict) else f"its {RUN_CONFIG} is not an object")
        inside = sorted(f"run:{p}" for p in folder.iterdir() if (p / RUN_WEIGHTS).is_file())
        if inside:  # several methods (OUT/<method>), or a sweep of transfer cells
            found += f"; the transfer runs in it: {', '.join(inside[:3])}" + (" ..." if len(inside) > 3 else "")
        raise ModelError(
            f"run:{path}: {folder} holds no `asbound transfer` run ({found}); run:DIR names the --out "
            f"directory of one transfer method"
        )
    problem = _config_problem(config)
    if problem:
        raise ModelError(f"run:{path}: {config_path} is damaged or not asbound's ({problem}); {lost}")
    if not (folder / RUN_WEIGHTS).is_file():
        raise ModelError(
            f"run:{path}: the transfer run in {folder} has not finished training (no {RUN_WEIGHTS}); "
            f"rerun its `asbound transfer` command to resume it"
        )
    return config


#: the records of the other kinds of run directory, and what to call them
_OTHER_RUNS = (("summary.json", "a score run"), ("sweep.json", "a sweep"), ("predict.json", "a prediction"))


def _config_problem(config: dict) -> Optional[str]:
    """What in a transfer run's config is not as :func:`load_run` reads it, or None."""
    base = config.get("base")
    if not isinstance(base, dict):
        return f"its base is {type(base).__name__ if base is not None else 'missing'}, not an object"
    if not isinstance(base.get("model"), str):
        return "its base has no model spec"
    shape = base.get("input_shape")
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s >= 1 for s in shape)):
        return f"its base's input_shape {shape!r} is not a list of sizes"
    for key in ("model_dir", "weights", "builtin_head", "feature_layer"):
        if base.get(key) is not None and not isinstance(base[key], str):
            return f"its base's {key} {base[key]!r} is not a string"
    classes = config.get("num_classes")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        return f"num_classes {classes!r} is not a whole number >= 1"
    structure = config.get("structure")
    if structure is not None:
        return _structure_problem(structure)
    return None


def _structure_problem(structure: object) -> Optional[str]:
    """What in a saved PEFT structure (``config.json``'s ``structure``) is not as
    :meth:`~asbound.models.peft.PeftSpec.from_record` reads it, or None."""
    import dataclasses

    from asbound.models.peft import PeftSpec

    if not isinstance(structure, dict):
        return "its structure is not an object"
    if not structure:
        return None
    types = {f.name: f.type for f in dataclasses.fields(PeftSpec)}
    unknown = sorted(set(structure) - set(types))
    if unknown:
        return f"its structure has the key {unknown[0]!r}; a saved structure has {', '.join(types)}"
    kinds = {"str": (str, "a string"), "int": (int, "a whole number"), "float": ((int, float), "a number"),
             "bool": (bool, "true or false")}
    for key, value in structure.items():
        expected, text = kinds[str(types[key])]
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            return f"its structure's {key} {value!r} is not {text}"
    if "variant" not in structure:
        return "its structure has no variant"
    return None


def with_run_weights(split: SplitModel, num_classes: int, folder: Path, structure: "dict | None" = None) -> SplitModel:
    """``split`` with a ``Linear(m, num_classes)`` head, the run's saved ``structure`` (adapters)
    rebuilt, and the run's trained weights (``model.pt``, ``weights_only=True``) loaded into all of it."""
    from asbound.models.loaders import load_tensor_file, load_weights
    from asbound.models.peft import rebuild_structure

    split = rebuild_structure(split.with_head(nn.Linear(split.feature_dim, num_classes)), structure)
    path = folder / RUN_WEIGHTS
    retrain = (f"delete {RUN_WEIGHTS} and final.json and rerun the run's `asbound transfer` command: "
               f"they are rebuilt from its checkpoints (or trained again)")
    state = load_tensor_file(path, f"run:{folder}:", retrain)
    if not isinstance(state, dict):
        raise ModelError(f"run:{folder}: {path} holds {type(state).__name__}, not a state dict; {retrain}")
    load_weights(split, state, f"run:{folder}: the trained weights in {path} do not fit the model rebuilt "
                 f"from its {RUN_CONFIG}", retrain)
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
    try:
        loaded = load_model(
            base["model"], model_dir=base.get("model_dir"), weights=base.get("weights"),
            allow_pickle=allow_pickle, download=download, builtin_head=base.get("builtin_head"),
        )
    except AsboundError as exc:
        raise ModelError(f"run:{spec.name}: its base model {base['model']} (in {folder / RUN_CONFIG}) "
                         f"does not load: {exc}") from None
    shape = tuple(int(s) for s in base["input_shape"])
    probe = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    try:
        split = split_model(loaded.module, probe, feature_layer=base.get("feature_layer"))
    except RuntimeError as exc:  # the base model cannot run on the recorded input shape
        raise ModelError(f"run:{spec.name}: {folder / RUN_CONFIG} is damaged or not asbound's (its base model "
                         f"{base['model']} cannot run on its input_shape {list(shape)}: {describe(exc)}); the run "
                         f"cannot be rebuilt without it; rerun its `asbound transfer` command into another "
                         f"--out") from None
    split = with_run_weights(split, int(config["num_classes"]), folder, config.get("structure"))
    # the run trained on inputs of this shape (after its --resize, if any)
    input_format = InputFormat(*shape) if len(shape) == 3 else loaded.input_format
    notes = [f"transfer run {folder} ({config.get('method')}) on {base['model']}", *loaded.notes]
    return split.eval(), input_format, notes, {"data": config.get("data"), "classes": config.get("classes")}
