"""Running a sweep: each cell an ordinary run directory, reused when done, through an executor.

* ``local``: the cells one after another in this process (their own progress bars show);
* ``submitit-local``: each cell a job of submitit's local executor (a subprocess on this
  machine: the code path of ``slurm``, which the tests use);
* ``slurm``: each cell a Slurm job through submitit (``pip install 'asbound[slurm]'``).

Only the coordinating process writes ``OUT/sweep.json``; it holds ``OUT/.lock`` for the whole
sweep, and every cell's run holds its own lock, so two processes never write the same run. A
complete cell (``summary.json`` / ``final.json`` present) is reused without loading anything; an
interrupted cell resumes from its own records, so an interrupted sweep rerun gives the records of
an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from asbound.errors import AsboundError, ConfigError, ResumeError
from asbound.records import RunDir, _normalised, environment, read_json, write_json
from asbound.sweep.grid import Cell, Sweep

EXECUTORS = ("local", "submitit-local", "slurm")
MANIFEST = "sweep.json"
#: the file that marks a cell's run complete
DONE_FILE = {"score": "summary.json", "transfer": "final.json"}


@dataclass(frozen=True)
class SlurmOptions:
    """What each Slurm job asks for (submitit's ``slurm_*`` parameters)."""

    partition: Optional[str] = None
    time_min: int = 240
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    mem_gb: Optional[int] = None
    array_parallelism: int = 16


@dataclass
class SweepResult:
    out: Path
    manifest: dict
    reused: "list[str]" = field(default_factory=list)
    ran: "list[str]" = field(default_factory=list)
    failed: "dict[str, str]" = field(default_factory=dict)


def run_cell(run: str, config: "dict[str, Any]", out: str, progress: bool = False) -> str:
    """Run (or resume) one cell into ``out``; return the path of its completion record. Top-level
    and picklable: submitit runs it in another process."""
    from asbound.sweep.grid import config_class

    cls = config_class(run)
    if run == "score":
        from asbound.scoring import score

        score(cls(**config), out=out, progress=progress)
    else:
        from asbound.transfer import transfer

        transfer(cls(**config), out, progress=progress, printer=lambda line: None)
    done = Path(out) / DONE_FILE[run]
    if not done.exists():  # pragma: no cover - the runs write it last
        raise AsboundError(f"cell {out} finished without writing {DONE_FILE[run]}")
    return str(done)


def is_done(run: str, path: Path) -> bool:
    return (path / DONE_FILE[run]).exists()


def _resolved(run: str, base: "dict[str, Any]") -> "dict[str, Any]":
    """``base`` with every option it leaves out at its default: a sweep's identity does not depend
    on whether an option was written out (command line) or left out (API, grid file)."""
    import dataclasses

    from asbound.sweep.grid import config_class

    defaults = {f.name: f.default for f in dataclasses.fields(config_class(run))
                if f.default is not dataclasses.MISSING}
    return _normalised({**defaults, **base})


def _manifest(sweep: Sweep, command: Optional[str], executor: str) -> dict:
    return {
        "kind": sweep.kind,
        "command": command,
        "run": sweep.run,
        "axes": list(sweep.axes),
        "base": _resolved(sweep.run, sweep.base),
        "executor": executor,
        "cells": [{"name": c.name, "dir": c.name, "params": _normalised(c.params), "status": "pending",
                   "error": None} for c in sweep.cells],
        "versions": environment()["versions"],
    }


def _merge(old: Optional[dict], new: dict, out: Path) -> dict:
    """The manifest to write: ``new``, keeping the cells an earlier sweep into ``out`` recorded.
    An earlier sweep of another kind or with other shared options is refused."""
    if old is None:
        return new
    cells = old.get("cells") if isinstance(old, dict) else None
    if not (isinstance(cells, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in cells)):
        raise ResumeError(f"{out / MANIFEST} is not a readable asbound sweep; choose another --out")
    for key in ("kind", "run", "base"):
        a, b = old.get(key), new.get(key)
        if key == "base":  # the device may change: a sweep can be finished on another machine
            a = {k: v for k, v in (a or {}).items() if k != "device"}
            b = {k: v for k, v in b.items() if k != "device"}
        if a != b:
            if key == "base":
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:3])
                raise ResumeError(f"{out} holds a sweep with other shared settings ({shown}); choose another --out")
            raise ResumeError(f"{out} holds a {old.get(key)} sweep, not {new.get(key)}; choose another --out")
    cells = {c["name"]: c for c in old["cells"]}
    for c in new["cells"]:
        if c["name"] in cells and cells[c["name"]].get("params") != c["params"]:
            raise ResumeError(f"{out} holds a cell {c['name']} with other values "
                              f"({cells[c['name']].get('params')} vs {c['params']}); choose another --out")
        cells[c["name"]] = {**c, "status": cells.get(c["name"], c)["status"]}
    return {**new, "cells": list(cells.values())}


def _submitit(kind: str) -> Any:
    """The submitit module, or a one-line ConfigError naming the extra to install."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(f"--executor {kind} needs submitit, which is not installed; "
                          f"pip install 'asbound[slurm]'") from None
    return submitit


def _executor(kind: str, folder: Path, slurm: SlurmOptions) -> Any:
    submitit = _submitit(kind)
    if kind == "submitit-local":
        ex = submitit.AutoExecutor(folder=str(folder), cluster="local")
        ex.update_parameters(timeout_min=slurm.time_min)
        return ex
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params: "dict[str, Any]" = dict(timeout_min=slurm.time_min, gpus_per_node=slurm.gpus_per_node,
                                    cpus_per_task=slurm.cpus_per_task,
                                    slurm_array_parallelism=slurm.array_parallelism)
    if slurm.partition:
        params["slurm_partition"] = slurm.partition
    if slurm.mem_gb:
        params["mem_gb"] = slurm.mem_gb
    ex.update_parameters(**params)
    return ex


def run_sweep(
    sweep: Sweep,
    out: "str | os.PathLike",
    *,
    executor: str = "local",
    command: Optional[str] = None,
    progress: bool = True,
    slurm: SlurmOptions = SlurmOptions(),
    printer: "Callable[[str], None]" = print,
    poll_s: float = 1.0,
) -> SweepResult:
    """Run every cell of ``sweep`` not yet done into ``OUT/<cell>``; record them in ``OUT/sweep.json``.

    Cells that fail are recorded with their error and the others still run; the result names
    them. Bad input (an unknown option, a corruption that does not exist, an executor that is not
    installed) is refused before anything is written.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"executor {executor!r} is not valid; valid: {', '.join(EXECUTORS)}")
    sweep = sweep.validated()
    out = Path(out)
    if executor != "local":
        _submitit(executor)  # refused before anything is written
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is not a directory; give a directory path")
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) and not (out / MANIFEST).exists():
        raise ResumeError(f"{out} is not empty and holds no {MANIFEST}; choose another --out for the sweep")
    result = SweepResult(out=out, manifest={})
    with RunDir(out).locked():
        manifest = _merge(read_json(out / MANIFEST), _manifest(sweep, command, executor), out)
        by_name = {c["name"]: c for c in manifest["cells"]}

        def save() -> None:
            write_json(out / MANIFEST, manifest)

        todo: "list[Cell]" = []
        for cell in sweep.cells:
            if is_done(sweep.run, out / cell.name):
                by_name[cell.name].update(status="done", error=None)
                result.reused.append(cell.name)
            else:
                todo.append(cell)
        save()
        total = len(sweep.cells)
        if result.reused:
            printer(f"{len(result.reused)} of {total} cells already done in {out}: reused")

        def finish(cell: Cell, error: Optional[str]) -> None:
            by_name[cell.name].update(status="failed" if error else "done", error=error)
            (result.failed.__setitem__(cell.name, error) if error else result.ran.append(cell.name))
            save()
            done = total - len(todo) + len(result.ran) + len(result.failed)
            printer(f"[{done}/{total}] {cell.name}: " + (f"failed: {error}" if error else "done"))

        if executor == "local":
            for cell in todo:
                printer(f"cell {cell.name} ({', '.join(f'{k}={v}' for k, v in cell.params.items())})")
                try:
                    run_cell(sweep.run, cell.config, str(out / cell.name), progress)
                except AsboundError as exc:
                    finish(cell, " ".join(str(exc).split()))
                else:
                    finish(cell, None)
        elif todo:
            ex = _executor(executor, out / ".submitit", slurm)
            jobs = []
            with ex.batch():
                for cell in todo:
                    jobs.append(ex.submit(run_cell, sweep.run, cell.config, str((out / cell.name).resolve()), False))
            printer(f"submitted {len(jobs)} cells ({executor}); logs in {out / '.submitit'}")
            pending = dict(zip(range(len(jobs)), zip(todo, jobs)))
            while pending:
                for i, (cell, job) in list(pending.items()):
                    if job.done():
                        del pending[i]
                        try:
                            job.result()
                        except Exception as exc:  # a job's failure comes back as a submitit error
                            finish(cell, _job_error(exc))
                        else:
                            finish(cell, None)
                if pending:
                    time.sleep(poll_s)
    result.manifest = manifest
    return result


def _job_error(exc: BaseException) -> str:
    """The last line of a failed job's traceback (submitit wraps the cell's exception)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else type(exc).__name__
