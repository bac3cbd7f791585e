"""Sweeps as grids of cells: each cell is the config of one ordinary ``score`` or ``transfer`` run.

Kinds (``docs/RECORDS.md``):

* ``shift``: an uncorrupted baseline cell, then every corruption at every severity (seed 001 B.5,
  Tables 12 and 13);
* ``eps``: eps times each multiple (seed 001 B.3, Table 8);
* ``resize``: each input side (seed 001 B.5, Table 10);
* ``grid``: the cartesian product of the lists in a TOML grid file.

Nothing here runs anything: :func:`asbound.sweep.engine.run_sweep` does.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from asbound.errors import ConfigError
from asbound.specs import parse_eps

KINDS = ("shift", "eps", "resize", "grid")
RUNS = ("score", "transfer")
#: the keys of a grid file
GRID_KEYS = ("run", "base", "grid", "cases")


def config_class(run: str) -> type:
    """The config dataclass of a cell: ScoreConfig or TransferConfig."""
    if run == "score":
        from asbound.scoring import ScoreConfig

        return ScoreConfig
    if run == "transfer":
        from asbound.transfer import TransferConfig

        return TransferConfig
    raise ConfigError(f"run {run!r} is not valid; valid: {', '.join(RUNS)}")


def config_keys(run: str) -> "tuple[str, ...]":
    return tuple(f.name for f in dataclasses.fields(config_class(run)))


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: ``name`` (its directory under the sweep's), the axis values that set it
    apart (``params``) and its whole config (the sweep's base with ``params`` applied)."""

    name: str
    params: "dict[str, Any]"
    config: "dict[str, Any]"


@dataclass(frozen=True)
class Sweep:
    kind: str
    run: str
    axes: "tuple[str, ...]"
    base: "dict[str, Any]"
    cells: "tuple[Cell, ...]"

    def validated(self) -> "Sweep":
        """Every cell's config checked as its run would check it (nothing is loaded)."""
        cls = config_class(self.run)
        if not self.cells:
            raise ConfigError(f"the {self.kind} sweep has no cells; give at least one value per axis")
        names = [c.name for c in self.cells]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"the {self.kind} sweep names cells twice ({', '.join(twice)}); give distinct values")
        for cell in self.cells:
            cfg = cls(**cell.config).validated()
            if self.run == "transfer" and len(cfg.methods) != 1:
                raise ConfigError(f"a transfer cell runs one method; cell {cell.name} has method {cfg.method!r} "
                                  f"(make the method an axis of the grid instead)")
        return self


def _slug(value: Any) -> str:
    text = "none" if value is None else format(value) if not isinstance(value, float) else f"{value:g}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _refuse_unknown(keys: Iterable[str], run: str, where: str) -> None:
    """A ConfigError naming the keys that are no option of a ``run`` cell, and the valid ones."""
    valid = config_keys(run)
    unknown = sorted(set(keys) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown {run} option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}; valid: {', '.join(valid)}")


def _check_base(run: str, base: Mapping[str, Any], what: str) -> "dict[str, Any]":
    _refuse_unknown(base, run, what)
    for key in ("model", "data"):
        if not base.get(key):
            raise ConfigError(f"{what}: give --{key} (the sweep's cells need a model and data)")
    return dict(base)


def shift_sweep(base: Mapping[str, Any], corruptions: Sequence[str], severities: Sequence[int], *,
                run: str = "score", params: str = "auto") -> Sweep:
    """The uncorrupted baseline and every corruption at every severity."""
    base = _check_base(run, base, "sweep shift")
    if not corruptions or not severities:
        raise ConfigError("sweep shift needs at least one --corruption and one --severity")
    from asbound.data.corruptions import parse_corruption

    for name in corruptions:
        for s in severities:
            parse_corruption(name, s, params)
    base = {**base, "corruption": None, "severity": None, "corruption_params": params}
    cells = [Cell("clean", {"corruption": None, "severity": 0}, dict(base))]
    for name in corruptions:
        for s in severities:
            cells.append(Cell(f"{name}-{s}", {"corruption": name, "severity": s},
                              {**base, "corruption": name, "severity": s}))
    return Sweep("shift", run, ("corruption", "severity"), base, tuple(cells))


def scaled_eps(eps: "str | float", multiple: "int | float", norm: str = "inf") -> "tuple[float, str]":
    """``multiple * eps`` as a float and as text: ``8/255`` x 2 -> ``16/255`` (a fraction keeps its
    denominator when the multiple is whole)."""
    value = parse_eps(eps, norm)
    if isinstance(eps, str) and "/" in eps and float(multiple).is_integer():
        num, den = (part.strip() for part in eps.split("/"))
        frac = Fraction(num) * int(multiple)
        if frac.denominator == 1:
            text = f"{frac.numerator}/{den}"
            return parse_eps(text, norm), text
    scaled = value * float(multiple)
    return scaled, f"{scaled:.6g}"


def whole(value: "int | float") -> "int | float":
    """1.0 -> 1 (a multiple read as a float prints as it was written)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def eps_sweep(base: Mapping[str, Any], eps: "str | float", multiples: Sequence["int | float"], *,
              run: str = "score") -> Sweep:
    """One cell per multiple of ``eps``; every cell scores the same datapoints (same n and seed),
    so per-datapoint results join on ``index`` (seed 001 Table 8)."""
    base = _check_base(run, base, "sweep eps")
    if not multiples:
        raise ConfigError("sweep eps needs at least one --multiples value")
    bad = [m for m in multiples if not (isinstance(m, (int, float)) and m > 0)]
    if bad:
        raise ConfigError(f"eps multiples must be numbers > 0, got {', '.join(map(str, bad))}")
    norm = str(base.get("norm", "inf"))
    parse_eps(eps, norm)
    cells = []
    for m in map(whole, multiples):
        value, text = scaled_eps(eps, m, norm)
        cells.append(Cell(f"eps-x{_slug(m)}", {"eps": value, "eps_text": text, "multiple": m},
                          {**base, "eps": text}))
    return Sweep("eps", run, ("eps",), {**base, "eps": str(eps)}, tuple(cells))


def resize_sweep(base: Mapping[str, Any], sizes: Sequence[int], *, run: str = "score") -> Sweep:
    """One cell per input side (images resized to SIDE x SIDE before the model)."""
    base = _check_base(run, base, "sweep resize")
    if not sizes:
        raise ConfigError("sweep resize needs at least one --sizes value")
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad:
        raise ConfigError(f"sizes must be whole numbers >= 1, got {', '.join(map(str, bad))}")
    cells = [Cell(f"resize-{s}", {"resize": s}, {**base, "resize": s}) for s in sizes]
    return Sweep("resize", run, ("resize",), base, tuple(cells))


def product_sweep(base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]], *, run: str = "score",
                  what: str = "grid", cases: Sequence[Mapping[str, Any]] = ()) -> Sweep:
    """The cartesian product of ``grid``'s lists (in the order the keys are given), times each of
    ``cases`` (option sets that go together, e.g. a data set with its classes)."""
    base = dict(base)
    _refuse_unknown(grid, run, f"{what} [grid]")
    for i, case in enumerate(cases):
        if not isinstance(case, Mapping) or not case:
            raise ConfigError(f"{what}: [[cases]] entry {i + 1} must be a non-empty table of options")
        _refuse_unknown(case, run, f"{what} [[cases]] entry {i + 1}")
        both = sorted(set(case) & set(grid))
        if both:
            raise ConfigError(f"{what}: {', '.join(both)} is both a [grid] axis and set by [[cases]] entry {i + 1}")
    axes = tuple(grid) + tuple(dict.fromkeys(k for case in cases for k in case))
    values = []
    for key in grid:
        v = grid[key]
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{what}: [grid] {key} must be a non-empty list, got {v!r}")
        values.append(v)
    cells = []
    for combo in itertools.product(*values):
        for case in (cases or [{}]):
            params = {**dict(zip(grid, combo)), **case}
            _check_base(run, {**base, **params}, what)
            name = "__".join(f"{k}={_slug(v)}" for k, v in params.items()) or "base"
            cells.append(Cell(name, params, {**base, **params}))
    return Sweep("grid", run, axes, base, tuple(cells))


def _load_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"grid file {str(path)!r} does not exist; give a TOML file with run, [base] and [grid]") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"grid file {str(path)!r} is not valid TOML: {' '.join(str(exc).split())}") from None


def grid_sweep(path: "str | Path", overrides: Optional[Mapping[str, Any]] = None) -> Sweep:
    """A grid file::

        run = "score"                 # or "transfer"
        [base]                        # options every cell shares (ScoreConfig / TransferConfig fields)
        model = "builtin:digits-adversarial"
        data = "digits"
        n = 200
        [grid]                        # lists; one cell per combination
        eps = ["1/255", "2/255"]
        seed = [0, 1]
        [[cases]]                     # optional: option sets that go together, each crossed with [grid]
        data = "digits"
        classes = "5-9"
        [[cases]]
        data = "dsprites:shape"

    ``overrides`` (e.g. ``device`` from the command line) replace base values.
    """
    path = Path(path)
    doc = _load_toml(path)
    unknown = sorted(set(doc) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"grid file {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"valid: {', '.join(GRID_KEYS)}")
    run = doc.get("run", "score")
    if run not in RUNS:
        raise ConfigError(f"grid file {path}: run {run!r} is not valid; valid: {', '.join(RUNS)}")
    base, grid, cases = doc.get("base", {}), doc.get("grid", {}), doc.get("cases", [])
    if not isinstance(cases, list):
        raise ConfigError(f"grid file {path}: cases must be an array of tables ([[cases]])")
    for key, table in (("base", base), ("grid", grid)):
        if not isinstance(table, dict):
            raise ConfigError(f"grid file {path}: [{key}] must be a table of options")
    _refuse_unknown(base, run, f"grid file {path} [base]")
    if "eval_steps" in base and isinstance(base["eval_steps"], list):
        base = {**base, "eval_steps": tuple(base["eval_steps"])}
    base = {**base, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return product_sweep(base, grid, run=run, what=f"grid file {path}", cases=cases)


def parse_list(text: str, kind: type, what: str) -> list:
    """``"1,2,5"`` -> [1, 2, 5]; a value that is not a ``kind`` is a ConfigError naming ``what``."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what} must list at least one value, got {text!r}")
    out = []
    for item in items:
        try:
            out.append(kind(item))
        except ValueError:
            noun = "whole numbers" if kind is int else "numbers"
            raise ConfigError(f"{what} must be {noun} separated by commas, got {item!r}") from None
    return out
