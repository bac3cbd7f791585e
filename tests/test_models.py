"""asbound.models: the split f(x) = W g(x) + b, the loaders of every spec source, their errors.

Everything runs offline: RobustBench architectures get random weights saved in the
``MODEL_DIR/<dataset>/<threat_model>/<name>.pt`` layout, so nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

from asbound.errors import AsboundError, ModelError, SpecError
from asbound.models import (
    LayerOutput,
    Normalize,
    SplitModel,
    frozen,
    load_head,
    load_model,
    split_model,
)
from asbound.models.loaders import IMAGENET_MEAN, IMAGENET_STD, default_model_dir
from fabricate import make_tensors_file


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine this is many times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))


def _snapshot(model: nn.Module) -> dict:
    """Everything a split must leave alone in the user's module."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(name, type(m)) for name, m in model.named_modules()],
        "modes": [m.training for m in model.modules()],
        "grads": [p.requires_grad for p in model.parameters()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["types"] == before["types"]
    assert after["modes"] == before["modes"] and after["grads"] == before["grads"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


# --- toy models -------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """A conv net ending in ``fc``; the representation is flattened functionally."""

    def __init__(self, num_classes: int = 10, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(self.bn(self.conv(x)))), 1))


class ConvEnd(nn.Module):
    """A linear layer followed by a convolution: the last layer is not linear."""

    def __init__(self, flatten_out: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 12)
        self.out = nn.Conv2d(3, 3, 2)
        self.flatten_out = flatten_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(self.flatten(self.pool(F.relu(self.conv(x)))))
        y = self.out(z.view(-1, 3, 2, 2))  # [N, 3, 1, 1]
        return y.flatten(1) if self.flatten_out else y


class Twice(nn.Module):
    """Calls the same Linear twice: no single linear head reproduces the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x.flatten(1)[:, :6])))


class TupleOut(SmallCNN):
    def forward(self, x: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        feats = torch.flatten(self.pool(F.relu(self.bn(self.conv(x)))), 1)
        return self.fc(feats), feats


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5))


def _nested() -> nn.Module:
    # the layout of RobustBench's ImageNet models: the head is ``model.fc``
    return nn.Sequential(OrderedDict(normalize=Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), model=SmallCNN()))


class Stateful(nn.Module):
    """Scales its input by the number of forward calls so far, even in eval mode: the first call
    (where the split finds its head) and any later one compute different functions."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.fc1 = nn.Linear(48, 16)
        self.act = nn.ReLU()
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(self.act(self.fc1(x.flatten(1) * self.calls)))


def _identity_after_head() -> nn.Module:
    """Two linear layers whose outputs both equal the model's output (the last is the identity):
    the head is the last of them."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5), nn.Linear(5, 5))
    with torch.no_grad():
        net[4].weight.copy_(torch.eye(5))
        net[4].bias.zero_()
    return net


# name: (constructor, input shape, head module name)
SPLITTABLE = {
    "mlp": (_mlp, (3, 4, 4), "3"),
    "cnn-fc": (SmallCNN, (3, 8, 8), "fc"),
    "nested-model.fc": (_nested, (3, 8, 8), "model.fc"),
    "bias-free": (lambda: SmallCNN(bias=False), (3, 8, 8), "fc"),
}


@pytest.mark.parametrize("case", sorted(SPLITTABLE))
def test_split_reproduces_model_and_exposes_head(case):
    make, shape, head_name = SPLITTABLE[case]
    torch.manual_seed(0)
    model = make()
    model.train()  # a split must not depend on (or change) the user's mode
    before = _snapshot(model)
    split = split_model(model, torch.rand((4,) + shape))
    _assert_unchanged(model, before)

    x = torch.rand((6,) + shape)  # not the probe
    head = model.get_submodule(head_name)
    model.eval()
    with torch.no_grad():
        g = split.features(x)
        assert g.shape == (6, head.in_features)
        _close(split.head(g), model(x))
        _close(g @ split.W.T + split.b, model(x))
    assert isinstance(split, SplitModel) and isinstance(split.head, nn.Linear)
    assert head_name in split.split_note
    assert torch.equal(split.W, head.weight)
    expected_b = head.bias if head.bias is not None else torch.zeros(head.out_features)
    assert torch.equal(split.b, expected_b)
    assert split.num_outputs == head.out_features and split.feature_dim == head.in_features

    # the split works on a copy: editing it leaves the user's module alone
    with torch.no_grad():
        split.head.weight.add_(1.0)
    assert not torch.equal(split.W, head.weight)


@pytest.mark.parametrize(
    "make, shape, layer, head_name",
    [
        (lambda: nn.Sequential(_mlp(), nn.Softmax(dim=1)), (3, 4, 4), "0.2", "0.3"),
        (lambda: ConvEnd(flatten_out=False), (3, 8, 8), "flatten", "fc"),
        (lambda: ConvEnd(flatten_out=True), (3, 8, 8), "flatten", "fc"),
    ],
    ids=["softmax", "conv-4d", "conv-flat"],
)
def test_non_linear_last_layer_needs_feature_layer(make, shape, layer, head_name):
    torch.manual_seed(1)
    model = make().eval()
    probe = torch.rand((4,) + shape)
    with pytest.raises(ModelError, match="--feature-layer") as info:
        split_model(model, probe)
    assert layer in str(info.value)  # the message lists the layers to choose from

    before = _snapshot(model)
    split = split_model(model, probe, feature_layer=layer)
    _assert_unchanged(model, before)
    assert isinstance(split.backbone, LayerOutput)
    head = model.get_submodule(head_name)
    assert torch.equal(split.W, head.weight) and torch.equal(split.b, head.bias)
    assert f"head = {head_name}" in split.split_note and "post-processes" in split.split_note
    # each tensor once: the layer's own weights plus a copy of the head, nothing registered twice
    assert len(split.state_dict()) == len(model.state_dict()) + len(head.state_dict())

    x = torch.rand((5,) + shape)
    captured = []
    handle = head.register_forward_hook(lambda m, i, o: captured.append((i[0], o)))
    with torch.no_grad():
        out = model(x)
        handle.remove()
        (rep, logits), = captured
        _close(split.features(x), rep)
        _close(split(x), logits)
    if isinstance(model, nn.Sequential):  # the softmax model: f is the head before the softmax
        _close(torch.softmax(split(x), dim=1), out)


def test_feature_layer_errors():
    model = ConvEnd(flatten_out=True).eval()
    probe = torch.rand(2, 3, 8, 8)
    with pytest.raises(ModelError, match="is not a module") as info:
        split_model(model, probe, feature_layer="nope")
    assert "flatten" in str(info.value)
    with pytest.raises(ModelError, match="feeds no nn.Linear"):
        split_model(model, probe, feature_layer="conv")
    with pytest.raises(ModelError, match="'' is not a module"):  # the root is not a layer
        split_model(model, probe, feature_layer="")


class Tokens(nn.Module):
    """A linear layer over tokens: the output is [N, T, K], not [N, K]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(len(x), -1, 4))


def test_output_that_is_not_n_by_k_is_named():
    with pytest.raises(ModelError, match=r"output is a tensor of shape \(2, 12, 5\), not a \[N, K\]"):
        split_model(Tokens(), torch.rand(2, 3, 4, 4))


class SharedAct(nn.Module):
    """One ReLU module called twice: the feature layer's output is that of its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(48, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.act(x.flatten(1) - 0.5))))


def test_feature_layer_called_twice_is_taken_at_its_first_call():
    torch.manual_seed(0)
    model = SharedAct().eval()
    x = torch.rand(3, 3, 4, 4)
    split = split_model(model, x, feature_layer="act")
    assert split.split_note.startswith("representation = act, head = fc1")
    with torch.no_grad():
        _close(split.features(x), torch.relu(x.flatten(1) - 0.5))
        _close(split(x), model.fc1(torch.relu(x.flatten(1) - 0.5)))


def test_with_head_and_load_head(tmp_path):
    torch.manual_seed(0)
    split = split_model(_mlp().eval(), torch.rand(2, 3, 4, 4))
    for bias in (True, False):
        probe = nn.Linear(16, 3, bias=bias)
        path = tmp_path / f"head-{bias}.pt"
        torch.save(probe.state_dict(), path)
        head = load_head(path, feature_dim=16)
        assert (head.bias is not None) == bias and torch.equal(head.weight, probe.weight)
        other = split.with_head(head)
        x = torch.rand(4, 3, 4, 4)
        with torch.no_grad():
            _close(other(x), probe(split.features(x)))
        assert other.num_outputs == 3 and torch.equal(other.b, probe.bias if bias else torch.zeros(3))
    with pytest.raises(ModelError, match="takes 10 features but the representation has 16"):
        split.with_head(nn.Linear(10, 3))


def test_same_linear_twice_is_refused():
    model = Twice()
    # refused because fc is called twice, not later because the split fails its check
    with pytest.raises(ModelError, match="no nn.Linear called once.*--feature-layer"):
        split_model(model, torch.rand(3, 3, 4, 4))


@pytest.mark.parametrize("feature_layer", [None, "act"], ids=["auto", "feature-layer"])
def test_split_that_does_not_reproduce_the_model_is_refused(feature_layer):
    """The head is found on the first forward pass; the split is then checked on the probe.
    A model that computes something else on a second call fails that check."""
    torch.manual_seed(0)
    model = Stateful().eval()
    probe = torch.rand(4, 3, 4, 4)
    with pytest.raises(ModelError, match="'fc' does not reproduce the model's output") as info:
        split_model(model, probe, feature_layer=feature_layer)
    assert "--feature-layer" in str(info.value)
    assert float(model.calls) == 0  # the split worked on a copy
    # the same architecture without the state splits fine at the same places
    class Stateless(Stateful):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.fc1(x.flatten(1))))

    plain = Stateless()
    plain.load_state_dict(model.state_dict())
    split = split_model(plain.eval(), probe, feature_layer=feature_layer)
    with torch.no_grad():
        _close(split(probe), plain(probe))


def test_the_last_linear_producing_the_output_is_the_head():
    torch.manual_seed(0)
    model = _identity_after_head().eval()
    x = torch.rand(3, 3, 4, 4)
    split = split_model(model, x)
    assert split.split_note == "head = 4 (auto)"
    assert torch.equal(split.W, torch.eye(5)) and split.feature_dim == 5
    with torch.no_grad():
        _close(split.features(x), model[:4](x))
        _close(split(x), model(x))


def test_feature_layer_feeding_the_output_head_is_no_post_processing():
    torch.manual_seed(0)
    model = _mlp().eval()
    x = torch.rand(3, 3, 4, 4)
    split = split_model(model, x, feature_layer="2")
    assert split.split_note == "representation = 2, head = 3"  # nothing after the head
    with torch.no_grad():
        _close(split.features(x), model[:3](x))
        _close(split(x), model(x))


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("make, shape, layer", [
    (_mlp, (3, 4, 4), None),
    (lambda: ConvEnd(flatten_out=True), (3, 8, 8), "flatten"),
], ids=["auto", "feature-layer"])
def test_split_leaves_no_hooks_behind(make, shape, layer):
    """The hooks that find the head, and the one that stops the forward pass at the feature
    layer, are removed after use: none stays on the split model, however often it is called."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand((2,) + shape)
    split = split_model(model, x, feature_layer=layer)
    assert _hooks(split) == 0
    with torch.no_grad():
        first = split(x)
        for _ in range(3):
            split.features(x)
        _close(split(x), first)
    assert _hooks(split) == 0 and _hooks(model) == 0


def test_tuple_output_is_refused_then_split_at_a_layer():
    model = TupleOut().eval()
    probe = torch.rand(3, 3, 8, 8)
    with pytest.raises(ModelError, match="output is a tuple.*--feature-layer"):
        split_model(model, probe)
    split = split_model(model, probe, feature_layer="pool")
    with torch.no_grad():
        _close(split(probe), model(probe)[0])


def test_frozen_restores_modes_and_flags():
    model = SmallCNN()
    model.train()
    model.bn.eval()  # a frozen BatchNorm inside a model in training mode
    model.conv.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    split = split_model(model, torch.rand(2, 3, 8, 8))
    with frozen(model) as m:
        assert m is model
        assert not any(mod.training for mod in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    with pytest.raises(RuntimeError, match="boom"), frozen(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads

    # inside frozen, input gradients flow and parameter gradients are not taken
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    with frozen(split):
        (grad,) = torch.autograd.grad(split.features(x).norm(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    assert all(p.grad is None for p in split.parameters())


# --- RobustBench, offline ----------------------------------------------------------------------

# (dataset, threat model, name, head): distinct architectures and head names
ZOO = [
    ("cifar10", "corruptions", "Hendrycks2020AugMix_WRN", "fc"),  # WRN-40-2
    ("cifar10", "corruptions", "Hendrycks2020AugMix_ResNeXt", "classifier"),  # ResNeXt-29
    ("cifar10", "Linf", "Sehwag2021Proxy_R18", "linear"),  # ResNet-18
    ("cifar100", "Linf", "Rice2020Overfitting", "linear"),  # PreActResNet-18, normalisation inside
    ("cifar10", "Linf", "Rade2021Helper_R18_ddpm", "logits"),  # DeepMind PreActResNet-18
    ("imagenet", "Linf", "Salman2020Do_R18", "model.fc"),  # Sequential(normalize, ResNet-18), 224 px
]
CLI_MODEL = "Sehwag2021Proxy_R18"


def _zoo_entry(dataset: str, threat: str, name: str) -> dict:
    from asbound._compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][name]


def _side(dataset: str) -> int:
    return 224 if dataset == "imagenet" else 32


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> "tuple[Path, dict[str, nn.Module]]":
    """Random-weight zoo models saved as state dicts in the RobustBench layout."""
    model_dir = tmp_path_factory.mktemp("robustbench")
    models = {}
    for i, (dataset, threat, name, _) in enumerate(ZOO):
        torch.manual_seed(i)
        model = _zoo_entry(dataset, threat, name)["model"]().eval()
        path = model_dir / dataset / threat / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        models[name] = model
    return model_dir, models


@pytest.mark.parametrize("dataset, threat, name, head_name", ZOO, ids=[z[2] for z in ZOO])
def test_robustbench_loads_offline_and_splits(zoo, dataset, threat, name, head_name):
    model_dir, models = zoo
    original = models[name]
    loaded = load_model(f"robustbench:{dataset}/{threat}/{name}", model_dir=model_dir)
    assert str(loaded.spec) == f"robustbench:{dataset}/{threat}/{name}"
    assert loaded.input_format.height == _side(dataset) and loaded.input_format.channels == 3
    assert not any(m.training for m in loaded.module.modules())
    assert any(str(model_dir) in note for note in loaded.notes)

    n = 1 if dataset == "imagenet" else 2
    x = torch.rand(n, 3, _side(dataset), _side(dataset), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original(x)
        _close(loaded.module(x), expected)
    split = split_model(loaded.module, x)
    assert split.split_note == f"head = {head_name} (auto)"
    head = original.get_submodule(head_name)
    assert torch.equal(split.W, head.weight) and torch.equal(split.b, head.bias)
    with torch.no_grad():
        _close(split.head(split.features(x)), expected)


def test_robustbench_model_is_put_in_eval_mode(zoo, monkeypatch):
    """asbound puts the loaded model in eval mode itself, whatever mode RobustBench returns."""
    from asbound._compat import import_robustbench

    import_robustbench()
    import robustbench.utils

    model_dir, _ = zoo
    rb_load_model = robustbench.utils.load_model
    monkeypatch.setattr(robustbench.utils, "load_model", lambda *a, **k: rb_load_model(*a, **k).train())
    loaded = load_model(f"robustbench:cifar10/Linf/{CLI_MODEL}", model_dir=model_dir)
    assert not any(m.training for m in loaded.module.modules())


def test_robustbench_end_to_end_through_cli(zoo, tmp_path, capsys):
    from asbound.cli import main

    model_dir, _ = zoo
    data = tmp_path / "data.pt"
    make_tensors_file(data, n=8, shape=(3, 32, 32), num_classes=10)
    out = tmp_path / "run"
    code = main([
        "score", "--model", f"robustbench:cifar10/Linf/{CLI_MODEL}", "--model-dir", str(model_dir),
        "--data", f"tensors:{data}", "--n", "8", "--steps", "2", "--out", str(out),
        "--no-progress", "--json",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    for key in ("as_score", "lhs", "rhs", "clean_accuracy"):
        assert key in summary, key
    assert np.isfinite(summary["as_score"]) and summary["as_score"] > 0
    assert json.loads(captured.out)["as_score"] == pytest.approx(summary["as_score"])


class _Opaque:
    """A type no checkpoint allow-list knows."""


def _save_in_layout(model_dir: Path, dataset: str, threat: str, name: str, obj: object) -> Path:
    path = model_dir / dataset / threat / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def test_robustbench_checkpoint_with_numpy_and_namespace_loads(zoo, tmp_path):
    _, models = zoo
    name = "Hendrycks2020AugMix_WRN"
    original = models[name]
    state = {f"module.{k}": v for k, v in original.state_dict().items()}  # a DataParallel checkpoint
    checkpoint = {
        "state_dict": state, "epoch": np.int64(3), "best_acc": np.float64(0.5),
        "curve": np.arange(3, dtype=np.float32), "args": argparse.Namespace(lr=0.1, arch="wrn"),
    }
    _save_in_layout(tmp_path, "cifar10", "corruptions", name, checkpoint)
    loaded = load_model(f"robustbench:cifar10/corruptions/{name}", model_dir=tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        _close(loaded.module(x), original(x))

    # 3D corruptions: RobustBench reads the same checkpoint from the corruptions folder
    loaded3d = load_model(f"robustbench:cifar10/corruptions_3d/{name}", model_dir=tmp_path)
    with torch.no_grad():
        _close(loaded3d.module(x), original(x))

    # an unknown type is refused, never unpickled without restriction
    checkpoint["extra"] = _Opaque()
    _save_in_layout(tmp_path, "cifar10", "corruptions", name, checkpoint)
    with pytest.raises(ModelError, match="could not load"):
        load_model(f"robustbench:cifar10/corruptions/{name}", model_dir=tmp_path)


def test_robustbench_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="unknown RobustBench model") as info:
        load_model("robustbench:cifar10/Linf/Standart", model_dir=tmp_path)
    assert "Standard" in str(info.value)  # close matches are listed
    with pytest.raises(ModelError, match="Sehwag2021Proxy_R18"):
        load_model("robustbench:cifar10/Linf/Sehwag2021Proxy_RN18", model_dir=tmp_path)

    expected = tmp_path / "cifar10" / "Linf" / "Sehwag2021Proxy_R18.pt"
    with pytest.raises(ModelError) as info:
        load_model("robustbench:cifar10/Linf/Sehwag2021Proxy_R18", model_dir=tmp_path)
    message = str(info.value)
    assert str(expected) in message and "--model-dir" in message and "--download" in message
    assert not expected.exists()  # nothing was downloaded or created

    monkeypatch.setenv("ASBOUND_MODEL_DIR", str(tmp_path / "env"))
    assert default_model_dir() == tmp_path / "env"
    with pytest.raises(ModelError, match=str(tmp_path / "env" / "cifar10" / "Linf")):
        load_model("robustbench:Sehwag2021Proxy_R18")  # the default cifar10/Linf

    ensemble = tmp_path / "cifar10" / "Linf" / "Chen2020Adversarial.pt_m0.pt"
    with pytest.raises(ModelError, match="ensemble members") as info:
        load_model("robustbench:cifar10/Linf/Chen2020Adversarial", model_dir=tmp_path)
    assert str(ensemble) in str(info.value)

    with pytest.raises(ModelError, match="timm.*--download"):
        load_model("robustbench:imagenet/corruptions/Tian2022Deeper_DeiT-S", model_dir=tmp_path)
    with pytest.raises(ModelError, match="threat models for cifar100: Linf, corruptions"):
        load_model("robustbench:cifar100/L2/Anything", model_dir=tmp_path)

    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelError, match="could not load") as info:
        load_model("robustbench:cifar10/Linf/Sehwag2021Proxy_R18", model_dir=tmp_path)
    assert str(expected) in str(info.value)

    for bad in ("robustbench:cifar10/Sehwag2021Proxy_R18", "robustbench:svhn/Linf/X", "robustbench:cifar10/L3/X"):
        with pytest.raises(SpecError):
            load_model(bad, model_dir=tmp_path)


def test_robustbench_import_is_quiet():
    code = "from asbound._compat import import_robustbench; import_robustbench()"
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


# --- file: -----------------------------------------------------------------------------------------


def test_file_models(tmp_path):
    torch.manual_seed(0)
    model = _mlp().eval()
    path = tmp_path / "model.pt"
    torch.save(model, path)

    with pytest.raises(ModelError, match="--allow-pickle"):
        load_model(f"file:{path}")
    loaded = load_model(f"file:{path}", allow_pickle=True)
    x = torch.rand(3, 3, 4, 4)
    with torch.no_grad():
        _close(loaded.module(x), model(x))
    assert loaded.input_format is None
    assert split_model(loaded.module, x).split_note == "head = 3 (auto)"

    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)
    with pytest.raises(ModelError, match="not an nn.Module") as info:
        load_model(f"file:{state}", allow_pickle=True)
    assert "torchvision:ARCH --weights" in str(info.value)

    with pytest.raises(ModelError, match="does not exist"):
        load_model(f"file:{tmp_path / 'missing.pt'}", allow_pickle=True)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="not a torch.save file"):
        load_model(f"file:{corrupt}", allow_pickle=True)

    with pytest.raises(ModelError, match="torchvision:ARCH and builtin:lenet-reference only"):
        load_model(f"file:{path}", weights=state, allow_pickle=True)

    # a module saved in training mode is loaded in eval mode (BatchNorm running stats, no dropout)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.Dropout(0.5),
                        nn.Linear(16, 5)).train()
    net(torch.rand(8, 3, 4, 4))  # give BatchNorm running stats that differ from a batch's
    torch.save(net, tmp_path / "train-mode.pt")
    module = load_model(f"file:{tmp_path / 'train-mode.pt'}", allow_pickle=True).module
    assert not any(m.training for m in module.modules())
    with torch.no_grad():
        _close(module(x), net.eval()(x))


# --- torchvision: ----------------------------------------------------------------------------------


def test_torchvision_models(tmp_path):
    import torchvision

    with pytest.raises(ModelError, match="unknown torchvision") as info:
        load_model("torchvision:resnet19")
    assert "resnet18" in str(info.value)

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    weights = tmp_path / "r18.pt"
    torch.save(net.state_dict(), weights)
    loaded = load_model("torchvision:resnet18", weights=weights)
    assert loaded.input_format.height == 224
    assert not any(m.training for m in loaded.module.modules())
    x = torch.rand(2, 3, 32, 32)  # small inputs keep the test fast; the net pools adaptively
    with torch.no_grad():
        # the reference normalises with torchvision's own function and the published ImageNet
        # statistics, not with asbound's Normalize and constants
        expected = net(TF.normalize(x, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
        _close(loaded.module(x), expected)
    split = split_model(loaded.module, x)
    assert split.split_note == "head = 1.fc (auto)" and split.W.shape == (10, 512)
    assert torch.equal(split.W, net.fc.weight) and torch.equal(split.b, net.fc.bias)
    with torch.no_grad():
        _close(split.head(split.features(x)), expected)

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": net.state_dict(), "epoch": 7}, wrapped)
    with torch.no_grad():
        _close(load_model("torchvision:resnet18", weights=wrapped).module(x), expected)

    wrong_keys = tmp_path / "wrong.pt"
    torch.save({f"backbone.{k}": v for k, v in net.state_dict().items()}, wrong_keys)
    with pytest.raises(ModelError, match="do not fit torchvision:resnet18: ") as info:
        load_model("torchvision:resnet18", weights=wrong_keys)
    keys = sorted(net.state_dict())  # every key is missing, every backbone.* key unexpected: 3 shown of each
    assert f"{len(keys)} missing: {', '.join(keys[:3])} and {len(keys) - 3} more" in str(info.value)
    assert f"{len(keys)} unexpected: backbone.{keys[0]}, " in str(info.value)

    wrong_shape = tmp_path / "shape.pt"
    torch.save({**net.state_dict(), "conv1.weight": torch.zeros(64, 1, 7, 7)}, wrong_shape)
    with pytest.raises(ModelError, match=r"do not fit torchvision:resnet18: 1 of another shape: "
                                         r"conv1.weight \(64x1x7x7 in the file, 64x3x7x7 in the model\);"):
        load_model("torchvision:resnet18", weights=wrong_shape)

    with pytest.raises(ModelError, match="does not exist"):
        load_model("torchvision:resnet18", weights=tmp_path / "missing.pt")
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": net.state_dict(), "extra": _Opaque()}, pickled)
    with pytest.raises(ModelError, match="not a state dict: it holds pickled Python objects") as info:
        load_model("torchvision:resnet18", weights=pickled)
    assert "_Opaque" in str(info.value) and "weights_only" not in str(info.value)


def test_normalize_by_hand():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 2.0, 4.0))
    x = torch.ones(2, 3, 2, 2)
    x[1] = 0.0
    out = norm(x)
    assert torch.equal(out[0, :, 0, 0], torch.tensor([1.0, 0.375, 0.25]))
    assert torch.equal(out[1, :, 1, 1], torch.tensor([-1.0, -0.125, 0.0]))
    assert torch.equal(out[:, :, 0, 0], out[:, :, 1, 0])  # per channel, the same at every pixel


def test_torchvision_classes_come_from_the_last_linear(tmp_path):
    """mobilenet_v3_small has two linear layers (576 -> 1024 -> K): K is the last one's."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=7).eval()
    weights = tmp_path / "mnv3.pt"
    torch.save(net.state_dict(), weights)
    loaded = load_model("torchvision:mobilenet_v3_small", weights=weights)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = loaded.module(x)
        assert out.shape == (2, 7)
        _close(out, net(TF.normalize(x, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))))


# --- builtin: and spec errors ----------------------------------------------------------------------


def test_builtin_errors():
    with pytest.raises(ModelError, match="unknown builtin model") as info:
        load_model("builtin:lenet-huge")
    assert "lenet-adversarial" in str(info.value)
    with pytest.raises(ModelError, match="no head 'colour'") as info:
        load_model("builtin:lenet-random/colour")
    assert "orientation" in str(info.value) and "shape" in str(info.value)


def test_builtin_loads_and_splits():
    from asbound.builtin import weights_path

    if not weights_path("lenet-random").is_file():
        pytest.skip("builtin weights not generated")
    loaded = load_model("builtin:lenet-random/shape")
    x = torch.rand(2, 1, 64, 64)
    split = split_model(loaded.module, x)
    assert split.num_outputs == 3
    with torch.no_grad():
        _close(split(x), loaded.module(x))


@pytest.mark.parametrize("bad", ["", "resnet18", "hub:foo", "file:", "robustbench:a/b"])
def test_model_spec_errors(bad):
    with pytest.raises(SpecError) as info:
        load_model(bad)
    assert isinstance(info.value, AsboundError) and "robustbench:" in str(info.value)
