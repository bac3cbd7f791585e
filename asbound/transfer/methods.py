"""Transfer methods as small objects over one training loop (:mod:`asbound.transfer.loop`).

A method is a sequence of :class:`Stage` s. A stage says *what trains* (the head, or everything),
*which objective* each mini-batch minimises, and its own optimiser settings; the loop does the
rest. Seed 001 (B.4), seed 002 and ``docs/METHODS.md``-style notes on the reference code:

========== ================================================ =========================================
method     stages                                           objective per mini-batch
========== ================================================ =========================================
lp         head (backbone frozen, eval mode)                CE(f(x), y)
ft         all (train mode)                                 CE(f(x), y)
lp-ft      lp, then ft from the LP head for half the epochs CE
adv-lp     head (backbone frozen, eval mode)                CE(f(x~), y), x~ = PGD on CE (Madry)
adv-ft     all; the attack runs in eval mode                CE(f(x~), y), x~ = PGD on CE (Madry)
trades-ft  all; the attack runs in eval mode                CE(f(x), y) + beta KL(p(x) || p(x~)),
                                                            x~ = PGD on the KL from x + 0.001 N(0, I)
ranli      ``--peft`` (full, lora, adapter, bias, prompt)   Madry, as adv-ft
           + head, from a random head (seed 000)
roli       adv-lp, then ranli's stage from the adv-lp       Madry
           stage's selected head, fresh optimiser (seed 000)
autolora   all + a LoRA natural branch (seed 002)           l1 CE(f_nat(x), y) + (1 - l1) CE(f(x~), y)
                                                            + l2 KL(p_nat(x) || p(x~)), x~ = PGD on
                                                            CE(f(.), y) from x + 0.001 N(0, I)
========== ================================================ =========================================

Fixed against the reference code: LP keeps the backbone in eval mode, so every backbone
parameter *and buffer* stays bit for bit (the reference's LP drifts BN statistics); the
training attack keeps the last iterate per example (not a batch-mean "best"); LP-FT's second
stage starts from the first stage's selected head with a fresh optimiser and schedule. PEFT
stages keep the backbone in eval mode (the reference's ``froze_enc``): nothing outside the PEFT
set changes. AutoLoRa's natural branch reads the backbone's weights detached (no
``requires_grad`` toggling, P-A8), and its lambda comes from the LoRA branch (P-A1).

Every method starts from a new ``Linear(m, K)`` head drawn from ``--head-init``
(:func:`new_head`): ``torch`` (the default: ``nn.Linear``'s own init, as seed 001's code and the
high-resolution AutoLoRa and TWINS code), ``roli`` (seed 000's code, ``src/models/mlp.py``:
``kaiming_normal_`` fan-out weights, std ``sqrt(2 / K)``, and every bias ``-log(99)``) or
``zeros`` (the low-resolution AutoLoRa code). RoLI's second stage starts from its first
stage's selected head, so the option reaches it through the adv-LP stage.

Each mini-batch's loss is the ``forward`` of :class:`StepLoss`, one module call however many
forward passes the objective makes, so ``DistributedDataParallel`` can wrap it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from asbound.attacks import PGD, loss_objective
from asbound.errors import ConfigError
from torch import nn

from asbound.models import SplitModel, frozen
from asbound.models.peft import natural_forward, peft_parameter_names

#: what a stage trains: the head, everything, ``--peft``'s choice (resolved to "all" or "peft")
SCOPES = ("head", "all", "tune", "peft")
#: the per-batch objectives
OBJECTIVES = ("ce", "madry", "trades", "autolora")


@dataclass(frozen=True)
class Stage:
    """One training stage: ``scope`` trains, ``objective`` is minimised, for ``epochs`` epochs.

    ``lr`` and ``epochs`` are the stage's defaults; the user's options override them (the
    second stage of LP-FT takes half of the user's epochs and the FT learning rate).
    """

    name: str
    scope: str
    objective: str
    epoch_factor: float = 1.0  # of the configured epochs (LP-FT's FT stage: 0.5)
    lr_role: str = "lp"  # the configured learning rate: "lp" (--lr), "ft" (--lr-ft), "tune" (--lr-ft for
    # --peft full, else --lr) or "autolora" (--autolora-lr)

    @property
    def adversarial(self) -> bool:
        return self.objective != "ce"


@dataclass(frozen=True)
class Method:
    name: str
    stages: "tuple[Stage, ...]"
    description: str

    @property
    def adversarial(self) -> bool:
        return any(s.adversarial for s in self.stages)


METHODS: "dict[str, Method]" = {
    m.name: m
    for m in (
        Method("lp", (Stage("lp", "head", "ce"),), "linear probing: the head on the frozen representation"),
        Method("ft", (Stage("ft", "all", "ce", lr_role="ft"),), "full finetuning"),
        Method(
            "lp-ft",
            (Stage("lp", "head", "ce"), Stage("ft", "all", "ce", epoch_factor=0.5, lr_role="ft")),
            "linear probing, then full finetuning from that head for half the epochs (seed 001 B.4)",
        ),
        Method("adv-lp", (Stage("adv-lp", "head", "madry"),), "adversarial linear probing (PGD on the loss)"),
        Method("adv-ft", (Stage("adv-ft", "all", "madry", lr_role="ft"),), "adversarial finetuning (Madry PGD-AT)"),
        Method(
            "trades-ft",
            (Stage("trades-ft", "all", "trades", lr_role="ft"),),
            "TRADES finetuning, seed 002's vanilla RFT: CE + beta KL",
        ),
        Method(
            "ranli",
            (Stage("ranli", "tune", "madry", lr_role="tune"),),
            "adversarial finetuning of --peft's parameters from a random head (seed 000's RanLI)",
        ),
        Method(
            "roli",
            (Stage("adv-lp", "head", "madry"), Stage("roli", "tune", "madry", lr_role="tune")),
            "robust linear initialisation: adv-LP, then RanLI's stage from that head (seed 000)",
        ),
        Method(
            "autolora",
            (Stage("autolora", "all", "autolora", lr_role="autolora"),),
            "adversarial finetuning with a LoRA natural branch and automated lambdas and lr (seed 002)",
        ),
    )
}


def parse_methods(text: str) -> "list[Method]":
    """``lp,ft,lp-ft`` -> methods; unknown names list the valid ones."""
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--method is empty; valid: {', '.join(METHODS)}")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--method names a method twice ({text}); give each once")
    return [METHODS[n] for n in names]


# --- the new head ---------------------------------------------------------------------------------

#: how a method's new head is drawn (``--head-init``)
HEAD_INITS = ("torch", "roli", "zeros")
#: the bias of seed 000's head: the logit of a prior probability 0.01, ``-log((1 - 0.01) / 0.01)``
ROLI_HEAD_BIAS = -math.log(99.0)


def new_head(features: int, classes: int, init: str, seed: int) -> nn.Linear:
    """A ``Linear(features, classes)`` head drawn from ``seed`` (the global generator untouched).

    ``torch``: ``nn.Linear``'s default, U(-1/sqrt(m), 1/sqrt(m)) weights and bias; ``roli``: seed
    000's code, weights ``kaiming_normal_(mode="fan_out")`` (N(0, 2 / K)), bias ``-log 99`` (a
    constant shift of every logit: softmax, the loss and the prediction ignore it); ``zeros``:
    weights and bias zero (the low-resolution AutoLoRa code's linear heads).
    """
    if init not in HEAD_INITS:
        raise ConfigError(f"unknown head init {init!r}; valid: {', '.join(HEAD_INITS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(features, classes)
        with torch.no_grad():
            if init == "roli":
                nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
                head.bias.fill_(ROLI_HEAD_BIAS)
            elif init == "zeros":
                head.weight.zero_()
                head.bias.zero_()
    return head


# --- what trains --------------------------------------------------------------------------------


def set_scope(model: SplitModel, scope: str) -> "list[torch.nn.Parameter]":
    """Make exactly the parameters of ``scope`` trainable; return them.

    ``head``: the backbone is frozen (no gradients) *and* kept in eval mode by :func:`train_mode`;
    ``peft``: the model's PEFT parameters (:mod:`asbound.models.peft`) and the head, the backbone
    in eval mode; ``all``: everything.
    """
    if scope not in SCOPES or scope == "tune":
        raise ConfigError(f"unknown scope {scope!r}; valid: head, all, peft")
    tuned = set(peft_parameter_names(model)) if scope == "peft" else set()
    for name, p in model.backbone.named_parameters(prefix="backbone"):
        p.requires_grad_(scope == "all" or name in tuned)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: SplitModel, scope: str) -> None:
    """Train mode for what trains; the backbone of a head-only or PEFT stage stays in eval mode."""
    model.train()
    if scope in ("head", "peft"):
        model.backbone.eval()


# --- objectives -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackSettings:
    """The training attack (and the validation attack): L-inf PGD, ``steps`` of ``step`` pixels."""

    eps: float
    steps: int
    step: float
    norm: str = "inf"

    def pgd(self, *, random_start: bool = True, steps: Optional[int] = None) -> PGD:
        rel = self.step / self.eps if self.eps > 0 else 1.0
        return PGD(eps=self.eps, norm=self.norm, steps=self.steps if steps is None else steps, rel_step=rel,
                   random_start=random_start, select="last")


def _kl(p_clean_log: Tensor, logits_adv: Tensor) -> Tensor:
    """``KL(p(x) || p(x~))`` per example, from ``log p(x)`` and the adversarial logits."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), p_clean_log, reduction="none", log_target=True).sum(1)


def adversarial_examples(
    model: SplitModel, objective: str, x: Tensor, y: Tensor, attack: AttackSettings, generator: torch.Generator
) -> Tensor:
    """``x~`` for a Madry or TRADES step, crafted in eval mode with parameters frozen (modes restored)."""
    with frozen(model):
        if objective == "autolora":  # the feature-extractor branch (the natural branch is off)
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
            return attack.pgd()(loss_objective(model, _ce_per_example, y), x, generator=generator,
                                start=x + 0.001 * noise, value=False).x_adv
        if objective == "madry":
            return attack.pgd()(loss_objective(model, _ce_per_example, y), x, generator=generator, value=False).x_adv
        with torch.no_grad():
            log_p = F.log_softmax(model(x), dim=1)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
        start = x + 0.001 * noise  # TRADES' start (seed 002); PGD projects it onto the threat set

        def kl(x_adv: Tensor) -> Tensor:
            return _kl(log_p, model(x_adv))

        return attack.pgd()(kl, x, generator=generator, start=start, value=False).x_adv


def _ce_per_example(outputs: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(outputs, labels, reduction="none")


class StepLoss(nn.Module):
    """One mini-batch's loss as a single forward call (whatever passes the objective makes).

    ``forward(x, y, x_adv, lambdas)`` returns ``(loss, logits)``: ``x_adv`` is the batch's
    adversarial examples for the adversarial objectives (made beforehand in eval mode by
    :func:`adversarial_examples`), ``lambdas`` AutoLoRa's ``(lambda1, lambda2)``. The objective
    ``features`` trains the head on cached features ``x``. The logits are those the training
    accuracy is read from (the adversarial ones for Madry and AutoLoRa).
    """

    def __init__(self, model: SplitModel, objective: str, trades_beta: float = 6.0) -> None:
        super().__init__()
        if objective not in (*OBJECTIVES, "features"):
            raise ConfigError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        self.model = model
        self.objective = objective
        self.trades_beta = trades_beta

    def forward(self, x: Tensor, y: Tensor, x_adv: Optional[Tensor] = None,
                lambdas: "tuple[float, float]" = (1.0, 0.0)) -> "tuple[Tensor, Tensor]":
        model, objective = self.model, self.objective
        if objective == "features":
            logits = model.head(x)
            return F.cross_entropy(logits, y), logits
        if objective == "ce":
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        if x_adv is None:
            raise ValueError(f"the {objective} objective needs adversarial examples")
        if objective == "madry":
            logits = model(x_adv)
            return F.cross_entropy(logits, y), logits
        if objective == "trades":
            logits = model(x)
            logits_adv = model(x_adv)
            kl = _kl(F.log_softmax(logits, dim=1), logits_adv).mean()
            return F.cross_entropy(logits, y) + self.trades_beta * kl, logits
        return autolora_loss(model, x, y, x_adv, lambdas)


def autolora_loss(model: SplitModel, x: Tensor, y: Tensor, x_adv: Tensor,
                  lambdas: "tuple[float, float]") -> "tuple[Tensor, Tensor]":
    """Seed 002's objective: ``l1 CE(z_nat, y) + (1 - l1) CE(z_adv, y) + l2 mean KL(p_nat || p_adv)``.

    ``z_nat``: the natural branch on ``x`` (its gradient reaches the LoRA factors and the head,
    not the backbone's weights); ``z_adv``: the feature-extractor branch on ``x_adv``. The KL is
    not detached: its gradient reaches both branches. Returns the loss and ``z_adv``.
    """
    lambda1, lambda2 = lambdas
    z_nat = natural_forward(model, x)
    z_adv = model(x_adv)
    kl = _kl(F.log_softmax(z_nat, dim=1), z_adv).mean()
    loss = lambda1 * F.cross_entropy(z_nat, y) + (1.0 - lambda1) * F.cross_entropy(z_adv, y) + lambda2 * kl
    return loss, z_adv


def batch_loss(
    model: SplitModel,
    objective: str,
    x: Tensor,
    y: Tensor,
    *,
    attack: AttackSettings,
    generator: torch.Generator,
    trades_beta: float,
    lambdas: "tuple[float, float]" = (1.0, 0.0),
    net: Optional[nn.Module] = None,
) -> "tuple[Tensor, Tensor]":
    """The mini-batch loss (a scalar) and the logits the training accuracy is read from.

    The caller has put the model in the stage's training mode; adversarial examples are made in
    eval mode and the mode is restored before the update's forward passes. ``net``: the
    :class:`StepLoss` of ``model`` to call (e.g. wrapped by ``DistributedDataParallel``).
    """
    x_adv = None if objective in ("ce", "features") else adversarial_examples(model, objective, x, y, attack, generator)
    return (net if net is not None else StepLoss(model, objective, trades_beta))(x, y, x_adv, lambdas)
