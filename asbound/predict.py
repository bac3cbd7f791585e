"""Prediction before transfer (seed 001 section 6.1, Table 4; SPEC.md section 5).

The AS score needs no labels, so it can be computed on the unlabelled data of a downstream task
before any training. :func:`predict` scores the representation on the pretraining data and on
each downstream task, and reports the ratio ``AS(downstream) / AS(pretraining)`` with a verdict:
a ratio at most ``threshold`` predicts that robustness transfers by linear probing (where the
pretraining AS is 0, no attack moved the representation there: the ratio is undefined, recorded
as ``null`` with the verdict ``undefined``). With a head
norm ``B`` (``head_norm``, or the head of a reference LP run), Lemma 1 multiplied out bounds the
mean increase of the adversarial loss: ``L * B * AS`` (an estimate: PGD gives AS from below).

Its predictive power is measured, not claimed: with ``measure=("lp",)`` every task is also
linear-probed and the measured relative CE increase ``(robust CE - CE) / CE`` is recorded next
to the prediction, with the Spearman rank correlation across tasks. ``measure=("lp", "adv-lp")``
adds seed 000's predictor (its Figure 5): standard-LP accuracy against adversarial-LP robust
accuracy across tasks.

Task grammar (``--data``): data specs separated by commas, each with optional ``@key=value``
modifiers: ``digits@classes=5-9``, ``digits@corruption=gaussian_noise:2``, ``digits@resize=16``,
``dsprites:shape``. A comma followed by a digit belongs to a class list (``digits@classes=0,2,4``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from asbound.errors import ConfigError, ResumeError
from asbound.records import RunDir, clean_json, environment, read_json, write_json
from asbound.scoring import REL_STEP, resolve_rel_step
from asbound.specs import format_eps, parse_data_spec, parse_eps, parse_model_spec, parse_norm

MANIFEST = "predict.json"
#: a task's verdict where the ratio is undefined (the pretraining AS is 0)
UNDEFINED = "undefined"
#: settings added after predictions were first written, as they ran before
OLD_DEFAULTS = {"attack": "pgd"}
#: up to this many tasks the Spearman p-value is an exact permutation test (n! orderings)
EXACT_N = 8
#: beyond, the t approximation (scipy's) and a permutation test on this many random orderings
PERMUTATIONS = 100_000
#: how a Spearman p-value was computed, for records written before ``p_method`` was recorded
#: (scipy's t approximation for every number of tasks, the only method then)
OLD_P_METHOD = "t approximation"
MEASURES = ("lp", "adv-lp")
_MODIFIERS = ("classes", "corruption", "resize")
#: Lemma 1 for softmax cross-entropy: 2-Lipschitz in the max norm, so ||W|| is max_k ||w_k||_2
LIPSCHITZ, Q, NORM_NAME = 2.0, "inf", "row_max"


@dataclass(frozen=True)
class Task:
    """A downstream data set: a data spec with its class subset, corruption and resize."""

    data: str
    classes: Optional[str] = None
    corruption: Optional[str] = None
    severity: Optional[int] = None
    resize: Optional[int] = None

    @property
    def label(self) -> str:
        text = self.data
        if self.classes:
            text += f" [{self.classes}]"
        if self.corruption:
            text += f" +{self.corruption}-{self.severity}"
        if self.resize:
            text += f" @{self.resize}px"
        return text

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label).strip("-")

    def options(self) -> "dict[str, Any]":
        return {"data": self.data, "classes": self.classes, "corruption": self.corruption,
                "severity": self.severity, "resize": self.resize}


def parse_task(text: str) -> Task:
    """``digits@classes=5-9@corruption=zoom_blur:2@resize=16`` -> a :class:`Task`."""
    head, *mods = [t.strip() for t in text.strip().split("@")]
    parse_data_spec(head)
    values: "dict[str, Any]" = {}
    for mod in mods:
        key, sep, value = mod.partition("=")
        key = key.strip().lower()
        if not sep or key not in _MODIFIERS or not value.strip():
            raise ConfigError(f"task {text!r}: modifier {mod!r} is not valid; valid: "
                              f"@classes=LIST, @corruption=NAME:SEVERITY, @resize=SIDE")
        values[key] = value.strip()
    severity = None
    if "corruption" in values:
        name, sep, sev = values["corruption"].partition(":")
        if not sep or not sev.strip().isdigit():
            raise ConfigError(f"task {text!r}: write the corruption as NAME:SEVERITY, e.g. gaussian_noise:2")
        values["corruption"], severity = name.strip(), int(sev)
        from asbound.data.corruptions import parse_corruption

        parse_corruption(values["corruption"], severity)
    resize = None
    if "resize" in values:
        if not values["resize"].isdigit() or int(values["resize"]) < 1:
            raise ConfigError(f"task {text!r}: @resize must be a whole number >= 1, got {values['resize']!r}")
        resize = int(values["resize"])
    return Task(head, values.get("classes"), values.get("corruption"), severity, resize)


def parse_tasks(text: "str | Sequence[str]") -> "list[Task]":
    """Comma-separated tasks; a comma followed by a digit stays inside a class list."""
    items = text if not isinstance(text, str) else re.split(r",(?=\s*[A-Za-z])", text)
    tasks = [parse_task(t) for t in items if t.strip()]
    if not tasks:
        raise ConfigError("give at least one downstream task with --data")
    labels = [t.label for t in tasks]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ConfigError(f"task {twice[0]} is given twice; give each downstream task once")
    slugs: "dict[str, str]" = {}
    for t in tasks:  # each task's runs live in a directory named by its slug: never two tasks in one
        if t.slug in slugs:
            raise ConfigError(f"tasks {slugs[t.slug]!r} and {t.label!r} would share the run directory {t.slug}; "
                              f"write one of them differently (e.g. classes as a range or a list)")
        slugs[t.slug] = t.label
    return tasks


@dataclass(frozen=True)
class PredictConfig:
    """Everything that determines a ``predict`` run."""

    model: str
    pretrain_data: str
    data: "str | tuple[str, ...]"
    pretrain_classes: Optional[str] = None
    eps: "float | str" = "8/255"
    norm: str = "inf"
    steps: int = 20
    rel_step: Optional[float] = None  # None: the attack's own (0.7 for pgd, 2 for apgd)
    restarts: int = 1
    attack: str = "pgd"
    n: Optional[int] = 500
    seed: int = 0
    batch_size: int = 128
    threshold: float = 2.0
    head_norm: "float | str | None" = None  # a number, or run:DIR of a reference LP run
    measure: "tuple[str, ...]" = ()
    epochs: int = 20
    n_train: Optional[int] = None
    n_test: "int | str | None" = "as-n"  # test images of the LP evaluation: "as-n" (the scored n), a number, None (all)
    device: str = "auto"
    model_dir: Optional[str] = None
    data_root: Optional[str] = None
    weights: Optional[str] = None
    feature_layer: Optional[str] = None
    allow_pickle: bool = False
    download: bool = False

    def validated(self) -> "PredictConfig":
        parse_model_spec(self.model)
        parse_data_spec(self.pretrain_data)
        norm = parse_norm(self.norm)
        parse_eps(self.eps, norm)
        parse_tasks(self.data)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps!r} (with no step only the random start "
                              f"would be scored: no attack)")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0):
            raise ConfigError(f"threshold must be a number > 0, got {self.threshold!r}")
        measure = tuple(self.measure.split(",")) if isinstance(self.measure, str) else tuple(self.measure)
        measure = tuple(m.strip() for m in measure if m.strip())
        bad = [m for m in measure if m not in MEASURES]
        if bad:
            raise ConfigError(f"--measure {','.join(bad)} is not valid; valid: {', '.join(MEASURES)} (comma-separated)")
        if "adv-lp" in measure and "lp" not in measure:
            raise ConfigError("--measure adv-lp compares with standard LP; give --measure lp,adv-lp")
        if not (self.n_test is None or self.n_test == "as-n" or (isinstance(self.n_test, int) and self.n_test >= 1)):
            raise ConfigError(f"n-test must be a whole number >= 1, 'all' or 'as-n', got {self.n_test!r}")
        head_norm = self.head_norm
        if isinstance(head_norm, str) and not head_norm.startswith("run:"):
            try:
                head_norm = float(head_norm)
            except ValueError:
                raise ConfigError(f"--head-norm must be a number > 0 or run:DIR (an LP run), got {head_norm!r}") from None
        if isinstance(head_norm, float) and not (math.isfinite(head_norm) and head_norm > 0):
            raise ConfigError(f"--head-norm must be a number > 0 or run:DIR (an LP run), got {head_norm!r}")
        return dataclasses.replace(self, norm=norm, measure=measure, head_norm=head_norm)

    @property
    def tasks(self) -> "list[Task]":
        return parse_tasks(self.data)


def _reference_head_norm(spec: str) -> "tuple[float, str]":
    """The head norm ``max_k ||w_k||_2`` recorded by an LP run (its score after transfer)."""
    path = Path(spec[len("run:"):])
    final = read_json(path / "final.json")
    if not isinstance(final, dict):
        raise ConfigError(f"--head-norm {spec}: {path} holds no finished transfer run (final.json); "
                          f"give a number or run:DIR of an LP run")
    after = final.get("score_after") or {}
    norms = after.get("head_norms") or {}
    if NORM_NAME not in norms:
        raise ConfigError(f"--head-norm {spec}: the run has no score after transfer with head norms; "
                          f"rerun it without --no-score, or give a number")
    return float(norms[NORM_NAME]), spec


def _score_config(cfg: PredictConfig, data: str, *, as_only: bool, **extra: Any) -> dict:
    return dict(model=cfg.model, data=data, eps=cfg.eps, norm=cfg.norm, steps=cfg.steps, rel_step=cfg.rel_step,
                restarts=cfg.restarts, attack=cfg.attack, n=cfg.n, seed=cfg.seed, batch_size=cfg.batch_size, device=cfg.device, model_dir=cfg.model_dir,
                data_root=cfg.data_root, weights=cfg.weights, feature_layer=cfg.feature_layer,
                allow_pickle=cfg.allow_pickle, download=cfg.download, as_only=as_only, **extra)


def _task_extra(task: Task) -> dict:
    return {k: v for k, v in task.options().items() if k != "data" and v is not None}


def _transfer_config(cfg: PredictConfig, task: Task, method: str) -> dict:
    if cfg.norm != "inf":
        raise ConfigError("--measure trains with L-inf attacks; give --norm inf")
    return dict(model=cfg.model, data=task.data, method=method, epochs=cfg.epochs, n=cfg.n_train, n_test=cfg.n if cfg.n_test == "as-n" else cfg.n_test,
                score_n=cfg.n, score_steps=cfg.steps, eps=cfg.eps, seed=cfg.seed, batch_size=cfg.batch_size,
                device=cfg.device, model_dir=cfg.model_dir, data_root=cfg.data_root, weights=cfg.weights,
                feature_layer=cfg.feature_layer, allow_pickle=cfg.allow_pickle, download=cfg.download,
                **_task_extra(task))


def spearman(x: Sequence[float], y: Sequence[float]) -> "Optional[dict[str, float]]":
    """Spearman's rank correlation of paired values (None with fewer than 3 pairs or a constant side).

    ``p`` is two-sided: up to :data:`EXACT_N` pairs an exact permutation test (all n! orderings;
    the t approximation gives p = 0 at |rho| = 1); beyond, scipy's t approximation, with
    ``p_permutation`` beside it: the share of :data:`PERMUTATIONS` random orderings (seeded) whose
    |rho| reaches the observed one, counting the observed ordering, ``(k + 1) / (B + 1)``.
    ``p_method`` names the method of ``p``.
    """
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    import numpy as np
    from scipy.stats import rankdata, spearmanr

    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    res = spearmanr(a, b)
    rho = float(res.statistic)
    ra, rb = rankdata(a), rankdata(b)
    if len(pairs) <= EXACT_N:
        import itertools

        rhos = [np.corrcoef(ra, np.asarray(perm))[0, 1] for perm in itertools.permutations(rb)]
        p = float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))
        return {"rho": rho, "p": p, "n": len(pairs), "p_method": "exact permutation"}
    return {"rho": rho, "p": float(res.pvalue), "n": len(pairs), "p_method": "t approximation",
            "p_permutation": _permutation_p(ra, rb, abs(rho), PERMUTATIONS), "permutations": PERMUTATIONS}


def _permutation_p(ra: "np.ndarray", rb: "np.ndarray", observed: float, count: int, seed: int = 0) -> float:
    """Two-sided Monte Carlo permutation p of a rank correlation: ``(k + 1) / (count + 1)``, k the
    random orderings of ``rb`` whose |Pearson r| with ``ra`` reaches ``observed``."""
    import numpy as np

    gen = np.random.default_rng(seed)
    xa = (ra - ra.mean()) / np.linalg.norm(ra - ra.mean())
    xb = (rb - rb.mean()) / np.linalg.norm(rb - rb.mean())
    hits, done = 0, 0
    while done < count:
        size = min(20_000, count - done)
        perms = gen.permuted(np.tile(xb, (size, 1)), axis=1)
        hits += int(np.sum(np.abs(perms @ xa) >= observed - 1e-12))
        done += size
    return (hits + 1) / (count + 1)


def p_text(s: dict) -> str:
    """``p 0.00031, t approximation; 0.00048 by 100,000 random permutations``: a recorded Spearman
    p-value with how it was computed (records without ``p_method``: :data:`OLD_P_METHOD`)."""
    text = f"p {s['p']:.2g}, {s.get('p_method') or OLD_P_METHOD}"
    if s.get("p_permutation") is not None:
        text += f"; {s['p_permutation']:.2g} by {s.get('permutations', 0):,} random permutations"
    return text


def predict(
    config: PredictConfig,
    out: "str | Path",
    *,
    progress: bool = True,
    command: Optional[str] = None,
    printer: "Callable[[str], None]" = print,
) -> dict:
    """Score the pretraining data and every task; write and return ``OUT/predict.json``.

    Every attack is an ordinary run directory under ``OUT`` (``as/<task>``, ``lp/<task>``,
    ``adv-lp/<task>``), reused when complete and resumed when interrupted.
    """
    from asbound.sweep.engine import is_done, run_cell
    from asbound.transfer import TransferConfig

    cfg = config.validated()
    tasks = cfg.tasks
    out = Path(out)
    head_norm, head_source = None, None
    if isinstance(cfg.head_norm, str):
        head_norm, head_source = _reference_head_norm(cfg.head_norm)
    elif cfg.head_norm is not None:
        head_norm, head_source = float(cfg.head_norm), "--head-norm"
    measure = cfg.measure
    for task in tasks if measure else ():  # bad options for the LP runs fail before any attack
        TransferConfig(**_transfer_config(cfg, task, "lp")).validated()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is not a directory; give a directory path")
    if cfg.attack not in REL_STEP:
        raise ConfigError(f"attack {cfg.attack!r} is not valid; valid: {', '.join(REL_STEP)}")
    cfg = dataclasses.replace(cfg, rel_step=resolve_rel_step(cfg.attack, cfg.rel_step))
    record: "dict[str, Any]" = {
        "model": cfg.model, "eps": parse_eps(cfg.eps, cfg.norm), "eps_text": format_eps(parse_eps(cfg.eps, cfg.norm))
        if "/" not in str(cfg.eps) else str(cfg.eps), "norm": cfg.norm, "threshold": cfg.threshold,
        "command": command, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                       for k, v in dataclasses.asdict(cfg).items()},
        "versions": environment()["versions"],
    }
    with RunDir(out).locked():
        old = read_json(out / MANIFEST)
        a, b = (old or {}).get("config") or {}, record["config"]
        # the task list may change (each task's runs are reused or added); every other setting may not
        a = {**OLD_DEFAULTS, **a}  # predictions made before a setting existed ran with its default then
        diff = sorted(k for k in set(a) | set(b) if k != "data" and a.get(k) != b.get(k))
        if isinstance(old, dict) and diff:
            raise ResumeError(f"{out} holds a prediction with other settings ({', '.join(diff[:4])}); "
                              f"choose another --out")

        def cell(run: str, config: dict, where: str) -> dict:
            path = out / where
            if not is_done(run, path):
                printer(f"{run} {config['data']}"
                        + (f" ({config.get('method')})" if run == "transfer" else "") + f" -> {path}")
                run_cell(run, config, str(path), progress)
            return read_json(path / ("summary.json" if run == "score" else "final.json"))

        # with labels: the model's own head gives the pretraining CE where it fits (else the AS alone)
        pre_task = Task(cfg.pretrain_data, cfg.pretrain_classes)
        pre_dir = f"as/pretrain-{pre_task.slug}"
        pre = cell("score", _score_config(cfg, cfg.pretrain_data, as_only=False, **_task_extra(pre_task)), pre_dir)
        # the tasks' AS comes from the representation attack alone (no labels); so does the ratio's
        # denominator, even where the pretraining run also attacked the loss with labels
        pre_as = pre.get("as_score_rep", pre["as_score"])
        record["pretrain"] = {"data": cfg.pretrain_data, "label": pre_task.label, "dir": pre_dir,
                              "as_score": pre_as, "as_score_both": pre["as_score"],
                              "loss_clean": pre.get("loss_clean"), "loss_adv": pre.get("loss_adv"),
                              "clean_accuracy": pre.get("clean_accuracy"),
                              "robust_accuracy": pre.get("robust_accuracy"), "n": pre["n"]}
        record["tasks"] = []
        for task in tasks:
            s = cell("score", _score_config(cfg, task.data, as_only=True, **_task_extra(task)), f"as/{task.slug}")
            ratio = s["as_score"] / pre_as if pre_as > 0 else None  # undefined: no attack moved g on pretraining
            entry: "dict[str, Any]" = {
                **task.options(), "label": task.label, "dir": f"as/{task.slug}", "as_score": s["as_score"],
                "n": s["n"], "ratio": ratio,
                "verdict": UNDEFINED if ratio is None else "transfers" if ratio <= cfg.threshold else "does not transfer",
                "bound": None if head_norm is None else {
                    "head_norm": head_norm, "head_norm_name": NORM_NAME, "q": Q, "lipschitz": LIPSCHITZ,
                    "loss_increase": LIPSCHITZ * head_norm * s["as_score"], "source": head_source},
                "measured": None,
            }
            if "lp" in measure:
                f = cell("transfer", _transfer_config(cfg, task, "lp"), f"lp/{task.slug}")
                after = f.get("score_after") or {}
                clean, adv = after.get("loss_clean"), after.get("loss_adv")
                entry["measured"] = {
                    "dir": f"lp/{task.slug}", "loss_clean": clean, "loss_adv": adv,
                    "relative_ce": (adv - clean) / clean if clean else None,
                    "clean_accuracy": f["test"].get("clean_accuracy"),
                    "robust_accuracy": _strongest(f["test"]), "lhs": after.get("lhs"),
                    "head_norm": after.get("head_norm"), "as_after": after.get("as_score"),
                }
                if "adv-lp" in measure:
                    g = cell("transfer", _transfer_config(cfg, task, "adv-lp"), f"adv-lp/{task.slug}")
                    entry["measured"]["adv_lp"] = {"dir": f"adv-lp/{task.slug}",
                                                   "clean_accuracy": g["test"].get("clean_accuracy"),
                                                   "robust_accuracy": _strongest(g["test"])}
            record["tasks"].append(entry)
            write_json(out / MANIFEST, clean_json({**record, "spearman": None}))
        measured = [t for t in record["tasks"] if t["measured"]]
        record["spearman"] = None
        if measured:
            record["spearman"] = {
                "ratio_vs_relative_ce": spearman([t["ratio"] for t in measured],
                                                 [t["measured"]["relative_ce"] for t in measured]),
                "as_vs_relative_ce": spearman([t["as_score"] for t in measured],
                                              [t["measured"]["relative_ce"] for t in measured]),
            }
            if "adv-lp" in measure:
                record["spearman"]["lp_accuracy_vs_adv_lp_robust_accuracy"] = spearman(
                    [t["measured"]["clean_accuracy"] for t in measured],
                    [t["measured"]["adv_lp"]["robust_accuracy"] for t in measured])
        write_json(out / MANIFEST, clean_json(record))
    return record


def _strongest(test: dict) -> Optional[float]:
    """Robust accuracy under the strongest evaluation recorded: ``robust_accuracy`` (a point robust
    only if every attack run fails on it), else AutoAttack, else PGD with the most steps."""
    if test.get("robust_accuracy") is not None:
        return test["robust_accuracy"]
    if test.get("autoattack") is not None:
        return test["autoattack"]
    pgd = test.get("pgd") or {}
    return pgd[max(pgd, key=int)] if pgd else None
