"""RanLI / RoLI with PEFT and AutoLoRa (seed 000, seed 002; ``METHODS.md`` 2.6-2.8, P-R1, P-R2,
P-R8, P-A1, P-A8): what trains, where each stage starts, the AutoLoRa objective, lambdas and
learning-rate rule inside the training loop, and runs that re-enter as ``run:DIR``.

Models are tiny CNNs on 8x8 digits; the runs train a few epochs on a few hundred images.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asbound.transfer.loop as loop
import asbound.transfer.run as run_module
from asbound.cli import main
from fabricate import digits_cnn, interrupt_training
from asbound.errors import ConfigError, ModelError
from asbound.models import SplitModel, load_model
from asbound.models.peft import (
    PeftSpec,
    apply_peft,
    base_parameter_names,
    lora_branch,
    natural_branch,
    natural_forward,
    peft_parameter_names,
    saved_model,
)
from asbound.specs import parse_model_spec
from asbound.transfer import METHODS, TransferConfig, transfer
from asbound.transfer.autolr import AutoLR, default_checkpoints
from asbound.transfer.methods import AttackSettings, autolora_loss, batch_loss, set_scope, train_mode


pytestmark = pytest.mark.usefixtures("one_thread")


def _split(seed: int = 0, outputs: int = 5) -> SplitModel:
    """Conv -> BN -> ReLU -> Conv -> Flatten -> Linear -> ReLU, and a linear head (8x8 inputs)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
    )
    with torch.no_grad():
        backbone[1].running_mean.uniform_(-0.5, 0.5)
        backbone[1].running_var.uniform_(0.5, 2.0)
    return SplitModel(backbone, nn.Linear(16, outputs))


def _batch(n: int = 16, seed: int = 1, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


ATTACK = AttackSettings(eps=0.1, steps=2, step=0.05)


def _step(model: SplitModel, optimizer: torch.optim.Optimizer, seed: int = 1) -> dict[str, torch.Tensor]:
    """One Madry step of the PEFT stage; returns the gradients of the trainable parameters."""
    x, y = _batch(seed=seed)
    train_mode(model, "peft")
    loss, _ = batch_loss(model, "madry", x, y, attack=ATTACK, generator=torch.Generator().manual_seed(seed),
                         trades_beta=6.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return grads


# --- what each PEFT variant trains ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "adapter", "bias"])
def test_peft_trains_its_parameters_and_nothing_else(variant):
    """The first step gives a non-zero gradient to every PEFT parameter not multiplied by a
    zero-initialised factor (B of LoRA, Up of an adapter, every bias) and to the head; A and Down
    are multiplied by those zeros, so their gradient is exactly zero on the first step, and every
    PEFT parameter's is non-zero from the second step on. After three steps every parameter and
    buffer outside the PEFT set (batch-norm statistics included) is bit for bit the pretrained one."""
    model = apply_peft(_split(), PeftSpec(variant, rank=4, alpha=4.0, reduction=4), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = set_scope(model, "peft")
    tuned = set(peft_parameter_names(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == tuned | {"head.weight", "head.bias"} and tuned
    optimizer = torch.optim.SGD(params, lr=0.1)

    first = _step(model, optimizer, seed=1)
    behind_zero = {n for n in tuned if ".lora_A." in n or ".adapter.0." in n}  # multiplied by B = 0 / Up = 0
    for name, grad in first.items():
        if name in behind_zero:
            assert torch.count_nonzero(grad) == 0, name
        else:
            assert grad.abs().sum() > 0, name
    # the PEFT set, by name and independently of how the code finds it
    assert {"lora": lambda n: ".lora_A." in n or ".lora_B." in n, "adapter": lambda n: ".adapter." in n,
            "bias": lambda n: n.endswith(".bias")}[variant](next(iter(tuned)))
    assert all({"lora": ".lora_" in n, "adapter": ".adapter." in n and ".layer." not in n,
                "bias": n.endswith(".bias")}[variant] for n in tuned)
    if variant == "bias":
        assert not behind_zero and all(n.endswith(".bias") for n in tuned)
        assert len(tuned) == sum(1 for n, _ in model.backbone.named_parameters() if n.endswith("bias"))
    else:
        assert behind_zero
    second = _step(model, optimizer, seed=2)
    for name in tuned | {"head.weight", "head.bias"}:
        assert second[name].abs().sum() > 0, name
    _step(model, optimizer, seed=3)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == tuned | {"head.weight", "head.bias"}


def test_lora_with_a_zero_as_the_reference_configs_never_trains_it():
    """P-R1: with A = 0 as well as B = 0 the LoRA factors get no gradient, ever; the default
    (A kaiming, B zero) trains them."""
    model = apply_peft(_split(), PeftSpec("lora", rank=4, alpha=4.0), seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.zero_()
    optimizer = torch.optim.SGD(set_scope(model, "peft"), lr=0.1)
    for seed in (1, 2, 3):
        grads = _step(model, optimizer, seed=seed)
        assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if ".lora_" in n)


def test_lora_is_saved_merged_and_adapters_are_rebuilt_with_the_same_outputs():
    x, _ = _batch()
    for variant in ("lora", "adapter"):
        model = apply_peft(_split(), PeftSpec(variant, rank=4, alpha=4.0, reduction=4), seed=3).eval()
        with torch.no_grad():  # make the PEFT weights matter
            for name, p in model.named_parameters():
                if name in peft_parameter_names(model):
                    p.add_(0.1 * torch.randn_like(p))
            expected = model(x)
        saved, structure = saved_model(model)
        if variant == "lora":
            assert structure is None and not any("lora" in k for k in saved.state_dict())
            assert set(saved.state_dict()) == set(_split().state_dict())
        else:
            assert structure == PeftSpec(variant, rank=4, alpha=4.0, reduction=4).as_record()
        torch.testing.assert_close(saved.eval()(x), expected, rtol=1e-5, atol=1e-5)
        assert getattr(saved, "peft", None) is None and model.peft is not None  # the training model is untouched


def test_a_chained_models_own_adapters_are_part_of_the_representation():
    """A run:DIR base that holds adapters (or any module named like one): a new PEFT structure
    trains only what it added, and AutoLoRa's natural branch leaks no gradient into the old adapters."""
    first = apply_peft(_split(), PeftSpec("adapter", reduction=4), seed=3)
    with torch.no_grad():
        for name in peft_parameter_names(first):
            first.get_parameter(name).add_(0.1)
    chained, _ = saved_model(first)  # what run:DIR rebuilds: a plain model that holds adapters
    old = {n for n, _ in chained.named_parameters() if ".adapter." in n}
    second = apply_peft(copy.deepcopy(chained), PeftSpec("adapter", reduction=4), seed=4)
    tuned = set(peft_parameter_names(second))
    assert len(old) == len(tuned) == 3 * 4  # one new adapter per layer of the representation, not on old ones
    assert old <= {n for n, _ in second.named_parameters()} and not tuned & old  # the old ones stay, untrained
    lora = apply_peft(copy.deepcopy(chained), natural_branch(rank=2), seed=4)
    assert all(".lora_" in n for n in peft_parameter_names(lora))
    set_scope(lora, "all")
    x, y = _batch()
    F.cross_entropy(natural_forward(lora, x), y).backward()
    leaked = [n for n in base_parameter_names(lora) if lora.get_parameter(n).grad is not None
              and torch.count_nonzero(lora.get_parameter(n).grad)]
    assert not leaked and any(".adapter." in n for n in base_parameter_names(lora))


def test_the_natural_branch_starts_as_seed_002s_conv_lora():
    """A ~ N(0, 1) and B = 0, scale alpha / r = 1/8: the branch starts equal to the model and moves."""
    model = apply_peft(_split(), natural_branch(), seed=0)
    a = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if ".lora_A." in n])
    b = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if ".lora_B." in n])
    assert 0.9 < float(a.std()) < 1.1 and abs(float(a.mean())) < 0.1 and torch.count_nonzero(b) == 0
    from peft.tuners.lora import LoraLayer

    scales = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
    assert scales == {1 / 8}


def test_a_peft_variant_without_a_layer_to_adapt_names_what_it_looks_for():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return (x * self.s).flatten(1)

    bare = SplitModel(Scale(), nn.Linear(64, 3))
    with pytest.raises(ModelError, match="Conv2d, Linear"):
        apply_peft(copy.deepcopy(bare), PeftSpec("lora"))
    with pytest.raises(ModelError, match="Conv2d, Linear"):
        apply_peft(copy.deepcopy(bare), PeftSpec("adapter"))
    no_bias = SplitModel(nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Flatten()), nn.Linear(72, 3))
    with pytest.raises(ModelError, match="'bias'"):
        apply_peft(no_bias, PeftSpec("bias"))


def test_bias_tuning_leaves_a_bias_table_alone():
    """P-R8: a parameter *named* like a bias but not a layer's bias (Swin's relative_position_bias_table) stays frozen."""
    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relative_position_bias_table = nn.Parameter(torch.zeros(4))
            self.proj = nn.Linear(64, 8)

        def forward(self, x):
            return self.proj(x.flatten(1)) + self.relative_position_bias_table.sum()

    model = apply_peft(SplitModel(Table(), nn.Linear(8, 3)), PeftSpec("bias"))
    assert peft_parameter_names(model) == ["backbone.proj.bias"]


# --- visual prompt tuning of a ViT (--peft prompt) ---------------------------------------------------------


def _vit(seed: int = 0, **options) -> nn.Module:
    """A tiny timm ViT with random weights for 1x8x8 inputs: 2x2 patches of 4x4, width 16."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    kw = dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=3, num_heads=2,
              mlp_ratio=2.0)
    vit = VisionTransformer(**{**kw, **options})
    with torch.no_grad():  # a class token and position embeddings that matter
        vit.cls_token.normal_(0.0, 0.5)
        vit.pos_embed.normal_(0.0, 0.5)
    return vit.eval()


def _vit_split(**options) -> SplitModel:
    from asbound.models import split_model

    x, _ = _batch()
    return split_model(_vit(**options), x)


def test_a_prompted_vit_with_no_tokens_is_the_vit_itself():
    """The prompted forward is timm's own (patch and position embedding, blocks, norm, pooling):
    with 0 prompt tokens it gives the ViT's features bit for bit (class-token and average pooling,
    with and without register tokens)."""
    from asbound.models.peft import PromptedViT

    x, _ = _batch()
    for options in ({}, {"global_pool": "avg"}, {"global_pool": "avg", "reg_tokens": 2}, {"reg_tokens": 1}):
        split = _vit_split(**options)
        assert split.split_note == "head = head (auto)" and split.feature_dim == 16
        for deep in (True, False):
            prompted = PromptedViT(copy.deepcopy(split.backbone), 0, deep).eval()
            assert torch.equal(prompted(x), split.backbone(x)), (options, deep)


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("deep", [True, False])
def test_prompts_enter_after_the_prefix_tokens_and_leave_before_the_pooling(pool, deep):
    """VPT written out on timm's modules: the prompts go after the class (and register) tokens once
    the position embeddings are added, before the first block; VPT-deep replaces them with the
    block's own before each later block; they leave before the norm and the pooling, so average
    pooling averages the patch tokens alone (as the model did), not the prompts."""
    options = {"global_pool": pool, "reg_tokens": 1} if pool == "avg" else {}
    vit = _vit(**options)
    split = _vit_split(**options)
    model = apply_peft(copy.deepcopy(split), PeftSpec("prompt", tokens=3, deep=deep), seed=2).eval()
    prompts = model.backbone.prompts.detach()
    assert prompts.shape == (3 if deep else 1, 3, 16)
    x, _ = _batch()
    k = 2 if pool == "avg" else 1  # the prefix tokens
    with torch.no_grad():
        embedded = vit._pos_embed(vit.patch_embed(x))  # [N, k + 4, 16]
        seq = torch.cat((embedded[:, :k], prompts[0].expand(len(x), -1, -1), embedded[:, k:]), dim=1)
        for i, block in enumerate(vit.blocks):
            if deep and i > 0:
                seq = seq.clone()
                seq[:, k:k + 3] = prompts[i]
            seq = block(seq)
        tokens = vit.norm(seq)
        without = torch.cat((tokens[:, :k], tokens[:, k + 3:]), dim=1)
        pooled = without[:, 0] if pool == "token" else without[:, k:].mean(1)
        expected = vit.head(vit.fc_norm(pooled))
        got = model(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, split(x), atol=1e-4)  # the prompts act, through attention
        if pool == "avg":  # pooling the prompts too would be another function
            with_prompts = vit.head(vit.fc_norm(tokens[:, k:].mean(1)))
            assert not torch.allclose(got, with_prompts, atol=1e-4)
        other = apply_peft(copy.deepcopy(split), PeftSpec("prompt", tokens=3, deep=not deep), seed=2).eval()
        with torch.no_grad():  # the same first prompts; deep and shallow differ after the first block
            other.backbone.prompts[0] = prompts[0]
        assert not torch.allclose(other(x), got, atol=1e-4)


def test_prompts_start_as_the_references_uniform_draw():
    """U(-v, v), v = sqrt(6 / (C p^2 + d)) (the reference's VPT init): C = 1 channel, p = 4, d = 64."""
    split = _vit_split(embed_dim=64, num_heads=4)
    model = apply_peft(split, PeftSpec("prompt", tokens=50, deep=True), seed=0)
    w = model.backbone.prompts.detach().double().flatten()
    v = math.sqrt(6.0 / (1 * 16 + 64))
    assert float(w.abs().max()) <= v and float(w.abs().max()) > 0.99 * v
    assert abs(float(w.std()) - v / math.sqrt(3)) < 0.02 * v and abs(float(w.mean())) < 0.02 * v
    again = apply_peft(_vit_split(embed_dim=64, num_heads=4), PeftSpec("prompt", tokens=50), seed=0)
    assert torch.equal(again.backbone.prompts, model.backbone.prompts)  # drawn from the seed


@pytest.mark.parametrize("deep", [True, False])
def test_prompt_tuning_trains_the_prompts_and_the_head_and_nothing_else(deep):
    """Every other parameter and buffer of the ViT stays bit for bit after three Madry steps."""
    model = apply_peft(_vit_split(), PeftSpec("prompt", tokens=4, deep=deep), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = set_scope(model, "peft")
    assert peft_parameter_names(model) == ["backbone.prompts"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"backbone.prompts", "head.weight",
                                                                           "head.bias"}
    optimizer = torch.optim.SGD(params, lr=0.5)
    for seed in (1, 2, 3):
        grads = _step(model, optimizer, seed=seed)
        assert all(g.abs().sum() > 0 for g in grads.values())
        assert model.backbone.training is False  # the representation stays in eval mode
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"backbone.prompts", "head.weight", "head.bias"}
    assert all(k.startswith("backbone.vit.") for k in before if k.startswith("backbone.") and "prompts" not in k)


def test_prompts_are_saved_with_the_model_and_rebuilt_with_the_same_outputs():
    x, _ = _batch()
    spec = PeftSpec("prompt", tokens=4, deep=False)
    model = apply_peft(_vit_split(), spec, seed=3).eval()
    expected = model(x)
    saved, structure = saved_model(model)
    assert structure == spec.as_record() == {"variant": "prompt", "rank": 16, "alpha": 16.0, "reduction": 8,
                                             "init": "kaiming", "tokens": 4, "deep": False}
    assert "backbone.prompts" in saved.state_dict()
    from asbound.models.peft import rebuild_structure

    rebuilt = rebuild_structure(_vit_split(seed=5), structure)  # other weights: the state dict brings them
    rebuilt.load_state_dict(saved.state_dict(), strict=True)
    assert torch.equal(rebuilt.eval()(x), expected)
    # the other variants' records are those written before prompts existed
    assert set(PeftSpec("adapter").as_record()) == {"variant", "rank", "alpha", "reduction", "init"}


def test_prompt_tuning_refuses_what_it_cannot_prompt():
    from asbound.models.peft import PromptedViT
    from asbound.models.split import split_model
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(ModelError, match=r"needs a ViT \(timm's VisionTransformer\).*has none"):
        apply_peft(_split(), PeftSpec("prompt"))
    prompted, _ = saved_model(apply_peft(_vit_split(), PeftSpec("prompt", tokens=2), seed=0))
    with pytest.raises(ModelError, match="already holds prompts"):
        apply_peft(prompted, PeftSpec("prompt"))

    class Pooled(VisionTransformer):  # its own forward: where prompts go is not defined
        def forward_head(self, x, pre_logits=False):
            return self.head(x.max(1).values)

    torch.manual_seed(0)
    other = Pooled(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=1, num_heads=2).eval()
    x, _ = _batch()
    with pytest.raises(ModelError, match="Pooled changes timm's VisionTransformer.forward_head"):
        apply_peft(split_model(other, x), PeftSpec("prompt"))
    inside = split_model(_vit(), x, feature_layer="fc_norm")  # a layer inside the ViT
    with pytest.raises(ModelError, match="--feature-layer fc_norm lies inside the ViT"):
        apply_peft(inside, PeftSpec("prompt"))
    assert not any(isinstance(m, PromptedViT) for m in inside.modules())


@pytest.fixture(scope="module")
def pretrained_vit(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vit") / "vit.pt"
    torch.save(_vit(), path)
    return path


def test_a_prompt_run_reenters_as_run_dir_with_its_test_accuracy(pretrained_vit, tmp_path):
    """RanLI with --peft prompt on a tiny ViT: the prompts and the head train, every other ViT
    weight is the pretrained one bit for bit, and run:DIR rebuilds the prompts from config.json."""
    from asbound.data import load_data
    from asbound.transfer.loop import accuracy

    argv = ["transfer", "--method", "ranli", "--peft", "prompt", "--prompt-tokens", "3", "--prompt-depth", "shallow",
            "--model", f"file:{pretrained_vit}", "--allow-pickle", "--data", "digits", "--classes", "5-9",
            "--epochs", "1", "--n", "96", "--n-val", "16", "--n-test", "40", "--no-score", "--attack-steps", "2",
            "--eval-steps", "2", "--batch-size", "32", "--lr", "0.1", "--no-progress", "--device", "cpu", "--json",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["structure"] == {"variant": "prompt", "rank": 16, "alpha": 16.0, "reduction": 8, "init": "kaiming",
                                   "tokens": 3, "deep": False}
    assert (config["peft"], config["prompt_tokens"], config["prompt_depth"]) == ("prompt", 3, "shallow")
    state = _state(tmp_path / "run" / "model.pt")
    assert state["backbone.prompts"].shape == (1, 3, 16)
    base = torch.load(pretrained_vit, weights_only=False).state_dict()
    for key, value in base.items():
        if not key.startswith("head."):
            assert torch.equal(state[f"backbone.vit.{key}"], value), key
    loaded = load_model(parse_model_spec(f"run:{tmp_path / 'run'}"), allow_pickle=True)
    test = load_data("digits", split="test", classes="5-9", n=40, seed=0)
    clean, _ = accuracy(loaded.module, test.loader(32), torch.device("cpu"))
    assert clean == pytest.approx(final["test"]["clean_accuracy"])
    assert torch.equal(loaded.module.backbone.prompts, state["backbone.prompts"])


def test_prompt_on_a_model_without_a_vit_is_one_line_with_exit_2(pretrained, tmp_path, capsys):
    argv = ["transfer", "--method", "ranli", "--peft", "prompt", "--model", f"file:{pretrained}", "--allow-pickle",
            "--data", "digits", "--classes", "5-9", "--n", "64", "--n-test", "20", "--no-score", "--epochs", "1",
            "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--peft prompt needs a ViT (timm's VisionTransformer)" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # refused before any directory is written


# --- AutoLoRa's objective ---------------------------------------------------------------------------------


def _autolora_model() -> SplitModel:
    model = apply_peft(_split(), natural_branch(rank=4, alpha=1.0), seed=3)
    with torch.no_grad():  # a non-zero natural branch (B starts at zero)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.5)
    return model


def test_the_natural_branch_gradient_never_reaches_the_backbone_weights():
    model = _autolora_model().train()
    set_scope(model, "all")
    x, y = _batch()
    base = set(base_parameter_names(model))
    lora = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert base and lora and not base & lora

    F.cross_entropy(natural_forward(model, x), y).backward()  # the natural term alone
    assert all(p.requires_grad for p in model.parameters())  # the branch switch froze nothing
    for name, p in model.named_parameters():
        if name in base:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
        elif name in lora or name.startswith("head."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    # the whole objective: the backbone's gradient is that of the adversarial and KL terms with
    # the natural logits held fixed, i.e. nothing flows into it through the natural branch
    x_adv = (x + 0.05).clamp(0, 1)
    model.zero_grad(set_to_none=True)
    loss, _ = autolora_loss(model, x, y, x_adv, (0.4, 2.0))
    loss.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if n in base}
    model.zero_grad(set_to_none=True)
    z_nat = natural_forward(model, x).detach()
    z_adv = model(x_adv)
    kl = F.kl_div(F.log_softmax(z_adv, 1), F.log_softmax(z_nat, 1), reduction="none", log_target=True).sum(1).mean()
    (0.6 * F.cross_entropy(z_adv, y) + 2.0 * kl).backward()
    for name in base:
        torch.testing.assert_close(full[name], model.get_parameter(name).grad, rtol=1e-5, atol=1e-7)


def test_autolora_loss_is_the_seed_002_objective_and_toggles_no_requires_grad(monkeypatch):
    model = _autolora_model().train()
    set_scope(model, "all")
    x, y = _batch()
    x_adv = (x - 0.05).clamp(0, 1)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for cls in (nn.Parameter, nn.Module):
        monkeypatch.setattr(cls, "requires_grad_", lambda *a, **k: pytest.fail("requires_grad toggled"))
    loss, logits = autolora_loss(model, x, y, x_adv, (0.3, 4.2))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    monkeypatch.undo()
    with torch.no_grad():
        with lora_branch(model):
            z_nat = model(x)
        z_adv = model(x_adv)
        p_nat = F.softmax(z_nat, 1)
        kl = (p_nat * (F.log_softmax(z_nat, 1) - F.log_softmax(z_adv, 1))).sum(1).mean()
        expected = 0.3 * F.cross_entropy(z_nat, y) + 0.7 * F.cross_entropy(z_adv, y) + 4.2 * kl
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.detach(), z_adv)
    assert not torch.allclose(z_nat, model(x))  # the model outside the natural branch is the FE branch


def test_autolora_attack_runs_on_the_feature_extractor_branch():
    """The training attack sees the model with the natural branch off: it equals the attack on
    the same weights with the LoRA factors removed."""
    from asbound.transfer.methods import adversarial_examples

    model = _autolora_model()
    plain, _ = saved_model(model)  # the natural branch dropped
    x, y = _batch()
    a = adversarial_examples(model, "autolora", x, y, ATTACK, torch.Generator().manual_seed(4))
    b = adversarial_examples(plain, "autolora", x, y, ATTACK, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert (a - x).abs().max() <= ATTACK.eps + 1e-6


# --- runs --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained") / "cnn.pt"
    torch.save(digits_cnn().eval(), path)
    return path


def _cfg(pretrained: Path, method: str, **kw) -> TransferConfig:
    options = dict(model=f"file:{pretrained}", data="digits", classes="5-9", method=method, epochs=2,
                   batch_size=64, allow_pickle=True, n=150, n_val=40, n_test=60, score_n=30, score_steps=3,
                   eval_steps=(3,), attack_steps=2, lr=0.05, lr_ft=0.01, autolora_lambda_n=64)
    options.update(kw)
    return TransferConfig(**options)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_roli_stage_two_starts_from_the_stage_one_head_and_ranli_from_a_random_one(pretrained, tmp_path, monkeypatch):
    starts = []
    original = run_module.train_stage

    def spy(model, plan, *args, **kwargs):
        starts.append((plan.stage.name, plan.train_scope, model.head.weight.detach().clone(),
                       sorted(peft_parameter_names(model)) if plan.train_scope == "peft" else None))
        return original(model, plan, *args, **kwargs)

    monkeypatch.setattr(run_module, "train_stage", spy)
    results = transfer(_cfg(pretrained, "ranli,roli", peft="lora", peft_rank=4, score=False), tmp_path / "run",
                       progress=False, printer=lambda s: None)
    assert [(s[0], s[1]) for s in starts] == [("ranli", "peft"), ("adv-lp", "head"), ("roli", "peft")]
    roli = results[1]
    stage1 = _state(roli.out / "checkpoints" / "0-adv-lp-best.pt")
    assert torch.equal(starts[2][2], stage1["head.weight"])  # exactly the stage-1 selection
    assert not torch.equal(starts[2][2], starts[1][2])  # which moved from the random head
    assert not torch.equal(starts[0][2], stage1["head.weight"])  # RanLI: a random head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_module.derived_seed(0, "ranli", "head"))
        fresh = nn.Linear(16, 5)
    assert torch.equal(starts[0][2], fresh.weight)
    assert starts[0][3] and starts[0][3] == starts[2][3]  # the same LoRA set in both
    stages = roli.final["stages"]
    assert [s["stage"] for s in stages] == ["adv-lp", "roli"] and stages[1]["peft"]["variant"] == "lora"
    assert [s["lr"] for s in stages] == [0.05, 0.05]  # PEFT stages: --lr
    assert list(pd.read_csv(roli.out / "epochs.csv")["stage"]) == ["adv-lp", "adv-lp", "roli", "roli"]
    # the optimiser of stage 2 is fresh: its first epoch runs at the full rate again (cosine)
    assert list(pd.read_csv(roli.out / "epochs.csv")["lr"])[2] == pytest.approx(0.05)


@pytest.mark.parametrize("variant", ["full", "lora", "adapter", "bias"])
def test_each_peft_run_reenters_as_run_dir_with_its_test_accuracy(pretrained, tmp_path, variant):
    from asbound.data import load_data
    from asbound.transfer.loop import accuracy

    cfg = _cfg(pretrained, "roli", peft=variant, peft_rank=4, adapter_reduction=4, score=False, epochs=1)
    result = transfer(cfg, tmp_path / variant, progress=False, printer=lambda s: None)[0]
    loaded = load_model(parse_model_spec(f"run:{result.out}"), allow_pickle=True)
    model = loaded.module
    test = load_data("digits", split="test", classes="5-9", n=60, seed=0)
    clean, _ = accuracy(model, test.loader(64), torch.device("cpu"))
    assert clean == pytest.approx(result.final["test"]["clean_accuracy"])
    base = torch.load(pretrained, weights_only=False).state_dict()
    state = _state(result.out / "model.pt")
    config = json.loads((result.out / "config.json").read_text())
    if variant == "adapter":
        assert config["structure"]["variant"] == "adapter" and any(".adapter." in k for k in state)
    else:
        assert config["structure"] is None and not any("lora" in k or "adapter" in k for k in state)
    if variant == "bias":  # only biases (and the head) differ from the pretrained weights
        changed = {k for k, v in state.items() if k.startswith("backbone.") and not torch.equal(v, base[k[9:]])}
        assert changed and all(k.endswith(".bias") for k in changed)


def test_autolora_records_its_lambdas_and_learning_rate_and_halves_with_restore(pretrained, tmp_path, monkeypatch):
    """Synthetic accuracies inside the training loop: the LoRA branch's accuracy a gives
    lambda1 = 1 - a and lambda2 = 6 a; the validation robust accuracies drive AutoLR, whose
    halvings restore the best epoch's weights and show in epochs.csv's lr."""
    lora_acc = iter([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] * 8)
    seen_lambdas = []
    monkeypatch.setattr(loop, "lora_accuracy", lambda *a, **k: next(lora_acc))
    val = iter([0.5, 0.4, 0.3, 0.2, 0.6, 0.1])  # robust validation accuracy per epoch
    restored = []
    real_accuracy = loop.accuracy

    def fake_accuracy(model, batches, device, *, attack=None, **kw):
        clean, _ = real_accuracy(model, batches, device, **kw)
        return clean, next(val)

    original_batch_loss = loop.batch_loss

    def spy(model, objective, x, y, **kw):
        seen_lambdas.append(kw["lambdas"])
        return original_batch_loss(model, objective, x, y, **kw)

    monkeypatch.setattr(loop, "accuracy", fake_accuracy)
    monkeypatch.setattr(loop, "batch_loss", spy)
    original_load_best = run_module.RunCheckpoints.load_best

    def load_best(self, plan):
        state = original_load_best(self, plan)
        restored.append({k: v.clone() for k, v in state.items()})
        return state

    monkeypatch.setattr(run_module.RunCheckpoints, "load_best", load_best)
    cfg = _cfg(pretrained, "autolora", epochs=6, n=256, batch_size=64, score=False, autolora_lr=0.08,
               autolora_rank=4)
    result = transfer(cfg, tmp_path / "auto", progress=False, printer=lambda s: None)[0]
    rows = pd.read_csv(result.out / "epochs.csv")
    # 4 steps per epoch: a measured at the epoch's start and after steps 1, 2, 3 (the scripted a
    # cycle through 0.1 ... 0.8, so each epoch starts at 0.1 or 0.5); the record is the epoch's start
    assert list(rows["lambda1"]) == pytest.approx([0.9, 0.5] * 3)
    assert list(rows["lambda2"]) == pytest.approx([6 * (1 - v) for v in rows["lambda1"]])
    assert [round(1 - l1, 6) for l1, _ in seen_lambdas[:8]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    # the rule, by hand: checkpoints (0, 2, 3, 4, 5, 6) for 6 epochs; accuracies 0.5 0.4 0.3 0.2 0.6 0.1
    assert default_checkpoints(6) == (0, 2, 3, 4, 5, 6)
    rule = AutoLR(0.08, default_checkpoints(6))
    expected_lrs, lr = [], 0.08
    for a in [0.5, 0.4, 0.3, 0.2, 0.6, 0.1]:
        expected_lrs.append(lr)
        lr = rule.step(a).lr
    assert list(rows["lr"]) == pytest.approx(expected_lrs)
    # epoch 3 (e - 1 = 2 = W[1]): no increase in [0, 2) -> halve (condition 1), restore epoch 1's weights
    assert expected_lrs == pytest.approx([0.08, 0.08, 0.08, 0.04, 0.02, 0.02])
    best1 = restored[0]
    assert len(restored) >= 3  # two halvings (after epochs 3 and 4), then the final selection
    assert list(rows["selected"]) == [True, False, False, False, True, False]
    assert all(torch.equal(best1[k], restored[1][k]) for k in best1)  # both restores: epoch 1's weights
    final = _state(result.out / "model.pt")
    assert not any("lora" in k for k in final)  # inference is the feature-extractor branch


def test_autolora_condition2_variants_reach_the_loop(pretrained, tmp_path, monkeypatch):
    captured = []
    original = loop.AutoLR

    def spy(*args, **kwargs):
        captured.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "AutoLR", spy)
    for variant in ("code", "apgd"):
        transfer(_cfg(pretrained, "autolora", epochs=1, score=False, autolora_condition2=variant,
                      autolora_rho=0.5, autolora_divide=3.0), tmp_path / variant, progress=False, printer=lambda s: None)
    assert [(c["condition2"], c["rho"], c["divide"]) for c in captured] == [("code", 0.5, 3.0), ("apgd", 0.5, 3.0)]


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--peft", "prompt"], "applies to the methods ranli and roli only"),
    (["--method", "ranli", "--peft", "prompt", "--prompt-tokens", "0"], "prompt-tokens must be >= 1, got 0"),
    (["--method", "ranli", "--peft", "prompt", "--prompt-depth", "middle"], "invalid choice: 'middle'"),
    (["--head-init", "kaiming"], "invalid choice: 'kaiming'"),
    (["--peft", "lora"], "applies to the methods ranli and roli only"),
    (["--method", "autolora", "--autolora-rho", "0"], "autolora-rho must lie in (0, 1]"),
    (["--method", "autolora", "--autolora-divide", "1"], "autolora-divide must be a number > 1"),
    (["--method", "autolora", "--autolora-condition2", "x"], "invalid choice: 'x'"),
    (["--method", "autolora", "--select", "clean"], "--select clean is not valid with it"),
    (["--method", "ranli", "--peft-rank", "0"], "peft-rank must be >= 1, got 0"),
])
def test_bad_peft_and_autolora_options_are_one_line_with_exit_2(pretrained, tmp_path, capsys, args, message):
    argv = ["transfer", "--method", "lp", "--model", f"file:{pretrained}", "--allow-pickle", "--data", "digits",
            "--classes", "5-9", "--out", str(tmp_path / "run"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_peft_variant_with_nothing_to_adapt_is_one_line_with_exit_2(tmp_path, capsys):
    path = tmp_path / "nobias.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)), path)
    argv = ["transfer", "--method", "ranli", "--peft", "bias", "--model", f"file:{path}", "--allow-pickle",
            "--data", "digits", "--classes", "5-9", "--n", "64", "--n-test", "20", "--no-score", "--epochs", "1",
            "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--peft bias finds no layer to adapt" in err and "'bias'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before any directory is written


def test_config_validation_names_the_option():
    with pytest.raises(ConfigError, match="autolora-lambda-n must be >= 1"):
        TransferConfig(model="builtin:digits-random", data="digits", method="autolora", autolora_lambda_n=0).validated()
    with pytest.raises(ConfigError, match="autolora-lr must lie in"):
        TransferConfig(model="builtin:digits-random", data="digits", method="autolora", autolora_lr=-1.0).validated()


def test_autoattack_evaluates_every_new_method_on_the_saved_model(pretrained, tmp_path):
    """--autoattack on an adapter RoLI run (rebuilt structure) and an AutoLoRa run (natural branch
    dropped): a stronger attack never leaves more points correct than PGD or the clean model."""
    results = transfer(_cfg(pretrained, "roli,autolora", peft="adapter", adapter_reduction=4, autoattack=True,
                            n_test=10, eval_steps=(10,), epochs=1, score=False), tmp_path / "aa",
                       progress=False, printer=lambda s: None)
    for r in results:
        test = r.final["test"]
        assert test["autoattack"] is not None, r.method
        assert test["autoattack"] <= min(test["clean_accuracy"], test["pgd"]["10"]) + 1e-9, r.method


def test_runs_recorded_before_peft_and_torchrun_are_reread(pretrained, tmp_path, monkeypatch):
    """A run finished by the previous version (its config.json without world_size, structure and the
    stages' scope / peft keys) is reread, not refused and not retrained."""
    first = transfer(_cfg(pretrained, "lp-ft", score=False, epochs=1), tmp_path / "old", progress=False,
                     printer=lambda s: None)[0]
    config_path = first.out / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("world_size", "structure", "head_init", "prompt_tokens", "prompt_depth"):
        config.pop(key)
    for stage in config["stages"]:
        assert "scope" not in stage and "peft" not in stage  # recorded only where --peft resolved them
    config_path.write_text(json.dumps(config))
    monkeypatch.setattr(run_module, "train_stage", lambda *a, **k: pytest.fail("an old finished run was retrained"))
    again = transfer(_cfg(pretrained, "lp-ft", score=False, epochs=1), tmp_path / "old", progress=False,
                     printer=lambda s: None)[0]
    assert again.final == first.final
    ranli = json.loads(json.dumps(run_module._plan_record(run_module.plan_stages(
        METHODS["ranli"], _cfg(pretrained, "ranli", peft="bias"), "none")[0])))
    assert ranli["scope"] == "peft" and ranli["peft"]["variant"] == "bias"


@pytest.mark.parametrize("method, peft, stop", [("roli", "lora", 8), ("roli", "adapter", 8), ("autolora", "full", 6)])
def test_a_peft_or_autolora_run_resumes_to_the_uninterrupted_weights(pretrained, tmp_path, monkeypatch, method, peft, stop):
    """Interrupted inside RoLI's PEFT stage (3 steps per epoch, 2 + 2 epochs: step 8 is in stage 2's
    second epoch) or inside AutoLoRa's third epoch (its lr rule and lambdas resumed): the rerun ends
    with the same weights and epochs.csv, bit for bit on the CPU."""
    cfg = _cfg(pretrained, method, peft=peft, peft_rank=4, adapter_reduction=4, autolora_rank=4, score=False,
               epochs=2 if method == "roli" else 5, n=150, autolora_lr=0.2)
    whole = transfer(cfg, tmp_path / "whole", progress=False, printer=lambda s: None)[0]
    stop_cls, original = interrupt_training(monkeypatch, run_module, stop)
    with pytest.raises(stop_cls):
        transfer(cfg, tmp_path / "split", progress=False, printer=lambda s: None)
    assert not (tmp_path / "split" / "model.pt").exists()
    monkeypatch.setattr(run_module, "train_stage", original)
    lines = []
    resumed = transfer(cfg, tmp_path / "split", progress=False, printer=lines.append)[0]
    assert any("resuming" in line for line in lines)
    a, b = _state(whole.out / "model.pt"), _state(resumed.out / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pd.testing.assert_frame_equal(
        pd.read_csv(whole.out / "epochs.csv").drop(columns=["seconds", "images_per_second"]),
        pd.read_csv(resumed.out / "epochs.csv").drop(columns=["seconds", "images_per_second"]),
    )
    if method == "autolora":
        assert pd.read_csv(whole.out / "epochs.csv")["lr"].nunique() > 1  # the rule acted before and after the stop


def test_autolora_measures_its_lambdas_four_times_an_epoch(pretrained, tmp_path, monkeypatch):
    """7 steps per epoch: at the epoch's start and after steps 1, 3 and 5 (N/4, N/2, 3N/4 rounded down)."""
    calls = []
    monkeypatch.setattr(loop, "lora_accuracy", lambda *a, **k: calls.append(1) or 0.5)
    steps = []
    original = loop.batch_loss

    def spy(model, objective, x, y, **kw):
        steps.append(kw["lambdas"])
        return original(model, objective, x, y, **kw)

    monkeypatch.setattr(loop, "batch_loss", spy)
    transfer(_cfg(pretrained, "autolora", epochs=2, n=7 * 32, batch_size=32, score=False, autolora_rank=2),
             tmp_path / "run", progress=False, printer=lambda s: None)
    assert len(steps) == 14 and len(calls) == 8


def test_options_a_method_does_not_use_do_not_bind_its_run(pretrained, tmp_path):
    """adv-ft trained beside roli --peft adapter is the same run as adv-ft alone."""
    cfg = _cfg(pretrained, "adv-ft,roli", peft="adapter", adapter_reduction=4, prompt_tokens=5,
               prompt_depth="shallow", score=False, epochs=1)
    first = transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)[0]
    alone = transfer(_cfg(pretrained, "adv-ft", score=False, epochs=1), tmp_path / "run" / "adv-ft",
                     progress=False, printer=lambda s: None)[0]
    assert alone.final == first.final


def test_a_rank_share_of_one_image_is_refused_before_training():
    from asbound.transfer.methods import METHODS as ALL

    model = SplitModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8)), nn.Linear(8, 3))
    probe = torch.rand(4, 1, 8, 8)
    run_module._check_one_image_batches(model, probe, [ALL["adv-ft"]], 67, 64, "m", ranks=1)  # 64 + 3: fine
    with pytest.raises(ConfigError, match="over 2 ranks give a rank a share of one image"):
        run_module._check_one_image_batches(model, probe, [ALL["adv-ft"]], 67, 64, "m", ranks=2)  # 3 -> 2 + 1
    run_module._check_one_image_batches(model, probe, [ALL["adv-ft"]], 65, 64, "m", ranks=2)  # 1 < 2: left out
    with pytest.raises(ConfigError, match="share of one image"):
        run_module._check_one_image_batches(model, probe, [ALL["adv-ft"]], 64, 3, "m", ranks=2)
