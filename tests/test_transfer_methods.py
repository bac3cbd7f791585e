"""The transfer engine's definitions, pinned one by one against hand computations.

Each test pins one part of a method (``docs/SPEC.md`` sections 7-8, ``METHODS.md``): the inputs
the Madry update sees, the modes of the attack and of the update, the TRADES objective
``CE(f(x), y) + beta KL(p(x) || p(x~))`` with its ``x + 0.001 N(0, I)`` start, the attack's random
start and step, the learning rates and schedules, weight decay, validation (eval mode, the
configured PGD steps), model selection, the per-epoch shuffles, the cached-feature LP and the
test PGD-k step counts. Models are a few-parameter split net on random 2x2 "images"; only the
cached-feature comparison runs ``transfer`` (LP on digits, a few hundred images).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asbound.transfer.run as run_module
from asbound.models import SplitModel
from asbound.transfer import METHODS, TransferConfig, loop, transfer
from asbound.transfer.loop import (
    Checkpointer,
    Settings,
    StagePlan,
    StageProgress,
    accuracy,
    train_stage,
)
from asbound.transfer.methods import AttackSettings, Stage, batch_loss
from asbound.transfer.optim import make_optimizer, schedule_factor


pytestmark = pytest.mark.usefixtures("one_thread")


# --- a tiny split model with BatchNorm, and hand-written PGD --------------------------------------


def _model(seed: int = 0) -> SplitModel:
    """``Flatten -> Linear(4, 8) -> BatchNorm1d -> ReLU`` and a ``Linear(8, 3)`` head, with BN
    running statistics far from a batch's, so eval and train mode give different outputs."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
    head = nn.Linear(8, 3)
    with torch.no_grad():
        backbone[1].weight.mul_(4.0)
        head.weight.mul_(3.0)
        backbone[2].running_mean.uniform_(-1.0, 1.0)
        backbone[2].running_var.uniform_(0.5, 2.0)
        backbone[2].weight.uniform_(0.5, 1.5)
    return SplitModel(backbone, head)


def _data(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 0.25 + 0.5 * torch.rand(n, 1, 2, 2, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _bn_buffers(model: SplitModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _hand_pgd(objective, x0: torch.Tensor, start: torch.Tensor, eps: float, step: float, steps: int) -> torch.Tensor:
    """L-inf PGD written out: ``x <- clip_[0,1](x0 + clip_eps(x + step sign(grad) - x0))``, last iterate."""
    xa = (x0 + (start - x0).clamp(-eps, eps)).clamp(0.0, 1.0)
    for _ in range(steps):
        xa = xa.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(xa).sum(), xa)
        xa = (x0 + (xa.detach() + step * grad.sign() - x0).clamp(-eps, eps)).clamp(0.0, 1.0)
    return xa.detach()


class _ModeSpy:
    """Records ``(backbone.training, input)`` of every forward pass through the backbone."""

    def __init__(self, model: SplitModel) -> None:
        self.calls: list[tuple[bool, torch.Tensor]] = []
        self.handle = model.backbone.register_forward_pre_hook(
            lambda module, args: self.calls.append((module.training, args[0].detach().clone())))

    def modes(self) -> list[bool]:
        return [mode for mode, _ in self.calls]


ATTACK = AttackSettings(eps=0.1, steps=3, step=0.03)


# --- the training attack ----------------------------------------------------------------------------


def test_attack_settings_build_pgd_with_random_start_and_the_configured_step():
    pgd = AttackSettings(eps=0.1, steps=7, step=0.025).pgd()
    assert pgd.random_start and pgd.select == "last" and pgd.steps == 7
    assert pgd.rel_step * pgd.eps == pytest.approx(0.025)  # the step, not eps (FGSM-like)
    assert AttackSettings(eps=0.1, steps=7, step=0.025).pgd(steps=2).steps == 2


def test_madry_loss_is_the_ce_at_the_pgd_point_and_the_attack_runs_in_eval_mode():
    model, (x, y) = _model(), _data()
    reference = copy.deepcopy(model)
    bn_before = _bn_buffers(model)

    # the expected attack: uniform start in the eps-box (drawn first from the generator), then
    # PGD steps of ATTACK.step on the per-example CE, all in eval mode (running statistics)
    g = torch.Generator().manual_seed(5)
    start = x + (2.0 * torch.rand(x.shape, generator=g) - 1.0) * ATTACK.eps
    reference.eval()
    x_adv = _hand_pgd(lambda z: F.cross_entropy(reference(z), y, reduction="none"), x, start, ATTACK.eps,
                      ATTACK.step, ATTACK.steps)
    assert (x_adv - x).abs().max() <= ATTACK.eps + 1e-6 and not torch.allclose(x_adv, x)
    reference.train()
    expected = F.cross_entropy(reference(x_adv), y)  # the update: train mode, at the PGD point
    with torch.no_grad():
        clean = F.cross_entropy(copy.deepcopy(model).train()(x), y)

    model.train()
    spy = _ModeSpy(model)
    loss, _ = batch_loss(model, "madry", x, y, attack=ATTACK, generator=torch.Generator().manual_seed(5),
                              trades_beta=6.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(loss.detach()) - float(clean)) > 1e-2  # not the clean loss
    # every attack pass in eval mode, then one update pass in train mode on x_adv
    modes = spy.modes()
    assert len(modes) >= ATTACK.steps + 1 and modes[-1] and not any(modes[:-1])
    torch.testing.assert_close(spy.calls[-1][1], x_adv)
    assert model.training and model.backbone[2].training
    # BN statistics moved once, by the update's batch x_adv, not by the attack's iterates
    bn_after = _bn_buffers(model)
    for k, v in _bn_buffers(reference).items():
        torch.testing.assert_close(bn_after[k], v)
    assert not torch.equal(bn_after["backbone.2.running_mean"], bn_before["backbone.2.running_mean"])
    loss.backward()  # the loss reaches the trained parameters
    assert model.head.weight.grad is not None and model.backbone[1].weight.grad is not None


def test_trades_loss_is_ce_plus_beta_kl_clean_to_adversarial_from_the_noisy_start():
    model, (x, y) = _model(2), _data(seed=3)
    attack, beta = AttackSettings(eps=0.3, steps=3, step=0.1), 6.0
    reference = copy.deepcopy(model).eval()

    # TRADES (seed 002; METHODS.md): x~ = PGD on KL(p(x) || p(x')) from x + 0.001 N(0, I), eval mode
    g = torch.Generator().manual_seed(9)
    start = x + 0.001 * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        log_p = F.log_softmax(reference(x), dim=1)

    def kl_clean_adv(z: torch.Tensor) -> torch.Tensor:  # sum_k p_k (log p_k - log q_k), per example
        return (log_p.exp() * (log_p - F.log_softmax(reference(z), dim=1))).sum(1)

    x_adv = _hand_pgd(kl_clean_adv, x, start, attack.eps, attack.step, attack.steps)
    reference.train()
    logits, logits_adv = reference(x), reference(x_adv)
    p, log_p_t, log_q = F.softmax(logits, 1), F.log_softmax(logits, 1), F.log_softmax(logits_adv, 1)
    ce = F.cross_entropy(logits, y)
    kl = (p * (log_p_t - log_q)).sum(1).mean()  # batchmean
    kl_reversed = (log_q.exp() * (log_q - log_p_t)).sum(1).mean()
    expected = ce + beta * kl
    # the hand computation distinguishes the variants the test must reject
    assert float(kl.detach()) > 1e-2
    assert abs(float((kl - kl_reversed).detach())) > 1e-3 * float(kl.detach()) + 1e-5
    torch.testing.assert_close(kl, F.kl_div(log_q, p, reduction="batchmean"))  # torch's TRADES form
    expected.backward()  # the KL's gradient flows through both p(x) and p(x~)

    model.train()
    spy = _ModeSpy(model)
    loss, out = batch_loss(model, "trades", x, y, attack=attack, generator=torch.Generator().manual_seed(9),
                           trades_beta=beta)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, logits)  # training accuracy is read from the clean logits
    loss.backward()
    for (name, p_model), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_model.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad()
    # clean log p, the attack's steps and its final value in eval mode; then f(x), f(x~) in train mode
    modes = spy.modes()
    assert len(modes) >= attack.steps + 3 and modes[-2:] == [True, True] and not any(modes[:-2])
    torch.testing.assert_close(spy.calls[-2][1], x)
    torch.testing.assert_close(spy.calls[-1][1], x_adv)
    # beta scales the KL term: beta = 0 is the clean CE
    loss0, _ = batch_loss(model, "trades", x, y, attack=attack, generator=torch.Generator().manual_seed(9),
                          trades_beta=0.0)
    torch.testing.assert_close(loss0, ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["trades", "autolora"])
def test_the_noisy_start_is_projected_onto_the_threat_set_before_the_first_gradient(objective):
    """TRADES' and AutoLoRa's start ``x + 0.001 N(0, I)`` is projected onto the eps-ball around x
    and [0, 1] before the model sees it (the reference code takes its first gradient at the raw
    start, outside [0, 1] wherever a pixel is 0 or 1): every input the attack evaluates is an image."""
    from asbound.transfer.methods import adversarial_examples

    model = _model(2)
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(4, 1, 2, 2).contiguous()  # pixels on the box's faces
    y = torch.tensor([0, 1, 2, 0])
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].detach().clone()))
    attack = AttackSettings(eps=0.0005, steps=2, step=0.0002)  # smaller than the noise: the ball acts too
    adversarial_examples(model, objective, x, y, attack, torch.Generator().manual_seed(0))
    attacked = [z for z in seen if not torch.equal(z, x)]
    assert len(attacked) >= attack.steps
    for z in attacked:
        assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
        assert float((z - x).abs().max()) <= attack.eps + 1e-7
    raw = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert float(raw.min()) < 0.0 and float((raw - x).abs().max()) > attack.eps  # what the reference evaluates


# --- what each method trains, with which rate and selection ----------------------------------------


def test_stage_plans_take_the_right_learning_rate_selection_and_cache():
    cfg = TransferConfig(model="file:m.pt", data="digits", lr=0.5, lr_ft=0.02, epochs=4)
    expected = {
        "lp": [(0.5, "clean", 4)], "ft": [(0.02, "clean", 4)], "lp-ft": [(0.5, "clean", 4), (0.02, "clean", 2)],
        "adv-lp": [(0.5, "robust", 4)], "adv-ft": [(0.02, "robust", 4)], "trades-ft": [(0.02, "robust", 4)],
        "ranli": [(0.02, "robust", 4)], "roli": [(0.5, "robust", 4), (0.02, "robust", 4)],
        "autolora": [(0.01, "robust", 4)],
    }
    scopes = {"lp": ["head"], "ft": ["all"], "lp-ft": ["head", "all"], "adv-lp": ["head"], "adv-ft": ["all"],
              "trades-ft": ["all"], "ranli": ["all"], "roli": ["head", "all"], "autolora": ["all"]}
    for name, method in METHODS.items():
        plans = run_module.plan_stages(method, cfg, "none")
        assert [(p.lr, p.select, p.epochs) for p in plans] == expected[name], name
        assert [p.train_scope for p in plans] == scopes[name], name
        assert [p.cache_features for p in plans] == [name in ("lp", "lp-ft") and i == 0 for i in range(len(plans))]
        assert not any(p.cache_features for p in run_module.plan_stages(method, cfg, "crop"))
        assert not any(p.cache_features for p in run_module.plan_stages(method, cfg, "none", distributed=True))
        assert [p.peft is not None for p in plans] == [name == "autolora"] * len(plans)
    last = dataclasses.replace(cfg, select="last", method="lp")
    assert {p.select for m in METHODS.values() for p in run_module.plan_stages(m, last, "none")} == {"last"}
    # --peft: RanLI / RoLI's adversarial stage trains the PEFT set at --lr (full: everything at --lr-ft)
    for variant in ("lora", "adapter", "bias", "prompt"):
        peft = dataclasses.replace(cfg, method="roli", peft=variant, prompt_tokens=7, prompt_depth="shallow")
        plans = run_module.plan_stages(METHODS["roli"], peft, "none")
        assert [(p.train_scope, p.lr) for p in plans] == [("head", 0.5), ("peft", 0.5)]
        assert plans[0].peft is None and plans[1].peft["variant"] == variant
        # adapters and prompts are saved unmerged: run:DIR rebuilds them
        assert run_module.saved_structure(plans) == (plans[1].peft if variant in ("adapter", "prompt") else None)
        # the prompt options are recorded for prompts only (the other records are unchanged)
        prompt_fields = {"tokens": 7, "deep": False} if variant == "prompt" else {}
        assert {k: plans[1].peft[k] for k in ("tokens", "deep") if k in plans[1].peft} == prompt_fields


# --- the new head (--head-init) -----------------------------------------------------------------------


def test_head_init_torch_is_nn_linears_default_from_the_seed():
    from asbound.transfer.methods import new_head

    state = torch.random.get_rng_state()
    head = new_head(64, 7, "torch", seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    torch.manual_seed(11)
    plain = nn.Linear(64, 7)
    assert torch.equal(head.weight, plain.weight) and torch.equal(head.bias, plain.bias)
    assert float(head.weight.detach().abs().max()) <= 1 / math.sqrt(64)  # U(-1/sqrt(m), 1/sqrt(m))
    assert torch.equal(new_head(64, 7, "torch", seed=11).weight, head.weight)
    assert not torch.equal(new_head(64, 7, "torch", seed=12).weight, head.weight)


@pytest.mark.parametrize("features, classes", [(4096, 10), (1024, 40)])
def test_head_init_roli_is_kaiming_normal_fan_out_with_bias_minus_log_99(features, classes):
    """Seed 000's code (``src/models/mlp.py``): ``kaiming_normal_(weight, a=0, mode='fan_out')``,
    i.e. N(0, 2 / K) with K = fan_out = the number of classes (whatever the feature width), and
    the bias ``-log((1 - 0.01) / 0.01)`` for every class."""
    from asbound.transfer.methods import new_head

    head = new_head(features, classes, "roli", seed=3)
    w = head.weight.detach().double().flatten()
    std = math.sqrt(2.0 / classes)
    n = w.numel()
    assert abs(float(w.mean())) < 4 * std / math.sqrt(n)
    assert abs(float(w.std()) / std - 1) < 4 / math.sqrt(2 * n)  # the sample std's standard error
    inside = float((w.abs() <= std).double().mean())  # normal, not uniform: 68.3% within one std
    assert abs(inside - 0.6827) < 4 * math.sqrt(0.6827 * 0.3173 / n)
    assert float(w.abs().max()) > 3 * std  # unbounded tails (a uniform of this std stops at 1.73 std)
    assert torch.equal(head.bias.detach(), torch.full((classes,), -math.log(99.0)))
    assert float(head.bias.detach()[0]) == pytest.approx(-4.59512, abs=1e-5)
    assert torch.equal(new_head(features, classes, "roli", seed=3).weight, head.weight)  # seeded


def test_head_init_zeros_and_an_unknown_init():
    from asbound.errors import ConfigError
    from asbound.transfer.methods import new_head

    head = new_head(16, 3, "zeros", seed=0)
    assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0
    with pytest.raises(ConfigError, match="unknown head init 'kaiming'; valid: torch, roli, zeros"):
        new_head(16, 3, "kaiming", seed=0)
    with pytest.raises(ConfigError, match="head-init 'x' is not valid; valid: torch, roli, zeros"):
        TransferConfig(model="file:m.pt", data="digits", head_init="x").validated()


@pytest.mark.parametrize("init", ["roli", "zeros", None])
def test_head_init_from_the_command_line_reaches_every_stage_that_starts_from_a_new_head(
        tmp_path, monkeypatch, init):
    """``--head-init`` is recorded in config.json and draws the head that lp, ranli and roli's
    adv-LP stage start from (roli's second stage starts from the first stage's selection)."""
    from asbound.cli import main
    from asbound.transfer.loop import derived_seed
    from asbound.transfer.methods import new_head

    path = tmp_path / "cnn.pt"
    torch.save(_cnn(), path)
    starts = []
    original = run_module.train_stage

    def spy(model, plan, *args, **kwargs):
        starts.append((plan.stage.name, model.head.weight.detach().clone(), model.head.bias.detach().clone()))
        return original(model, plan, *args, **kwargs)

    monkeypatch.setattr(run_module, "train_stage", spy)
    argv = ["transfer", "--method", "lp,ranli,roli", "--model", f"file:{path}", "--allow-pickle", "--data", "digits",
            "--classes", "5-9", "--epochs", "1", "--n", "64", "--n-val", "16", "--n-test", "16", "--no-score",
            "--attack-steps", "1", "--eval-steps", "1", "--no-progress", "--device", "cpu",
            "--out", str(tmp_path / "run"), *(["--head-init", init] if init else [])]
    assert main(argv) == 0
    kind = init or "torch"
    assert [s[0] for s in starts] == ["lp", "ranli", "adv-lp", "roli"]
    for (stage, weight, bias), method in zip([starts[0], starts[1], starts[2]], ["lp", "ranli", "roli"]):
        expected = new_head(8, 5, kind, derived_seed(0, method, "head"))
        assert torch.equal(weight, expected.weight) and torch.equal(bias, expected.bias), stage
        config = json.loads((tmp_path / "run" / method / "config.json").read_text())
        assert config["head_init"] == kind
    if kind != "torch":  # not nn.Linear's default
        torch.manual_seed(derived_seed(0, "lp", "head"))
        assert not torch.equal(starts[0][1], nn.Linear(8, 5).weight)


def test_cosine_step_and_constant_schedules_match_the_closed_form():
    T = 8
    cosine = schedule_factor("cosine", T)
    for t in range(T + 1):
        assert cosine(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * t / T)), abs=1e-12)
    assert cosine(0) == 1.0 and cosine(T) == pytest.approx(0.0, abs=1e-12)
    assert [schedule_factor("step", T)(t) for t in range(T)] == [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    assert [schedule_factor("constant", T)(t) for t in range(T)] == [1.0] * T


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_shrinks_a_parameter_with_zero_gradient(name):
    p = nn.Parameter(torch.full((3,), 2.0))
    opt = make_optimizer([p], name, lr=0.1, momentum=0.0, weight_decay=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    # SGD: p - lr (grad + wd p); AdamW (decoupled): p (1 - lr wd), and Adam's step is 0 for a 0 gradient
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 * (1 - 0.1 * 0.5)))
    q = nn.Parameter(torch.full((3,), 2.0))
    opt = make_optimizer([q], name, lr=0.1, momentum=0.0, weight_decay=0.0)
    q.grad = torch.zeros_like(q)
    opt.step()
    assert torch.equal(q.detach(), torch.full((3,), 2.0))


# --- the loop: schedule per iteration, shuffles, validation, selection, cached features ------------


class _Memory(Checkpointer):
    def __init__(self) -> None:
        self.best: dict | None = None

    def save_last(self, plan, model, progress) -> None:
        pass

    def save_best(self, plan, model) -> None:
        self.best = copy.deepcopy(model.state_dict())

    def load_best(self, plan) -> dict:
        return self.best


def _settings(**kw) -> Settings:
    options = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "schedule": "cosine", "batch_size": 8,
               "attack": AttackSettings(eps=0.1, steps=2, step=0.05), "trades_beta": 6.0, "seed": 3, "method": "m",
               "device": torch.device("cpu"), "amp": None}
    return Settings(**{**options, **kw})


def _plan(objective: str = "ce", scope: str = "all", epochs: int = 2, lr: float = 0.1, select: str = "clean",
          cache: bool = False) -> StagePlan:
    return StagePlan(stage=Stage("s", scope, objective), index=0, epochs=epochs, lr=lr, select=select,
                     augment="none", cache_features=cache)


class _Loader:
    """``train_batches(seed, shuffle)`` like ``DataSet.loader``: a seeded randperm order; records seeds."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.calls: list[tuple[int, bool]] = []
        self.orders: list[list[int]] = []

    def __call__(self, seed: int, shuffle: bool):
        self.calls.append((seed, shuffle))
        n = len(self.y)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        self.orders.append(order.tolist())
        return [(self.x[order[i:i + self.batch_size]], self.y[order[i:i + self.batch_size]])
                for i in range(0, n, self.batch_size)]


def _run(plan: StagePlan, settings: Settings, model: SplitModel | None = None, n: int = 24, **kw):
    model = model if model is not None else _model()
    x, y = _data(n, seed=4)
    xv, yv = _data(8, seed=5)
    loader = _Loader(x, y, settings.batch_size)
    memory = _Memory()
    lrs: list[float] = []
    state = train_stage(model, plan, settings, loader, n, lambda: [(xv, yv)], memory, StageProgress(),
                        on_batch=lambda epoch, step, loss, lr: lrs.append(lr), **kw)
    return model, state, loader, lrs


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_the_learning_rate_follows_the_schedule_per_iteration(monkeypatch, schedule):
    used: list[float] = []  # the rate of each optimizer step, read when the step is taken
    real = loop.make_optimizer

    def spy(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, a, kw: used.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", spy)
    _run(_plan(epochs=2, lr=0.2, select="last"), _settings(schedule=schedule))  # 24 images, batch 8: T = 6
    T = 6
    expected = {
        "cosine": [0.2 * 0.5 * (1 + math.cos(math.pi * t / T)) for t in range(T)],
        "step": [0.2 * f for f in (1, 1, 1, 0.1, 0.1, 0.01)],  # x0.1 from 50%, x0.01 from 75% of T
        "constant": [0.2] * T,
    }[schedule]
    assert used == pytest.approx(expected, abs=1e-12)


def test_each_epoch_has_its_own_reproducible_shuffle():
    settings = _settings()
    _, _, a, _ = _run(_plan(epochs=3, select="last"), settings)
    _, _, b, _ = _run(_plan(epochs=3, select="last"), settings)
    assert a.calls == b.calls and a.orders == b.orders  # reproducible
    assert all(shuffle for _, shuffle in a.calls)
    assert len({seed for seed, _ in a.calls}) == 3 and len({tuple(o) for o in a.orders}) == 3
    _, _, c, _ = _run(_plan(epochs=3, select="last"), _settings(seed=4))
    assert c.orders != a.orders  # and a function of the seed


def test_cached_feature_batches_are_reshuffled_every_epoch():
    model = _model()
    seen: list[torch.Tensor] = []
    model.head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    _run(_plan(scope="head", epochs=3, select="last", cache=True), _settings(batch_size=24), model=model)
    firsts = [g for g in seen if g.shape[0] == 24][-3:]  # one full batch per epoch (validation has 8)
    assert len(firsts) == 3
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])
    rows = [sorted(map(tuple, g.tolist())) for g in firsts]  # the same features, in another order
    assert rows[0] == rows[1] == rows[2]


def test_cached_features_train_the_same_head_as_the_backbone_path():
    settings = _settings(batch_size=8)
    a, state_a, loader_a, _ = _run(_plan(scope="head", epochs=2, select="last", cache=True), settings)
    b, state_b, loader_b, _ = _run(_plan(scope="head", epochs=2, select="last", cache=False), settings)
    assert loader_a.calls[0][1] is False and len(loader_a.calls) == 1  # features computed once, unshuffled
    assert all(shuffle for _, shuffle in loader_b.calls) and len(loader_b.calls) == 2
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-5, atol=1e-6)
    assert [r["train_loss"] for r in state_a.history] == pytest.approx([r["train_loss"] for r in state_b.history],
                                                                       rel=1e-5)
    assert not torch.equal(a.head.weight, _model().head.weight)


def test_validation_accuracy_runs_in_eval_mode_and_leaves_bn_statistics_alone():
    model, (x, y) = _model(), _data(16, seed=6)
    model.train()
    before = _bn_buffers(model)
    clean, robust = accuracy(model, [(x[:8], y[:8]), (x[8:], y[8:])], torch.device("cpu"),
                             attack=AttackSettings(eps=0.1, steps=2, step=0.05), steps=2)
    for k, v in _bn_buffers(model).items():
        assert torch.equal(v, before[k]), k
    assert model.training and model.backbone[2].training  # the mode is given back
    with torch.no_grad():
        expected = float((copy.deepcopy(model).eval()(x).argmax(1) == y).float().mean())
    assert clean == pytest.approx(expected)
    assert robust is not None and robust <= clean


class _ScriptedAccuracy:
    """Stands in for ``loop.accuracy``: scripted (clean, robust) per validation, records the steps."""

    def __init__(self, values: list[tuple[float, float]]) -> None:
        self.values, self.calls = list(values), []

    def __call__(self, model, batches, device, *, attack=None, steps=10, seed=0, world=None):
        self.calls.append((attack, steps))
        clean, robust = self.values.pop(0)
        return clean, (robust if attack is not None else None)


@pytest.mark.parametrize("select, objective, best", [("robust", "madry", 2), ("clean", "ce", 3),
                                                     ("robust", "ce", 2), ("last", "ce", 3)])
def test_model_selection_keeps_the_best_epoch_by_the_plans_metric(monkeypatch, select, objective, best):
    scripted = _ScriptedAccuracy([(0.9, 0.1), (0.5, 0.6), (0.95, 0.2)])
    monkeypatch.setattr(loop, "accuracy", scripted)
    model, weights = _model(), []
    _, state, _, _ = _run(_plan(objective=objective, epochs=3, select=select), _settings(), model=model,
                          report=lambda record: weights.append(copy.deepcopy(model.state_dict())))
    assert state.best_epoch == best
    assert [r["selected"] for r in state.history][best - 1]
    for k, v in model.state_dict().items():  # the model ends with the selected epoch's weights
        assert torch.equal(v, weights[best - 1][k]), k
    if select == "robust":
        assert all(attack is not None for attack, _ in scripted.calls)


def test_validation_robust_accuracy_uses_the_configured_attack_steps(monkeypatch):
    steps_seen = []
    real = loop.robust_correct

    def spy(model, x, y, attack, steps, generator, **kwargs):
        steps_seen.append(steps)
        return real(model, x, y, attack, steps, generator, **kwargs)

    monkeypatch.setattr(loop, "robust_correct", spy)
    settings = _settings(attack=AttackSettings(eps=0.1, steps=4, step=0.03))
    _, state, _, _ = _run(_plan(objective="madry", epochs=2, select="robust"), settings)
    assert steps_seen == [4, 4]  # one validation batch per epoch, PGD with --attack-steps
    assert all(r["val_robust_accuracy"] is not None for r in state.history)


# --- the test evaluation ----------------------------------------------------------------------------


class _TestSet:
    num_classes = 3

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def loader(self, batch_size: int, shuffle: bool = False):
        return [(self.x[i:i + batch_size], self.y[i:i + batch_size]) for i in range(0, len(self.y), batch_size)]


def test_test_pgd_k_runs_k_steps_not_the_training_steps(monkeypatch):
    steps_seen = []
    real = loop.robust_correct

    def spy(model, x, y, attack, steps, generator, **kwargs):
        steps_seen.append(steps)
        assert attack.eps == pytest.approx(0.1) and attack.step == pytest.approx(0.03)
        return real(model, x, y, attack, steps, generator, **kwargs)

    monkeypatch.setattr(loop, "robust_correct", spy)
    cfg = TransferConfig(model="file:m.pt", data="digits", eps=0.1, attack_step=0.03, attack_steps=3,
                         eval_steps=(1, 5), batch_size=8, seed=0)
    x, y = _data(8, seed=7)
    out = run_module.evaluate(_model().eval(), _TestSet(x, y), cfg, torch.device("cpu"))
    assert steps_seen == [1, 5]
    assert set(out["pgd"]) == {"1", "5"} and out["n"] == 8


# --- LP on cached features, end to end --------------------------------------------------------------


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 8), nn.ReLU(), nn.Linear(8, 5)).eval()


def test_lp_on_cached_features_equals_lp_through_the_backbone_without_augmentation(tmp_path, monkeypatch):
    path = tmp_path / "cnn.pt"
    torch.save(_cnn(), path)
    cfg = TransferConfig(model=f"file:{path}", data="digits", classes="5-9", method="lp", epochs=2, batch_size=32,
                         allow_pickle=True, n=96, n_val=32, n_test=16, score=False, eval_steps=(1,), attack_steps=1,
                         lr=0.05, augment="none", device="cpu", amp="off")
    a = transfer(cfg, tmp_path / "cached", progress=False, printer=lambda s: None)[0]
    plan = run_module.plan_stages

    def uncached(*args, **kwargs):
        return [dataclasses.replace(p, cache_features=False) for p in plan(*args, **kwargs)]

    monkeypatch.setattr(run_module, "plan_stages", uncached)
    b = transfer(cfg, tmp_path / "backbone", progress=False, printer=lambda s: None)[0]
    assert a.final["stages"][0]["cached_features"] is True
    assert b.final["stages"][0]["cached_features"] is False
    wa = torch.load(Path(a.out) / "model.pt", weights_only=True)
    wb = torch.load(Path(b.out) / "model.pt", weights_only=True)
    for k, v in wa.items():
        torch.testing.assert_close(v, wb[k], rtol=1e-5, atol=1e-6)
    for k, v in _cnn().state_dict().items():  # LP: the backbone bit for bit
        if not k.startswith("6."):
            assert torch.equal(wa[f"backbone.{k}"], v), k
