"""``transfer``: from a pretrained model to downstream models, one run directory per method.

A method's run directory (``OUT`` for one method, ``OUT/<method>`` for several)::

    config.json          resolved options, the base model's spec, seed, versions, device (kind "transfer")
    epochs.csv           one row per epoch and stage: losses, lr, clean / robust validation accuracy,
                         seconds, images per second (rewritten atomically after every epoch)
    checkpoints/last.pt  the resumable state after the last complete epoch (atomic)
    checkpoints/<i>-<stage>-best.pt   the stage's selected weights (atomic)
    model.pt             the trained split model's weights: what ``run:DIR`` loads
    final.json           test metrics (clean, PGD-k, AutoAttack) and the stages' selections
    score/before/        ``score`` of the pretrained representation on the test data (AS only)
    score/after/         ``score`` of ``run:DIR`` on the test data (every bound)

Every directory is locked while it is written; a finished run is only reread; a rerun with other
settings is refused. Under ``torchrun`` (:mod:`asbound.distributed`) every rank trains and rank 0
alone locks, reads and writes the directory, evaluates and scores.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch
from torch import nn

from asbound.data import DataSet, load_data, resolve_augment, select_indices, validation_split
from asbound.devices import amp_dtype, memory_format, resolve_device
from asbound.distributed import SINGLE, World, local_device, world_from_env
from asbound.data.corruptions import corruption_of
from asbound.errors import AsboundError, ConfigError, ModelError, ResumeError, describe
from asbound.models import SplitModel, load_model, split_model
from asbound.models.peft import REBUILT, PeftSpec, apply_peft, check_peft, natural_branch, saved_model
from asbound.models.runs import RUN_KIND, RUN_WEIGHTS, with_run_weights
from asbound.records import RunDir, atomic_write, clean_json, environment, read_json, write_json
from asbound.scoring import ScoreConfig, score
from asbound.specs import absolute_path, format_eps, parse_data_spec, parse_model_spec
from asbound.transfer.config import TransferConfig
from asbound.transfer.loop import (
    AutoLoraSettings,
    Checkpointer,
    EpochRecord,
    Settings,
    StagePlan,
    StageProgress,
    accuracy,
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

    def best_path(self, plan: StagePlan) -> Path:
        return self.folder / f"{plan.key}-best.pt"

    def save_last(self, plan: StagePlan, model: nn.Module, progress: StageProgress) -> None:
        if not self.world.main:
            return
        state = {"stage": plan.index, "model": model.state_dict(), "progress": dataclasses.asdict(progress),
                 "history": self.done_history}
        _save(self.last_path, state)
        self.write_epochs(self.done_history + progress.history)

    def save_best(self, plan: StagePlan, model: nn.Module) -> None:
        if self.world.main:
            _save(self.best_path(plan), model.state_dict())

    def load_best(self, plan: StagePlan) -> dict:
        state = torch.load(self.best_path(plan), map_location="cpu", weights_only=True) if self.world.main else None
        return self.world.broadcast(state, self.device)

    def load_last(self) -> Optional[dict]:
        state = None
        if self.world.main and self.last_path.exists():
            state = torch.load(self.last_path, map_location="cpu", weights_only=True)
        return self.world.broadcast(state, self.device)

    def write_epochs(self, rows: "list[dict]") -> None:
        text = pd.DataFrame(rows).to_csv(index=False) if rows else ""
        atomic_write(self.epochs_path, lambda handle: handle.write(text.encode()))


def _save(path: Path, obj: object) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


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
) -> "list[dict]":
    """Train every stage (resuming after the last complete epoch); write ``model.pt``; return the stages.

    Before stage ``i`` trains, the model carries the PEFT structures of stages ``0..i``; ``last.pt``
    of stage ``i`` holds weights of that structure.
    """
    world = settings.world
    checkpoints = RunCheckpoints(folder, [], world, settings.device)
    model = _new_head(base, train.num_classes, derived_seed(cfg.seed, method.name, "head"), cfg.head_init)
    plans = plan_stages(method, cfg, augment, world.distributed)
    last = checkpoints.load_last()
    start_stage, state = 0, StageProgress()
    if last is not None:
        start_stage = int(last["stage"])
    for plan in plans[:start_stage + 1]:
        _build_structure(model, plan, cfg, method)
    model = model.to(settings.device, memory_format=memory_format(settings.amp))
    if last is not None:
        model.load_state_dict(last["model"])
        state = StageProgress(**last["progress"])
        checkpoints.done_history = list(last["history"])
        printer(f"resuming {method.name}: stage {plans[start_stage].stage.name}, after epoch {state.epoch}")
    stages = []
    for plan in plans[:start_stage]:
        stages.append(_stage_summary(plan, checkpoints.done_history))

    def loader(data: DataSet, shuffle: bool, augmented: bool, shard: "tuple[int, int]" = (0, 1)) -> Callable[..., object]:
        return lambda seed=0: data.loader(
            cfg.batch_size, shuffle=shuffle, augment=augment if augmented else "none", seed=seed,
            workers=cfg.workers, pin_memory=settings.device.type == "cuda", shard=shard,
        )

    def share(data: DataSet) -> DataSet:  # this rank's rows, for counts summed over the ranks
        return data.subset(torch.arange(world.rank, len(data), world.size)) if world.distributed else data

    val_batches = loader(share(val), False, False)
    lambda_set = share(train.subset(select_indices(len(train), cfg.autolora_lambda_n,
                                                   derived_seed(cfg.seed, "lambda"))))
    lambda_batches = loader(lambda_set, False, False)
    # training: this rank's share of every global batch, in lockstep with the other ranks
    train_loader = lambda seed, training: loader(train, training, training, (world.rank, world.size))(seed)  # noqa: E731
    progress = progress and world.main
    for plan in plans[start_stage:]:
        with _EpochBar(progress, method.name, plan, len(train), cfg.batch_size) as bar:
            state = train_stage(
                model, plan, settings, train_loader, len(train), val_batches, checkpoints, state,
                report=lambda record: bar.say(_epoch_line(method.name, plan, record), printer), on_batch=bar.update,
                lambda_batches=lambda_batches,
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
    if world.main:
        _save(folder / RUN_WEIGHTS, saved.state_dict())
    return stages


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


def _epoch_line(method: str, plan: StagePlan, r: EpochRecord) -> str:
    robust = "-" if r.val_robust_accuracy is None else f"{100 * r.val_robust_accuracy:.1f}%"
    mark = "  *selected" if r.selected else ""
    return (f"{_stage_label(method, plan)} epoch {r.epoch}/{plan.epochs}: loss {r.train_loss:.4f}, "
            f"lr {r.lr:.3g}, val acc {100 * r.val_accuracy:.1f}%, val robust acc {robust}, "
            f"{r.images_per_second:.0f} img/s{mark}")


class _EpochBar:
    """A rich progress bar over the batches of each epoch (loss and learning rate as it trains)."""

    def __init__(self, enabled: bool, method: str, plan: StagePlan, n: int, batch_size: int) -> None:
        self.enabled, self.method, self.plan = enabled, method, plan
        self.steps = max(1, -(-n // batch_size))
        self.epoch = -1

    def __enter__(self) -> "_EpochBar":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                console=Console(stderr=True), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.steps, info="")
        return self

    def update(self, epoch: int, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        if epoch != self.epoch:
            self.epoch = epoch
            self.bar.reset(self.task, total=self.steps,
                           description=f"{_stage_label(self.method, self.plan)} epoch {epoch + 1}/{self.plan.epochs}")
        self.bar.update(self.task, completed=step + 1, info=f"loss {loss:.4f}  lr {lr:.3g}")

    def say(self, line: str, printer: "Callable[[str], None]") -> None:
        """A finished epoch's line: above the live bar when it shows, else through ``printer``."""
        if self.enabled:
            self.bar.console.print(line, highlight=False, soft_wrap=True)
        else:
            printer(line)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


# --- evaluation and the scores before / after --------------------------------------------------------


def evaluate(model: SplitModel, test: DataSet, cfg: TransferConfig, device: torch.device) -> dict:
    """Test metrics in float32: clean accuracy, PGD-k accuracy for each k, AutoAttack if asked."""
    attack = AttackSettings(eps=float(cfg.eps), steps=cfg.attack_steps, step=float(cfg.attack_step))
    out: dict = {"n": len(test), "eps": float(cfg.eps), "eps_text": format_eps(float(cfg.eps)),
                 "attack_step": float(cfg.attack_step), "pgd": {}}
    for k in cfg.eval_steps:
        clean, robust = accuracy(model, test.loader(cfg.batch_size, shuffle=False), device, attack=attack,
                                 steps=k, seed=derived_seed(cfg.seed, "test", k))
        out["clean_accuracy"] = clean
        out["pgd"][str(k)] = robust
    out["autoattack"] = autoattack_accuracy(model, test, cfg, device) if cfg.autoattack else None
    return out


def autoattack_accuracy(model: SplitModel, test: DataSet, cfg: TransferConfig, device: torch.device) -> float:
    """AutoAttack standard (pyautoattack), L-inf at ``eps``, on the test data."""
    import logging

    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    model = model.eval()
    adversary = AutoAttack(model, norm="Linf", eps=float(cfg.eps), version="standard", device=device, seed=cfg.seed)
    k = int(test.num_classes or 2)
    adversary.apgd_targeted.n_target_classes = max(1, min(9, k - 1))  # fewer than 10 classes
    adversary.fab.n_target_classes = max(1, min(9, k - 1))
    correct = total = 0
    for x, y in test.loader(cfg.batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))  # (images, their predictions)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


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
    after = score(ScoreConfig(model=f"run:{folder}", **_score_options(cfg)), out=after_dir, progress=progress)
    return before.summary, after.summary


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
    if full_train.num_classes < 2:
        raise ConfigError(f"transfer needs at least 2 classes; {full_train.spec}"
                          f"{' --classes ' + str(cfg.classes) if cfg.classes else ''} has {full_train.num_classes}")
    if cfg.autoattack and full_train.num_classes < 4:
        raise ConfigError(f"--autoattack (standard: its targeted DLR attacks) needs at least 4 classes; "
                          f"{full_train.spec} has {full_train.num_classes}; leave --autoattack out")
    train_pos, val_pos = training_positions(len(full_train), cfg.val_fraction, cfg.n, cfg.seed,
                                          cfg.n_val)
    train, val = full_train.subset(train_pos), full_train.subset(val_pos)
    test = load_data(data_spec, split="test", n=cfg.n_test, seed=cfg.seed, **common)
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
        "n_train": len(train), "n_val": len(val), "n_test": len(test), "augment": augment,
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
                          defaults=_option_defaults())
                final = read_json(folder / FINAL)
                needs_training = final is None and not (folder / RUN_WEIGHTS).exists()
                world.broadcast(needs_training, device)
                told = True
                if final is None:
                    final = _train_and_evaluate(method, cfg, base, train, val, test, folder, folders, method_settings,
                                                augment, printer, progress, needs_training, resolved["structure"])
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
                        structure: Optional[dict]) -> dict:
    """Train (or reuse the trained weights), evaluate on the test data, score before and after."""
    started = time.perf_counter()
    if needs_training:
        stages = _train_method(method, cfg, base, train, val, folder, settings, augment, printer, progress)
    else:
        stages = read_json(folder / "stages.json", kind=list) or []
    write_json(folder / "stages.json", stages)
    trained = _load_trained(base, train.num_classes, folder, settings.device, structure)
    final = {"method": method.name, "peft": cfg.peft if any(st.scope == "tune" for st in method.stages) else None,
             "stages": stages, "test": evaluate(trained, test, cfg, settings.device),
             "seconds": time.perf_counter() - started}
    if cfg.score:
        before, after = _scores(cfg, folder, [f for f in folders if f != folder], progress)
        final.update(score_before=before, score_after=after)
    write_json(folder / FINAL, clean_json(final))
    return final


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
