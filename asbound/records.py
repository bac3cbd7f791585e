"""Per-datapoint records and run directories: written as they go, resumed after interruption.

A run directory holds::

    config.json    the resolved configuration, seed, package versions and device
    points.csv     one row per datapoint, appended (and fsync'ed) batch by batch
    summary.json   data-set level numbers, derived from points.csv only

Rerunning the same configuration into the same directory skips the datapoints already in
``points.csv``. A directory holding a run with another configuration is refused, never
overwritten.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from asbound.errors import ResumeError

CONFIG = "config.json"
POINTS = "points.csv"
SUMMARY = "summary.json"

# config keys that may differ between an interrupted run and its resumption
VOLATILE_KEYS = ("versions", "device", "python", "platform", "resumed", "out")


def versions() -> "dict[str, str]":
    """Versions of the packages that determine the numbers."""
    found = {}
    for name in ("asbound", "torch", "torchvision", "numpy", "foolbox", "robustbench", "pandas"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def environment() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions()}


def _identity(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in VOLATILE_KEYS}


class RunDir:
    """One run's output directory."""

    def __init__(self, path: "str | os.PathLike") -> None:
        self.path = Path(path)

    @property
    def points_path(self) -> Path:
        return self.path / POINTS

    def start(self, config: dict) -> "set[int]":
        """Create or resume the directory; return the positions already recorded.

        Raises :class:`ResumeError` if the directory holds a run with another configuration.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        config_path = self.path / CONFIG
        if config_path.exists():
            try:
                old = json.loads(config_path.read_text())
            except json.JSONDecodeError:
                old = None
            if old is not None and _identity(old) != _identity(config):
                diff = sorted(
                    k for k in set(_identity(old)) | set(_identity(config))
                    if old.get(k) != config.get(k)
                )
                shown = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff[:3])
                raise ResumeError(
                    f"{self.path} holds a run with other settings ({shown}); "
                    f"choose another --out, or delete that directory to start over"
                )
        done = self._repair_points()
        _write_json(config_path, config)
        return done

    def _repair_points(self) -> "set[int]":
        """Drop a torn last line left by an interruption; return the recorded positions."""
        path = self.points_path
        if not path.exists():
            return set()
        text = path.read_text()
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
        if len(good) != len(lines):
            path.write_text("".join(good))
        if len(good) == 1:
            return set()
        frame = pd.read_csv(io.StringIO("".join(good)))
        return set(int(p) for p in frame["position"])

    def append(self, rows: pd.DataFrame) -> None:
        """Append one batch of per-datapoint rows and flush them to disk."""
        path = self.points_path
        header = not path.exists()
        with open(path, "a", newline="") as handle:
            rows.to_csv(handle, header=header, index=False)
            handle.flush()
            os.fsync(handle.fileno())

    def points(self) -> pd.DataFrame:
        frame = pd.read_csv(self.points_path)
        return frame.sort_values("position").reset_index(drop=True)

    def write_summary(self, summary: dict) -> None:
        _write_json(self.path / SUMMARY, summary)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n")
    os.replace(tmp, path)


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


def columns(frame: pd.DataFrame, names: Iterable[str]) -> "dict[str, np.ndarray]":
    return {name: frame[name].to_numpy() for name in names if name in frame}


def read_summary(path: "str | os.PathLike") -> Optional[dict]:
    p = Path(path) / SUMMARY
    return json.loads(p.read_text()) if p.exists() else None
