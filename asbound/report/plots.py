"""Figures from stored records (matplotlib, Agg): each saved as PNG and PDF side by side.

Kinds (``asbound plot RUN... --kind K --out FIG.png``):

* ``lhs-rhs``: Lemma 1's LHS against its RHS (the AS score) per run, with the diagonal LHS = RHS
  (colour: downstream data; marker: pretraining; runs that share both numbered, with a key below);
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
from asbound.records import write_output
from asbound.report.console import UNDEFINED_RATIO
from asbound.report.runs import (
    Run,
    attack_text,
    collect,
    data_label,
    labels,
    model_label,
    pretraining_label,
    robust_accuracy,
    settings,
)

KINDS = ("lhs-rhs", "margin-vs-sensitivity", "shift", "eps", "predict")


def _plt():  # noqa: ANN202 - pyplot, imported with the Agg backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lhs_rhs(runs: "list[Run]"):  # noqa: ANN201
    """Lemma 1 per run. Colour: the downstream data; marker: the pretrained representation. Where
    runs share both (another method, eps, weight decay, ...), each point is numbered and the key
    below names what sets it apart; runs whose markers overlap carry one label with all their
    numbers (``1,7``), and the title names runs at one point, so that no run hides another."""
    plt = _plt()
    from matplotlib.lines import Line2D

    pts = []
    for run in runs:
        s = run.summary
        if not s or s.get("lhs") is None or s.get("as_score") is None:
            raise ConfigError(f"--kind lhs-rhs: {run.path} lacks lhs (an AS-only run or no score after transfer); "
                              f"give runs with Lemma 1's terms")
        pts.append((float(s["as_score"]), float(s["lhs"])))
    pre = [pretraining_label(r) for r in runs]
    data = [data_label(r) for r in runs]
    extra = settings(runs)
    pre_names, data_names = list(dict.fromkeys(pre)), list(dict.fromkeys(data))
    markers = "osD^v<>pPX*h"
    colours = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    style = [dict(marker=markers[pre_names.index(p) % len(markers)], color=colours[data_names.index(d) % len(colours)])
             for p, d in zip(pre, data)]
    at: "dict[tuple[str, str], list[int]]" = {}  # runs drawn at one point
    for i, (x, y) in enumerate(pts):
        at.setdefault((f"{x:.3g}", f"{y:.3g}"), []).append(i)
    number = len(set(zip(pre, data))) < len(runs) or len(at) < len(runs) or any(extra)

    key = []
    fig, ax = plt.subplots(figsize=(8.0, 6.4 + (0.14 * ((len(runs) + 1) // 2) if number else 0.4)),
                           layout="constrained")
    for i, xy in enumerate(pts):
        ax.scatter(*xy, s=38, zorder=3, edgecolors="k", linewidths=0.5, alpha=0.85, **style[i])
    xs, ys = np.array(pts, dtype=float).T
    positive = np.concatenate([xs[xs > 0], ys[ys > 0]])
    lo = float(positive.min()) if positive.size else 1e-3
    hi = float(max(xs.max(), ys.max(), lo))
    log = bool(np.all(xs > 0) and np.all(ys > 0) and hi / lo > 10)  # more than a decade: log axes
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        grid = np.geomspace(lo / 1.5, hi * 1.5, 100)
        ax.set_xlim(lo / 1.5, hi * 1.5)
        ax.set_ylim(lo / 1.5, hi * 1.5)
    else:
        grid = np.linspace(0, hi * 1.1, 100)
        ax.set_xlim(0, hi * 1.1)
        ax.set_ylim(min(0.0, float(ys.min()) * 1.1), hi * 1.1)
    ax.set_aspect("equal", adjustable="box")
    ax.plot(grid, grid, "k--", lw=1)
    ax.fill_between(grid, grid, grid.max() * 10, color="tab:red", alpha=0.07, lw=0)
    ax.set_xlabel("RHS = AS score (mean sensitivity; PGD estimate, a lower bound)" + (" [log]" if log else ""),
                  fontsize=8)
    ax.set_ylabel("LHS = mean (adv. loss - loss) / (L ||W||)" + (" [log]" if log else ""), fontsize=8)
    shared = [",".join(str(k + 1) for k in m) for m in at.values() if len(m) > 1]
    ax.set_title(f"Lemma 1 per run: LHS <= RHS below the diagonal ({int(np.sum(ys <= xs))} of {len(runs)} runs)"
                 + (f"\nruns at one point (to 3 digits), one marker over the other: {'; '.join(shared)}"
                    if shared else "")
                 + "\nRHS from PGD is an estimate: the lemma is checked against a lower bound of its right-hand side",
                 fontsize=8)
    handles = [Line2D([], [], ls="", marker="s", ms=6, color=colours[k % len(colours)], label=name)
               for k, name in enumerate(data_names)]
    handles += [Line2D([], [], ls="", marker=markers[k % len(markers)], ms=6, color="0.6", markeredgecolor="k",
                       label=name) for k, name in enumerate(pre_names)]
    handles += [Line2D([], [], ls="--", color="k", label="LHS = RHS"),
                plt.Rectangle((0, 0), 1, 1, color="tab:red", alpha=0.15, label="LHS > RHS: Lemma 1 fails")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", title="colour: downstream data; marker: pretraining",
              title_fontsize=7, frameon=True, framealpha=0.9)
    if number:
        for i, (p, d, e) in enumerate(zip(pre, data, extra)):
            key.append(Line2D([], [], ls="", markeredgecolor="k", ms=5, **style[i],
                              label=f"{i + 1}  {p} → {d}" + (f" ({e})" if e else "")))
        fig.legend(handles=key, loc="outside lower center", ncol=2 if len(key) > 3 else 1, fontsize=6.5,
                   frameon=False, columnspacing=1.5, handletextpad=0.3)
        _numbers(fig, ax, pts)
    return fig


def _numbers(fig, ax, pts: "list[tuple[float, float]]") -> None:  # noqa: ANN001
    """Number each point (1, 2, ...) beside it; points whose markers overlap (centres within 4
    points) share one label (``1,7``). Each label goes to the first of eight places around its
    point (then eight further out, with a leader line) where it covers no other label and no point:
    a greedy placement in display space, once the layout is fixed."""
    fig.draw_without_rendering()
    px_per_pt = fig.dpi / 72.0
    dots = [ax.transData.transform(xy) for xy in pts]
    groups: "list[list[int]]" = []
    for i, (px, py) in enumerate(dots):
        near = next((g for g in groups if np.hypot(*(dots[g[0]] - (px, py))) < 4 * px_per_pt), None)
        near.append(i) if near is not None else groups.append([i])
    boxes: "list[tuple[float, float, float, float]]" = []
    for group in groups:
        text = ",".join(str(k + 1) for k in group)
        px, py = dots[group[0]]
        w, h = 4.3 * len(text) + 1, 7.0  # points, at fontsize 7
        places = []
        for r in (4.5, 14.0):
            for ux, uy in ((1, 0.3), (1, -1), (-1, 0.3), (-1, -1), (0, 1), (0, -1.6), (1, 1), (-1, 1)):
                dx = r * ux - (w if ux < 0 else w / 2 if ux == 0 else 0)
                dy = r * uy - (h / 2 if uy == 0.3 else 0) - (h if uy < 0 and ux != 0 else 0)
                places.append((dx, dy, r > 5))
        best, best_cost = places[0], None
        for dx, dy, far in places:
            box = (px + dx * px_per_pt, py + dy * px_per_pt, px + (dx + w) * px_per_pt, py + (dy + h) * px_per_pt)
            cost = sum(_overlap(box, b) for b in boxes) + sum(
                _overlap(box, (qx - 4 * px_per_pt, qy - 4 * px_per_pt, qx + 4 * px_per_pt, qy + 4 * px_per_pt))
                for qx, qy in dots)
            if best_cost is None or cost < best_cost - 1e-9:
                best, best_cost = (dx, dy, far), cost
            if cost == 0:
                break
        dx, dy, far = best
        boxes.append((px + dx * px_per_pt, py + dy * px_per_pt, px + (dx + w) * px_per_pt, py + (dy + h) * px_per_pt))
        ax.annotate(text, pts[group[0]], xytext=(dx, dy), textcoords="offset points", fontsize=7, zorder=4,
                    va="bottom",
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="0.35", shrinkA=0, shrinkB=3) if far else None)


def _overlap(a: "tuple[float, float, float, float]", b: "tuple[float, float, float, float]") -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def margin_sensitivity(runs: "list[Run]"):  # noqa: ANN201
    plt = _plt()
    shown = runs[:6]
    cols = min(3, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows), squeeze=False, layout="constrained")
    for ax, run, name in zip(axes.flat, shown, labels(shown)):
        p = run.points()
        if "margin" not in p or "robust" not in p:
            raise ConfigError(f"--kind margin-vs-sensitivity: {run.path} lacks margin in points.csv (a regression "
                              f"or AS-only run); give classification runs scored with labels")
        m, s = p["margin"].to_numpy(float), p["sensitivity"].to_numpy(float)
        robust = p["robust"].astype(bool).to_numpy()
        finite = np.isfinite(m)
        wrong = m <= 0
        top = max(float(np.nanmax(s)), float(np.max(m[finite & ~wrong], initial=0.0)), 1e-9) * 1.05
        left = min(0.0, float(np.min(m[finite], initial=0.0)))
        left = left - 0.03 * (top - left) if left < 0 else 0.0
        m_shown = np.where(finite, m, np.where(m > 0, top, left))  # infinite margins at the edges
        grid = np.linspace(0, top, 50)
        ax.fill_between(grid, 0, grid, color="tab:green", alpha=0.12, lw=0, label="s < m: criterion holds")
        if left < 0:
            ax.axvspan(left, 0, color="0.85", lw=0, zorder=0, label="m <= 0: misclassified")
        ax.plot(grid, grid, "k--", lw=0.8)
        for mask, style in (
            (~wrong & robust, dict(s=6, alpha=0.6, color="tab:blue", label="robust")),
            (~wrong & ~robust, dict(s=10, alpha=0.8, color="tab:orange", marker="^", label="correct, not robust")),
            (wrong, dict(s=14, alpha=0.8, color="tab:red", marker="x", label="misclassified")),
        ):
            if mask.any():
                ax.scatter(m_shown[mask], s[mask], **style)
        ax.set_xlim(left, top)
        ax.set_ylim(0, top)
        summary = run.summary or {}
        held = summary.get("prop_fulfilled")
        held = float(np.mean(s < m)) if held is None else held
        racc = summary.get("robust_accuracy")
        racc = float(np.mean(robust)) if racc is None else racc
        note = f"; {int((~finite).sum())} infinite margins at the edge" if (~finite).any() else ""
        ax.set_title(f"{name}\nfulfilled {100 * held:.1f}%, robust {100 * racc:.1f}% of {len(p)} points{note}",
                     fontsize=7)
        ax.set_xlabel("margin m_i (distance to the decision boundary in g-space)", fontsize=8)
        ax.set_ylabel("sensitivity s_i (PGD estimate, a lower bound)", fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="tab:green", alpha=0.25, label="s < m: the criterion holds (robust by Theorem 2)"),
                        Patch(color="0.85", label="m <= 0: misclassified"),
                        Line2D([], [], ls="", marker="o", ms=3, color="tab:blue", label="robust (PGD)"),
                        Line2D([], [], ls="", marker="^", ms=4, color="tab:orange", label="correct, not robust"),
                        Line2D([], [], ls="", marker="x", ms=4, color="tab:red", label="misclassified")],
               loc="outside lower center", ncol=5, fontsize=7, frameon=False)
    attacks = sorted({attack_text(r.summary) for r in shown if r.summary})
    fig.suptitle("Theorem 2 per datapoint: s_i < m_i implies robust (s_i from PGD: a lower bound, so the "
                 "criterion is estimated)" + (f"; first 6 of {len(runs)} runs" if len(runs) > 6 else "")
                 + (f"\nattack: {attacks[0]} (a stronger attack finds larger s_i: fewer fulfilled points)"
                    if len(attacks) == 1 else ""), fontsize=9)
    return fig


def _sweeps(runs: "list[Run]", kind: str) -> "dict[str, list[Run]]":
    groups: "dict[str, list[Run]]" = {}
    for r in runs:
        if r.sweep_kind != kind:
            raise ConfigError(f"--kind {kind}: {r.path} is not a cell of a {kind} sweep")
        groups.setdefault(str(r.sweep), []).append(r)
    return groups


def _acc(r: Run) -> "tuple[float, float]":
    """Clean and robust accuracy: a transfer run's on its test split (as the transfer table counts
    it), a score run's over its scored points."""
    s = r.summary or {}
    if r.kind == "transfer":
        return r.record["test"].get("clean_accuracy"), robust_accuracy(r.record["test"])[0]
    return s.get("clean_accuracy"), s.get("robust_accuracy")


def shift(runs: "list[Run]"):  # noqa: ANN201
    plt = _plt()
    groups = _sweeps(runs, "shift")
    fig, axes = plt.subplots(len(groups), 3, figsize=(12, 3.6 * len(groups)), squeeze=False, layout="constrained")
    for row, (sweep, members) in zip(axes, groups.items()):
        severities: "set[int]" = set()
        clean = [r for r in members if not r.params.get("corruption")]
        names = list(dict.fromkeys(r.params["corruption"] for r in members if r.params.get("corruption")))
        for name in names:
            cells = clean + sorted((r for r in members if r.params.get("corruption") == name),
                                   key=lambda r: r.params["severity"])
            sev = [r.params.get("severity") or 0 for r in cells]
            severities.update(sev)
            for ax, value in zip(row, (lambda r: (r.summary or {}).get("as_score"),
                                       lambda r: (r.summary or {}).get("lhs"), lambda r: _acc(r)[1])):
                ax.plot(sev, [np.nan if value(r) is None else value(r) for r in cells], "o-", label=name)
        setting = f"{model_label(members[0])} → {members[0].config.get('data')}"
        for ax, (title, ylabel) in zip(row, (("AS score", "AS (PGD estimate, a lower bound)"),
                                             ("Lemma 1 LHS", "mean (adv. loss - loss) / (L ||W||)"),
                                             ("robust accuracy", "robust accuracy (PGD: an upper bound)"))):
            ax.set_title(f"{title}\n{setting}", fontsize=8)
            ax.set_xlabel("corruption severity (0: uncorrupted)")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_xticks(sorted(severities))
            ax.legend(fontsize=7)
    fig.suptitle("Distribution shift: metrics against corruption severity (AS from PGD is a lower bound)", fontsize=9)
    return fig


def eps(runs: "list[Run]"):  # noqa: ANN201
    plt = _plt()
    groups = _sweeps(runs, "eps")
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.0), squeeze=False, layout="constrained")
    for ax, (sweep, members) in zip(axes[0], groups.items()):
        cells = sorted(members, key=lambda r: float(r.params["multiple"]))
        p0 = cells[0].points()
        if "fulfilled" not in p0:
            raise ConfigError(f"--kind eps: {cells[0].path} lacks fulfilled in points.csv (a regression or AS-only "
                              f"run)")
        fulfilled = set(p0.loc[p0["fulfilled"].astype(bool), "index"])
        mult = [float(r.params["multiple"]) for r in cells]
        every = [_acc(r)[1] for r in cells]
        sub = []
        for r in cells:
            p = r.points()
            q = p[p["index"].isin(fulfilled)]
            sub.append(float(q["robust"].astype(bool).mean()) if len(q) else np.nan)
        ax.plot(mult, [np.nan if v is None else v for v in every], "o-", label=f"all points ({len(p0)})")
        ax.plot(mult, sub, "s-", label=f"fulfilled at x{mult[0]:g}: s_i < m_i ({len(fulfilled)} points)")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(mult)
        ax.set_xlabel(f"eps multiple ({', '.join(r.params['eps_text'] for r in cells)})")
        ax.set_ylabel("robust accuracy (PGD: an upper bound)", fontsize=8)
        ax.set_title(f"{model_label(cells[0])} → {cells[0].config.get('data')}", fontsize=8)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Theorem 2 beyond eps: robust accuracy of the points fulfilling the criterion at the first "
                 "multiple\n(s_i from PGD, a lower bound: the criterion is an estimate)", fontsize=9)
    return fig


def predict(runs: "list[Run]"):  # noqa: ANN201
    from asbound.predict import p_text  # torch, through scoring: only where a prediction is drawn

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 5.4), layout="constrained")
    titles = []
    thresholds = set()
    for r in runs:
        if r.kind != "predict":
            raise ConfigError(f"--kind predict: {r.path} is not an 'asbound predict' directory")
        measured = [t for t in r.record["tasks"] if t.get("measured") and t["measured"].get("relative_ce") is not None]
        if not measured:
            raise ConfigError(f"--kind predict: {r.path} has no measured tasks; run asbound predict with --measure lp")
        tasks = [t for t in measured if t.get("ratio") is not None]  # undefined where the pretraining AS is 0
        if not tasks:
            raise ConfigError(f"--kind predict: {r.path} has no AS ratio to plot: "
                              + UNDEFINED_RATIO.format(r.record["pretrain"]["label"]))
        if r.record.get("threshold") is not None:
            thresholds.add(float(r.record["threshold"]))
        x = [t["ratio"] for t in tasks]
        y = [t["measured"]["relative_ce"] for t in tasks]
        ax.scatter(x, y, s=25, label=model_label(r), zorder=3)
        for t, a, b in zip(tasks, x, y):
            ax.annotate(t["label"], (a, b), fontsize=5, alpha=0.7, xytext=(2, 2), textcoords="offset points")
        s = (r.record.get("spearman") or {}).get("ratio_vs_relative_ce")
        left = len(measured) - len(tasks)
        left_out = f"; {left} task{'s' if left > 1 else ''} without a ratio left out" if left else ""
        if s:
            titles.append(f"{model_label(r)}: Spearman rho {s['rho']:.2f} ({p_text(s)}; {s['n']} tasks){left_out}")
        else:
            titles.append(f"{model_label(r)}: no Spearman rho (fewer than 3 measured tasks){left_out}")
    for threshold in sorted(thresholds):
        ax.axvline(threshold, color="0.4", ls=":", lw=1, label=f"threshold {threshold:g}: 'transfers' left of it")
    ax.set_xlabel("predicted: AS(downstream) / AS(pretraining) (both PGD estimates, lower bounds)")
    ax.set_ylabel("measured after LP: (robust CE - CE) / CE")
    ax.set_title("Prediction before transfer: AS ratio against the measured CE increase\n" + "\n".join(titles),
                 fontsize=8)
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
    paths = list(paths)
    runs, _ = collect(paths)
    if not runs:
        raise ConfigError("no finished runs to plot")
    try:
        fig = BUILDERS[kind](runs)
    except KeyError as exc:  # a record without a field the figure reads
        raise ConfigError(f"--kind {kind}: the records under {', '.join(map(str, paths))} lack {exc} "
                          f"(not the asbound record format; docs/RECORDS.md)") from exc
    written = []
    try:
        for suffix in (".png", ".pdf"):
            written.append(write_output(out.with_suffix(suffix), lambda f, fmt=suffix[1:]: fig.savefig(
                f, format=fmt, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if fmt == "pdf" else None)))
    finally:
        _plt().close(fig)
    return written
