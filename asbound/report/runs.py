"""Run directories as the renderers see them: their records, read, never recomputed.

A path given to ``asbound table`` / ``asbound plot`` may be a score run (``summary.json``), a
transfer run (``final.json``), a sweep (``sweep.json``: its complete cells, in order, with the
values that set each apart), a prediction (``predict.json``) or a folder of such runs (each
sub-folder that is one, sorted). ``docs/RECORDS.md`` describes the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from asbound.errors import ConfigError, RecordError
from asbound.records import REMEDIES, SWEEP, read_json, read_points
from asbound.specs import format_eps

MARKERS = {"summary.json": "score", "final.json": "transfer", "sweep.json": "sweep", "predict.json": "predict"}


@dataclass
class Run:
    """One score, transfer or predict run; ``params``: its sweep cell's values ({} outside a sweep)."""

    path: Path
    kind: str
    config: dict
    record: dict  # summary.json, final.json or predict.json
    params: "dict[str, Any]" = field(default_factory=dict)
    sweep: Optional[str] = None  # the sweep directory it belongs to
    sweep_kind: Optional[str] = None

    @property
    def summary(self) -> Optional[dict]:
        """The score summary: a score run's own, a transfer run's score after transfer."""
        if self.kind == "score":
            return self.record
        if self.kind == "transfer":
            return self.record.get("score_after")
        return None

    def points(self) -> pd.DataFrame:
        """The per-datapoint records (a transfer run: those of its score after transfer)."""
        path = self.path / "points.csv" if self.kind == "score" else self.path / "score" / "after" / "points.csv"
        if not path.exists():
            raise ConfigError(f"{self.path} has no per-datapoint records ({path.name}); rerun it with its score")
        return read_points(path)

    def get(self, key: str, default: Any = None) -> Any:
        """An option of the run: its sweep cell's value, else its config's."""
        return self.params.get(key, self.config.get(key, default))


def _kind_of(path: Path) -> Optional[str]:
    for marker, kind in MARKERS.items():
        if (path / marker).exists():
            return kind
    return None


def _read(path: Path, kind: str, **extra: Any) -> Run:
    marker = next(m for m, k in MARKERS.items() if k == kind)
    record = read_json(path / marker)  # a dict: anything else is a RecordError naming the file
    config = read_json(path / "config.json") if kind != "predict" else record.get("config")
    return Run(path=path, kind=kind, config=config if isinstance(config, dict) else {}, record=record, **extra)


def _sweep_cells(path: Path) -> "tuple[list[Run], list[str]]":
    manifest = read_json(path / SWEEP)
    cells = manifest.get("cells")
    if not (isinstance(cells, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                            and isinstance(c.get("dir"), str) for c in cells)):
        raise RecordError(f"{path / SWEEP} is damaged or not asbound's (its cells are not a list of "
                          f"{{name, dir, ...}}); {REMEDIES[SWEEP]}")
    runs, missing = [], []
    for cell in cells:
        folder = path / cell["dir"]
        kind = _kind_of(folder)
        if kind not in ("score", "transfer"):
            missing.append(cell["name"])
            continue
        runs.append(_read(folder, kind, params=dict(cell.get("params") or {}), sweep=str(path),
                          sweep_kind=manifest.get("kind")))
    return runs, missing


def collect(paths: "Iterable[str | os.PathLike]") -> "tuple[list[Run], list[str]]":
    """The runs under ``paths`` and notes on what was left out (sweep cells not done)."""
    runs: "list[Run]" = []
    notes: "list[str]" = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise ConfigError(f"{given} is not a directory; give asbound run directories (with summary.json, "
                              f"final.json, sweep.json or predict.json)")
        kind = _kind_of(path)
        if kind == "sweep":
            cells, missing = _sweep_cells(path)
            runs += cells
            if missing:
                notes.append(f"{given}: {len(missing)} cell(s) not done, left out: {', '.join(missing)}")
        elif kind is not None:
            runs.append(_read(path, kind))
        else:
            children = sorted(p for p in path.iterdir() if p.is_dir() and _kind_of(p) is not None)
            if not children:
                raise ConfigError(f"{given} is not an asbound run directory: it holds no summary.json (score), "
                                  f"final.json (transfer), sweep.json or predict.json, nor folders that do")
            for child in children:
                sub, more = collect([child])
                runs += sub
                notes += more
    return runs, notes


ATTACK_NAMES = {"pgd": "PGD", "apgd": "APGD"}


def attack_text(s: dict) -> str:
    """``PGD 20 steps x 1 restart, step 0.7 eps``: the attack a score summary's sensitivity came from
    (summaries written before ``attack`` was recorded ran PGD, the only attack then)."""
    attack = str(s.get("attack") or "pgd")
    text = f"{ATTACK_NAMES.get(attack, attack)} {s.get('steps', '?')} steps"
    restarts = s.get("restarts")
    if restarts is not None:
        text += f" x {restarts} restart" + ("" if restarts == 1 else "s")
    if s.get("rel_step") is not None:
        text += f", step {s['rel_step']:g} eps"
    return text


def robust_accuracy(test: dict) -> "tuple[Optional[float], str]":
    """A transfer run's robust accuracy on its test split (``final.json``'s ``test``) and the rule
    it was counted by: ``robust_accuracy`` where recorded (a point is robust only if every attack
    run fails on it; ``robust_rule`` says which attacks); older records: the accuracy under the PGD
    attack with the most steps (its key compared as a number: PGD-20 over PGD-5), each attack
    counted alone."""
    if test.get("robust_accuracy") is not None:
        rule = test.get("robust_rule")
        return test["robust_accuracy"], (rule if isinstance(rule, str) and rule
                                         else "robust: every attack run fails on the point")
    pgd = test.get("pgd") or {}
    if not pgd:
        return None, "no attack recorded"
    steps = max(pgd, key=int)
    step = f"step {format_eps(test['attack_step'])}; " if isinstance(test.get("attack_step"), (int, float)) else ""
    return pgd[steps], (f"PGD-{steps} accuracy ({step}each attack counted alone: the record holds no per-point "
                        f"robust accuracy)")


def data_label(run: Run) -> str:
    """``digits [5-9]``, ``cifar10 +zoom_blur-2``, ``digits @16px``: the data a run used."""
    text = str(run.get("data", "?"))
    if run.get("classes"):
        text += f" [{run.get('classes')}]"
    if run.get("corruption"):
        text += f" +{run.get('corruption')}-{run.get('severity')}"
    if run.get("resize"):
        text += f" @{run.get('resize')}px"
    return text


def model_label(run: Run) -> str:
    model = str(run.get("model", "?"))
    return model.split(":", 1)[1] if model.startswith("builtin:") else model


def pretraining_label(run: Run) -> str:
    """The pretrained representation a run stands on: its model without a builtin's ``/HEAD``
    (``builtin:lenet-adversarial/posx`` and ``.../scale`` share one representation)."""
    model = str(run.get("model", "?"))
    return model.split(":", 1)[1].split("/", 1)[0] if model.startswith("builtin:") else model


#: options that, when they differ between runs, belong in the column labels
_DISTINCT = ("method", "peft", "norm", "eps", "steps", "weight_decay", "epochs", "seed", "n", "n_train")
#: how a label names them (``method`` and a score run's ``no transfer`` go bare)
_NAMES = {"weight_decay": "weight decay", "n_train": "n train"}


def recorded(run: Run, key: str) -> Any:
    """What ``run`` recorded for ``key`` of :data:`_DISTINCT`, from the records that hold what ran
    (its score summary first: ``n`` is the number of points scored, ``eps`` the radius scored
    at), never the value a sweep asked for; None where the option does not apply (a score run has
    no ``method``, ``peft``, ``n_train``, ``weight_decay`` or ``epochs``)."""
    s = run.summary or {}
    transfer = run.kind == "transfer"
    if key in ("method", "peft"):
        return run.record.get(key) if transfer else None
    if key == "n_train":  # None in a transfer config: the whole training split
        return (run.config.get("n") or "all") if transfer else None
    if key in ("weight_decay", "epochs") and not transfer:
        return None
    if key == "n":  # a transfer run's config n is its training images: never the scored points
        return s.get("n") if s or transfer else run.get("n")
    if key == "eps":
        text = s.get("eps_text") or run.config.get("eps_text") or run.get("eps")
        return format_eps(text) if isinstance(text, float) else text
    if key in ("steps", "norm") and s.get(key) is not None:
        return s[key]
    return run.get(key)


def settings(runs: "list[Run]", beside_data: bool = False, omit: "Iterable[str]" = ()) -> "list[str]":
    """Per run, what sets it apart from the others besides model and data (``lp, eps 8/255, n
    190``), or ``""``; ``beside_data``: only the options that vary within one data set (not those
    each data set fixes); ``omit``: options shown elsewhere (a column of their own)."""
    keys = [k for k in _DISTINCT if k not in set(omit)]
    values = [{k: recorded(r, k) for k in keys} for r in runs]

    def differs(group: "list[dict]", key: str) -> bool:  # among the runs the option applies to
        return len({str(v[key]) for v in group if v[key] is not None}) > 1 or (
            key == "method" and len({v[key] is None for v in group}) > 1)

    varying = [k for k in keys if differs(values, k)]
    if beside_data:
        data = [data_label(r) for r in runs]
        varying = [k for k in varying
                   if any(differs([v for v, e in zip(values, data) if e == d], k) for d in set(data))]
    mixed = len({r.kind for r in runs}) > 1 and "method" not in set(omit)
    out = []
    for r, v in zip(runs, values):
        shown = [k for k in varying if v[k] is not None]  # None: the option does not apply to this run
        if mixed and "method" not in shown and v.get("method") is not None:
            shown.insert(0, "method")  # beside score runs, a transfer run always says how it transferred
        extra = [_short(v[k]) if k == "method" else f"{_NAMES.get(k, k)} {_short(v[k])}" for k in shown]
        if mixed and r.kind == "score":
            extra.insert(0, "no transfer")
        out.append(", ".join(extra))
    return out


#: config entries that never set a run's results apart (where and how fast it ran)
_NOT_RESULTS = ("device", "versions", "python", "platform", "workers", "data_root", "model_dir", "amp", "grad_dtype",
                "compile", "batch_size", "download", "allow_pickle", "backend")


def differences(runs: "list[Run]", limit: int = 3) -> "list[str]":
    """Per run, the first ``limit`` config entries whose values differ between the runs that
    record them (``lr 0.01``), for runs that the options of :func:`settings` do not tell apart."""
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.config)
            if k not in _NOT_RESULTS and k not in _DISTINCT
            and len({repr(r.config[k]) for r in runs if r.config.get(k) is not None}) > 1][:limit]
    return [", ".join(f"{k.replace('_', ' ')} {_short(r.config[k])}" for k in keys if r.config.get(k) is not None)
            for r in runs]


def numbered(texts: "list[str]", keys: "Optional[list[Any]]" = None) -> "list[str]":
    """``texts`` with repeats numbered (``x``, ``x #2``): runs nothing sets apart stay distinct;
    ``keys``: what identifies each run where the text alone does not (the values of columns shown
    beside the text): only runs with the same text and key are numbered."""
    keys = texts if keys is None else [(t, k) for t, k in zip(texts, keys)]
    out, seen = list(texts), {}
    for i, key in enumerate(keys):
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            out[i] = f"{texts[i]} #{seen[key]}"
    return out


def labels(runs: "list[Run]", omit: "Iterable[str]" = ()) -> "list[str]":
    """A label per run: model and data, plus whatever else sets the runs apart (``omit``: options
    shown in columns of their own, which then also tell runs of one label apart)."""
    omit = tuple(omit)
    return numbered([f"{model_label(r)} → {data_label(r)}" + (f" ({extra})" if extra else "")
                     for r, extra in zip(runs, settings(runs, omit=omit))],
                    [tuple(str(recorded(r, k)) for k in omit) for r in runs])


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def relative(path: "str | os.PathLike", base: "str | os.PathLike | None" = None) -> str:
    """``path`` relative to ``base`` (default: the working directory) where it lies below it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path(base or os.getcwd()).resolve()))
    except ValueError:
        return str(path)
