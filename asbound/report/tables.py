"""Seed 001's tables from stored records, as pandas DataFrames, rendered to Markdown, LaTeX
(booktabs) or CSV with their provenance.

Styles (``asbound table RUN... --style S``):

=========== ====================================================================================
lemma1      Tables 1, 2, 7: Diff. loss, ||W||, Lemma 1 LHS, AS score (= RHS), one column per run
theorem2    Table 3: clean accuracy, robust accuracy, prop. fulfilled, rob. fulfilled
transfer    Tables 5, 9: per method and downstream task: Acc, RAcc, AS after, Diff. CE, ||W||
shift       Tables 12, 13: per corruption, one column per severity (the clean data first)
eps         Table 8: robust accuracy at each eps multiple, of all points and of the points that
            fulfil the Theorem 2 criterion at the first multiple (joined on ``index``)
resize      Table 10: one row per input size
predict     Table 4: AS before transfer, its ratio, the verdict, the measured CE after LP
certify     runs of ``score --certify``: the certified RHS mean(s_upper) against the PGD AS, their
            ratio (tightness), prop. certified against prop. fulfilled
=========== ====================================================================================

Every AS is a PGD estimate (a lower bound on the sensitivity), so every RHS is an estimate.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import pandas as pd

from asbound.errors import ConfigError
from asbound.report.runs import Run, collect, data_label, labels, model_label, relative

STYLES = ("lemma1", "theorem2", "transfer", "shift", "eps", "resize", "predict", "certify")
FORMATS = ("md", "tex", "csv")
WIDE = 6  # more runs than this: one row per run instead of one column
NOTE = "AS is a PGD estimate (a lower bound on the sensitivity): RHS and every bound built on it are estimates."


@dataclass
class Block:
    title: str
    frame: pd.DataFrame
    notes: "list[str]" = field(default_factory=list)


@dataclass
class Rendered:
    blocks: "list[Block]"
    sources: "list[str]"
    notes: "list[str]"


def pct(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def num(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{digits}g}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits + 1}g}"


def _need(run: Run, record: Optional[dict], keys: "Iterable[str]", style: str) -> dict:
    """``record`` with ``keys``, or a ConfigError naming the run and the missing field."""
    if record is None:
        raise ConfigError(f"--style {style}: {run.path} has no score summary (a transfer run without its score "
                          f"after transfer, or a prediction); give score or transfer runs")
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        why = f" ({record['task_note']})" if record.get("task_note") else ""
        raise ConfigError(f"--style {style}: {run.path} lacks {', '.join(missing)}{why}; give runs that have them")
    return record


def _loss_name(s: dict) -> str:
    return "Diff. CE" if s.get("loss") == "cross_entropy" else "Diff. loss"


def lemma1(runs: "list[Run]") -> "list[Block]":
    cols = labels(runs)
    rows: "dict[str, list[str]]" = {}
    names = set()
    for run in runs:
        s = _need(run, run.summary, ("loss_diff", "head_norm", "lhs", "as_score"), "lemma1")
        names.add(_loss_name(s))
        rows.setdefault("diff", []).append(num(s["loss_diff"]))
        rows.setdefault("norm", []).append(f"{num(s['head_norm'])} ({s['head_norm_name']})")
        rows.setdefault("lhs", []).append(num(s["lhs"]))
        rows.setdefault("as", []).append(num(s["as_score"]))
        rows.setdefault("holds", []).append("yes" if s["lhs"] <= s["as_score"] else "NO")
    index = [" / ".join(sorted(names)), "‖W‖", "LHS", "AS score (RHS)", "LHS <= RHS"]
    frame = pd.DataFrame([rows[k] for k in ("diff", "norm", "lhs", "as", "holds")], index=index, columns=cols)
    return [Block("Lemma 1", _oriented(frame))]


def _oriented(frame: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout (a column per run) up to ``WIDE`` runs; a row per run beyond."""
    return frame if frame.shape[1] <= WIDE else frame.T.rename_axis("run")


def theorem2(runs: "list[Run]") -> "list[Block]":
    cols = labels(runs)
    keys = ("clean_accuracy", "robust_accuracy", "prop_fulfilled")
    data = []
    for run in runs:
        s = _need(run, run.summary, keys, "theorem2")
        data.append([pct(s["clean_accuracy"]), pct(s["robust_accuracy"]), pct(s["prop_fulfilled"]),
                     pct(s.get("rob_fulfilled"))])
    index = ["clean accuracy", "robust accuracy", "prop. fulfilled", "rob. fulfilled"]
    return [Block("Theorem 2", _oriented(pd.DataFrame(list(zip(*data)), index=index, columns=cols)))]


def _strongest(test: dict) -> "tuple[Optional[float], str]":
    if test.get("autoattack") is not None:
        return test["autoattack"], "AutoAttack"
    pgd = test.get("pgd") or {}
    if not pgd:
        return None, "-"
    k = max(pgd, key=int)
    return pgd[k], f"PGD-{k}"


def transfer(runs: "list[Run]") -> "list[Block]":
    finals = [r for r in runs if r.kind == "transfer"]
    if len(finals) != len(runs):
        bad = next(r for r in runs if r.kind != "transfer")
        raise ConfigError(f"--style transfer: {bad.path} is a {bad.kind} run, not a transfer run (final.json)")
    groups: "dict[str, list[Run]]" = {}
    for r in finals:
        groups.setdefault(f"{model_label(r)} → {data_label(r)}", []).append(r)
    blocks = []
    for group, members in groups.items():
        rows, attacks = [], []
        for r in members:
            s = r.summary or {}
            racc, attack = _strongest(r.record["test"])
            attacks.append(attack)
            rows.append([pct(r.record["test"].get("clean_accuracy")), pct(racc), num(s.get("as_score")),
                         num(s.get("loss_clean")), num(s.get("loss_adv")), num(s.get("head_norm"))])
        frame = pd.DataFrame(rows, index=pd.Index([_method(r) for r in members], name="method"),
                             columns=["Acc", "RAcc", "AS", "CE", "robust CE", "‖W‖"])
        blocks.append(Block(group, frame, [f"RAcc: {', '.join(sorted(set(attacks)))} accuracy on the test split "
                                           f"({members[0].record['test'].get('eps_text')}); AS, CE, ‖W‖: the score "
                                           f"after transfer"]))
    return blocks


def _method(r: Run) -> str:
    return str(r.record.get("method")) + (f" ({r.record['peft']})" if r.record.get("peft") else "")


def _by_sweep(runs: "list[Run]", kind: str, style: str) -> "dict[str, list[Run]]":
    groups: "dict[str, list[Run]]" = {}
    for r in runs:
        if r.sweep_kind != kind:
            raise ConfigError(f"--style {style}: {r.path} is not a cell of a {kind} sweep; give the directory of an "
                              f"'asbound sweep {kind}'")
        groups.setdefault(str(r.sweep), []).append(r)
    return groups


def _setting(members: "list[Run]") -> str:
    r = members[0]
    base = {**r.config, **{k: None for k in r.params}}
    text = f"{model_label(r)} → {base.get('data')}" + (f" [{base['classes']}]" if base.get("classes") else "")
    return text


def _metrics(r: Run, style: str) -> dict:
    s = _need(r, r.summary, ("loss_clean", "loss_adv", "lhs", "as_score"), style)
    if r.kind == "transfer":
        acc, (racc, _) = r.record["test"].get("clean_accuracy"), _strongest(r.record["test"])
    else:
        acc, racc = s.get("clean_accuracy"), s.get("robust_accuracy")
    return {"acc": acc, "racc": racc, "ce": s["loss_clean"], "rce": s["loss_adv"], "diff": s["loss_diff"],
            "w": s["head_norm"], "lhs": s["lhs"], "as": s["as_score"], "prop": s.get("prop_fulfilled")}


def shift(runs: "list[Run]") -> "list[Block]":
    blocks = []
    for sweep, members in _by_sweep(runs, "shift", "shift").items():
        clean = [r for r in members if not r.params.get("corruption")]
        corruptions = list(dict.fromkeys(r.params["corruption"] for r in members if r.params.get("corruption")))
        for name in corruptions:
            cells = clean + sorted((r for r in members if r.params.get("corruption") == name),
                                   key=lambda r: r.params["severity"])
            cols = ["clean" if not r.params.get("corruption") else f"C{r.params['severity']}" for r in cells]
            m = [_metrics(r, "shift") for r in cells]
            index = ["Acc.", "Robust Acc.", "CE", "robust CE", "difference CE", "‖W‖", "LHS (Lem. 1)", "AS score"]
            rows = [[pct(x["acc"]) for x in m], [pct(x["racc"]) for x in m], [num(x["ce"]) for x in m],
                    [num(x["rce"]) for x in m], [num(x["diff"]) for x in m], [num(x["w"]) for x in m],
                    [num(x["lhs"]) for x in m], [num(x["as"]) for x in m]]
            used = []
            for r in cells[1:]:
                described = next((t for t in r.config.get("transforms", []) if t.startswith("corrupt:")), "")
                found = re.search(r"\((?:[\w-]+ parameters: )?(.*?)\)(?:, after resizing)?, per image", described)
                if found:
                    used.append(f"C{r.params['severity']} {found.group(1)}")
            family = "CIFAR-10-C parameters" if any("CIFAR-10-C" in str(r.config.get("transforms")) for r in cells) else ""
            blocks.append(Block(f"{_setting(members)}: {name}", pd.DataFrame(rows, index=index, columns=cols),
                                [f"{relative(sweep)}" + (f"; {family}: " if family else "; ") + ", ".join(used)]))
    return blocks


def eps(runs: "list[Run]") -> "list[Block]":
    columns: "dict[str, list[str]]" = {}
    index: "list[str]" = []
    notes = []
    for sweep, members in _by_sweep(runs, "eps", "eps").items():
        cells = sorted(members, key=lambda r: float(r.params["multiple"]))
        first = cells[0]
        s0 = _need(first, first.summary, ("clean_accuracy", "robust_accuracy", "prop_fulfilled"), "eps")
        p0 = first.points()
        if "fulfilled" not in p0:
            raise ConfigError(f"--style eps: {first.path} has no Theorem 2 criterion per datapoint (an AS-only run)")
        fulfilled = set(p0.loc[p0["fulfilled"].astype(bool), "index"])
        rows = {"eps": ", ".join(f"{r.params['eps_text']}" for r in cells),
                "clean accuracy": pct(s0["clean_accuracy"]),
                f"prop. fulfilled (x{_m(first)})": pct(s0["prop_fulfilled"])}
        for r in cells:
            s = _need(r, r.summary, ("robust_accuracy",), "eps")
            rows[f"robust accuracy (x{_m(r)})"] = pct(s["robust_accuracy"])
        for r in cells:
            p = r.points()
            if set(p["index"]) != set(p0["index"]):
                notes.append(f"{relative(r.path)} scored other points than {relative(first.path)}: joined on the "
                             f"{len(set(p['index']) & set(p0['index']))} shared ones")
            sub = p[p["index"].isin(fulfilled)]
            rows[f"robust accuracy of the fulfilled (x{_m(r)})"] = (
                pct(float(sub["robust"].astype(bool).mean())) if len(sub) else "-")
        columns[_setting(cells)] = list(rows.values())
        index = index if len(index) >= len(rows) else list(rows)
        for k in rows:
            if k not in index:
                index.append(k)
    frame = pd.DataFrame({k: v + ["-"] * (len(index) - len(v)) for k, v in columns.items()}, index=index)
    return [Block("Theorem 2 at eps multiples", frame,
                  ["fulfilled: sensitivity < margin at the first multiple; robust: PGD on the loss at that multiple "
                   "(every iterate counts)", *notes])]


def _m(r: Run) -> str:
    m = r.params["multiple"]
    return f"{m:g}" if isinstance(m, float) else str(m)


def resize(runs: "list[Run]") -> "list[Block]":
    blocks = []
    for sweep, members in _by_sweep(runs, "resize", "resize").items():
        cells = sorted(members, key=lambda r: -int(r.params["resize"]))
        rows = []
        for r in cells:
            m = _metrics(r, "resize")
            rows.append([f"{num(m['ce'])} / {num(m['rce'])}", f"{pct(m['acc'])} / {pct(m['racc'])}", pct(m["prop"]),
                         num(m["lhs"]), num(m["as"])])
        index = pd.Index([f"{r.params['resize']}x{r.params['resize']}" for r in cells], name="input image")
        frame = pd.DataFrame(rows, index=index,
                             columns=["clean / robust CE", "clean / robust acc", "prop. fulfilled", "LHS", "RHS"])
        blocks.append(Block(_setting(cells), frame, [relative(sweep)]))
    return blocks


def predict(runs: "list[Run]") -> "list[Block]":
    rows, index, notes = [], [], []
    for r in runs:
        if r.kind != "predict":
            raise ConfigError(f"--style predict: {r.path} is a {r.kind} run, not an 'asbound predict' directory")
        rec = r.record
        pre = rec["pretrain"]
        pre_rel = _rel_ce(pre.get("loss_clean"), pre.get("loss_adv"))
        index.append((model_label(r), pre["label"]))
        rows.append([num(pre["as_score"]), "1 (pretraining)", "-", _ce_pair(pre.get("loss_clean"), pre.get("loss_adv")),
                     num(pre_rel)])
        for t in rec["tasks"]:
            m = t.get("measured") or {}
            index.append(("", t["label"]))
            rows.append([num(t["as_score"]), num(t["ratio"]), t["verdict"], _ce_pair(m.get("loss_clean"),
                         m.get("loss_adv")), num(m.get("relative_ce"))])
        for name, s in (rec.get("spearman") or {}).items():
            if s:
                notes.append(f"{model_label(r)}: Spearman {name.replace('_', ' ')}: rho {s['rho']:.3f} "
                             f"(p {s['p']:.2g}, {s['n']} tasks)")
        notes.append(f"{model_label(r)}: eps {rec['eps_text']} (L{rec['norm']}), verdict: ratio <= {rec['threshold']:g}")
    frame = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["Pretraining", "Downstream"]),
                         columns=["AS score", "AS ratio", "verdict", "clean / robust CE (LP)", "relative dif."])
    return [Block("Prediction before transfer", frame,
                  notes + ["relative dif.: (robust CE - CE) / CE after linear probing (measured)"])]


def _rel_ce(clean: Optional[float], adv: Optional[float]) -> Optional[float]:
    return None if clean is None or adv is None or clean == 0 else (adv - clean) / clean


def _ce_pair(clean: Optional[float], adv: Optional[float]) -> str:
    return "-" if clean is None or adv is None else f"{num(clean)} / {num(adv)}"


def certify(runs: "list[Run]") -> "list[Block]":
    rows, index = [], []
    for r, name in zip(runs, labels(runs)):
        s = _need(r, r.summary, ("rhs_certified", "as_score"), "certify")
        vacuous = s.get("prop_vacuous") or 0.0
        rows.append([s.get("eps_text"), num(s["as_score"]), num(s["rhs_certified"]) + (" (vacuous)" if vacuous >= 1 else ""),
                     num(s.get("tightness")), pct(s.get("prop_fulfilled")), pct(s.get("prop_certified")),
                     pct(s.get("robust_accuracy"))])
        index.append(name)
    frame = pd.DataFrame(rows, index=pd.Index(index, name="run"),
                         columns=["eps", "AS (PGD, lower)", "mean s_upper (certified)", "tightness", "prop. fulfilled",
                                  "prop. certified", "robust accuracy"])
    return [Block("Certified sensitivity", frame,
                  ["s_upper bounds every point of the ball (interval bound propagation / operator norms); "
                   "prop. certified: s_upper < margin, a guarantee; prop. fulfilled: the PGD estimate < margin"])]


BUILDERS: "dict[str, Callable[[list[Run]], list[Block]]]" = {
    "lemma1": lemma1, "theorem2": theorem2, "transfer": transfer, "shift": shift, "eps": eps, "resize": resize,
    "predict": predict, "certify": certify,
}


def table(paths: "Iterable[str | os.PathLike]", style: str) -> Rendered:
    """The blocks of ``style`` for the runs under ``paths``."""
    if style not in BUILDERS:
        raise ConfigError(f"table style {style!r} is not valid; valid: {', '.join(STYLES)}")
    paths = list(paths)
    runs, notes = collect(paths)
    if not runs:
        raise ConfigError(f"no finished runs under {', '.join(map(str, paths))}")
    return Rendered(BUILDERS[style](runs), [relative(p) for p in paths], notes)


def render(rendered: Rendered, fmt: str, command: Optional[str] = None) -> str:
    """Markdown (pipe tables), LaTeX (booktabs) or CSV (one long frame with a ``table`` column), with
    the command and the run directories as footer or comment lines."""
    if fmt not in FORMATS:
        raise ConfigError(f"table format {fmt!r} is not valid; valid: {', '.join(FORMATS)}")
    provenance = ([f"command: {command}"] if command else []) + [f"runs: {', '.join(rendered.sources)}"]
    notes = [*rendered.notes, NOTE]
    if fmt == "csv":
        frames = []
        for b in rendered.blocks:
            f = b.frame.copy()
            if isinstance(f.columns, pd.MultiIndex):
                f.columns = [" | ".join(map(str, c)) for c in f.columns]
            if not isinstance(f.index, pd.MultiIndex) and f.index.name is None:
                f = f.rename_axis("quantity")
            f = f.reset_index()
            f.insert(0, "table", b.title)
            frames.append(f)
        body = pd.concat(frames, ignore_index=True).fillna("-").to_csv(index=False)
        return "".join(f"# {line}\n" for line in provenance + notes) + body
    out = []
    for b in rendered.blocks:
        if fmt == "md":
            flat = isinstance(b.frame.index, pd.MultiIndex)
            frame = b.frame.reset_index() if flat else b.frame
            out.append(f"**{b.title}**\n\n{frame.to_markdown(index=not flat)}\n")
            out += [f"- {n}" for n in b.notes]
            out.append("")
        else:
            body = b.frame.to_latex(escape=True, caption=_tex_escape(b.title), multicolumn_format="c")
            out.append(body.replace("→", r"$\to$").replace("‖W‖", r"$\|W\|$"))
            out += [f"% {n}" for n in b.notes]
    if fmt == "md":
        out += [f"_{_md_escape(n)}_  " for n in notes] + [f"`{line}`  " for line in provenance]
    else:
        out += [f"% {line}" for line in notes + provenance]
    return "\n".join(out).rstrip() + "\n"


def _md_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("*", r"\*")


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("→", r"$\to$"), ("|", r"$|$")):
        text = text.replace(a, b)
    return text
