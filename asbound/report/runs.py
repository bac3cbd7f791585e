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
_DISTINCT = ("method", "peft", "norm", "eps", "steps", "weight_decay", "epochs", "seed", "n")


def settings(runs: "list[Run]", beside_data: bool = False) -> "list[str]":
    """Per run, what sets it apart from the others besides model and data (``norm 2, n all``), or ``""``;
    ``beside_data``: only the options that vary within one data set (not those each data set fixes)."""
    varying = [k for k in _DISTINCT if len({str(r.get(k)) for r in runs}) > 1]
    if beside_data:
        varying = [k for k in varying
                   if any(len({str(r.get(k)) for r in runs if data_label(r) == d}) > 1 for d in map(data_label, runs))]
    out = []
    for r in runs:
        extra = [f"{k} {_short(r.get(k))}" for k in varying]
        if r.kind == "transfer" and "method" not in varying and len({x.kind for x in runs}) > 1:
            extra.insert(0, str(r.record.get("method")) + (f" ({r.record['peft']})" if r.record.get("peft") else ""))
        out.append(", ".join(extra))
    return out


def numbered(texts: "list[str]") -> "list[str]":
    """``texts`` with repeats numbered (``x``, ``x #2``): runs nothing sets apart stay distinct."""
    out, seen = list(texts), {}
    for i, text in enumerate(out):
        seen[text] = seen.get(text, 0) + 1
        if seen[text] > 1:
            out[i] = f"{text} #{seen[text]}"
    return out


def labels(runs: "list[Run]") -> "list[str]":
    """A label per run: model and data, plus whatever else sets the runs apart."""
    return numbered([f"{model_label(r)} → {data_label(r)}" + (f" ({extra})" if extra else "")
                     for r, extra in zip(runs, settings(runs))])


def _short(value: Any) -> str:
    if value is None:
        return "all"  # n: every datapoint
    if isinstance(value, float):
        from asbound.specs import format_eps

        return format_eps(value) if value < 1 else f"{value:g}"
    return str(value)


def relative(path: "str | os.PathLike", base: "str | os.PathLike | None" = None) -> str:
    """``path`` relative to ``base`` (default: the working directory) where it lies below it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path(base or os.getcwd()).resolve()))
    except ValueError:
        return str(path)
