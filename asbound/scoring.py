"""``score``: (model, data) -> per-datapoint records and the bounds of Nern et al. (2023).

Data flows one way: specs -> model (features + linear head) and data -> attacks ->
per-datapoint records -> bounds and summaries. :mod:`asbound.api` re-exports this module's
public names; a notebook calls them directly::

    from asbound import ScoreConfig, score
    result = score(ScoreConfig(model="builtin:lenet-adversarial", data="dsprites:shape", n=200))
    result.summary["as_score"], result.points.head()

The data are read and attacked batch by batch, so memory stays bounded whatever ``n`` is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from asbound.attacks import ATTACKS, PGD, FastObjective, Watch, foolbox_pgd, loss_objective, representation_shift
from asbound.certify import METHODS as CERTIFY_METHODS, Bounder, CheckFailed, certified, check_attack_points
from asbound.certify import check_records, float32_deviation, method_for, no_random_draws, record_slack
from asbound.certify import sensitivity_upper
from asbound.bounds import head_norms, headline_term, lemma1_terms, margins, summarize_points
from asbound.data import DataSet, load_data
from asbound.data.corruptions import corruption_of
from asbound.devices import AMP_DTYPES, attack_amp_dtype, cpu_has_bf16, float32_exact, resolve_device, to_format
from asbound.errors import ConfigError, ModelError, SpecError, describe
from asbound.losses import Loss, loss_for_task
from asbound.models import LoadedModel, SplitModel, frozen, load_head, load_model, split_model
from asbound.protocol import DEFAULT_PROTOCOL, PROTOCOLS, get_protocol, load_protocol_data, wrap_data, wrap_model
from asbound.records import RunDir, clean_json, environment
from asbound.specs import DataSpec, format_eps, parse_classes, parse_data_spec, parse_eps, parse_model_spec, parse_norm

DEFAULT_MODEL = "builtin:lenet-adversarial"
DEFAULT_TASKS = ("dsprites:orientation", "dsprites:shape")
#: the embedded default's rows: Lemma 1 on the orientation-pretrained LeNet's own task, Theorem 2
#: on the LeNet adversarially trained to classify the shape (its orientation probe reaches 44%)
DEFAULT_RUNS = (("builtin:lenet-adversarial", "dsprites:orientation"),
                ("builtin:lenet-shape-adversarial", "dsprites:shape"))
DEFAULT_N = 500
BACKENDS = ("asbound", "foolbox")


#: options added after runs were recorded without them: such a run compares as if it had these
OPTION_DEFAULTS = {"corruption": None, "severity": None, "corruption_params": "auto", "certify": None,
                   "attack": "pgd", "amp": "auto", "compile": False, "grad_dtype": "float32",
                   "protocol": DEFAULT_PROTOCOL, "protocol_settings": PROTOCOLS[DEFAULT_PROTOCOL].settings(),
                   # recorded with --certify crown only: a crown run from before full CROWN (its bound
                   # was today's crown-ibp) is not resumed as one
                   "certify_used": None, "certify_note": None}
#: the initial step relative to eps when --rel-step is not given: PGD the seed's 0.7, APGD Croce and Hein's 2,
#: Nystrom's first local step 0.7
REL_STEP = {"pgd": 0.7, "apgd": 2.0, "nystrom": 0.7}


def resolve_rel_step(attack: str, rel_step: Optional[float]) -> float:
    """``rel_step``, or the attack's own when it is None (:data:`REL_STEP`)."""
    return REL_STEP[attack] if rel_step is None else rel_step


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that determines a ``score`` run. Eps is in pixel units (a number or ``"8/255"``)."""

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_TASKS[0]
    eps: "float | str" = "8/255"
    norm: str = "inf"
    steps: int = 20
    rel_step: Optional[float] = None  # None: 0.7 for pgd and nystrom, 2 for apgd (REL_STEP)
    restarts: int = 1
    random_start: bool = True
    batch_size: int = 128
    n: Optional[int] = 1000
    split: str = "test"
    seed: int = 0
    delta: float = 0.05
    loss_cap: float = 10.0
    device: str = "auto"
    backend: str = "asbound"
    model_dir: Optional[str] = None
    data_root: Optional[str] = None
    weights: Optional[str] = None
    head: Optional[str] = None
    feature_layer: Optional[str] = None
    resize: Optional[int] = None
    allow_pickle: bool = False
    download: bool = False
    classes: Optional[str] = None
    as_only: bool = False  # the AS score alone: no labels, no loss attack (e.g. before any transfer)
    corruption: Optional[str] = None  # distribution shift: a corruption of every image (asbound.data.corruptions)
    severity: Optional[int] = None
    corruption_params: str = "auto"  # auto | cifar (CIFAR-10-C) | imagenet (ImageNet-C, imagecorruptions)
    certify: Optional[str] = None  # ibp | crown-ibp | crown: an upper bound on every s_i (asbound.certify)
    attack: str = "pgd"  # pgd (foolbox semantics, the seed protocol) | apgd (Auto-PGD) | nystrom (asbound.attacks.Nystrom)
    amp: str = "auto"  # gradient passes in low precision: auto | off | bf16 | fp16 (values stay float32)
    compile: bool = False  # torch.compile the gradient passes
    protocol: str = DEFAULT_PROTOCOL  # asbound | paper | dsprites-exp: whose choices (asbound.protocol)

    def validated(self) -> "ScoreConfig":
        """Check every option's range; return the config with eps as a float and norm normalised."""
        norm = parse_norm(self.norm)
        eps = parse_eps(self.eps, norm)
        for name in ("steps", "restarts", "batch_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must lie in [0, 2**63), got {self.seed}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps} (with no step only the random start "
                              f"would be scored: no attack)")
        if self.restarts < 1:
            raise ConfigError(f"restarts must be >= 1, got {self.restarts}")
        if self.restarts > 1 and not self.random_start:
            raise ConfigError(
                f"{self.restarts} restarts without a random start would repeat one deterministic attack; "
                f"use one restart, or drop --no-random-start"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int)):
            raise ConfigError(f"n must be a whole number >= 1 (or 'all'), got {self.n!r}")
        if self.resize is not None and (isinstance(self.resize, bool) or not isinstance(self.resize, int)
                                        or self.resize < 1):
            raise ConfigError(f"resize must be a whole number >= 1, got {self.resize!r}")
        if self.n is not None and self.n < 1:
            raise ConfigError(f"n must be >= 1 (or 'all'), got {self.n}")
        if self.attack not in ATTACKS:
            raise ConfigError(f"attack {self.attack!r} is not valid; valid: {', '.join(ATTACKS)}")
        rel_step = resolve_rel_step(self.attack, self.rel_step)
        if isinstance(rel_step, bool) or not isinstance(rel_step, (int, float)) or not (
                math.isfinite(rel_step) and rel_step > 0):
            raise ConfigError(f"rel-step must be > 0, got {rel_step}")
        if self.amp not in ("auto", "off", *AMP_DTYPES):
            raise ConfigError(f"amp {self.amp!r} is not valid; valid: auto, off, {', '.join(AMP_DTYPES)}")
        if self.compile and self.amp in AMP_DTYPES:
            raise ConfigError(f"--compile with --amp {self.amp} is not supported: the compiled low-precision gradient "
                              f"passes weakened the attack (mean AS -0.4% to -0.5% against float32 over three seeds "
                              f"on a WideResNet-16-4, eager bf16 within 0.03%); give one of them")
        if self.backend == "foolbox" and (self.attack != "pgd" or self.amp not in ("auto", "off") or self.compile):
            raise ConfigError("--backend foolbox runs foolbox's PGD in float32: it takes --attack pgd, and "
                              "neither --amp bf16/fp16 nor --compile")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"delta must lie in (0, 1), got {self.delta}")
        if not (math.isfinite(self.loss_cap) and self.loss_cap > 0):
            raise ConfigError(f"loss cap must be a positive number, got {self.loss_cap}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device {self.device!r} is not valid; valid: auto, cpu, cuda")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not valid; valid: {', '.join(BACKENDS)}")
        parse_model_spec(self.model)
        parse_data_spec(self.data)
        corruption_of(self.corruption, self.severity, self.corruption_params)
        get_protocol(self.protocol)
        if self.certify is not None and self.certify not in CERTIFY_METHODS:
            raise ConfigError(f"certify {self.certify!r} is not valid; valid: {', '.join(CERTIFY_METHODS)}")
        return dataclasses.replace(self, eps=eps, norm=norm, rel_step=float(rel_step))

    @property
    def pgd(self) -> PGD:
        """The attack this config runs (:class:`~asbound.attacks.PGD`, :class:`~asbound.attacks.APGD` or
        :class:`~asbound.attacks.Nystrom`), on the unit box: ``eps`` over the width of the protocol's box."""
        width = get_protocol(self.protocol).width
        return ATTACKS[self.attack](
            eps=float(parse_eps(self.eps, parse_norm(self.norm))) / width, norm=parse_norm(self.norm), steps=self.steps,
            rel_step=resolve_rel_step(self.attack, self.rel_step), random_start=self.random_start, restarts=self.restarts,
        )


@dataclass
class ScoreResult:
    """A finished run: its resolved config, the per-datapoint records and the summary."""

    config: dict
    summary: dict
    points: pd.DataFrame
    out: Optional[Path] = None
    notes: "list[str]" = field(default_factory=list)


def _count(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


def head_mismatch(split: SplitModel, data: DataSet) -> Optional[str]:
    """Why the head does not fit the task (then only the AS score is computed), or None."""
    k = split.num_outputs
    if data.task == "classification":
        if k != data.num_classes:
            return (
                f"the head has {_count(k, 'output')} but {data.spec} has {data.num_classes} classes; only the "
                f"AS score is computed (give a head for this task with --head PATH)"
            )
        if k < 2:
            return "a classification head needs at least 2 outputs; only the AS score is computed"
        return None
    if k != data.target_dim:
        return (
            f"the head has {_count(k, 'output')} but {data.spec} has {data.target_dim}-dimensional targets; "
            f"only the AS score is computed (give a head for this task with --head PATH)"
        )
    return None


def _format_values(values: Tensor) -> "np.ndarray | list[str]":
    values = values.detach().cpu()
    if values.dim() == 1 or values.shape[1] == 1:
        return values.reshape(-1).numpy()
    return [";".join(f"{v:.6g}" for v in row) for row in values.tolist()]


class _Scorer:
    """Scores one batch: the AS attack, the loss attack, and the per-datapoint quantities.

    Each attack runs under a :class:`~asbound.attacks.Watch` that sees every point it evaluates
    (each step, each restart, the clean input): ``s_rep`` / ``s_loss`` are the largest
    representation shifts seen by each attack, ``loss_adv`` the largest loss seen by the loss
    attack (so ``loss_adv >= loss_clean``), and a point is ``robust`` only if no evaluated
    point of either attack is misclassified.
    """

    def __init__(self, split: SplitModel, loss: Optional[Loss], attack: PGD, backend: str, scale: float,
                 bounder: "Optional[Bounder]" = None, amp: Optional[torch.dtype] = None,
                 compile: bool = False, certify: Optional[str] = None) -> None:
        self.bounder, self.certify = bounder, certify
        self.split, self.loss, self.attack, self.backend, self.scale = split, loss, attack, backend, scale
        # the gradient passes: low precision and/or compiled; kept points are re-evaluated exactly
        self.fast = amp is not None or compile
        self.amp = amp
        self.fast_features = torch.compile(split.features) if compile else split.features

    def _fast(self, objective: Callable[[Tensor], Tensor], x: Tensor) -> "Optional[FastObjective]":
        return FastObjective(objective, self.amp, x.device.type) if self.fast else None

    def _run(self, objective: Callable[[Tensor], Tensor], x: Tensor, gen: torch.Generator, clean: Tensor,
             fast: "Optional[FastObjective]" = None) -> Tensor:
        """Run the attack; return the points it kept."""
        if self.backend == "foolbox":
            return foolbox_pgd(self.attack, objective, x, generator=gen).x_adv
        return self.attack(objective, x, generator=gen, clean_value=clean, fast=fast).x_adv

    def _kept_rounding(self, bound: "dict[str, Tensor]", x: Tensor, kept: Tensor, g0: Tensor) -> Tensor:
        """The certificate checked in float64 at an attack's kept points; the float32 rounding there."""
        with torch.no_grad():
            g_kept = self.split.features(kept)
        return check_attack_points(self.bounder, bound, x, kept, g_kept, g0, self.attack.eps, self.attack.norm)

    def __call__(self, x: Tensor, y: Tensor, task: str, seed: int) -> "dict[str, object]":
        split = self.split
        gen = torch.Generator().manual_seed(seed)
        head = split.exact_head()  # predictions, losses and margins all in float64
        certify = self.bounder is not None
        # certify: the network must be one function of its input (its graph is checked against it below)
        with torch.no_grad(), no_random_draws("the representation's forward") if certify else contextlib.nullcontext():
            g0 = split.features(x)
            out_clean = head(g0)
        labels = y if task == "classification" and self.loss is not None else None
        rep = Watch(head, g0, labels=labels)
        rep.observe(g0)
        # the fast objective subtracts the float32 g(x0): a g(x0) rounded to bf16 would add one constant
        # error to every step's direction, and that biased the attack (mean AS -0.33% against +0.005%
        # with the float32 g(x0), three seeds, WideResNet-16-4, bf16 on the CPU: benchmarks/amp_strength.py)
        fast = self._fast(representation_shift(self.fast_features, x, g0), x)
        kept = self._run(representation_shift(split.features, x, g0, watch=rep), x, gen,
                         torch.zeros(len(x), device=x.device), fast)
        rows: "dict[str, object]" = {"s_rep": rep.shift.cpu().numpy()}
        if certify:  # every batch checks itself (asbound.certify): CheckFailed names the row, nothing is recorded
            eps, norm = self.attack.eps, self.attack.norm
            # checks that the graph it bounds is the network (in float64)
            bound = sensitivity_upper(self.bounder, x.contiguous(), eps, norm, method=self.certify)
            measured = [float32_deviation(bound, g0), self._kept_rounding(bound, x, kept, g0)]
            rows.update(s_upper=bound["s_upper"].cpu().numpy(),
                        vacuous=(bound["s_upper"] >= bound["s_domain"]).cpu().numpy())
        if self.loss is None:
            if certify:
                check_records(bound, record_slack(bound, measured), rep.shift)
            rows["sensitivity"] = rows["s_rep"]
            rows["sensitivity_source"] = np.full(len(x), "rep")
            return _raise_to_recorded(rows)
        targets = y if task == "classification" else y.to(x.dtype)
        adv = Watch(head, g0, labels=labels, loss=self.loss, targets=targets)
        adv.observe(g0)
        loss_clean = adv.loss.clone()
        fast_model = (lambda z: split.head(self.fast_features(z))) if self.fast else split
        kept = self._run(loss_objective(split, self.loss, targets, watch=adv), x, gen, loss_clean.to(x.dtype),
                         self._fast(loss_objective(fast_model, self.loss, targets), x))
        if certify:
            measured.append(self._kept_rounding(bound, x, kept, g0))
            slack = record_slack(bound, measured)
        best = torch.maximum(rep.shift, adv.shift)
        delta = adv.loss - loss_clean
        ratio = delta / self.scale if self.scale > 0 else torch.where(delta > 0, math.inf, 0.0).to(delta)
        rows.update(
            s_loss=adv.shift.cpu().numpy(),
            sensitivity=best.cpu().numpy(),
            sensitivity_source=np.where((adv.shift > rep.shift).cpu().numpy(), "loss", "rep"),
            loss_clean=loss_clean.cpu().numpy(),
            loss_adv=adv.loss.cpu().numpy(),
            lemma1_ratio=ratio.cpu().numpy(),
        )
        if task == "classification":
            pred = out_clean.argmax(1)
            m = margins(g0, y, split.W, split.b)
            rows.update(
                pred=pred.cpu().numpy(),
                # the first misclassified point in evaluation order: clean, AS attack, loss attack
                pred_adv=torch.where(rep.fooled, rep.witness, adv.witness).cpu().numpy(),
                correct=(pred == y).cpu().numpy(),
                robust=(~(rep.fooled | adv.fooled)).cpu().numpy(),
                margin=m.cpu().numpy(),
                fulfilled=(best < m).cpu().numpy(),
                fulfilled_rep=(rep.shift < m).cpu().numpy(),
            )
            if certify:  # s_upper bounds every point of the ball: the criterion certified, below the margin
                # of the float64 g(x) the bound is centred on (the certificate is about the exact function,
                # as is the float64 head's prediction) and, with the float32 slack, below the recorded margin
                # of the network's g(x): no float32 point of the ball is classified otherwise either
                sure = certified(bound, slack, [margins(bound["g"], y, split.W, split.b), m])
                check_records(bound, slack, best, sure, ~(rep.fooled | adv.fooled))
                rows["certified"] = sure.cpu().numpy()
        else:
            if certify:
                check_records(bound, slack, best)
            rows["pred"] = _format_values(out_clean)
        return _raise_to_recorded(rows)


def _raise_to_recorded(rows: "dict[str, object]") -> "dict[str, object]":
    """``s_upper`` as recorded: the float64 bound, raised to the recorded float32 sensitivity where
    float32 rounding put that above it (by at most the slack ``check_records`` allows), so that
    ``sensitivity <= s_upper`` holds on every row; still an upper bound on ``s_i``."""
    if "s_upper" in rows:
        rows["s_upper"] = np.maximum(np.asarray(rows["s_upper"], dtype=np.float64),
                                     np.asarray(rows["sensitivity"], dtype=np.float64))
    return rows


def _batch_seed(seed: int, position: int) -> int:
    # one generator per batch, keyed by its first position: a resumed run draws the same starts
    return (seed * 1_000_003 + position) % (2**63)


def classes_for(loaded: LoadedModel, data_spec: DataSpec, classes: Optional[str], as_only: bool = False) -> Optional[str]:
    """``--classes`` for a run on ``data_spec``: a ``run:DIR`` trained on that data with
    ``--classes`` has a head whose labels mean those classes, so they are the default, and another
    selection is refused (it would relabel silently). An AS-only score uses no labels: any goes."""
    trained = loaded.trained_on or {}
    recorded = trained.get("classes")
    if recorded is None or as_only:
        return classes
    try:
        same_data = parse_data_spec(str(trained.get("data"))).canonical() == data_spec.canonical()
    except SpecError:
        same_data = False
    if not same_data:
        return classes
    if classes is None:
        return recorded
    if parse_classes(classes) != parse_classes(recorded):
        raise ConfigError(f"{loaded.spec} was trained on {data_spec} --classes {recorded} (its head's labels "
                          f"are those classes, in that order); --classes {classes} would relabel them: "
                          f"leave --classes out, give {recorded}, or score the AS alone with --as-only")
    return classes


def recorded_model(spec: str, out: "str | os.PathLike | None") -> str:
    """``spec`` as ``config.json`` records it: a ``run:DIR`` holding the run directory ``out``
    (a transfer run's score of itself) relative to ``out``, so that the run can be moved."""
    if out is None or not spec.startswith("run:"):
        return spec
    target, here = Path(spec[len("run:"):]).resolve(), Path(out).resolve()
    return f"run:{os.path.relpath(target, here)}" if target == here or target in here.parents else spec


def score(
    config: Optional[ScoreConfig] = None,
    *,
    out: "str | os.PathLike | None" = None,
    progress: bool = True,
    **overrides: object,
) -> ScoreResult:
    """Attack the representation and the loss; return per-datapoint records and the bounds.

    ``out`` names a run directory (written batch by batch, resumed on rerun); None keeps
    everything in memory. Keyword overrides replace fields of ``config``.
    """
    cfg = dataclasses.replace(config or ScoreConfig(), **overrides).validated()
    device = resolve_device(cfg.device)
    model_spec, data_spec = parse_model_spec(cfg.model), parse_data_spec(cfg.data)
    loaded = load_model(
        model_spec, model_dir=cfg.model_dir, weights=cfg.weights, allow_pickle=cfg.allow_pickle,
        download=cfg.download, builtin_head=data_spec.factor,
    )
    cfg = dataclasses.replace(cfg, classes=classes_for(loaded, data_spec, cfg.classes, cfg.as_only))
    protocol = get_protocol(cfg.protocol)
    if protocol.is_default:
        data = load_data(
            data_spec, root=cfg.data_root, split=cfg.split, n=cfg.n, seed=cfg.seed,
            download=cfg.download, input_format=loaded.input_format, resize=cfg.resize, classes=cfg.classes,
            corruption=corruption_of(cfg.corruption, cfg.severity, cfg.corruption_params),
        )
    else:
        if cfg.resize is not None or cfg.classes is not None or cfg.corruption is not None:
            raise ConfigError(f"--protocol {protocol.name} takes neither --resize, --classes nor --corruption")
        data = load_protocol_data(protocol, data_spec, root=cfg.data_root, split=cfg.split, n=cfg.n,
                                  seed=cfg.seed, input_format=loaded.input_format)
    data, loaded.module = wrap_data(protocol, data), wrap_model(protocol, loaded.module)
    probe = data.batch(torch.arange(min(len(data), 8)))
    try:
        split = split_model(loaded.module, probe, feature_layer=cfg.feature_layer)
    except RuntimeError as exc:  # the model cannot run on these inputs (shape / channel mismatch)
        expects = f" (it expects {loaded.input_format})" if loaded.input_format else ""
        raise ModelError(
            f"{loaded.spec} cannot run on {data.spec} inputs of shape "
            f"{'x'.join(map(str, probe.shape[1:]))}{expects}: {describe(exc)}; give data in the "
            f"model's input format, or --resize SIDE"
        ) from None
    if cfg.head is not None:
        split = split.with_head(load_head(cfg.head, split.feature_dim))
    split = split.to(device)
    # with --compile, auto is float32 (compiled low-precision gradients weakened the attack; validated() refuses
    # --compile with an explicit bf16 / fp16)
    amp = None if cfg.backend == "foolbox" or cfg.compile else attack_amp_dtype(cfg.amp, device)
    fmt = torch.channels_last if (amp is not None or cfg.compile) and probe.dim() == 4 else torch.contiguous_format
    if fmt == torch.channels_last:  # where convolutions run fastest with low precision / compiled kernels
        split = split.to(memory_format=fmt)
    mismatch = "the AS score only (--as-only): no labels are used" if cfg.as_only else head_mismatch(split, data)
    loss = None if mismatch else loss_for_task(data.task)
    norms = head_norms(split.W)
    scale = headline_term(loss, lemma1_terms(loss, norms, split.num_outputs, 0.0)).scale if loss else 1.0
    notes = list(loaded.notes) + [split.split_note] + ([mismatch] if mismatch else [])
    if amp == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        notes.append("--amp bf16: this CPU has no native bf16 (avx512_bf16 / amx_bf16), torch emulates it and "
                     "the attack runs many times slower than in float32 (--amp off)")

    resolved = {
        **{k: v for k, v in dataclasses.asdict(cfg).items()},
        "eps_text": format_eps(float(cfg.eps)),
        "model": recorded_model(str(loaded.spec), out),
        "data": str(data.spec),
        "task": data.task,
        "n": len(data),
        "data_source": data.source,
        "transforms": data.transforms,
        "input_format": str(loaded.input_format) if loaded.input_format else None,
        "split_note": split.split_note,
        "head_outputs": split.num_outputs,
        "feature_dim": split.feature_dim,
        "task_note": mismatch,
        "device": str(device),
        "grad_dtype": str(amp or torch.float32).replace("torch.", ""),
        "protocol_settings": protocol.settings(),
        **environment(),
    }
    run = RunDir(out) if out is not None else None
    bounder = Bounder(split.backbone) if cfg.certify else None  # refuses before the run directory exists
    certify_used = cfg.certify
    if bounder is not None:  # so does an unsupported operation
        bounder.check_supported(to_format(probe.to(device), fmt))
    if cfg.certify == "crown":  # full CROWN, or crown-ibp where it is over its budget: said, never silent
        certify_used, certify_note = method_for(bounder, cfg.certify, to_format(probe[:1].to(device), fmt),
                                                 cfg.norm)
        resolved.update(certify_used=certify_used, certify_note=certify_note)
        notes += [certify_note] if certify_note else []
    with run.locked() if run else contextlib.nullcontext():
        done = run.start(resolved, defaults=OPTION_DEFAULTS) if run else set()
        scorer = _Scorer(split, loss, cfg.pgd, cfg.backend, scale, bounder, amp, cfg.compile, certify_used)
        frames: "list[pd.DataFrame]" = []
        batches = [range(i, min(i + cfg.batch_size, len(data))) for i in range(0, len(data), cfg.batch_size)]
        todo = [b for b in batches if not set(b) <= done]
        # IEEE float32 on CUDA: cuDNN convolutions default to TF32 (10-bit mantissa), which would put
        # rounding of about 1e-3 |g| into every recorded float32 value (g(x), the shifts, margins, losses)
        # and into a certificate's float32 slack; bf16 / fp16 gradient passes (--amp) are not affected
        bar = _progress(progress, len(data), len(data) - sum(len(b) for b in todo), cfg)
        with frozen(split), float32_exact(), bar as advance:
            for positions in todo:
                sel = torch.tensor(list(positions))
                x = to_format(data.batch(sel).to(device), fmt)
                y = data.y[sel].to(device)
                try:
                    rows = scorer(x, y, data.task, _batch_seed(cfg.seed, positions[0]))
                except CheckFailed as failed:  # never recorded: the batch stops the run
                    raise ModelError(f"certify: point {int(data.index[sel][failed.row])} (position "
                                     f"{positions[failed.row]}): {failed.what}; stopped before recording "
                                     f"its batch") from None
                frame = pd.DataFrame(
                    {"position": list(positions), "index": data.index[sel].numpy(), "label": _format_values(data.y[sel]), **rows}
                )
                frame = frame[~frame["position"].isin(done)]
                if run:
                    run.append(frame)
                else:
                    frames.append(frame)
                advance(len(positions))
        points = run.points() if run else pd.concat(frames, ignore_index=True)
        try:
            summary = summarize(points, loss=loss, norms=norms if loss else None, num_outputs=split.num_outputs,
                                cfg=cfg)
        except KeyError as exc:  # a resumed points.csv without a column this run writes
            if run is None or not exc.args or exc.args[0] in points.columns:
                raise
            raise run.damaged_points(f"no {exc.args[0]} column") from None
        summary.update(model=str(loaded.spec), data=str(data.spec), task=data.task, task_note=mismatch)
        if cfg.certify:
            summary["certify_used"] = certify_used
        summary = clean_json(summary)
        if run:
            run.write_summary(summary)
    return ScoreResult(clean_json(resolved), summary, points, Path(out) if out else None, notes)


def summarize(points: pd.DataFrame, *, loss: Optional[Loss], norms: Optional[dict], num_outputs: int, cfg: ScoreConfig) -> dict:
    """The data-set summary, derived from the per-datapoint records only."""
    cols = {c: points[c].to_numpy() for c in points.columns}
    summary = summarize_points(cols, loss=loss, norms=norms, num_outputs=num_outputs, cap=cfg.loss_cap, delta=cfg.delta)
    summary.update(
        eps=float(cfg.eps), eps_text=format_eps(float(cfg.eps)), norm=cfg.norm, attack=cfg.attack, steps=cfg.steps,
        rel_step=cfg.rel_step, restarts=cfg.restarts, seed=cfg.seed,
        sensitivity_from_loss_attack=int((points["sensitivity_source"] == "loss").sum()),
    )
    if "s_upper" in points:
        upper, est = points["s_upper"].to_numpy(float), points["sensitivity"].to_numpy(float)
        summary.update(
            certify=cfg.certify, rhs_certified=float(upper.mean()),
            tightness=float(upper.mean() / est.mean()) if est.mean() > 0 else None,
            prop_vacuous=float(points["vacuous"].astype(bool).mean()),
            prop_certified=float(points["certified"].astype(bool).mean()) if "certified" in points else None,
        )
        if summary.get("lhs") is not None:
            summary["lemma1_certified"] = bool(summary["lhs"] <= summary["rhs_certified"])
    return summary


class _progress:
    """A rich progress bar over datapoints (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, completed: int, cfg: ScoreConfig) -> None:
        self.enabled, self.total, self.completed = enabled, total, completed
        self.label = f"{cfg.model} on {cfg.data}"

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda k: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.table import Column

        # on stderr: stdout carries the results (the table, or the summary JSON with --json); a long
        # description wraps, so that the count and the time stay in view at 80 columns
        self._bar = Progress(
            TextColumn("{task.description}", table_column=Column(overflow="fold")), BarColumn(bar_width=12),
            MofNCompleteColumn(), TimeRemainingColumn(), transient=False, console=Console(stderr=True),
        )
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total, completed=self.completed)
        return lambda k: self._bar.advance(task, k)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)


def score_default(
    out: "str | os.PathLike | None" = "runs/default", *, progress: bool = True, **overrides: object
) -> "list[ScoreResult]":
    """The embedded default: shipped adversarially trained LeNets on procedural dSprites, offline.

    Two rows (:data:`DEFAULT_RUNS`): Lemma 1 on orientation regression and Theorem 2 on shape
    classification.
    """
    overrides.setdefault("n", DEFAULT_N)
    results = []
    for model, task in DEFAULT_RUNS:
        sub = Path(out) / task.split(":")[1] if out is not None else None
        results.append(score(ScoreConfig(model=model, data=task), out=sub, progress=progress, **overrides))
    return results
