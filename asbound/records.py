"""Per-datapoint records and run directories: written as they go, resumed after interruption.

A run directory holds::

    config.json    the resolved configuration, seed, package versions and device
    points.csv     one row per datapoint, appended (and fsync'ed) batch by batch
    summary.json   data-set level numbers, derived from points.csv only

Rerunning the same configuration into the same directory skips the datapoints already in
``points.csv``. A directory holding a run with another configuration is refused, never
overwritten. While a process writes a run it holds an exclusive lock on ``DIR/.lock``
(:meth:`RunDir.locked`); a second process on the same directory is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pandas as pd

from asbound.errors import ConfigError, RecordError, ResumeError, RunLockedError, describe

CONFIG = "config.json"
POINTS = "points.csv"
SUMMARY = "summary.json"
LOCK = ".lock"

# config keys that may differ between an interrupted run and its resumption
VOLATILE_KEYS = ("versions", "device", "python", "platform", "resumed", "out")


def versions() -> "dict[str, str]":
    """Versions of the packages that determine the numbers."""
    found = {}
    for name in ("asbound", "torchvision", "numpy", "foolbox", "robustbench", "pandas"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import torch

    found["torch"] = torch.__version__  # with the build tag (+cpu, +cu130)
    found["cuda"] = torch.version.cuda or "none"
    return found


def environment() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions()}


def _identity(config: dict, volatile: "tuple[str, ...]" = (), defaults: "dict | None" = None) -> dict:
    """The keys that decide whether two configs describe the same run; a key a config lacks
    (recorded before the option existed) counts as its default from ``defaults``."""
    merged = {**(defaults or {}), **config}
    return {k: v for k, v in merged.items() if k not in VOLATILE_KEYS and k not in volatile}


class RunDir:
    """One run's output directory."""

    def __init__(self, path: "str | os.PathLike") -> None:
        self.path = Path(path)

    @property
    def points_path(self) -> Path:
        return self.path / POINTS

    def create(self) -> None:
        """Create the directory (and its parents); a path that cannot be one is a ConfigError."""
        reason = make_dir(self.path)
        if reason is not None:
            raise ConfigError(
                f"--out {str(self.path)!r} cannot be used as a run directory "
                f"({reason}); give a directory path that can be created"
            )
        if not self.path.is_dir():
            raise ConfigError(f"--out {str(self.path)!r} is not a directory; give a directory path")

    @contextmanager
    def locked(self) -> Iterator["RunDir"]:
        """Hold an exclusive lock on the run for the duration (``flock`` on ``DIR/.lock``).

        A second holder, in this process or another, gets :class:`RunLockedError` naming the
        process that writes the run. The lock dies with its process, so a killed run never
        leaves the directory locked. (``flock`` is not reliable on some network file systems.)
        """
        import fcntl

        self.create()
        path = self.path / LOCK
        handle = open(path, "a+")
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise RunLockedError(
                    f"{self.path} is being written by {holder}; wait for it to finish, or choose "
                    f"another --out"
                ) from None
            handle.seek(0)
            handle.truncate()
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            handle.write(f"asbound pid {os.getpid()} on {socket.gethostname()} since {stamp}\n")
            handle.flush()
            try:
                yield self
            except Exception as exc:  # a directory moved or deleted under the run: say so, in one line
                moved = self._moved(handle)
                if moved is not None:
                    raise ResumeError(moved) from exc
                raise
        finally:
            handle.close()  # releases the lock

    def _moved(self, handle: "io.TextIOBase") -> Optional[str]:
        """Why the directory this process locked is no longer at ``self.path`` (moved or deleted
        while the run wrote to it), or None while it is still there."""
        try:
            if os.path.samestat(os.stat(self.path / LOCK), os.fstat(handle.fileno())):
                return None
        except OSError:
            pass
        try:  # where the locked file is now (Linux)
            now = os.readlink(f"/proc/self/fd/{handle.fileno()}")
        except OSError:
            now = ""
        if now.endswith(f"/{LOCK}") and Path(now).parent.is_dir():
            return (f"{self.path} was moved to {Path(now).parent} while this process wrote to it: the run "
                    f"stopped, and what it had finished is there; rerun the command with --out at the new "
                    f"place to resume")
        return (f"{self.path} was moved or deleted while this process wrote to it: the run stopped; rerun "
                f"the command with --out at its new place to resume, or to start over")

    def start(self, config: dict, *, defaults: "dict | None" = None) -> "set[int]":
        """Create or resume the directory; return the positions already recorded.

        Raises :class:`ResumeError` if the directory holds a run with another configuration
        (or records that cannot be attributed to one); nothing in it is changed then.
        """
        self.claim(config, defaults=defaults)
        done = self._repair_points()
        n = config.get("n")
        if isinstance(n, int) and not isinstance(n, bool):  # the datapoints of the run: positions 0 .. n-1
            outside = sorted(p for p in done if not 0 <= p < n)
            if outside:
                raise damaged(self.points_path, f"position {outside[0]} is outside this run's {n} datapoints")
        return done

    def claim(self, config: dict, *, volatile: "tuple[str, ...]" = (), defaults: "dict | None" = None,
              meant: "dict[str, dict] | None" = None) -> None:
        """Create the directory and write ``config``, or check it against the recorded one.

        Keys in ``volatile`` may differ (the new values are recorded); a key the recorded config
        lacks compares as its value in ``defaults``; ``meant[key]`` maps a value that older
        records hold for ``key`` to what it meant (``{None: 35}``: ``null``, a whole split of 35
        images). Raises :class:`ResumeError` if the directory holds a run with another
        configuration; nothing in it is changed then.
        """
        self.create()
        config = _normalised(config)
        defaults = _normalised(defaults) if defaults else None
        config_path = self.path / CONFIG
        if config_path.exists():
            try:  # a damaged config: the run cannot be resumed (ResumeError), the file named
                old = read_json(config_path)
            except RecordError as exc:
                raise ResumeError(str(exc)) from None
            if old is None:  # gone since exists(): as if never written
                old = config
            # a value of another JSON type than this run's (a number for a model spec, a string for
            # the base model's record) is no other setting: the file is damaged
            kind = next((k for k in config if k in old and _kind_differs(old[k], config[k])), None)
            if kind is not None:
                raise ResumeError(str(damaged(config_path, f"{kind} is {_a(old[kind])}, not {_a(config[kind])}")))
            old = {**old, **{k: m[old[k]] for k, m in (meant or {}).items() if k in old and _hashable(old[k])
                             and old[k] in m}}
            before, after = _identity(old, volatile, defaults), _identity(config, volatile, defaults)
            if before != after:
                diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
                shown = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in diff[:3])
                more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
                todo = remake(self.path) or "choose another --out, or delete that directory to start over"
                raise ResumeError(f"{self.path} holds a run with other settings ({shown}{more}); {todo}")
        elif self.points_path.exists():
            raise ResumeError(
                f"{self.path} holds a {POINTS} without a {CONFIG}, so its records cannot be "
                f"resumed; choose another --out, or delete that directory to start over"
            )
        write_json(config_path, config)

    def _repair_points(self) -> "set[int]":
        """Drop a torn last line left by an interruption; return the recorded positions."""
        path = self.points_path
        if not path.exists():
            return set()
        text = _read_text(path)
        lines = text.splitlines(keepends=True)
        if not lines:
            path.unlink()
            return set()
        width = len(next(csv.reader([lines[0]])))
        good = [lines[0]]
        for line in lines[1:]:
            if not line.endswith("\n"):
                break
            row = next(csv.reader([line]), [])
            if len(row) != width:
                break
            good.append(line)
        if len(good) == 1:
            # no complete record (perhaps not even a complete header): start the file afresh
            path.unlink()
            return set()
        frame = _points_frame(path, io.StringIO("".join(good)))
        if len(good) != len(lines):
            path.write_text("".join(good))
        return set(int(p) for p in frame["position"])

    def append(self, rows: pd.DataFrame) -> None:
        """Append one batch of per-datapoint rows and flush them to disk; rows with other columns
        than the file's (a damaged header) are refused, never appended under it."""
        path = self.points_path
        header = not path.exists()
        if not header:
            with open(path, newline="") as handle:
                columns = next(csv.reader([handle.readline()]), [])
            if columns != [str(c) for c in rows.columns]:
                lacks = [str(c) for c in rows.columns if str(c) not in columns]
                what = f"no {lacks[0]} column" if lacks else "its columns are not this run's"
                raise damaged(path, what)
        with open(path, "a", newline="") as handle:
            rows.to_csv(handle, header=header, index=False)
            handle.flush()
            os.fsync(handle.fileno())

    def points(self) -> pd.DataFrame:
        return read_points(self.points_path).sort_values("position").reset_index(drop=True)

    def damaged_points(self, problem: str) -> RecordError:
        """The error for a ``points.csv`` found damaged while it is summarised (``problem``: what)."""
        return damaged(self.points_path, problem)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / SUMMARY, summary)


def _json_kind(value: object) -> str:
    """A JSON value's type, numbers as one (``null``: none)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _kind_differs(old: object, new: object) -> bool:
    """Whether a recorded value and this run's are of different JSON types (null is any type:
    a value recorded before an option existed, a non-finite number)."""
    return old is not None and new is not None and _json_kind(old) != _json_kind(new)


def _hashable(value: object) -> bool:
    return not isinstance(value, (dict, list))


def _normalised(config: dict) -> dict:
    """The config as it reads back from config.json (tuples -> lists, Path -> str, numpy -> int/float),
    so that a resumption compares like with like."""
    return json.loads(json.dumps(clean_json(config), default=_json_default, allow_nan=False))


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as strict JSON, atomically (a temporary file, fsync'ed, then renamed)."""
    atomic_write(path, lambda handle: handle.write(
        (json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n").encode()))


def atomic_write(path: Path, write: "Callable[[io.BufferedWriter], object]") -> None:
    """Write ``path`` through ``write(handle)`` so that readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves no stray temporary file
        raise


def make_dir(path: Path) -> Optional[str]:
    """Create the directory ``path`` and its parents; return why that failed, or None.

    The one check of every output path a user names (``--out``): the callers turn the reason
    into a one-line :class:`ConfigError` that names their option.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # under a file, on a read-only or virtual file system, no permission
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
        return f"{path} cannot be created: {exc.strerror or type(exc).__name__}"
    return None


def write_output(path: "str | os.PathLike", write: "Callable[[io.BufferedWriter], object]",
                 flag: str = "--out") -> Path:
    """Write a file the user named (``table --out``, ``plot --out``) through ``write(handle)``,
    atomically, creating its folder; a path that cannot be written is a one-line ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a directory; give a file path")
    reason = make_dir(path.parent)
    if reason is None:
        try:
            atomic_write(path, write)
            return path
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
    raise ConfigError(f"{flag} {str(path)!r} cannot be written ({reason}); give a file path in a "
                      f"folder that exists or can be created")


def _json_default(obj: object) -> object:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def clean_json(obj: object) -> object:
    """Replace non-finite floats by None (JSON has no inf/NaN)."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


FINAL = "final.json"  # a transfer run's result
SWEEP = "sweep.json"  # a sweep's manifest
PREDICT = "predict.json"  # a prediction's record
STAGES = "stages.json"  # a transfer run's stages, as selected

_RERUN = "delete it and rerun the command that made the run (for a run inside a sweep or predict: that command)"
#: what to do about a damaged record, by file name: the second half of its one-line error
REMEDIES = {
    CONFIG: "the run's settings cannot be recovered from it: choose another --out, or delete the "
            "directory to start over",
    SUMMARY: f"{_RERUN}; it is written again from {POINTS}",
    FINAL: f"{_RERUN}; the trained model.pt is kept, and evaluated and scored again",
    STAGES: "delete it, model.pt and final.json and rerun the command that made the run; they are "
            "rebuilt from its checkpoints",
    SWEEP: "the sweep cannot be resumed without it: sweep into another --out, or delete the directory "
           "to start over",
    PREDICT: "delete it and rerun the predict command into the same --out; the runs it made are reused",
    POINTS: "delete it to score every datapoint again, or choose another --out",
}


def enclosing_run(run: Path) -> "Optional[tuple[str, Path]]":
    """The command and directory that made the run directory ``run`` as a part of a larger run:
    ``("transfer", DIR)`` for ``DIR/score/before`` and ``DIR/score/after``, ``("sweep", DIR)`` for a
    cell of the sweep in ``DIR``, ``("predict", DIR)`` for a run of the prediction in ``DIR``;
    None for a run of its own."""
    if run.parent.name == "score" and run.name in ("before", "after") and (run.parent.parent / CONFIG).exists():
        return "transfer", run.parent.parent
    if (run.parent / SWEEP).exists():
        return "sweep", run.parent
    if (run.parent.parent / PREDICT).exists():
        return "predict", run.parent.parent
    return None


def remake(run: Path) -> Optional[str]:
    """How to make the run directory ``run`` again when it is a part of a larger run (deleting it
    and rerunning the command that made the larger one), or None for a run of its own."""
    found = enclosing_run(run)
    if found is None:
        return None
    command, outer = found
    if command == "transfer":
        return (f"delete {run} and {outer / FINAL} and rerun the transfer command that made {outer}: "
                f"its model.pt is kept, evaluated and scored again")
    what = "that cell runs again" if command == "sweep" else "that run is made again, the others are reused"
    return f"delete {run} and rerun the {command} command that made {outer}: {what}"


def remedy_for(path: Path) -> str:
    """What to do about the damaged record ``path``: the second half of its one-line error."""
    if path.name == CONFIG:  # a run's settings: a part of a larger run is made again with it
        nested = remake(path.parent)
        if nested:
            return nested
    return REMEDIES.get(path.name, "delete it and rerun the command that wrote it")


def damaged(path: Path, problem: str, remedy_text: Optional[str] = None) -> RecordError:
    """The one-line error for the record ``path`` found damaged (``problem``: what is wrong in it)."""
    return RecordError(f"{path} is damaged or not asbound's ({problem}); {remedy_text or remedy_for(path)}")



def _read_text(path: Path, remedy: Optional[str] = None) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise damaged(path, "not text", remedy) from None
    except OSError as exc:
        raise RecordError(f"{path} cannot be read ({exc.strerror or type(exc).__name__})") from None


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


# --- what each record holds: the readers (tables, plots, reruns) index and format these fields -------

_NUM, _INT, _STR, _BOOL = "a number", "a whole number", "a string", "true or false"
#: a run directory a record names, relative to the record's own directory and inside it
_DIR = "a folder (a string)"
#: a torch tensor (in a checkpoint)
_TENSOR = "a tensor"


@dataclass(frozen=True)
class _Each:
    """A list, each item as ``item``."""

    item: object


@dataclass(frozen=True)
class _Map:
    """An object whose every value is ``value`` (and every key matches ``key``, a regular expression
    for ``keys``, what the keys are)."""

    value: object
    key: Optional[str] = None
    keys: str = ""


_SUMMARY_FIELDS: dict = {
    "n": _INT, "as_score": _NUM, "as_score_rep": _NUM, "loss": _STR, "loss_clean": _NUM, "loss_adv": _NUM,
    "loss_diff": _NUM, "q": _STR, "lipschitz": _NUM, "head_norm": _NUM, "head_norm_name": _STR, "lhs": _NUM,
    "rhs": _NUM, "lemma1_holds": _BOOL, "lemma1_holds_rep": _BOOL,
    "lemma1_all": _Each({"q": _STR, "lipschitz": _NUM, "head_norm_name": _STR, "head_norm": _NUM, "lhs": _NUM}),
    "head_norms": _Map(_NUM),
    "theorem1": {"cap": _NUM, "delta": _NUM, "n": _INT, "lhs_capped": _NUM, "lipschitz_term": _NUM,
                 "confidence": _NUM, "bound": _NUM},
    "clean_accuracy": _NUM, "robust_accuracy": _NUM, "prop_fulfilled": _NUM, "rob_fulfilled": _NUM,
    "prop_fulfilled_rep": _NUM, "rob_fulfilled_rep": _NUM, "eps": _NUM, "eps_text": _STR, "norm": _STR,
    "attack": _STR, "steps": _INT, "rel_step": _NUM, "restarts": _INT, "seed": _INT,
    "sensitivity_from_loss_attack": _INT, "model": _STR, "data": _STR, "task": _STR, "task_note": _STR,
    "certify": _STR, "rhs_certified": _NUM, "tightness": _NUM, "prop_vacuous": _NUM, "prop_certified": _NUM,
    "lemma1_certified": _BOOL,
}
#: a stage as ``stages.json`` and ``final.json`` record it ("!": a key every record has)
_STAGE_FIELDS: dict = {
    "!stage": _STR, "scope": _STR, "objective": _STR, "peft": {}, "!epochs": _INT, "lr": _NUM, "select": _STR,
    "augment": _STR, "cached_features": _BOOL, "!selected_epoch": _INT, "val_accuracy": _NUM,
    "val_robust_accuracy": _NUM,
}
#: the fields of each record, by file name: a field that is present (and not null: JSON's
#: non-finite number) has its type; a key marked "!" is present in every record
RECORD_FIELDS: "dict[str, object]" = {
    SUMMARY: _SUMMARY_FIELDS,
    FINAL: {
        "!method": _STR, "peft": _STR, "!stages": _Each(_STAGE_FIELDS),
        "!test": {"!n": _INT, "eps": _NUM, "eps_text": _STR, "attack_step": _NUM, "clean_accuracy": _NUM,
                  "!pgd": _Map(_NUM, r"\d+", "step counts"), "autoattack": _NUM, "robust_accuracy": _NUM, "robust_rule": _STR},
        "seconds": _NUM, "score_before": _SUMMARY_FIELDS, "score_after": _SUMMARY_FIELDS,
    },
    STAGES: _Each(_STAGE_FIELDS),
    SWEEP: {
        "kind": _STR, "command": _STR, "run": _STR, "axes": _Each(_STR), "base": {}, "executor": _STR,
        "!cells": _Each({"!name": _STR, "!dir": _DIR, "params": {}, "!status": _STR, "error": _STR}),
        "versions": _Map(_STR),
    },
    PREDICT: {
        "!model": _STR, "eps": _NUM, "!eps_text": _STR, "!norm": _STR, "!threshold": _NUM, "command": _STR,
        "config": {}, "versions": _Map(_STR),
        "!pretrain": {"data": _STR, "!label": _STR, "dir": _DIR, "!as_score": _NUM, "as_score_both": _NUM,
                      "loss_clean": _NUM, "loss_adv": _NUM, "clean_accuracy": _NUM, "robust_accuracy": _NUM,
                      "n": _INT},
        "!tasks": _Each({"data": _STR, "classes": _STR, "corruption": _STR, "severity": _INT, "!label": _STR,
                         "dir": _DIR, "!as_score": _NUM, "n": _INT, "!ratio": _NUM, "!verdict": _STR,
                         "!bound": {"head_norm": _NUM, "head_norm_name": _STR, "q": _STR, "lipschitz": _NUM,
                                    "!loss_increase": _NUM, "source": _STR},
                         "!measured": {"dir": _DIR, "adv_lp": {"dir": _DIR}}}),
        "spearman": _Map({"n": _INT, "rho": _NUM, "p": _NUM, "p_method": _STR, "p_permutation": _NUM,
                          "permutations": _INT}),
    },
}


#: a row of ``epochs.csv``, as a checkpoint's history holds it
_EPOCH_ROW: dict = {
    "!stage": _STR, "!epoch": _INT, "train_loss": _NUM, "train_accuracy": _NUM, "lr": _NUM, "val_accuracy": _NUM,
    "val_robust_accuracy": _NUM, "seconds": _NUM, "images_per_second": _NUM, "selected": _BOOL, "lambda1": _NUM,
    "lambda2": _NUM,
}
#: a transfer run's ``checkpoints/last.pt`` (a torch.save file): what resuming reads, with the
#: fields that must not be null besides (:data:`CHECKPOINT_NOT_NULL`)
CHECKPOINT_FIELDS: dict = {
    "!stage": _INT, "!model": _Map(_TENSOR),
    "!progress": {"!epoch": _INT, "!best_metric": _NUM, "!best_epoch": _INT,
                  "optimizer": {"!state": {}, "!param_groups": _Each({"!params": _Each(_INT)})},
                  "scheduler": {}, "scaler": {}, "autolr": {}, "!history": _Each(_EPOCH_ROW)},
    "!history": _Each(_EPOCH_ROW),
}
CHECKPOINT_NOT_NULL = ("stage", "model", "progress", "history", "progress.epoch", "progress.best_metric",
                       "progress.best_epoch", "progress.history")


def _a(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _fits(value: object, expected: str) -> bool:
    if expected == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == _TENSOR:
        import torch

        return isinstance(value, torch.Tensor)
    return isinstance(value, {_STR: str, _BOOL: bool, _DIR: str}[expected])


def outside_problem(folder: str) -> Optional[str]:
    """Why the folder a record names (``sweep.json``'s ``cells[].dir``, ``predict.json``'s ``dir``)
    is not a folder inside the record's own directory, or None: an absolute path, or one that
    climbs out (``..``), would make the readers read and the reruns write elsewhere."""
    parts = Path(folder).parts
    if Path(folder).is_absolute():
        return "is an absolute path, not a folder inside this directory"
    if ".." in parts:
        return "leads out of this directory (..)"
    if not parts:
        return "is this directory itself, not a folder inside it"
    return None


def field_problem(value: object, fields: object, where: str = "") -> Optional[str]:
    """What in ``value`` does not fit ``fields`` (a :data:`RECORD_FIELDS` entry), or None."""
    if value is None:
        return None
    name = where or "it"
    if isinstance(fields, str):
        if not _fits(value, fields):
            return f"{name} is {_a(value)}, not {fields}"
        outside = outside_problem(value) if fields == _DIR else None  # type: ignore[arg-type]
        return f"{name} {value!r} {outside}" if outside else None
    if isinstance(fields, _Each):
        if not isinstance(value, list):
            return f"{name} is {_a(value)}, not a list"
        null = next((i for i, item in enumerate(value) if item is None), None)
        if null is not None:  # no list asbound writes holds null (nor a non-finite number)
            return f"{where}[{null}] is null, not {fields.item if isinstance(fields.item, str) else 'an object'}"
        return next((p for i, item in enumerate(value) if (p := field_problem(item, fields.item, f"{where}[{i}]"))),
                    None)
    if not isinstance(value, dict):
        return f"{name} is {_a(value)}, not an object"
    if isinstance(fields, _Map):
        for key, item in value.items():
            here = f"{where}.{key}" if where else key
            if fields.key is not None and not re.fullmatch(fields.key, key):
                return f"{name} has the key {key!r}; its keys are {fields.keys}"
            problem = field_problem(item, fields.value, here)
            if problem:
                return problem
        return None
    for key, expected in fields.items():  # type: ignore[union-attr]
        bare = key.lstrip("!")
        here = f"{where}.{bare}" if where else bare
        if bare not in value:
            if key.startswith("!"):
                return f"{here} is missing"
            continue
        problem = field_problem(value[bare], expected, here)
        if problem:
            return problem
    return None


def read_json(path: "str | os.PathLike", kind: "type | None" = dict, remedy: Optional[str] = None) -> Optional[object]:
    """The JSON value in ``path`` (of type ``kind`` unless None), or None when the file does not exist.

    A file that is not JSON, holds another type, or (for asbound's records, :data:`RECORD_FIELDS`)
    a field of another type than the record's is a :class:`RecordError` naming it and what to do
    (``remedy``, else :func:`remedy_for`).
    """
    p = Path(path)
    if not p.exists():
        return None
    try:
        value = json.loads(_read_text(p, remedy))
    except json.JSONDecodeError as exc:
        raise damaged(p, f"not JSON: {exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}",
                      remedy) from None
    if kind is not None and not isinstance(value, kind):
        raise damaged(p, f"it holds {_a(value)}, not {_JSON_TYPES.get(kind, kind.__name__)}", remedy)
    problem = field_problem(value, RECORD_FIELDS[p.name]) if p.name in RECORD_FIELDS else None
    if problem:
        raise damaged(p, problem, remedy)
    return value


def read_summary(path: "str | os.PathLike") -> Optional[dict]:
    """The ``summary.json`` of the score run in ``path``, or None."""
    return read_json(Path(path) / SUMMARY)  # type: ignore[return-value]


#: the columns of points.csv that hold numbers, and those that hold True or False
NUMBER_COLUMNS = ("s_rep", "s_loss", "sensitivity", "loss_clean", "loss_adv", "lemma1_ratio", "margin", "s_upper")
BOOLEAN_COLUMNS = ("correct", "robust", "fulfilled", "fulfilled_rep", "certified", "vacuous")


def _points_frame(path: Path, text: io.StringIO) -> pd.DataFrame:
    """The table in ``text`` (read from ``path``), checked to hold whole-number positions, each
    once, and numbers and True / False where asbound writes them."""
    try:
        frame = pd.read_csv(text)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise damaged(path, f"not a CSV table: {describe(exc)}") from None
    if "position" not in frame.columns:
        raise damaged(path, "no position column")
    positions = pd.to_numeric(frame["position"], errors="coerce")
    bad = (positions.isna() | (positions != positions.round())).to_numpy()
    if bad.any():
        row = int(bad.argmax())
        raise damaged(path, f"position {str(frame['position'].iloc[row])!r} in row {row + 1} is not a whole number")
    twice = positions.duplicated(keep=False).to_numpy()
    if twice.any():
        rows = np.flatnonzero(positions.to_numpy() == positions.to_numpy()[twice.argmax()])
        raise damaged(path, f"position {int(positions.iloc[rows[0]])} is in rows {rows[0] + 1} and {rows[1] + 1}")
    for column in NUMBER_COLUMNS:
        if column in frame.columns:
            values = frame[column]
            bad = (pd.to_numeric(values, errors="coerce").isna() & values.notna()).to_numpy()
            if bad.any():
                row = int(bad.argmax())
                raise damaged(path, f"{column} {str(values.iloc[row])!r} in row {row + 1} is not a number")
    for column in BOOLEAN_COLUMNS:
        if column in frame.columns and frame[column].dtype != bool:
            bad = (~frame[column].isin([True, False, "True", "False"])).to_numpy()
            if bad.any():
                row = int(bad.argmax())
                raise damaged(path, f"{column} {str(frame[column].iloc[row])!r} in row {row + 1} is not True "
                                     f"or False")
    return frame


def read_points(path: "str | os.PathLike") -> pd.DataFrame:
    """The per-datapoint records in ``path`` (a ``points.csv``); a damaged file (or one without
    a row) is a RecordError."""
    p = Path(path)
    frame = _points_frame(p, io.StringIO(_read_text(p)))
    if frame.empty:
        raise damaged(p, "no rows")
    return frame
