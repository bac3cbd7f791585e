"""``transfer``: from a pretrained model to downstream models, one run directory per method.

A method's run directory (``OUT`` for one method, ``OUT/<method>`` for several)::

    config.json          resolved options, the base model's spec, seed, versions, device (kind "transfer")
    epochs.csv           one row per epoch and stage: losses, lr, clean / robust validation accuracy,
                         seconds, images per second (rewritten atomically after every epoch)
    checkpoints/last.pt  the resumable state after the last complete epoch (atomic)
    checkpoints/last.prev.pt          the one before it, resumed when last.pt is unusable
    checkpoints/<i>-<stage>-best.pt   the stage's selected weights (atomic)
    model.pt             the trained split model's weights: what ``run:DIR`` loads
    final.json           test metrics (clean, PGD-k, AutoAttack, robust accuracy per point:
                         robust against every attack run) and the stages' selections
    score/before/        ``score`` of the pretrained representation on the test data (AS only)
    score/after/         ``score`` of ``run:DIR`` on the test data (every bound); its config
                         names the run relatively (``run:../..``), so the directory can move

Every directory is locked while it is written; a finished run is only reread; a rerun with other
settings is refused. Under ``torchrun`` (:mod:`asbound.distributed`) every rank trains and rank 0
alone locks, reads and writes the directory, evaluates and scores.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch
from torch import nn

from asbound.data import DataSet, load_data, resolve_augment, select_indices, validation_split
from asbound.devices import amp_dtype, float32_exact, memory_format, resolve_device
from asbound.distributed import SINGLE, World, local_device, world_from_env
from asbound.data.corruptions import corruption_of
from asbound.errors import AsboundError, ConfigError, ModelError, ResumeError, describe
from asbound.models import SplitModel, frozen, load_model, split_model
from asbound.models.peft import REBUILT, PeftSpec, apply_peft, check_peft, natural_branch, saved_model
from asbound.models.runs import RUN_KIND, RUN_WEIGHTS, with_run_weights
from asbound.models.loaders import state_mismatch
from asbound.records import (
    CONFIG,
    CHECKPOINT_FIELDS,
    CHECKPOINT_NOT_NULL,
    STAGES,
    RunDir,
    atomic_write,
    clean_json,
    damaged,
    environment,
    field_problem,
    read_json,
    write_json,
)
from asbound.scoring import ScoreConfig, recorded_model, score
from asbound.specs import absolute_path, format_eps, parse_data_spec, parse_model_spec
from asbound.transfer.config import TransferConfig, image_counts, score_request
from asbound.transfer import loop
from asbound.transfer.loop import (
    AutoLoraSettings,
    Checkpointer,
    EpochRecord,
    Settings,
    StagePlan,
    StageProgress,
    derived_seed,
    train_stage,
)
from asbound.transfer.methods import AttackSettings, Method, new_head

FINAL = "final.json"
EPOCHS = "epochs.csv"
CHECKPOINTS = "checkpoints"


@dataclass
class MethodResult:
    """A finished method: its run directory and its final record (with the two score summaries)."""

    method: str
    out: Path
    final: dict


# --- checkpoints ---------------------------------------------------------------------------------


class RunCheckpoints(Checkpointer):
    """``checkpoints/last.pt`` (stage, epoch, weights, optimiser, schedule, history) and per-stage bests.

    Each new ``last.pt`` is written whole beside the old one, which then becomes ``last.prev.pt``
    (an epoch earlier): a ``last.pt`` damaged later (a copy cut short, a full disk, fields of other
    types, weights of another model) falls back to it.
    In a distributed ``world`` rank 0 writes and reads the files and sends what it read to the others.
    """

    def __init__(self, folder: Path, done_history: "list[dict]", world: World = SINGLE,
                 device: "torch.device | None" = None) -> None:
        self.folder = folder / CHECKPOINTS
        self.world, self.device = world, device or torch.device("cpu")
        if world.main:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.epochs_path = folder / EPOCHS
        self.done_history = done_history  # the rows of the stages before the current one

    @property
    def last_path(self) -> Path:
        return self.folder / "last.pt"

    @property
    def previous_path(self) -> Path:
        return self.folder / "last.prev.pt"

    def best_path(self, plan: StagePlan) -> Path:
        return self.folder / f"{plan.key}-best.pt"

    def save_last(self, plan: StagePlan, model: nn.Module, progress: StageProgress) -> None:
        if not self.world.main:
            return
        state = {"stage": plan.index, "model": model.state_dict(), "progress": dataclasses.asdict(progress),
                 "history": self.done_history}
        _save(self.last_path, state, previous=self.previous_path)
        self.write_epochs(self.done_history + progress.history)

    def save_best(self, plan: StagePlan, model: nn.Module) -> None:
        if self.world.main:
            _save(self.best_path(plan), model.state_dict())

    def load_best(self, plan: StagePlan) -> dict:
        def read() -> dict:
            path = self.best_path(plan)
            state, problem = _load(path, dict)
            if problem is not None:
                raise ResumeError(f"{path} {problem}; {self._restart}")
            return state

        return self._shared(read)

    def restore_best(self, plan: StagePlan, model: nn.Module) -> None:
        """The stage's best weights into ``model``."""
        model.load_state_dict(self.fitting_best(plan, model))

    def fitting_best(self, plan: StagePlan, model: nn.Module) -> dict:
        """The stage's best weights, checked to fit ``model``: weights of another model (other
        keys, other shapes) are a one-line error naming the file and what differs."""
        state = self.load_best(plan)
        mismatch = state_mismatch(model.state_dict(), state)
        if mismatch:
            raise ResumeError(f"{self.best_path(plan)} is damaged or not asbound's (its weights do not fit this "
                              f"run's model: {mismatch}); {self._restart}")
        return state

    def refuse_retraining(self, weights: Path) -> None:
        """A one-line refusal on every rank when ``weights`` (the trained ``model.pt``) exists: the
        run has no checkpoint to resume from, so training would start over and replace them."""
        def check() -> None:
            if weights.exists():
                raise ResumeError(f"{weights} has no {STAGES} beside it and {self.folder} no checkpoint to rebuild "
                                  f"it from; the trained weights are kept: delete {weights.name} to train this "
                                  f"method again, or choose another --out")

        self._shared(check)

    @property
    def _restart(self) -> str:
        return f"delete {self.folder} to train this method from its first epoch, or choose another --out"

    def load_last(self, problem: "Callable[[dict], Optional[str]]" = lambda state: None
                  ) -> "tuple[Optional[dict], str]":
        """The state to resume from (None: start afresh) and a note naming the checkpoint it
        came from when that is not ``last.pt``. ``problem(state)``: what makes a state that loads
        unusable for this run (None: nothing); such a checkpoint is passed over as a damaged one."""
        return self._shared(lambda: self._read_last(problem))

    def _shared(self, read: "Callable[[], object]") -> object:
        """``read()`` on rank 0, its result (or its one-line refusal) on every rank."""
        result: object = None
        if self.world.main:
            try:
                result = read()
            except AsboundError as exc:
                if self.world.distributed:
                    self.world.broadcast(_Refusal(str(exc)), self.device)
                raise
        result = self.world.broadcast(result, self.device)
        if isinstance(result, _Refusal):
            raise ResumeError(result.message)
        return result

    def _read_last(self, problem: "Callable[[dict], Optional[str]]") -> "tuple[Optional[dict], str]":
        last, previous = self.last_path, self.previous_path
        if not last.exists() and not previous.exists():
            return None, ""
        if last.is_dir():  # nothing asbound writes: not removed, and no checkpoint can be written there
            raise ResumeError(f"{last} is a directory, not a checkpoint; move it out of {self.folder} and rerun")
        state, what = self._usable(last, problem)
        if state is not None:
            return state, ""
        fallback, why = self._usable(previous, problem)
        if fallback is None:
            raise ResumeError(f"{last} {what} and no earlier checkpoint is usable ({previous.name} {why}); "
                              f"{self._restart}")
        # the damaged file goes: the next checkpoint would make it last.prev.pt, the fallback
        last.unlink(missing_ok=True)
        return fallback, f"{self._name(last)} {what}: resumed from {previous.name}"

    @staticmethod
    def _usable(path: Path, problem: "Callable[[dict], Optional[str]]") -> "tuple[Optional[dict], str]":
        """The resumable state in ``path``, or None and what is wrong with the file."""
        state, what = _load(path, dict)
        if what is None:
            found = _checkpoint_problem(state) or problem(state)
            if found is None:
                return state, ""
            what = f"is damaged or not asbound's ({found})"
        return None, what

    def _name(self, path: Path) -> str:
        return f"{CHECKPOINTS}/{path.name}"

    def write_epochs(self, rows: "list[dict]") -> None:
        text = pd.DataFrame(rows).to_csv(index=False) if rows else ""
        atomic_write(self.epochs_path, lambda handle: handle.write(text.encode()))


@dataclass
class _Refusal:
    """Rank 0's refusal, sent to the other ranks."""

    message: str


def _save(path: Path, obj: object, previous: "Path | None" = None) -> None:
    """Write ``obj`` atomically; with ``previous``, the file it replaces is kept there."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    if previous is None or not path.exists():
        atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
        return
    fresh = path.with_name(path.name + ".new")
    atomic_write(fresh, lambda handle: handle.write(buffer.getvalue()))
    os.replace(path, previous)  # an interruption here leaves last.pt missing: previous is resumed
    os.replace(fresh, path)


def _load(path: Path, kind: type) -> "tuple[object, Optional[str]]":
    """``path`` read with ``weights_only=True``: ``(the object, None)``, or ``(None, what is
    wrong)`` when it is missing, cannot be read whole, or holds no ``kind``. A file that cannot
    be opened (permissions) is a ResumeError: it is not damaged, and is never removed."""
    if not path.is_file():
        return None, "is a directory, not a file" if path.is_dir() else "is missing"
    try:
        with path.open("rb"):
            pass
    except OSError as exc:  # there, but not readable now (permissions): no damage, never removed
        raise ResumeError(f"{path} cannot be read ({exc.strerror or type(exc).__name__}); it is kept: make it "
                          f"readable and rerun") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception:  # a truncated zip, a torn pickle, a file that is not a checkpoint
        return None, "is unreadable (truncated?)"
    if not isinstance(state, kind):
        found = type(state).__name__
        return None, (f"is damaged or not asbound's (it holds {'an' if found[0] in 'aeiou' else 'a'} {found}, "
                      f"not {'a state dict' if kind is dict else kind.__name__})")
    return state, None


def _checkpoint_problem(state: dict) -> Optional[str]:
    """What in a loaded ``last.pt`` is not as asbound writes it (:data:`CHECKPOINT_FIELDS`), or None."""
    problem = field_problem(state, CHECKPOINT_FIELDS)
    if problem:
        return problem
    for where in CHECKPOINT_NOT_NULL:
        value: object = state
        for key in where.split("."):
            value = value[key]  # type: ignore[index]
        if value is None:
            return f"{where} is null"
    known = {f.name for f in dataclasses.fields(StageProgress)}
    unknown = sorted(set(state["progress"]) - known)
    if unknown:
        return f"progress has the key {unknown[0]!r}; a checkpoint's progress has {', '.join(sorted(known))}"
    return None


# --- one method ------------------------------------------------------------------------------------


def plan_stages(method: Method, cfg: TransferConfig, augment: str, distributed: bool = False) -> "list[StagePlan]":
    """The method's stages with their settings resolved from ``cfg`` (scope, learning rate, the
    PEFT structure, selection, whether features are cached)."""
    plans = []
    for i, stage in enumerate(method.stages):
        select = cfg.select if cfg.select != "auto" else ("robust" if stage.adversarial else "clean")
        cache = stage.scope == "head" and stage.objective == "ce" and augment == "none" and not distributed
        scope, peft = stage.scope, None
        if stage.scope == "tune":
            scope = "all" if cfg.peft == "full" else "peft"
            if cfg.peft != "full":
                peft = PeftSpec(cfg.peft, rank=cfg.peft_rank, alpha=float(cfg.peft_alpha),
                                reduction=cfg.adapter_reduction, tokens=cfg.prompt_tokens,
                                deep=cfg.prompt_depth == "deep").as_record()
        if stage.objective == "autolora":
            peft = natural_branch(cfg.autolora_rank, float(cfg.autolora_alpha)).as_record()
        lr = {"lp": cfg.lr, "ft": cfg.lr_ft, "autolora": cfg.autolora_lr,
              "tune": cfg.lr_ft if cfg.peft == "full" else cfg.lr}[stage.lr_role]
        plans.append(StagePlan(
            stage=stage, index=i, epochs=max(1, math.ceil(cfg.epochs * stage.epoch_factor - 1e-9)),  # half of 5: 3
            lr=lr, select=select, augment=augment, cache_features=cache, scope=scope, peft=peft,
        ))
    return plans


def saved_structure(plans: "list[StagePlan]") -> Optional[dict]:
    """The structure ``run:DIR`` rebuilds before loading ``model.pt`` (adapters, prompts; LoRA is
    saved merged, AutoLoRa's natural branch is dropped), or ``None``."""
    return next((p.peft for p in reversed(plans) if p.peft and p.peft["variant"] in REBUILT), None)


def _build_structure(model: SplitModel, plan: StagePlan, cfg: TransferConfig, method: Method) -> None:
    """The stage's PEFT structure on ``model`` (new weights drawn from a seed of the stage)."""
    if plan.peft is not None:
        apply_peft(model, PeftSpec.from_record(plan.peft), seed=derived_seed(cfg.seed, method.name, plan.key, "peft"))


def _new_head(split: SplitModel, num_classes: int, seed: int, init: str = "torch") -> SplitModel:
    """A copy of the pretrained representation with a fresh ``Linear(m, K)`` head (``--head-init``,
    seeded); the pretrained model itself is never trained."""
    return copy.deepcopy(split).with_head(new_head(split.feature_dim, num_classes, init, seed))


def _train_method(
    method: Method,
    cfg: TransferConfig,
    base: SplitModel,
    train: DataSet,
    val: DataSet,
    folder: Path,
    settings: Settings,
    augment: str,
    printer: "Callable[[str], None]",
    progress: bool,
    preface: str = "",
) -> "list[dict]":
    """Train every stage (resuming after the last complete epoch); write ``model.pt``; return the stages.

    Before stage ``i`` trains, the model carries the PEFT structures of stages ``0..i``; ``last.pt``
    of stage ``i`` holds weights of that structure.
    """
    world = settings.world
    checkpoints = RunCheckpoints(folder, [], world, settings.device)
    model = _new_head(base, train.num_classes, derived_seed(cfg.seed, method.name, "head"), cfg.head_init)
    plans = plan_stages(method, cfg, augment, world.distributed)
    last, source = checkpoints.load_last(
        lambda state: _resume_problem(state, model, plans, cfg, method, settings, len(train)))
    if last is None:  # a trained model.pt (without its stages.json) is never trained over
        checkpoints.refuse_retraining(folder / RUN_WEIGHTS)
    start_stage, state = 0, StageProgress()
    if last is not None:
        start_stage = int(last["stage"])
    for plan in plans[:start_stage + 1]:
        _build_structure(model, plan, cfg, method)
    model = model.to(settings.device, memory_format=memory_format(settings.amp))
    if last is not None and last["progress"]["best_epoch"] > 0:  # the stage has selected weights: read them
        checkpoints.fitting_best(plans[start_stage], model)     # now, not after its remaining epochs
    if preface:
        printer(preface)
    if last is not None:
        model.load_state_dict(last["model"])
        state = StageProgress(**last["progress"])
        checkpoints.done_history = list(last["history"])
        printer(f"resuming {method.name}: stage {plans[start_stage].stage.name}, after epoch {state.epoch}")
        if source:
            printer(textwrap.fill(f"({source})", 80, initial_indent="  ", subsequent_indent="   ",
                                  break_on_hyphens=False))
    stages = []
    for plan in plans[:start_stage]:
        stages.append(_stage_summary(plan, checkpoints.done_history))

    def loader(data: DataSet, shuffle: bool, augmented: bool, shard: "tuple[int, int]" = (0, 1)) -> Callable[..., object]:
        return lambda seed=0: data.loader(
            cfg.batch_size, shuffle=shuffle, augment=augment if augmented else "none", seed=seed,
            workers=cfg.workers, pin_memory=settings.device.type == "cuda", shard=shard,
        )

    def share(data: DataSet) -> DataSet:  # this rank's rows, for counts summed over the ranks
        return data.subset(world.share(len(data))) if world.distributed else data

    val_share = share(val)
    val_batches = loader(val_share, False, False)
    lambda_set = share(train.subset(select_indices(len(train), cfg.autolora_lambda_n,
                                                   derived_seed(cfg.seed, "lambda"))))
    lambda_batches = loader(lambda_set, False, False)
    # training: this rank's share of every global batch, in lockstep with the other ranks
    train_loader = lambda seed, training: loader(train, training, training, (world.rank, world.size))(seed)  # noqa: E731
    progress = progress and world.main
    for plan in plans[start_stage:]:
        printer(_stage_line(method.name, plan))
        with _EpochBar(progress, method.name, plan, len(train), cfg.batch_size, len(val_share)) as bar:
            state = train_stage(
                model, plan, settings, train_loader, len(train), val_batches, checkpoints, state,
                report=lambda record: bar.say(_epoch_line(record, plan.epochs), printer), on_batch=bar.update,
                on_pass=bar.passed, lambda_batches=lambda_batches,
            )
        stages.append(_stage_summary(plan, checkpoints.done_history + state.history))
        checkpoints.done_history = checkpoints.done_history + state.history
        state = StageProgress()
        if plan.index + 1 < len(plans):  # the next stage starts from this stage's selection
            following = plans[plan.index + 1]
            _build_structure(model, following, cfg, method)
            model.to(settings.device)
            checkpoints.save_last(following, model, state)
    saved, _ = saved_model(model)
    if world.main:  # the stages first: a model.pt is never without them
        write_json(folder / STAGES, stages)
        _save(folder / RUN_WEIGHTS, saved.state_dict())
    return stages


def _resume_problem(state: dict, model: SplitModel, plans: "list[StagePlan]", cfg: TransferConfig, method: Method,
                    settings: Settings, n_train: int) -> Optional[str]:
    """What makes the checkpointed ``state`` (of the form :data:`CHECKPOINT_FIELDS` holds) unusable
    for this run, or None: a stage or epoch outside its plan, weights that do not fit the model
    the stage trains (``model``, a fresh head on the base, given the stage's structures here on
    a copy), an optimiser, schedule or learning-rate state that does not fit the stage's."""
    stage, progress = state["stage"], state["progress"]
    if not 0 <= stage < len(plans):
        return f"stage {stage} is outside the method's stages 0 to {len(plans) - 1}"
    plan = plans[stage]
    if not 0 <= progress["epoch"] <= plan.epochs:
        return f"progress.epoch {progress['epoch']} is outside stage {plan.stage.name}'s 0 to {plan.epochs}"
    trial = copy.deepcopy(model)
    for earlier in plans[:stage + 1]:
        _build_structure(trial, earlier, cfg, method)
    mismatch = state_mismatch(trial.state_dict(), state["model"])
    if mismatch:
        return f"its weights do not fit this run's model: {mismatch}"
    return loop.resume_problem(trial, plan, settings, n_train, StageProgress(**progress))


def _stage_summary(plan: StagePlan, history: "list[dict]") -> dict:
    rows = [r for r in history if r["stage"] == plan.stage.name]
    chosen = [r for r in rows if r.get("selected")]
    best = chosen[-1] if chosen else (rows[-1] if rows else {})
    return {
        "stage": plan.stage.name, "scope": plan.train_scope, "objective": plan.stage.objective,
        "peft": plan.peft,
        "epochs": plan.epochs, "lr": plan.lr, "select": plan.select, "augment": plan.augment,
        "cached_features": plan.cache_features, "selected_epoch": best.get("epoch"),
        "val_accuracy": best.get("val_accuracy"), "val_robust_accuracy": best.get("val_robust_accuracy"),
    }


def _stage_label(method: str, plan: StagePlan) -> str:
    """``adv-ft`` for a one-stage method, ``lp-ft: ft`` for a stage of a longer one."""
    return method if plan.stage.name == method else f"{method}: {plan.stage.name}"


SELECT_TEXT = {"robust": "best robust validation accuracy", "clean": "best clean validation accuracy",
               "last": "last epoch"}


def _stage_line(method: str, plan: StagePlan) -> str:
    """The line before a stage's epoch lines."""
    epochs = f"{plan.epochs} epoch{'s' if plan.epochs != 1 else ''}"
    return f"{_stage_label(method, plan)}: {epochs}; * marks the {SELECT_TEXT[plan.select]} so far"


def _epoch_line(r: EpochRecord, epochs: int) -> str:
    """A finished epoch in at most 80 columns (``epochs.csv`` holds every value in full)."""
    robust = "-" if r.val_robust_accuracy is None else f"{100 * r.val_robust_accuracy:.1f}%"
    rate = r.images_per_second
    rate_text = "-" if not math.isfinite(rate) else f"{rate:.0f}" if rate < 1e5 else f"{rate / 1e3:.0f}k"
    return (f"  epoch {r.epoch}/{epochs}: loss {r.train_loss:.4g}, lr {r.lr:.2g}, val {100 * r.val_accuracy:.1f}%"
            f", robust {robust}, {rate_text} img/s{' *' if r.selected else ''}")


class _Bar:
    """A rich progress bar on stderr, one task at a time: ``show(description, total)`` starts
    (or restarts) it, ``advance(k)`` moves it on; nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.key = enabled, None

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = Console(stderr=True)
            self.enabled = console.is_terminal  # a log file gets the lines, not a bar's last state
        if self.enabled:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                console=console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=1, info="")
        return self

    def show(self, key: object, description: str, total: int) -> None:
        """Restart the bar for a new task ``key`` (nothing when ``key`` is the current one)."""
        if self.enabled and key != self.key:
            self.key = key
            self.bar.reset(self.task, total=max(1, total), description=description, info="")

    def advance(self, k: int, info: str = "") -> None:
        if self.enabled:
            self.bar.update(self.task, advance=k, info=info)

    def say(self, line: str, printer: "Callable[[str], None]") -> None:
        """A line above the live bar when it shows, else through ``printer``."""
        if self.enabled:
            self.bar.console.print(line, highlight=False, soft_wrap=True)
        else:
            printer(line)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


class _EpochBar(_Bar):
    """The bar of a stage: over the batches of each epoch (loss and learning rate as it trains),
    then over the validation images; before the first epoch over the images whose features are cached."""

    def __init__(self, enabled: bool, method: str, plan: StagePlan, n: int, batch_size: int, n_val: int) -> None:
        super().__init__(enabled)
        self.label, self.plan = _stage_label(method, plan), plan
        self.steps, self.totals = max(1, -(-n // batch_size)), {"features": n, "validation": n_val}

    def update(self, epoch: int, step: int, loss: float, lr: float) -> None:
        self.show(("train", epoch), f"{self.label} epoch {epoch + 1}/{self.plan.epochs}", self.steps)
        self.advance(1, info=f"loss {loss:.4f}  lr {lr:.3g}")

    def passed(self, what: str, epoch: int, images: int) -> None:
        """``images`` more of a pass without training (``features`` or ``validation``)."""
        where = "" if what == "features" else f" epoch {epoch + 1}/{self.plan.epochs}"
        self.show((what, epoch), f"{self.label}{where}: {what}", self.totals[what])
        self.advance(images)


# --- evaluation and the scores before / after --------------------------------------------------------


#: how ``final.json`` counts robust accuracy (``test.robust_rule``)
ROBUST_RULE = "per point, robust against every attack run"


def evaluate(model: SplitModel, test: DataSet, cfg: TransferConfig, device: torch.device, *,
             progress: bool = False) -> dict:
    """Test metrics in IEEE float32 (no TF32 convolutions on CUDA): clean accuracy, robust
    accuracy under PGD-k for each k and AutoAttack if asked, counted per point (``ROBUST_RULE``):
    ``pgd[k]`` counts the points that every PGD attack with at most k steps left correct,
    ``autoattack`` those that AutoAttack and every PGD attack left correct, ``robust_accuracy``
    those that every attack run left correct. Each PGD-k draws its random starts from its own
    seeded generator, as if run alone."""
    attack = AttackSettings(eps=float(cfg.eps), steps=cfg.attack_steps, step=float(cfg.attack_step))
    steps = sorted(set(cfg.eval_steps))
    generators = {k: torch.Generator().manual_seed(derived_seed(cfg.seed, "test", k)) for k in steps}
    adversary = _autoattacker(model, test, cfg, device) if cfg.autoattack else None
    clean = total = robust = after_autoattack = 0
    pgd = dict.fromkeys(steps, 0)
    attacks = ", ".join([*(f"PGD-{k}" for k in steps), *(["AutoAttack"] if adversary else [])])
    with frozen(model), float32_exact(), _Bar(progress) as bar:
        bar.show("test", f"test: clean, {attacks}", len(test))
        for x, y in test.loader(cfg.batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                g0 = model.features(x)  # once: the clean prediction and every attack's starting point
                clean += int((model.head(g0).argmax(1) == y).sum())
            survived = torch.ones_like(y, dtype=torch.bool)
            for k in steps:  # robust_correct judges the clean point too
                survived &= loop.robust_correct(model, x, y, attack, k, generators[k], g0=g0)
                pgd[k] += int(survived.sum())
            if adversary is not None:  # on the points every PGD left correct, as it runs its own attacks
                left = survived.nonzero().flatten()
                if len(left):
                    survived[left] = adversary(x[left], y[left]).to(survived.device)
                after_autoattack += int(survived.sum())
            robust += int(survived.sum())
            total += len(y)
            bar.advance(len(y))
    n = max(total, 1)
    return {"n": len(test), "eps": float(cfg.eps), "eps_text": format_eps(float(cfg.eps)),
            "attack_step": float(cfg.attack_step), "clean_accuracy": clean / n,
            "pgd": {str(k): v / n for k, v in pgd.items()},
            "autoattack": after_autoattack / n if adversary is not None else None,
            "robust_accuracy": robust / n, "robust_rule": ROBUST_RULE}


def _autoattacker(model: SplitModel, test: DataSet, cfg: TransferConfig,
                  device: torch.device) -> "Callable[[torch.Tensor, torch.Tensor], torch.Tensor]":
    """AutoAttack standard (pyautoattack), L-inf at ``eps``: ``(x, y) -> the points it left correct``."""
    import logging

    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    adversary = AutoAttack(model, norm="Linf", eps=float(cfg.eps), version="standard", device=device, seed=cfg.seed)
    k = int(test.num_classes or 2)
    adversary.apgd_targeted.n_target_classes = max(1, min(9, k - 1))  # fewer than 10 classes
    adversary.fab.n_target_classes = max(1, min(9, k - 1))

    def correct(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))  # (images, their predictions)
        with torch.no_grad():
            return model(x_adv).argmax(1) == y

    return correct


def _score_options(cfg: TransferConfig) -> dict:
    return dict(
        data=cfg.data, classes=cfg.classes, eps=cfg.eps, n=cfg.score_n, split="test", seed=cfg.seed,
        device=cfg.device, data_root=cfg.data_root, resize=cfg.resize, allow_pickle=cfg.allow_pickle,
        download=cfg.download, batch_size=cfg.batch_size, steps=cfg.score_steps, corruption=cfg.corruption,
        severity=cfg.severity, corruption_params=cfg.corruption_params,
    )


def _scores(cfg: TransferConfig, folder: Path, siblings: "list[Path]", progress: bool) -> "tuple[dict, dict]":
    before_dir, after_dir = folder / "score" / "before", folder / "score" / "after"
    done = [s / "score" / "before" for s in siblings if (s / "score" / "before" / "summary.json").exists()]
    if done and not (before_dir / "summary.json").exists():  # the same run, already made by a sibling
        shutil.copytree(done[0], before_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock"))
    before = score(
        ScoreConfig(model=cfg.model, **_score_options(cfg)), out=before_dir, progress=progress, as_only=True,
        model_dir=cfg.model_dir, weights=cfg.weights, feature_layer=cfg.feature_layer,
    )
    _name_the_run_relatively(folder, after_dir)
    after = score(ScoreConfig(model=f"run:{folder}", **_score_options(cfg)), out=after_dir, progress=progress)
    return before.summary, after.summary


def _name_the_run_relatively(folder: Path, after_dir: Path) -> None:
    """``score/after`` records its model, this run, relative to itself (``run:../..``); one
    written before it did names the run by an absolute path, which a moved run no longer has:
    that name is rewritten (the run's own config matched, so the model is this run)."""
    path = after_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # none yet, or unreadable: score() says so
    if isinstance(config, dict) and str(config.get("model", "")).startswith("run:/"):
        write_json(path, {**config, "model": recorded_model(f"run:{folder}", after_dir)})


# --- the whole command -------------------------------------------------------------------------------


def _check_one_image_batches(base: SplitModel, probe: torch.Tensor, methods: "list[Method]", n_train: int,
                             batch_size: int, spec: object, ranks: int = 1) -> None:
    """Refuse, before training, a batch of one image (``--batch-size 1``, a last batch of one, or
    under torchrun a rank's share of one) for methods that train the backbone when the model cannot
    train on one image (batch norm over one value per channel: BatchNorm1d, or BatchNorm2d on 1x1 maps)."""
    full, rest = divmod(n_train, batch_size)
    sizes = ([batch_size] if full else []) + ([rest] if rest >= ranks else [])  # smaller ones are left out
    if min(size // ranks for size in sizes) != 1:
        return
    training = [m.name for m in methods if any(stage.scope != "head" for stage in m.stages)]
    if not training:
        return
    trial = copy.deepcopy(base).cpu().train()
    try:
        with torch.no_grad():
            trial(probe[:1].cpu())
    except (ValueError, RuntimeError) as exc:
        if batch_size == 1:
            where = "--batch-size 1"
        elif ranks == 1:
            where = f"{n_train} training images in batches of {batch_size} leave one in the last batch"
        else:
            where = (f"{n_train} training images in global batches of {batch_size} over {ranks} ranks give a "
                     f"rank a share of one image")
        raise ConfigError(f"{spec} cannot train on a batch of one image ({describe(exc)}), and {where}; "
                          f"{', '.join(training)} train the backbone: choose another --batch-size or --n") from None


def _absolute_path(path: "str | None") -> "str | None":
    return absolute_path(path) if path is not None else None


#: options that change the evaluation and the scores, not the training
EVALUATION_KEYS = ("workers", "autoattack", "eval_steps", "n_test")


def _option_defaults() -> dict:
    """The option defaults as a config records them (validated: eps as a float); they stand in for
    options a config was written without."""
    options = dataclasses.asdict(TransferConfig(model="builtin:lenet-random", data="digits").validated())
    return {**options, "world_size": 1, "structure": None}  # recorded since torchrun and --peft


def _images_line(counts: "dict[str, int]", sizes: "tuple[int, int, int]", scored: bool) -> str:
    """How many images each phase uses, of how many (wrapped at 80 columns)."""
    import textwrap

    parts = [f"{what} {counts[k]:,} of {size:,}" for k, size, what in
             zip(("train", "val", "test"), sizes, ("training", "validation", "test"))]
    if scored:
        parts.append(f"scored before and after transfer {counts['score']:,}")
    text = f"images: {', '.join(parts)}; --n-val, --n-test, --score-n all: a whole split"
    return "\n".join(textwrap.wrap(text, 80, subsequent_indent="  ", break_on_hyphens=False))


def training_positions(
    size: int, val_fraction: float, n: "int | None", seed: int, n_val: "int | None" = None
) -> "tuple[torch.Tensor, torch.Tensor]":
    """``(train, val)`` positions in a training split of ``size`` rows: the seeded validation
    split, then ``n`` training and ``n_val`` validation rows drawn by seeded permutations (not the
    first rows: data sets such as dSprites are stored ordered by class), each ascending."""
    train_pos, val_pos = validation_split(size, val_fraction, seed)
    return train_pos[select_indices(len(train_pos), n, seed)], val_pos[select_indices(len(val_pos), n_val, seed)]


def transfer(
    config: TransferConfig,
    out: "str | Path",
    *,
    progress: bool = True,
    printer: "Callable[[str], None]" = print,
    **overrides: object,
) -> "list[MethodResult]":
    """Run every method of ``config``; each writes (or resumes, or rereads) its run directory.

    Under torchrun every rank trains; rank 0 returns the results, the other ranks an empty list.
    """
    cfg = dataclasses.replace(config, **overrides).validated()
    methods = cfg.methods
    out = Path(out)
    world = world_from_env()
    _check_same_everywhere(world, cfg)
    if not world.main:
        printer, progress = (lambda line: None), False
    device = resolve_device(local_device(world, cfg.device))
    amp = amp_dtype(cfg.amp, device)
    model_spec, data_spec = parse_model_spec(cfg.model), parse_data_spec(cfg.data)
    loaded = load_model(model_spec, model_dir=cfg.model_dir, weights=cfg.weights, allow_pickle=cfg.allow_pickle,
                        download=cfg.download, builtin_head=data_spec.factor)
    common = dict(root=cfg.data_root, download=cfg.download, input_format=loaded.input_format,
                  resize=cfg.resize, classes=cfg.classes,
                  corruption=corruption_of(cfg.corruption, cfg.severity, cfg.corruption_params))
    full_train = load_data(data_spec, split="train", n=None, seed=cfg.seed, **common)
    if full_train.task != "classification":
        raise ConfigError(f"transfer trains classifiers; {full_train.spec} has {full_train.task} targets")
    selection = f"{full_train.spec}{' --classes ' + str(cfg.classes) if cfg.classes else ''}"
    if full_train.num_classes < 2:
        raise ConfigError(f"transfer needs at least 2 classes; {selection} has {full_train.num_classes}")
    if cfg.autoattack and full_train.num_classes < 4:
        raise ConfigError(f"--autoattack (standard: its targeted DLR attacks) needs at least 4 classes; "
                          f"{selection} has {full_train.num_classes}; leave --autoattack out")
    train_split, val_split = validation_split(len(full_train), cfg.val_fraction, cfg.seed)
    full_test = load_data(data_spec, split="test", n=None, seed=cfg.seed, **common)
    counts = image_counts(cfg.n, cfg.n_val, cfg.n_test, cfg.score_n,
                          (len(train_split), len(val_split), len(full_test)))
    train_pos, val_pos = training_positions(len(full_train), cfg.val_fraction, counts["train"], cfg.seed,
                                            counts["val"])
    train, val = full_train.subset(train_pos), full_train.subset(val_pos)
    test = full_test if counts["test"] == len(full_test) else load_data(
        data_spec, split="test", n=counts["test"], seed=cfg.seed, **common)
    # from here on the counts: what config.json records and the evaluation and the scores use
    cfg = dataclasses.replace(cfg, n_val=len(val), n_test=len(test),
                              score_n=score_request(cfg.n, cfg.n_test, cfg.score_n))
    images = _images_line(counts, (len(train_split), len(val_split), len(full_test)), cfg.score)
    # runs recorded before the counts were resolved hold null for a whole split
    whole_splits = {"n_val": {None: len(val_split)}, "n_test": {None: len(full_test)}}
    probe = full_train.batch(torch.arange(min(len(full_train), 8)))
    try:
        base = split_model(loaded.module, probe, feature_layer=cfg.feature_layer)
    except RuntimeError as exc:
        raise ModelError(f"{loaded.spec} cannot run on {full_train.spec} inputs of shape "
                         f"{'x'.join(map(str, probe.shape[1:]))}: {describe(exc)}; give --resize SIDE") from None
    augment = resolve_augment(full_train, cfg.augment)
    _check_one_image_batches(base, probe, methods, len(train), cfg.batch_size, loaded.spec, world.size)
    for method in methods:  # a PEFT variant with nothing to adapt: refused before any directory is written
        for plan in plan_stages(method, cfg, "none"):
            if plan.peft is not None:
                check_peft(base, PeftSpec.from_record(plan.peft))
    settings = Settings(
        optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
        batch_size=cfg.batch_size,
        attack=AttackSettings(eps=float(cfg.eps), steps=cfg.attack_steps, step=float(cfg.attack_step)),
        trades_beta=cfg.trades_beta, seed=cfg.seed, method="", device=device, amp=amp, workers=cfg.workers,
        world=world, autolora=AutoLoraSettings(scale=float(cfg.autolora_scale), rho=float(cfg.autolora_rho),
                                               divide=float(cfg.autolora_divide), condition2=cfg.autolora_condition2),
    )
    resolved_common = {
        **dataclasses.asdict(cfg), "kind": RUN_KIND, "eps_text": format_eps(float(cfg.eps)),
        "data": data_spec.canonical(), "data_root": _absolute_path(cfg.data_root),
        "num_classes": full_train.num_classes, "class_names": full_train.class_names,
        "n_train": len(train), "augment": augment,
        "amp": str(amp).replace("torch.", "") if amp else "off", "device": str(device),
        "base": {
            # absolute paths: run:DIR must load from any working directory
            "model": loaded.spec.canonical(), "model_dir": _absolute_path(cfg.model_dir),
            "weights": _absolute_path(cfg.weights),
            "builtin_head": data_spec.factor, "feature_layer": cfg.feature_layer,
            "input_shape": list(probe.shape[1:]), "split_note": base.split_note,
        },
        "data_source": full_train.source, "transforms": full_train.transforms, "world_size": world.size,
        **environment(),
    }
    folders = [out] if len(methods) == 1 else [out / m.name for m in methods]
    results = []
    for method, folder in zip(methods, folders):
        plans = plan_stages(method, cfg, augment, world.distributed)
        resolved = {**resolved_common, **_unused_options(method), "method": method.name,
                    "structure": saved_structure(plans),
                    "stages": [_plan_record(p) for p in plans]}
        method_settings = dataclasses.replace(settings, method=method.name)
        if not world.main:  # rank 0 says whether this method trains (or why the run is refused)
            answer = world.broadcast(None, device)
            if isinstance(answer, str):
                raise ResumeError(answer)  # rank 0's own message
            if answer:
                _train_method(method, cfg, base, train, val, folder, method_settings, augment, printer, progress)
            continue
        told = False  # whether the other ranks heard rank 0's answer
        try:
            with RunDir(folder).locked() as run:
                # the evaluation's settings may change until the evaluation has finished (final.json)
                finished = (folder / FINAL).exists()
                run.claim(resolved, volatile=("workers",) if finished else EVALUATION_KEYS,
                          defaults=_option_defaults(), meant=whole_splits)
                final = read_json(folder / FINAL)
                if final is None and cfg.score:  # the scores' records, read before hours of training or evaluation
                    for scores in ("before", "after"):
                        read_json(folder / "score" / scores / CONFIG)
                # trained: model.pt and its stages (a model.pt alone is rebuilt from the checkpoints)
                needs_training = final is None and not ((folder / RUN_WEIGHTS).exists()
                                                        and (folder / STAGES).exists())
                world.broadcast(needs_training, device)
                told = True
                if final is None:
                    final = _train_and_evaluate(method, cfg, base, train, val, test, folder, folders, method_settings,
                                                augment, printer, progress, needs_training, resolved["structure"],
                                                preface=images)
                    images = ""  # said once, before the first method that trains or evaluates
        except AsboundError as exc:
            if not told:  # a refused or locked directory: every rank stops with the same one line
                world.broadcast(str(exc), device)
            raise
        results.append(MethodResult(method.name, folder, final))
    world.close()
    return results


def _train_and_evaluate(method: Method, cfg: TransferConfig, base: SplitModel, train: DataSet, val: DataSet,
                        test: DataSet, folder: Path, folders: "list[Path]", settings: Settings, augment: str,
                        printer: "Callable[[str], None]", progress: bool, needs_training: bool,
                        structure: Optional[dict], preface: str = "") -> dict:
    """Train (or reuse the trained weights), evaluate on the test data, score before and after;
    ``preface`` is said first (once the checkpoints have been read)."""
    started = time.perf_counter()
    if needs_training:
        stages = _train_method(method, cfg, base, train, val, folder, settings, augment, printer, progress, preface)
    else:
        stages = _recorded_stages(folder, plan_stages(method, cfg, augment))
    trained = _load_trained(base, train.num_classes, folder, settings.device, structure)
    if preface and not needs_training:  # once the stored records have been read: a damaged one is the only line
        printer(preface)
    write_json(folder / STAGES, stages)
    final = {"method": method.name, "peft": cfg.peft if any(st.scope == "tune" for st in method.stages) else None,
             "stages": stages, "test": evaluate(trained, test, cfg, settings.device, progress=progress),
             "seconds": time.perf_counter() - started}
    if cfg.score:
        before, after = _scores(cfg, folder, [f for f in folders if f != folder], progress)
        final.update(score_before=before, score_after=after)
    write_json(folder / FINAL, clean_json(final))
    return final


def _recorded_stages(folder: Path, plans: "list[StagePlan]") -> "list[dict]":
    """The stages' selections as ``stages.json`` records them, checked to be this method's stages."""
    stages = read_json(folder / STAGES, kind=list)
    names, planned = [s.get("stage") for s in stages], [p.stage.name for p in plans]  # type: ignore[union-attr]
    if names != planned:
        raise damaged(folder / STAGES, f"it lists the stages {', '.join(map(str, names)) or 'none'}; the method "
                                       f"has {', '.join(planned)}")
    return stages  # type: ignore[return-value]


PEFT_KEYS = ("peft", "peft_rank", "peft_alpha", "adapter_reduction", "prompt_tokens", "prompt_depth")
AUTOLORA_KEYS = ("autolora_lr", "autolora_rank", "autolora_alpha", "autolora_scale", "autolora_rho",
                 "autolora_divide", "autolora_condition2", "autolora_lambda_n")


def _unused_options(method: Method) -> dict:
    """The options a method does not use, at their defaults in its record: ``--method adv-ft,roli
    --peft lora`` and a later ``--method adv-ft`` into the same directory describe the same adv-ft run."""
    defaults = _option_defaults()
    unused = () if any(st.scope == "tune" for st in method.stages) else PEFT_KEYS
    if not any(st.objective == "autolora" for st in method.stages):
        unused += AUTOLORA_KEYS
    return {k: defaults[k] for k in unused}


def _plan_record(plan: StagePlan) -> dict:
    """A stage's resolved settings as ``config.json`` records them; the scope and the PEFT structure
    only where ``--peft`` resolved them, so runs recorded before they existed still compare equal."""
    record = dataclasses.asdict(plan) | {"stage": plan.stage.name}
    if plan.scope in ("", plan.stage.scope):
        del record["scope"]
    if plan.peft is None:
        del record["peft"]
    return record


def _check_same_everywhere(world: World, cfg: TransferConfig) -> None:
    """Refuse a torchrun world whose ranks were started with different options."""
    if not world.distributed:
        return
    options = dataclasses.asdict(cfg)
    every = world.gather(options)
    differ = sorted({k for other in every for k in options if other.get(k) != every[0].get(k)})
    if differ:
        ranks = [r for r, other in enumerate(every) if other != every[0]]
        raise ConfigError(f"the torchrun ranks disagree on the configuration (rank {ranks[0]} differs from rank 0 in "
                          f"{', '.join(d.replace('_', '-') for d in differ)}); start every rank with the same command")


def _load_trained(base: SplitModel, num_classes: int, folder: Path, device: torch.device,
                  structure: Optional[dict] = None) -> SplitModel:
    return with_run_weights(copy.deepcopy(base), num_classes, folder, structure).to(device).eval()
