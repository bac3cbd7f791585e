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


def default_model_dir() -> Path:
    """RobustBench's model directory: ``$ASBOUND_MODEL_DIR`` or the user cache."""
    env = os.environ.get("ASBOUND_MODEL_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("asbound")) / "models"


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
        raise ModelError(f"model file {str(path)!r} does not exist (file:PATH expects a torch.save(model, PATH) file)")
    if not allow_pickle:
        raise ModelError(
            f"{spec} holds a pickled nn.Module; unpickling runs code from the file, so asbound "
            f"loads it only with --allow-pickle (use it for files you trust), or save a state dict "
            f"and use torchvision:ARCH --weights PATH"
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
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            missing, unexpected = _key_diff(net.state_dict(), state)
            detail = (
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]})"
                if missing or unexpected
                else " ".join(line.strip() for line in str(exc).splitlines()[1:3])
            )
            raise ModelError(
                f"--weights do not fit torchvision:{spec.name}: {detail}; save the state dict of "
                f"torchvision.models.{spec.name}(num_classes=K)"
            ) from None
    module = nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net).eval()
    return LoadedModel(module, spec, InputFormat(3, 224, 224), notes)


def _head_outputs(state: dict) -> Optional[int]:
    """The output size of the last 2-D weight in a state dict (the classifier), if any."""
    last = None
    for key, value in state.items():
        if key.endswith("weight") and isinstance(value, torch.Tensor) and value.dim() == 2:
            last = value
    return int(last.shape[0]) if last is not None else None


def _key_diff(expected: dict, got: dict) -> "tuple[list[str], list[str]]":
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def load_tensor_file(path: Path, flag: str, hint: str) -> object:
    """``torch.load(path, weights_only=True)``; a missing or unloadable file is a ModelError."""
    if not path.is_file():
        raise ModelError(f"{flag} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{flag} {path} is not loadable with weights_only=True ({describe(exc)}); {hint}") from None


def load_head(path: "str | os.PathLike", feature_dim: int) -> nn.Linear:
    """A linear head ``Linear(feature_dim, K)`` from ``torch.save(head.state_dict(), PATH)`` (``--head``)."""
    p = Path(path).expanduser()
    hint = f"save it with torch.save(nn.Linear({feature_dim}, K).state_dict(), PATH)"
    state = load_tensor_file(p, "--head", hint)
    weight = state.get("weight") if isinstance(state, dict) else None
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
        raise ModelError(f"--head {p} must hold {{'weight': [K, {feature_dim}], 'bias': [K]}}; {hint}")
    head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
    try:
        head.load_state_dict({k: v for k, v in state.items() if k in ("weight", "bias")}, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"--head {p} does not form a linear layer ({describe(exc)}); {hint}") from None
    return head
