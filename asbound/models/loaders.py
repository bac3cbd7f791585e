"""Loading models from every spec source: RobustBench, a saved module, torchvision, builtin, a run.

Each loader returns a :class:`LoadedModel`: the whole ``nn.Module`` (pixels in [0, 1] in,
normalisation inside), the input format it expects when known, and notes for the record.
Splitting into features and head happens afterwards, in :mod:`asbound.models.split`.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from asbound.defaults import default_model_dir
from asbound.errors import ModelError, describe
from asbound.specs import InputFormat, ModelSpec, parse_model_spec

ROBUSTBENCH_INPUT = {
    "cifar10": InputFormat(3, 32, 32),
    "cifar100": InputFormat(3, 32, 32),
    "imagenet": InputFormat(3, 224, 224),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    """A whole model as loaded, before the feature/head split."""

    module: nn.Module
    spec: ModelSpec
    input_format: Optional[InputFormat]
    notes: list[str] = field(default_factory=list)
    #: a ``run:DIR``'s training data and ``--classes`` (its head's labels mean those classes)
    trained_on: Optional[dict] = None


def load_model(
    spec: "ModelSpec | str",
    *,
    model_dir: "str | os.PathLike | None" = None,
    weights: "str | os.PathLike | None" = None,
    allow_pickle: bool = False,
    download: bool = False,
    builtin_head: Optional[str] = None,
) -> LoadedModel:
    """Load the model named by ``spec`` (see :mod:`asbound.specs` for the grammar)."""
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    if weights is not None and spec.source not in ("torchvision", "builtin"):
        raise ModelError(f"--weights applies to torchvision:ARCH and builtin:lenet-reference only, not {spec}")
    if spec.source == "robustbench":
        return _load_robustbench(spec, Path(model_dir) if model_dir else default_model_dir(), download)
    if spec.source == "file":
        return _load_file(spec, allow_pickle)
    if spec.source == "torchvision":
        return _load_torchvision(spec, weights)
    if spec.source == "run":
        from asbound.models.runs import load_run

        module, input_format, notes, trained_on = load_run(spec, allow_pickle=allow_pickle, download=download)
        return LoadedModel(module, spec, input_format, notes, trained_on)
    from asbound.builtin import load_builtin

    module, input_format, notes, resolved = load_builtin(spec.name, spec.head, builtin_head, weights)
    return LoadedModel(module, resolved, input_format, notes)


def _closest(name: str, names: "list[str]", n: int = 5) -> str:
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.4)
    return ", ".join(close) if close else ", ".join(sorted(names)[:n]) + ", ..."


def _robustbench_checkpoints(name: str, entry: dict, folder: Path) -> "list[Path]":
    """The files ``robustbench.utils.load_model`` reads for a zoo entry (ensembles: one per member)."""
    ids = entry.get("gdrive_id")
    if isinstance(ids, (list, tuple)):
        return [folder / f"{name}.pt_m{i}.pt" for i in range(len(ids))]
    return [folder / f"{name}.pt"]


def _load_robustbench(spec: ModelSpec, model_dir: Path, download: bool) -> LoadedModel:
    from asbound._compat import import_robustbench

    import_robustbench()
    import timm
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model as rb_load_model

    dataset = BenchmarkDataset(spec.dataset)
    threat = ThreatModel(spec.threat_model)
    # RobustBench evaluates the corruptions models on 3D corruptions too: same zoo, same folder
    stored = ThreatModel(threat.value.replace("_3d", ""))
    zoo = model_dicts[dataset].get(stored, {})
    if not zoo:
        raise ModelError(
            f"RobustBench has no {spec.dataset}/{spec.threat_model} models; threat models for "
            f"{spec.dataset}: {', '.join(t.value for t in model_dicts[dataset])}"
        )
    if spec.name not in zoo:
        raise ModelError(
            f"unknown RobustBench model {spec.name!r} for {spec.dataset}/{spec.threat_model} "
            f"({len(zoo)} entries); closest: {_closest(spec.name, list(zoo))}"
        )
    timm_name = f"{spec.name.lower().replace('-', '_')}_{dataset.value.lower()}_{stored.value.lower()}"
    if timm.is_model(timm_name) or zoo[spec.name].get("gdrive_id") is None:
        if not download:
            raise ModelError(
                f"{spec} is loaded by RobustBench through timm with pretrained weights from the "
                f"network, not from --model-dir; pass --download when online"
            )
        paths: "list[Path]" = []
    else:
        paths = _robustbench_checkpoints(spec.name, zoo[spec.name], model_dir / dataset.value / stored.value)
    missing = [p for p in paths if not p.is_file()]
    if missing and not download:
        raise ModelError(
            f"no checkpoint for {spec} at {missing[0]}"
            + (f" (and {len(missing) - 1} more ensemble members)" if len(missing) > 1 else "")
            + "; copy the RobustBench checkpoint there (layout MODEL_DIR/<dataset>/<threat_model>/"
            "<name>.pt, set MODEL_DIR with --model-dir) or pass --download when online"
        )
    where = ", ".join(map(str, paths)) or "timm"
    try:
        with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation in zoo constructors
            warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum)", category=UserWarning)
            module = rb_load_model(
                spec.name, model_dir=str(model_dir), dataset=dataset.value, threat_model=threat.value
            )
    except ModelError:
        raise
    except Exception as exc:  # robustbench raises many types; report the first line
        raise ModelError(f"RobustBench could not load {spec} from {where}: {describe(exc)}") from None
    notes = [f"checkpoint {p}" for p in paths] or ["timm pretrained weights"]
    return LoadedModel(module.eval(), spec, ROBUSTBENCH_INPUT[spec.dataset], notes)


def _load_file(spec: ModelSpec, allow_pickle: bool) -> LoadedModel:
    path = Path(spec.name).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ModelError(f"model file {str(path)!r} {what} (file:PATH expects a torch.save(model, PATH) file)")
    found = pickled_globals(path)
    if found is None:
        raise ModelError(f"{spec} {NOT_TORCH}; file:PATH expects torch.save(model, PATH)")
    if not found:  # tensors and containers only: it loads without unpickling code, and is no module
        obj = load_tensor_file(path, str(spec), "file:PATH expects torch.save(model, PATH)")
        raise ModelError(
            f"{spec} holds {type(obj).__name__} (a state dict?), not an nn.Module; file:PATH "
            f"expects torch.save(model, PATH); for a state dict use torchvision:ARCH --weights PATH"
        )
    if not allow_pickle:
        raise ModelError(
            f"{spec} holds pickled Python objects ({_shown(found)}); unpickling runs code from the file, "
            f"so asbound loads it only with --allow-pickle (use it for files you trust), or save a state "
            f"dict and use torchvision:ARCH --weights PATH"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"{spec} is not a torch.save file that loads ({describe(exc)})") from None
    if not isinstance(obj, nn.Module):
        raise ModelError(
            f"{spec} holds a {type(obj).__name__}, not an nn.Module; file:PATH expects "
            f"torch.save(model, PATH) (for a state dict use torchvision:ARCH --weights PATH)"
        )
    return LoadedModel(obj.eval(), spec, None, [f"pickled module {path}"])


class Normalize(nn.Module):
    """Per-channel normalisation inside the model, so that inputs stay pixels in [0, 1]."""

    def __init__(self, mean: "tuple[float, ...]", std: "tuple[float, ...]") -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _load_torchvision(spec: ModelSpec, weights: "str | os.PathLike | None") -> LoadedModel:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if spec.name not in available:
        raise ModelError(
            f"unknown torchvision classification model {spec.name!r}; closest: "
            f"{_closest(spec.name, available)} ({len(available)} in torchvision.models.list_models())"
        )
    notes = ["ImageNet mean/std normalisation inside the model"]
    state = None
    if weights is not None:
        wpath = Path(weights).expanduser()
        state = load_tensor_file(wpath, "--weights", "save it with torch.save(model.state_dict(), PATH)")
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelError(f"--weights {wpath} holds a {type(state).__name__}, not a state dict")
        notes.append(f"weights {wpath}")
    else:
        notes.append("random weights (no --weights given)")
    num_classes = _head_outputs(state) if state else None
    kwargs = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    net = torchvision.models.get_model(spec.name, **kwargs)
    if state is not None:
        load_weights(net, state, f"--weights {weights} do not fit torchvision:{spec.name}",
                     f"save the state dict of torchvision.models.{spec.name}(num_classes=K)")
    module = nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net).eval()
    return LoadedModel(module, spec, InputFormat(3, 224, 224), notes)


def _head_outputs(state: dict) -> Optional[int]:
    """The output size of the last 2-D weight in a state dict (the classifier), if any."""
    last = None
    for key, value in state.items():
        if key.endswith("weight") and isinstance(value, torch.Tensor) and value.dim() == 2:
            last = value
    return int(last.shape[0]) if last is not None else None


NOT_TORCH = "is not a torch.save file (damaged, truncated, or another format)"


def pickled_globals(path: Path) -> "Optional[list[str]]":
    """The classes and functions that unpickling the torch.save file ``path`` would import beyond
    tensors and plain containers (``[]`` for a state dict), found without running any of its
    code; None when ``path`` is not a torch.save file (or one too damaged to read)."""
    import zipfile

    if zipfile.is_zipfile(path):
        find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
        if find is None:
            return ["not listed by this torch version"]
        try:
            return list(find(str(path)))
        except Exception:  # a damaged archive
            return None
    with open(path, "rb") as handle:
        head = handle.read(2)
    # torch's legacy format is a pickle (protocol 2+): its contents are not listed without unpickling
    return ["torch's legacy format"] if len(head) == 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5) else None


def _shown(names: "list[str]", k: int = 3) -> str:
    """The first ``k`` of ``names``, then how many more."""
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def load_tensor_file(path: Path, flag: str, hint: str) -> object:
    """``torch.load(path, weights_only=True)``; a missing or unloadable file is a ModelError that
    says what the file holds instead (it never suggests unpickling it)."""
    if not path.is_file():
        raise ModelError(f"{flag} {str(path)!r} " + ("is a directory, not a file" if path.is_dir() else "does not exist")
                         + (f"; {hint}" if hint and path.is_dir() else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        found = pickled_globals(path)
        if found is None:
            what = NOT_TORCH
        elif found:
            what = (f"is not a state dict: it holds pickled Python objects ({_shown(found)}), which "
                    f"load only by running code from the file")
        else:
            what = "is damaged: its tensors do not load"
        raise ModelError(f"{flag} {path} {what}" + (f"; {hint}" if hint else "")) from None


def _shape(value: object) -> str:
    return "x".join(map(str, value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def state_mismatch(expected: dict, got: dict) -> str:
    """How the state dict ``got`` differs from ``expected`` (a module's): its missing and
    unexpected keys and the tensors of another shape, a few of each by name, then a count."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(map(str, set(got) - set(expected)))  # a key of another file may be no string
    reshaped = [f"{k} ({_shape(got[k])} in the file, {_shape(expected[k])} in the model)"
                for k in expected if k in got and _shape(got[k]) != _shape(expected[k])]
    parts = [f"{len(keys)} {what}: {_shown(keys)}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if keys]
    return "; ".join(parts)


def load_weights(module: nn.Module, state: dict, what: str, hint: str) -> None:
    """``module.load_state_dict(state, strict=True)``; weights that do not fit are a ModelError
    ``what: <the keys and shapes that differ>; hint``."""
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        detail = state_mismatch(module.state_dict(), state) or describe(exc)
        raise ModelError(f"{what}: {detail}; {hint}") from None


def load_head(path: "str | os.PathLike", feature_dim: int) -> nn.Linear:
    """A linear head ``Linear(feature_dim, K)`` from ``torch.save(head.state_dict(), PATH)`` (``--head``)."""
    p = Path(path).expanduser()
    hint = f"save it with torch.save(nn.Linear({feature_dim}, K).state_dict(), PATH)"
    state = load_tensor_file(p, "--head", hint)
    weight = state.get("weight") if isinstance(state, dict) else None
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] >= 1):
        raise ModelError(f"--head {p} must hold {{'weight': [K, {feature_dim}], 'bias': [K]}} with K >= 1; {hint}")
    for key in ("weight", "bias"):
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ModelError(f"--head {p} holds non-finite values (nan or inf) in its {key}; {hint}")
    head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
    load_weights(head, {k: v for k, v in state.items() if k in ("weight", "bias")},
                 f"--head {p} does not form a linear layer", hint)
    return head
