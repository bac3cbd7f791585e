"""Optimisers and learning-rate schedules for a training stage.

Schedules are stepped once per iteration (seed 001's LP: cosine annealing per iteration over the
stage, no warm restart) and are pure functions of the step index, so a resumed stage continues
exactly where it stopped:

* ``cosine``: ``lr(t) = lr0 * (1 + cos(pi t / T)) / 2`` over the stage's ``T`` iterations;
* ``constant``: ``lr0``;
* ``step``: ``lr0``, times 0.1 after 50% and again after 75% of the iterations.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from asbound.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant", "step")


def make_optimizer(
    params: "Iterable[torch.nn.Parameter]", name: str, *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with momentum (the seeds' choice) or AdamW; weight decay on every trained parameter."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def schedule_factor(name: str, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the initial learning rate at iteration ``t`` of ``total_steps``."""
    total = max(1, int(total_steps))
    if name == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if name == "constant":
        return lambda t: 1.0
    if name == "step":
        return lambda t: 1.0 if t < 0.5 * total else (0.1 if t < 0.75 * total else 0.01)
    raise ConfigError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(name, total_steps))
