"""``TransferConfig``: everything that determines a transfer run, with the seeds' defaults.

Defaults (``docs/SPEC.md`` section 8; seed 001 B.1 and B.4, seed 002):

================================ =================================================================
LP, adv-LP                       20 epochs, batch 128, SGD momentum 0.9, lr 0.01, cosine per iteration
FT, adv-FT, TRADES-FT            lr 0.001 (``--lr-ft``), otherwise as LP
LP-FT                            LP as above, then FT from that head for half the epochs
training attack                  L-inf PGD-10, eps 8/255, step 2/255, uniform random start
TRADES                           beta 6, PGD-10 on the KL from x + 0.001 N(0, I)
RanLI, RoLI (seed 000)           stage 2 (RoLI: after adv-LP, from its selected head) is Madry
                                 PGD-AT of what ``--peft`` says: full (lr ``--lr-ft``), lora (rank
                                 16, alpha 16), adapter (reduction 8), bias or prompt (10 tokens,
                                 VPT-deep; ViTs) (lr ``--lr``)
new head                         ``nn.Linear``'s default init (``--head-init``; seed 000's code:
                                 ``roli``)
AutoLoRa (seed 002)              LoRA natural branch rank 8, alpha 1; lambda1 = 1 - a, lambda2 = 6 a;
                                 SGD from lr 0.01 with the automated halving rule (rho 0.75, divide 2)
model selection                  5% seeded validation split of the training data; the epoch with
                                 the best robust validation accuracy (adversarial stages) or clean
                                 validation accuracy (standard stages); the test split is used once
evaluation                       clean, PGD-10 and PGD-20 accuracy (step 2/255) on the test split,
                                 AutoAttack standard with ``--autoattack``; ``score`` before and after
images per phase                 without ``--n``: every training, validation and test image, 1000
                                 test images scored; with ``--n N``: at most N in each phase
                                 (:func:`image_counts`); ``all`` takes a whole split
================================ =================================================================

Robust accuracy is counted per point: a test point is robust when every attack run on it fails
(PGD with each of ``eval_steps``, and AutoAttack), as AutoAttack itself counts its attacks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from asbound.data.corruptions import corruption_of
from asbound.errors import ConfigError
from asbound.models.peft import VARIANTS
from asbound.transfer.autolr import CONDITIONS
from asbound.specs import parse_data_spec, parse_eps, parse_model_spec
from asbound.transfer.methods import HEAD_INITS, parse_methods
from asbound.transfer.optim import OPTIMIZERS, SCHEDULES

AUGMENTS = ("auto", "none", "crop", "crop-flip")
SELECTS = ("auto", "robust", "clean", "last")
PEFTS = VARIANTS
AMPS = ("auto", "off", "bf16", "fp16")
PROMPT_DEPTHS = ("deep", "shallow")
#: the default of --n-val, --n-test and --score-n: follow --n (:func:`image_counts`)
AUTO = "auto"
#: test images scored before and after transfer by default, at most
SCORE_N_CAP = 1000


def _count(value: "int | str | None", size: int, default: "int | None") -> int:
    """``value`` images of a split of ``size``: None all, AUTO ``default`` (None: all), else at most ``size``."""
    n = default if value == AUTO else value
    return size if n is None else min(n, size)


def score_request(n: "int | None", n_test: "int | str | None", score_n: "int | str | None") -> "int | None":
    """``--score-n`` resolved (None: all test images): ``auto`` is the evaluation's request
    (``--n-test``, which ``auto`` makes ``--n``), at most ``SCORE_N_CAP``."""
    if score_n != AUTO:
        return score_n
    test = n if n_test == AUTO else n_test
    return SCORE_N_CAP if test is None else min(test, SCORE_N_CAP)


def image_counts(n: "int | None", n_val: "int | str | None", n_test: "int | str | None",
                 score_n: "int | str | None", sizes: "tuple[int, int, int]") -> "dict[str, int]":
    """The images each phase uses, from the options and the split sizes ``(train, val, test)``
    (the training split after the validation split is taken out).

    ``auto`` (the default of the three others) follows ``--n``: validation and test use as many
    images as training (at most their split), or their whole split without ``--n``; the scores
    before and after transfer use as many as the test, at most ``SCORE_N_CAP``. None is a whole split.
    """
    train, val, test = sizes
    return {"train": _count(n, train, None), "val": _count(n_val, val, n), "test": _count(n_test, test, n),
            "score": _count(score_request(n, n_test, score_n), test, None)}


@dataclass(frozen=True)
class TransferConfig:
    """A transfer run: ``method`` (one or several, comma-separated) from ``model`` to ``data``."""

    model: str
    data: str
    method: str = "lp"
    classes: Optional[str] = None
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    lr_ft: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    eps: "float | str" = "8/255"
    attack_steps: int = 10
    attack_step: "float | str" = "2/255"
    trades_beta: float = 6.0
    head_init: str = "torch"  # the new head: torch (nn.Linear's), roli (seed 000's code) or zeros
    peft: str = "full"  # RanLI / RoLI stage 2: full, lora, adapter, bias or prompt
    peft_rank: int = 16
    peft_alpha: float = 16.0
    adapter_reduction: int = 8
    prompt_tokens: int = 10  # --peft prompt: prompt tokens per block (seed 000's code: 10; CUB 20)
    prompt_depth: str = "deep"  # deep: new prompts before every block (VPT-deep); shallow: the first only
    autolora_lr: float = 0.01
    autolora_rank: int = 8
    autolora_alpha: float = 1.0
    autolora_scale: float = 6.0  # lambda2 = scale * a
    autolora_rho: float = 0.75
    autolora_divide: float = 2.0
    autolora_condition2: str = "code"  # "code" (the reference's) or "apgd" (Auto-PGD's)
    autolora_lambda_n: int = 512  # training images on which the LoRA branch's accuracy a is measured
    val_fraction: float = 0.05
    select: str = "auto"
    augment: str = "auto"
    n: Optional[int] = None  # training images drawn (seeded) after the validation split is taken out; None: all
    # the other phases' images, drawn (seeded) from their splits; None: all; "auto": see image_counts
    n_val: "int | str | None" = AUTO  # validation images
    n_test: "int | str | None" = AUTO  # test images of the evaluation
    score_n: "int | str | None" = AUTO  # test images of `score` before and after (the attacks are costly)
    score_steps: int = 20  # PGD steps of those scores (relative step 0.7, as `score`)
    eval_steps: "tuple[int, ...]" = (10, 20)
    autoattack: bool = False
    score: bool = True
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    workers: int = 0
    model_dir: Optional[str] = None
    data_root: Optional[str] = None
    weights: Optional[str] = None
    feature_layer: Optional[str] = None
    resize: Optional[int] = None
    allow_pickle: bool = False
    download: bool = False
    corruption: Optional[str] = None  # every image (training, validation, test, scores) corrupted
    severity: Optional[int] = None
    corruption_params: str = "auto"

    def validated(self) -> "TransferConfig":
        """Check every option; eps and the attack step become floats."""
        parse_model_spec(self.model)
        parse_data_spec(self.data)
        parse_methods(self.method)
        corruption_of(self.corruption, self.severity, self.corruption_params)
        eps, step = parse_eps(self.eps), parse_eps(self.attack_step)
        for name in ("epochs", "batch_size", "attack_steps", "seed", "workers", "peft_rank", "adapter_reduction",
                     "prompt_tokens", "autolora_rank", "autolora_lambda_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name.replace('_', '-')} must be a whole number, got {value!r}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.attack_steps < 1:
            raise ConfigError(f"attack steps must be >= 1, got {self.attack_steps}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        for name in ("peft_rank", "adapter_reduction", "prompt_tokens", "autolora_rank", "autolora_lambda_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("peft_alpha", "autolora_alpha", "autolora_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name.replace('_', '-')} must be a number > 0, got {value!r}")
        if not (isinstance(self.autolora_rho, (int, float)) and 0 < self.autolora_rho <= 1):
            raise ConfigError(f"autolora-rho must lie in (0, 1], got {self.autolora_rho!r}")
        if not (isinstance(self.autolora_divide, (int, float)) and math.isfinite(self.autolora_divide)
                and self.autolora_divide > 1):
            raise ConfigError(f"autolora-divide must be a number > 1, got {self.autolora_divide!r}")
        if self.autolora_condition2 not in CONDITIONS:
            raise ConfigError(f"autolora-condition2 {self.autolora_condition2!r} is not valid; valid: {', '.join(CONDITIONS)}")
        if self.peft not in PEFTS:
            raise ConfigError(f"unknown --peft variant {self.peft!r}; valid: {', '.join(PEFTS)}")
        names = [m.name for m in parse_methods(self.method)]
        if self.peft != "full" and not {"ranli", "roli"} & set(names):
            raise ConfigError(f"--peft {self.peft} applies to the methods ranli and roli only; "
                              f"--method {self.method} has neither")
        if any(m.name == "autolora" for m in parse_methods(self.method)) and self.select not in ("auto", "robust"):
            raise ConfigError(f"autolora selects and restores weights on robust validation accuracy (seed 002); "
                              f"--select {self.select} is not valid with it: use auto or robust")
        for name in ("lr", "lr_ft", "autolora_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 10):
                raise ConfigError(f"{name.replace('_', '-')} must lie in (0, 10], got {value!r}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must lie in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.trades_beta) and self.trades_beta >= 0):
            raise ConfigError(f"trades beta must be >= 0, got {self.trades_beta}")
        if not (math.isfinite(self.val_fraction) and 0 < self.val_fraction < 1):
            raise ConfigError(f"validation fraction must lie in (0, 1), got {self.val_fraction}")
        if not step > 0:
            raise ConfigError(f"attack step must be > 0, got {step:g} (e.g. 2/255; FGSM with a random start: 1.25 eps)")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must lie in [0, 2**63), got {self.seed}")
        for name, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("select", SELECTS),
                            ("augment", AUGMENTS), ("amp", AMPS), ("head_init", HEAD_INITS),
                            ("prompt_depth", PROMPT_DEPTHS)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name.replace('_', '-')} {getattr(self, name)!r} is not valid; "
                                  f"valid: {', '.join(valid)}")
        for name in ("n", "n_val", "n_test", "score_n"):
            value = getattr(self, name)
            if value is None or (value == AUTO and name != "n"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                also = "" if name == "n" else f", or {AUTO!r}"
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1 (or 'all'{also}), got {value!r}")
        if not isinstance(self.score_steps, int) or isinstance(self.score_steps, bool) or self.score_steps < 1:
            raise ConfigError(f"score steps must be a whole number >= 1, got {self.score_steps!r}")
        steps = tuple(self.eval_steps)
        if not steps or any(not isinstance(k, int) or k < 1 for k in steps):
            raise ConfigError(f"eval steps must be whole numbers >= 1, got {self.eval_steps!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device {self.device!r} is not valid; valid: auto, cpu, cuda")
        return dataclasses.replace(self, eps=eps, attack_step=step, eval_steps=steps)

    @property
    def methods(self) -> list:
        return parse_methods(self.method)
