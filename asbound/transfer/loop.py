"""The one training loop: every method runs its stages through :func:`train_stage`.

Per epoch: shuffle (and augment) with generators seeded by ``(seed, method, stage, epoch)``,
minimise the stage's objective (:func:`asbound.transfer.methods.batch_loss`) with the stage's
optimiser and per-iteration schedule, validate (clean, and robust accuracy under the training
attack with ``--attack-steps``), keep the best epoch for model selection, then checkpoint. A
rerun resumes after the last complete epoch and, with the same seed on the CPU, ends with the
same weights as an uninterrupted run: every random draw is a function of the epoch's seed.

A head-only stage with the plain cross-entropy and no augmentation trains on features computed
once (the backbone is frozen and in eval mode, so they do not change): 20 epochs then cost one
pass of the backbone.

AutoLoRa's stage (seed 002) has no schedule: its learning rate follows the automated rule of
:mod:`asbound.transfer.autolr` on the robust validation accuracy (halving and restoring the best
weights at checkpoint epochs), and its ``lambda1 = 1 - a``, ``lambda2 = s a`` use ``a``, the clean
accuracy of the LoRA branch (eval mode) on a fixed seeded subset of the training images
(``--autolora-lambda-n``, no augmentation), measured at the start of every epoch and after each
of its first three quarters (steps ``N/4``, ``N/2``, ``3N/4``, rounded down; once an epoch with
fewer than 2 steps): the reference measures on the whole augmented training set five times an epoch
(P-A2), which costs more than the training.

Under ``torchrun`` every rank trains on its share of each global batch through
``DistributedDataParallel`` (:mod:`asbound.distributed`); sums and validation counts are reduced
over the ranks, so every rank takes the same decisions.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from asbound.attacks import Watch, loss_objective
from asbound.devices import float32_exact, memory_format, to_format
from asbound.distributed import SINGLE, World
from asbound.errors import AsboundError, ResumeError, describe
from asbound.models import LayerOutput, SplitModel, frozen
from asbound.models.peft import lora_branch
from asbound.transfer.autolr import AutoLR, default_checkpoints
from asbound.transfer.methods import AttackSettings, Stage, StepLoss, batch_loss, set_scope, train_mode
from asbound.transfer.optim import make_optimizer, make_scheduler


class TrainingDiverged(AsboundError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from the parts (the same on every machine and Python version)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) * 2_654_435_761 % (2**63)


@dataclass(frozen=True)
class StagePlan:
    """A stage with its resolved settings."""

    stage: Stage
    index: int
    epochs: int
    lr: float
    select: str  # "robust", "clean" or "last"
    augment: str
    cache_features: bool
    scope: str = ""  # what trains, resolved ("head", "all" or "peft"); "" means the stage's own scope
    peft: Optional[dict] = None  # the PEFT structure built at the stage's start (a PeftSpec record)

    @property
    def key(self) -> str:
        return f"{self.index}-{self.stage.name}"

    @property
    def train_scope(self) -> str:
        return self.scope or self.stage.scope


@dataclass(frozen=True)
class AutoLoraSettings:
    """AutoLoRa's lambdas (``lambda2 = scale * a``) and its automated learning-rate rule."""

    scale: float = 6.0
    rho: float = 0.75
    divide: float = 2.0
    condition2: str = "code"


@dataclass
class Settings:
    """What every stage of a run shares."""

    optimizer: str
    momentum: float
    weight_decay: float
    schedule: str
    batch_size: int
    attack: AttackSettings
    trades_beta: float
    seed: int
    method: str
    device: torch.device
    amp: Optional[torch.dtype]  # autocast dtype, or None
    workers: int = 0
    world: World = SINGLE
    autolora: AutoLoraSettings = AutoLoraSettings()


@dataclass
class EpochRecord:
    stage: str
    epoch: int
    train_loss: float
    train_accuracy: float
    lr: float
    val_accuracy: float
    val_robust_accuracy: Optional[float]
    seconds: float
    images_per_second: float
    selected: bool = False
    lambda1: Optional[float] = None  # AutoLoRa's lambdas at the epoch's first step
    lambda2: Optional[float] = None

    def as_row(self) -> dict:
        row = dict(self.__dict__)
        if self.lambda1 is None:
            del row["lambda1"], row["lambda2"]
        return row


@dataclass
class StageProgress:
    """The resumable state of a stage (what ``last.pt`` holds besides the weights)."""

    epoch: int = 0  # epochs completed
    best_metric: float = -1.0
    best_epoch: int = -1
    optimizer: Optional[dict] = None
    scheduler: Optional[dict] = None
    scaler: Optional[dict] = None
    autolr: Optional[dict] = None  # AutoLoRa's learning-rate rule
    history: "list[dict]" = field(default_factory=list)


class Checkpointer:
    """Where the loop saves: called with the stage's state after every epoch, and for a new best."""

    def save_last(self, plan: StagePlan, model: SplitModel, progress: StageProgress) -> None:  # pragma: no cover
        raise NotImplementedError

    def save_best(self, plan: StagePlan, model: SplitModel) -> None:  # pragma: no cover
        raise NotImplementedError

    def load_best(self, plan: StagePlan) -> dict:  # pragma: no cover
        raise NotImplementedError

    def restore_best(self, plan: StagePlan, model: SplitModel) -> None:
        """Load the stage's best weights into ``model``."""
        model.load_state_dict(self.load_best(plan))


def autocast(settings: Settings) -> "contextlib.AbstractContextManager":
    if settings.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=settings.device.type, dtype=settings.amp)


# --- evaluation (always float32, eval mode) -------------------------------------------------------


def robust_correct(
    model: SplitModel, x: Tensor, y: Tensor, attack: AttackSettings, steps: int, generator: torch.Generator,
    g0: Optional[Tensor] = None,
) -> Tensor:
    """Correct under PGD on the cross-entropy, judged on *every* evaluated point (clean included);
    ``g0``: the clean representation ``g(x)`` when the caller has it."""
    with frozen(model):
        if g0 is None:
            with torch.no_grad():
                g0 = model.features(x)
        watch = Watch(model.head, g0, labels=y)
        watch.observe(g0)
        objective = loss_objective(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), y, watch=watch)
        attack.pgd(steps=steps)(objective, x, generator=generator)
    return ~watch.fooled


def accuracy(
    model: SplitModel,
    batches: "Iterator[tuple[Tensor, Tensor]]",
    device: torch.device,
    *,
    attack: Optional[AttackSettings] = None,
    steps: int = 10,
    seed: int = 0,
    world: World = SINGLE,
) -> "tuple[float, Optional[float]]":
    """Clean accuracy and, with an ``attack``, robust accuracy over ``batches`` (IEEE float32, eval);
    in a distributed ``world`` the batches are this rank's share and the counts are summed."""
    clean = robust = total = 0
    generator = torch.Generator().manual_seed(seed + world.rank)
    with frozen(model), float32_exact():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                g0 = model.features(x)  # once: the clean prediction and the attack's starting point
                clean += int((model.head(g0).argmax(1) == y).sum())
            if attack is not None:
                robust += int(robust_correct(model, x, y, attack, steps, generator, g0=g0).sum())
            total += len(y)
    clean, robust, total = world.sum([clean, robust, total], device)
    if total == 0:
        return float("nan"), None
    return clean / total, (robust / total if attack is not None else None)


# --- training ------------------------------------------------------------------------------------


def _features(model: SplitModel, batches: "Iterator[tuple[Tensor, Tensor]]", device: torch.device) -> "tuple[Tensor, Tensor]":
    feats, labels = [], []
    with frozen(model), torch.no_grad():
        for x, y in batches:
            feats.append(model.features(x.to(device)).float())
            labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def lora_accuracy(model: SplitModel, batches: "Iterator[tuple[Tensor, Tensor]]", device: torch.device,
                  world: World = SINGLE) -> float:
    """Clean accuracy of AutoLoRa's natural (LoRA) branch, eval mode, over ``batches`` (P-A1: the
    LoRA branch, not the feature extractor the reference's default path measures)."""
    correct = total = 0
    with frozen(model), torch.no_grad(), lora_branch(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    correct, total = world.sum([correct, total], device)
    return correct / total if total else 0.0


def steps_per_epoch(n_train: int, batch_size: int, world: World = SINGLE) -> int:
    """Optimiser steps per epoch: global batches of ``batch_size``; under torchrun a last batch
    with fewer images than ranks is left out (every rank must take every step)."""
    full, rest = divmod(n_train, batch_size)
    return max(1, full + (1 if rest >= max(1, world.size) else 0))


def train_stage(
    model: SplitModel,
    plan: StagePlan,
    settings: Settings,
    train_batches: Callable[[int, bool], "Iterator[tuple[Tensor, Tensor]]"],
    n_train: int,
    val_batches: Callable[[], "Iterator[tuple[Tensor, Tensor]]"],
    checkpoints: Checkpointer,
    state: StageProgress,
    *,
    report: Callable[[EpochRecord], None] = lambda r: None,
    on_batch: Callable[[int, int, float, float], None] = lambda *a: None,
    on_pass: Callable[[str, int, int], None] = lambda *a: None,
    lambda_batches: Optional[Callable[[], "Iterator[tuple[Tensor, Tensor]]"]] = None,
) -> StageProgress:
    """Train ``model`` through one stage, from ``state`` (a fresh or resumed stage).

    ``train_batches(seed, shuffle)`` yields the epoch's (augmented) training batches (under
    torchrun: this rank's share of each global batch); ``val_batches()`` the validation batches
    (this rank's share); ``lambda_batches()`` AutoLoRa's subset for measuring its lambdas. On
    return the model holds the selected weights (the best validation epoch, or the last with
    ``select == "last"``). ``on_batch(epoch, step, loss, lr)`` follows the training steps,
    ``on_pass(what, epoch, images)`` the passes without training (``"features"`` cached before
    the first epoch, ``"validation"`` after each).
    """
    stage = plan.stage
    scope = plan.train_scope
    device, world = settings.device, settings.world
    if stage.objective == "autolora" and lambda_batches is None:
        raise ValueError("the autolora objective needs lambda_batches")
    optimizer, scheduler, scaler, autolr = _stage_tools(model, plan, settings, n_train)
    n_steps = steps_per_epoch(n_train, settings.batch_size, world)
    fmt = memory_format(settings.amp)
    born_non_finite = set(_non_finite(model))  # e.g. an infinite cap or mask the model was built with
    _restore_tools(state, optimizer, scheduler, scaler, autolr)
    cached = None
    if plan.cache_features:
        cached = _features(model, _counted(train_batches(0, False), lambda k: on_pass("features", state.epoch, k)),
                           device)
    objective = "features" if cached is not None else stage.objective
    net: torch.nn.Module = StepLoss(model, objective, settings.trades_beta)
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # a representation cut at --feature-layer keeps the layers after it, unused by the loss
        unused = any(isinstance(m, LayerOutput) for m in model.modules())
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=unused)

    while state.epoch < plan.epochs:
        epoch = state.epoch
        seed = derived_seed(settings.seed, settings.method, plan.key, epoch)
        torch.manual_seed(seed + world.rank)  # dropout and anything else drawing from the global generator
        attack_gen = torch.Generator().manual_seed(seed + 1 + world.rank)
        started = time.perf_counter()
        loss_sum = correct = seen = 0.0
        batches = _cached_batches(cached, settings.batch_size, seed) if cached is not None else train_batches(seed, True)
        epoch_lr = optimizer.param_groups[0]["lr"]  # the rate of the epoch's first step
        lambdas = epoch_lambdas = None
        quarters = {n_steps * k // 4 for k in (1, 2, 3)} - {0, n_steps}  # after these many steps
        if autolr is not None:
            lambdas = epoch_lambdas = _lambdas(model, lambda_batches(), device, world, settings.autolora.scale)
        for step, (x, y) in enumerate(batches):
            if step >= n_steps:  # a rank's share of a last global batch too small to split
                break
            x, y = to_format(x.to(device, non_blocking=True), fmt), y.to(device, non_blocking=True)
            world.sync_buffers(model)  # the attack runs in eval mode on rank 0's statistics, on every rank
            train_mode(model, scope)
            with autocast(settings):
                loss, logits = batch_loss(model, objective, x, y, attack=settings.attack, generator=attack_gen,
                                          trades_beta=settings.trades_beta, lambdas=lambdas or (1.0, 0.0), net=net)
            value = float(loss.detach())
            if not torch.isfinite(loss.detach()):
                raise TrainingDiverged(
                    f"the loss became {value} in stage {stage.name}, epoch {epoch + 1}, step {step + 1}; "
                    f"the last good checkpoint (after epoch {epoch}) is kept; rerun with a lower learning "
                    f"rate (--lr / --lr-ft) into another --out"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            loss_sum += value * len(y)
            correct += float((logits.detach().argmax(1) == y).sum())
            seen += len(y)
            on_batch(epoch, step, value, optimizer.param_groups[0]["lr"])
            if autolr is not None and step + 1 in quarters:
                world.sync_buffers(model)
                lambdas = _lambdas(model, lambda_batches(), device, world, settings.autolora.scale)
        seconds = time.perf_counter() - started
        loss_sum, correct, seen = world.sum([loss_sum, correct, seen], device)
        world.sync_buffers(model)  # validation and the checkpoint: rank 0's model on every rank
        bad = [name for name in _non_finite(model) if name not in born_non_finite]
        if bad:  # a finite loss with an infinite gradient: nothing non-finite is ever checkpointed
            kept = f"the last good checkpoint (after epoch {epoch}) is kept" if epoch else "no checkpoint of it was written"
            raise TrainingDiverged(
                f"the weights became non-finite ({bad[0]}{' and more' if len(bad) > 1 else ''}) in stage "
                f"{stage.name}, epoch {epoch + 1}, though every loss was finite; {kept}; rerun with a lower "
                f"learning rate (--lr / --lr-ft) into another --out"
            )
        robust_needed = plan.select == "robust" or stage.adversarial or epoch == plan.epochs - 1
        val_clean, val_robust = accuracy(
            model, _counted(val_batches(), lambda k, e=epoch: on_pass("validation", e, k)),
            device, attack=settings.attack if robust_needed else None,
            steps=settings.attack.steps, seed=derived_seed(settings.seed, "val"), world=world,
        )
        record = EpochRecord(
            stage=stage.name, epoch=epoch + 1, train_loss=loss_sum / max(seen, 1),
            train_accuracy=correct / max(seen, 1), lr=epoch_lr,
            val_accuracy=val_clean, val_robust_accuracy=val_robust, seconds=seconds,
            images_per_second=seen / seconds if seconds > 0 else float("nan"),
            lambda1=None if epoch_lambdas is None else epoch_lambdas[0],
            lambda2=None if epoch_lambdas is None else epoch_lambdas[1],
        )
        metric = {"robust": val_robust, "clean": val_clean, "last": float(epoch)}[plan.select]
        if metric is not None and metric > state.best_metric:
            state.best_metric, state.best_epoch = float(metric), epoch + 1
            record.selected = True
            checkpoints.save_best(plan, model)
        if autolr is not None:  # its own best is the selection's (robust validation accuracy, strictly better)
            decision = autolr.step(float(val_robust))
            if decision.restore:  # the best weights back; the optimiser's momentum is kept (as the reference)
                checkpoints.restore_best(plan, model)
            _set_lr(optimizer, decision.lr)
            state.autolr = autolr.state_dict()
        state.epoch = epoch + 1
        state.history.append(record.as_row())
        state.optimizer = optimizer.state_dict()
        state.scheduler = scheduler.state_dict() if scheduler is not None else None
        state.scaler = scaler.state_dict() if scaler.is_enabled() else None
        checkpoints.save_last(plan, model, state)
        report(record)
    checkpoints.restore_best(plan, model)
    return state


def _stage_tools(model: SplitModel, plan: StagePlan, settings: Settings, n_train: int) -> "tuple[object, ...]":
    """The stage's trainable parameters made so on ``model`` (:func:`set_scope`), and its optimiser,
    schedule (None for AutoLoRa's stage), gradient scaler and AutoLoRa's learning-rate rule (or None)."""
    params = set_scope(model, plan.train_scope)
    optimizer = make_optimizer(params, settings.optimizer, lr=plan.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    autolr, scheduler = None, None
    if plan.stage.objective == "autolora":
        auto = settings.autolora
        autolr = AutoLR(plan.lr, default_checkpoints(plan.epochs), rho=auto.rho, divide=auto.divide,
                        condition2=auto.condition2)
    else:
        n_steps = steps_per_epoch(n_train, settings.batch_size, settings.world)
        scheduler = make_scheduler(optimizer, settings.schedule, plan.epochs * n_steps)
    scaler = torch.amp.GradScaler(settings.device.type, enabled=settings.amp == torch.float16)
    return optimizer, scheduler, scaler, autolr


def _restore_tools(state: StageProgress, optimizer: torch.optim.Optimizer,
                   scheduler: "Optional[torch.optim.lr_scheduler.LRScheduler]", scaler: torch.amp.GradScaler,
                   autolr: Optional[AutoLR]) -> None:
    """The optimiser, schedule, scaler and learning-rate rule as a resumed ``state`` left them."""
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            scaler.load_state_dict(state.scaler)
    if autolr is not None:
        if state.autolr:
            autolr.load_state_dict(state.autolr)
        _set_lr(optimizer, autolr.lr)


def resume_problem(model: SplitModel, plan: StagePlan, settings: Settings, n_train: int,
                   state: StageProgress) -> Optional[str]:
    """What in a checkpointed ``state`` does not fit the stage ``plan`` trains on ``model`` (its
    optimiser's parameter groups and buffers, its schedule, AutoLoRa's rule), or None; ``model``
    is changed (its trainable parameters), so give a copy."""
    if state.epoch > 0:  # a stage under way resumes its optimiser (and rule), never fresh ones
        for name, value in (("optimizer", state.optimizer), ("autolr", state.autolr)):
            if not value and (name == "optimizer" or plan.stage.objective == "autolora"):
                return f"progress.{name} is null after epoch {state.epoch}"
    try:
        optimizer, scheduler, scaler, autolr = _stage_tools(model, plan, settings, n_train)
        made = [dict(group) for group in optimizer.param_groups]  # as made: loading puts the file's in
        _restore_tools(state, optimizer, scheduler, scaler, autolr)
    except ResumeError as exc:  # AutoLoRa's rule says what differs
        return str(exc)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        return f"its optimiser state does not fit this stage: {describe(exc)}"
    for group, fresh in zip(optimizer.param_groups, made):  # a learning rate of text fails mid-epoch
        for key, value in fresh.items():
            if key != "params" and value is not None and _kind(group.get(key)) != _kind(value):
                return f"its optimiser's {key} is {_kind(group.get(key))}, not {_kind(value)}"
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                    shape = "x".join(map(str, value.shape))
                    return (f"its optimiser's {key} is {shape} for a parameter of "
                            f"{'x'.join(map(str, p.shape))}")
    if scheduler is not None and state.optimizer is not None:
        last, base = scheduler.last_epoch, scheduler.base_lrs
        if isinstance(last, bool) or not isinstance(last, int) or not (
                isinstance(base, list) and len(base) == len(optimizer.param_groups)
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in base)):
            return "its schedule state is not one asbound writes"
    return None


def _kind(value: object) -> str:
    """A setting's type as an error names it (whole and fractional numbers as one)."""
    if value is None:
        return "missing"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


def _counted(batches: "Iterator[tuple[Tensor, Tensor]]",
             report: Callable[[int], None]) -> "Iterator[tuple[Tensor, Tensor]]":
    """``batches``, reporting each batch's size once the consumer has taken the next."""
    for x, y in batches:
        yield x, y
        report(len(y))


def _lambdas(model: SplitModel, batches: "Iterator[tuple[Tensor, Tensor]]", device: torch.device, world: World,
             scale: float) -> "tuple[float, float]":
    """AutoLoRa's ``(lambda1, lambda2) = (1 - a, scale a)``, ``a`` the LoRA branch's clean accuracy."""
    a = lora_accuracy(model, batches, device, world)
    return 1.0 - a, scale * a


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _non_finite(model: torch.nn.Module) -> "list[str]":
    """Names of the floating-point parameters and buffers holding a NaN or an infinity."""
    return [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]


def _cached_batches(cached: "tuple[Tensor, Tensor]", batch_size: int, seed: int) -> "Iterator[tuple[Tensor, Tensor]]":
    """The features' batches in the order a seeded shuffling loader would give the images (one
    process only: under torchrun the features are not cached)."""
    feats, labels = cached
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(feats.device)
    for i in range(0, len(order), batch_size):
        sel = order[i:i + batch_size]
        yield feats[sel], labels[sel]
