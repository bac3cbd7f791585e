"""Figures from stored records (matplotlib, Agg): each saved as PNG and PDF side by side.

Kinds (``asbound plot RUN... --kind K --out FIG.png``):

* ``lhs-rhs``: Lemma 1's LHS against its RHS (the AS score) per run, with the diagonal LHS = RHS;
* ``margin-vs-sensitivity``: per datapoint, the sensitivity against the margin, the region where
  Theorem 2's criterion holds (sensitivity < margin) shaded; one panel per run (at most 6);
* ``shift``: AS, LHS and robust accuracy against corruption severity, per corruption;
* ``eps``: robust accuracy against the eps multiple, of all points and of the fulfilled ones;
* ``predict``: the AS ratio before transfer against the measured relative CE increase after LP.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from asbound.errors import ConfigError
from asbound.report.runs import Run, collect, labels, model_label

KINDS = ("lhs-rhs", "margin-vs-sensitivity", "shift", "eps", "predict")
ESTIMATE = "AS: PGD estimate (a lower bound)"


def _plt():  # noqa: ANN202 - pyplot, imported with the Agg backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lhs_rhs(runs: "list[Run]"):  # noqa: ANN201
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    pts = []
    names = labels(runs)
    models = list(dict.fromkeys(model_label(r) for r in runs))
    markers = "osD^v<>p"
    for run, name in zip(runs, names):
        s = run.summary
        if not s or s.get("lhs") is None:
            raise ConfigError(f"--kind lhs-rhs: {run.path} has no Lemma 1 LHS (an AS-only run or no score)")
        pts.append((s["as_score"], s["lhs"]))
        m = markers[models.index(model_label(run)) % len(markers)]
        ax.scatter(s["as_score"], s["lhs"], marker=m, s=40, label=name, zorder=3)
    xs, ys = np.array(pts).T
    lo, hi = min(xs.min(), ys.min()), max(xs.max(), ys.max())
    if hi / max(lo, 1e-12) > 100:
        ax.set_xscale("log")
        ax.set_yscale("log")
        grid = np.geomspace(max(lo, 1e-6) / 2, hi * 2, 50)
    else:
        grid = np.linspace(0, hi * 1.1, 50)
    ax.plot(grid, grid, "k--", lw=1, label="LHS = RHS")
    ax.fill_between(grid, grid, grid.max() * 10, color="tab:red", alpha=0.07, lw=0, label="LHS > RHS: Lemma 1 fails")
    if ax.get_yscale() == "log":
        ax.set_ylim(top=max(ys.max() * 1.5, grid.max() * 0.05))
    else:
        ax.set_xlim(0, hi * 1.1)
        ax.set_ylim(min(0.0, float(ys.min()) * 1.1), hi * 1.1)
    ax.set_xlabel(f"RHS = AS score ({ESTIMATE})")
    ax.set_ylabel("LHS = mean (adv. loss - loss) / (L ||W||)")
    ax.set_title("Lemma 1: LHS <= RHS (points below the diagonal)")
    ax.legend(fontsize=6, loc="upper left")
    return fig


def margin_sensitivity(runs: "list[Run]"):  # noqa: ANN201
    plt = _plt()
    shown = runs[:6]
    cols = min(3, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.2 * rows), squeeze=False, layout="constrained")
    for ax, run, name in zip(axes.flat, shown, labels(shown)):
        p = run.points()
        if "margin" not in p:
            raise ConfigError(f"--kind margin-vs-sensitivity: {run.path} has no margins (an AS-only run)")
        m, s = p["margin"].to_numpy(float), p["sensitivity"].to_numpy(float)
        wrong = m <= 0
        top = max(float(np.nanmax(s)), float(np.nanmax(m)), 1e-9) * 1.05
        grid = np.linspace(0, top, 50)
        ax.fill_between(grid, 0, grid, color="tab:green", alpha=0.12, lw=0, label="s < m: criterion holds")
        ax.plot(grid, grid, "k--", lw=0.8)
        ok = ~wrong
        ax.scatter(m[ok], s[ok], s=6, alpha=0.6, label="correct")
        if wrong.any():
            ax.scatter(np.clip(m[wrong], 0, None), s[wrong], s=6, alpha=0.6, color="tab:red",
                       label="misclassified (m <= 0, shown at 0)")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        held = float(np.mean(s < m))
        ax.set_title(f"{name}\nfulfilled {100 * held:.1f}%", fontsize=7)
        ax.set_xlabel("margin m_i")
        ax.set_ylabel("sensitivity s_i (PGD, lower bound)")
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("Theorem 2 per datapoint" + (f" (first 6 of {len(runs)} runs)" if len(runs) > 6 else ""))
    return fig


def _sweeps(runs: "list[Run]", kind: str) -> "dict[str, list[Run]]":
    groups: "dict[str, list[Run]]" = {}
    for r in runs:
        if r.sweep_kind != kind:
            raise ConfigError(f"--kind {kind}: {r.path} is not a cell of a {kind} sweep")
        groups.setdefault(str(r.sweep), []).append(r)
    return groups


def _acc(r: Run) -> "tuple[float, float]":
    s = r.summary or {}
    if r.kind == "transfer":
        pgd = r.record["test"].get("pgd") or {}
        return r.record["test"].get("clean_accuracy"), pgd[max(pgd, key=int)] if pgd else None
    return s.get("clean_accuracy"), s.get("robust_accuracy")


def shift(runs: "list[Run]"):  # noqa: ANN201
    plt = _plt()
    groups = _sweeps(runs, "shift")
    fig, axes = plt.subplots(len(groups), 3, figsize=(12, 3.4 * len(groups)), squeeze=False)
    for row, (sweep, members) in zip(axes, groups.items()):
        clean = [r for r in members if not r.params.get("corruption")]
        names = list(dict.fromkeys(r.params["corruption"] for r in members if r.params.get("corruption")))
        for name in names:
            cells = clean + sorted((r for r in members if r.params.get("corruption") == name),
                                   key=lambda r: r.params["severity"])
            sev = [r.params.get("severity") or 0 for r in cells]
            for ax, value in zip(row, (lambda r: (r.summary or {}).get("as_score"),
                                       lambda r: (r.summary or {}).get("lhs"), lambda r: _acc(r)[1])):
                ax.plot(sev, [value(r) for r in cells], "o-", label=name)
        setting = f"{model_label(members[0])} → {members[0].config.get('data')}"
        for ax, title in zip(row, ("AS score (PGD estimate)", "Lemma 1 LHS", "robust accuracy")):
            ax.set_title(f"{title}\n{setting}", fontsize=8)
            ax.set_xlabel("severity (0: clean)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def eps(runs: "list[Run]"):  # noqa: ANN201
    plt = _plt()
    groups = _sweeps(runs, "eps")
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
    for ax, (sweep, members) in zip(axes[0], groups.items()):
        cells = sorted(members, key=lambda r: float(r.params["multiple"]))
        p0 = cells[0].points()
        fulfilled = set(p0.loc[p0["fulfilled"].astype(bool), "index"])
        mult = [float(r.params["multiple"]) for r in cells]
        every = [_acc(r)[1] for r in cells]
        sub = []
        for r in cells:
            p = r.points()
            q = p[p["index"].isin(fulfilled)]
            sub.append(float(q["robust"].astype(bool).mean()) if len(q) else np.nan)
        ax.plot(mult, every, "o-", label="all points")
        ax.plot(mult, sub, "s-", label=f"fulfilled at x{mult[0]:g} ({len(fulfilled)} points)")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(mult)
        ax.set_xlabel(f"eps multiple ({', '.join(r.params['eps_text'] for r in cells)})")
        ax.set_ylabel("robust accuracy (PGD on the loss)")
        ax.set_title(f"{model_label(cells[0])} → {cells[0].config.get('data')}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def predict(runs: "list[Run]"):  # noqa: ANN201
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5))
    titles = []
    for r in runs:
        if r.kind != "predict":
            raise ConfigError(f"--kind predict: {r.path} is not an 'asbound predict' directory")
        tasks = [t for t in r.record["tasks"] if t.get("measured") and t["measured"].get("relative_ce") is not None]
        if not tasks:
            raise ConfigError(f"--kind predict: {r.path} has no measured tasks; run asbound predict with --measure lp")
        x = [t["ratio"] for t in tasks]
        y = [t["measured"]["relative_ce"] for t in tasks]
        ax.scatter(x, y, s=25, label=model_label(r), zorder=3)
        for t, a, b in zip(tasks, x, y):
            ax.annotate(t["label"], (a, b), fontsize=5, alpha=0.7, xytext=(2, 2), textcoords="offset points")
        s = (r.record.get("spearman") or {}).get("ratio_vs_relative_ce")
        if s:
            titles.append(f"{model_label(r)}: Spearman rho {s['rho']:.2f} (n {s['n']})")
    ax.set_xlabel(f"predicted: AS(downstream) / AS(pretraining) ({ESTIMATE})")
    ax.set_ylabel("measured after LP: (robust CE - CE) / CE")
    ax.set_title("Prediction before transfer\n" + "; ".join(titles), fontsize=8)
    ax.legend(fontsize=7)
    return fig


BUILDERS: "dict[str, Callable[[list[Run]], object]]" = {
    "lhs-rhs": lhs_rhs, "margin-vs-sensitivity": margin_sensitivity, "shift": shift, "eps": eps, "predict": predict,
}


def plot(paths: "Iterable[str | os.PathLike]", kind: str, out: "str | os.PathLike") -> "list[Path]":
    """Draw ``kind`` from the runs under ``paths``; save ``out`` as PNG and PDF; return both paths."""
    if kind not in BUILDERS:
        raise ConfigError(f"plot kind {kind!r} is not valid; valid: {', '.join(KINDS)}")
    out = Path(out)
    if out.suffix not in (".png", ".pdf"):
        raise ConfigError(f"--out {out} must end in .png or .pdf (both are written)")
    runs, _ = collect(paths)
    if not runs:
        raise ConfigError("no finished runs to plot")
    fig = BUILDERS[kind](runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".pdf"):
        path = out.with_suffix(suffix)
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if suffix == ".pdf" else None)
        written.append(path)
    _plt().close(fig)
    return written
