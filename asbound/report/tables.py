"""Seed 001's tables from stored records, as pandas DataFrames, rendered to Markdown, LaTeX
(booktabs) or CSV with their provenance.

Styles (``asbound table RUN... --style S``):

=========== ====================================================================================
lemma1      Tables 1, 2, 7: Diff. loss, ||W||, Lemma 1 LHS, AS score (= RHS), one column per run
            under a (Pretraining, Downstream) header; many runs: Table 7's rows per pretraining and
            setting (attack norm, weight decay, ...) with a column per downstream data set
theorem2    Table 3: clean accuracy, robust accuracy, prop. fulfilled, rob. fulfilled (as lemma1)
transfer    Tables 5, 9: per downstream task and eps, a row per method (two runs of one method
            labelled with what differs): Acc, RAcc (robust against every attack run where the
            record says so, against every PGD attack where AutoAttack ran too, else PGD with the
            most steps; the note names the rule), AutoAttack (it and every PGD, per point) where
            recorded, AS after transfer, CE, robust CE, ||W||
shift       Tables 12, 13: per corruption, one column per severity (the clean data first)
eps         Table 8: robust accuracy at each eps multiple, of all points and of the points that
            fulfil the Theorem 2 criterion at the first multiple (joined on ``index``)
resize      Table 10: one row per input size
predict     Table 4: AS before transfer, its ratio, the verdict, the measured CE after LP
certify     runs of ``score --certify``: the certified RHS mean(s_upper) against the PGD AS, their
            ratio (tightness), prop. certified against prop. fulfilled
=========== ====================================================================================

Every AS is a PGD estimate (a lower bound on the sensitivity), so every RHS is an estimate;
each table names the attack behind it (name, steps, restarts, step) and the number of points
scored, both read from the runs' summaries (never from the values a sweep asked for).

Each style is a function ``runs -> list[Block]`` (a titled DataFrame in the seed's layout, with
notes); :func:`table` collects the runs and builds the blocks, :func:`render` writes them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import pandas as pd

from asbound.errors import ConfigError
from asbound.report.console import UNDEFINED_RATIO
from asbound.report.runs import (
    Run,
    attack_text,
    collect,
    data_label,
    differences,
    labels,
    model_label,
    numbered,
    pretraining_label,
    recorded,
    relative,
    robust_accuracy,
    settings,
)

STYLES = ("lemma1", "theorem2", "transfer", "shift", "eps", "resize", "predict", "certify")
FORMATS = ("md", "tex", "csv")
CONSOLE = "console"  # not a file format: the tables laid out for a terminal (render(..., "console"))
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
        if record.get("task") == "regression" and {"clean_accuracy", "robust_accuracy"} & set(missing):
            raise ConfigError(f"--style {style}: {run.path} is a regression run (no accuracies); give classifier runs")
        why = f" ({record['task_note']})" if record.get("task_note") else ""
        raise ConfigError(f"--style {style}: {run.path} lacks {', '.join(missing)}{why}; give runs that have them")
    return record


def _loss_name(s: dict) -> str:
    return "Diff. CE" if s.get("loss") == "cross_entropy" else "Diff. loss"


def _holds(s: dict) -> str:
    """Lemma 1 as the run recorded it (``lemma1_holds``, with its float tolerance); older records
    without it: compared here with the same tolerance."""
    held = s.get("lemma1_holds")
    if held is None:
        held = s["lhs"] <= s["as_score"] + 1e-9
    return "yes" if held else "NO"


def lemma1(runs: "list[Run]") -> "list[Block]":
    summaries = [_need(r, r.summary, ("loss_diff", "head_norm", "lhs", "as_score"), "lemma1") for r in runs]
    names = sorted({_loss_name(s) for s in summaries})
    norms = sorted({f"{s['head_norm_name']}" for s in summaries})
    attack_row, attack_note = _attacks(runs, fulfilled=False)

    def values(run: Run) -> "list[str]":
        s = run.summary
        return [num(s["loss_diff"]), num(s["head_norm"]) + ("" if len(norms) == 1 else f" ({s['head_norm_name']})"),
                num(s["lhs"]), num(s["as_score"]), _holds(s)] + ([attack_text(s)] if attack_row else [])

    norm_row = f"‖W‖ ({norms[0]})" if len(norms) == 1 else "‖W‖"
    index = [" / ".join(names), norm_row, "LHS", "AS score (RHS)", "LHS <= RHS"] + (["attack"] if attack_row else [])
    return [Block("Lemma 1", _per_run(runs, index, values),
                  [f"LHS: the mean of (adversarial loss - clean loss) / (L ‖W‖) over the {_points(runs)}; "
                   "‖W‖: the head norm Lemma 1 uses (q and L as recorded); AS score: the mean sensitivity over the "
                   "same points, a PGD estimate", *attack_note])]


def _points(runs: "list[Run]") -> str:
    """``n scored points`` (n the runs' own, from their records; a transfer run's: those of its
    score after transfer, not its training images)."""
    ns = {recorded(r, "n") for r in runs}
    if len(ns) == 1 and None not in ns:
        return f"{ns.pop()} scored points"
    return "scored points (n: their number, per run)" if len(ns) > 1 else "scored points"


def _attacks(runs: "list[Run]", fulfilled: bool = True) -> "tuple[bool, list[str]]":
    """How strong the attack behind the AS and the Theorem 2 criterion was: one note when every run
    used the same attack (``(False, [note])``), else a row per run (``(True, [note])``). The
    criterion ``sensitivity < margin`` is only as good as this attack: a stronger one finds larger
    shifts (``fulfilled``: the table shows the criterion, and the note says so)."""
    summaries = [r.summary for r in runs if r.summary]
    texts = {attack_text(s) for s in summaries}
    stronger = "; a stronger attack finds larger shifts (a higher AS" + (
        ", fewer fulfilled points)" if fulfilled else ")")
    if len(texts) > 1:
        return True, ["attack: the one behind each run's sensitivity" + stronger]
    if not texts:
        return False, []
    both = any(s.get("loss_adv") is not None for s in summaries)
    return False, [f"attack: {texts.pop()}" + (", on g and on the loss (the sensitivity: the larger shift)" if both
                                               else ", on g") + stronger]


def _per_run(runs: "list[Run]", quantities: "list[str]", values: "Callable[[Run], list[str]]") -> pd.DataFrame:
    """Seed 001's layout for quantities of single runs, grouped by pretraining, then downstream data.

    Up to ``WIDE`` runs: a column per run under a (Pretraining, Downstream) header, rows the
    quantities (Tables 1-3). Beyond, when every (pretraining, setting, data) is one run and there
    are at most ``WIDE`` data sets: a column per downstream data set, rows (Pretraining, setting,
    quantity) (Table 7: rows per pretraining and attack, columns per factor). Else a row per run.
    """
    pre = [pretraining_label(r) for r in runs]
    data = [data_label(r) for r in runs]
    extra = settings(runs)
    order = sorted(range(len(runs)), key=lambda i: (pre.index(pre[i]), data.index(data[i])))  # stable
    cells = {i: values(runs[i]) for i in order}
    down = [f"{data[i]} ({extra[i]})" if extra[i] else data[i] for i in order]
    pairs = [tuple(k.split("\x00")) for k in numbered([f"{pre[i]}\x00{d}" for i, d in zip(order, down)])]
    if len(runs) <= WIDE:
        columns = pd.MultiIndex.from_tuples(pairs, names=["Pretraining", "Downstream"])
        return pd.DataFrame(list(zip(*[cells[i] for i in order])), index=quantities, columns=columns)
    extra = settings(runs, beside_data=True)
    triples = {(pre[i], extra[i], data[i]): cells[i] for i in order}
    datasets = list(dict.fromkeys(data[i] for i in order))
    if len(triples) == len(runs) and len(datasets) <= WIDE:
        groups = list(dict.fromkeys((pre[i], extra[i]) for i in order))
        index, rows = [], []
        for p, e in groups:
            for q, name in enumerate(quantities):
                index.append((p, e, name) if any(extra) else (p, name))
                rows.append([triples[(p, e, d)][q] if (p, e, d) in triples else "-" for d in datasets])
        names = ["Pretraining", "setting", "quantity"] if any(extra) else ["Pretraining", "quantity"]
        return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=names),
                            columns=pd.Index(datasets, name="Downstream"))
    return pd.DataFrame([cells[i] for i in order], index=pd.MultiIndex.from_tuples(pairs, names=["Pretraining",
                        "Downstream"]), columns=quantities)


def theorem2(runs: "list[Run]") -> "list[Block]":
    keys = ("clean_accuracy", "robust_accuracy", "prop_fulfilled")
    for run in runs:
        _need(run, run.summary, keys, "theorem2")
    attack_row, attack_note = _attacks(runs)

    def values(run: Run) -> "list[str]":
        s = run.summary
        return [pct(s["clean_accuracy"]), pct(s["robust_accuracy"]), pct(s["prop_fulfilled"]),
                pct(s.get("rob_fulfilled"))] + ([attack_text(s)] if attack_row else [])

    index = ["clean accuracy", "robust accuracy", "prop. fulfilled", "rob. fulfilled"] + (
        ["attack"] if attack_row else [])
    return [Block("Theorem 2", _per_run(runs, index, values),
                  [f"over the {_points(runs)}; robust: no point either attack evaluated is misclassified (an upper "
                   "bound on the true robust accuracy); prop. fulfilled: sensitivity < margin with the attack's "
                   "sensitivity, an empirical estimate; rob. fulfilled: the robust share of the fulfilled "
                   "points", *attack_note])]


def transfer(runs: "list[Run]") -> "list[Block]":
    """A table per (pretraining, downstream data, eps): runs at other radii are never mixed under one
    eps; two runs of one method are told apart by what differs between them."""
    finals = [r for r in runs if r.kind == "transfer"]
    if len(finals) != len(runs):
        bad = next(r for r in runs if r.kind != "transfer")
        raise ConfigError(f"--style transfer: {bad.path} is a {bad.kind} run, not a transfer run (final.json)")
    for r in finals:
        test = r.record.get("test")
        if not isinstance(test, dict) or test.get("clean_accuracy") is None:
            raise ConfigError(f"--style transfer: {r.path} lacks test.clean_accuracy in final.json (no final "
                              f"evaluation); give finished transfer runs")
    groups: "dict[tuple[str, str], list[Run]]" = {}
    for r in finals:
        groups.setdefault((f"{model_label(r)} → {data_label(r)}", _test_eps(r)), []).append(r)
    blocks = []
    for (setting, eps_text), members in groups.items():
        rows, rules = [], []
        autoattack = any(r.record["test"].get("autoattack") is not None for r in members)
        per_point_aa = False  # a record whose AutoAttack accuracy counts every PGD attack too
        for r in members:
            test, s = r.record["test"], r.summary or {}
            racc, rule = robust_accuracy(test)
            if test.get("autoattack") is not None and test.get("robust_rule") and test.get("pgd"):
                # its robust accuracy is the AutoAttack column's: RAcc shows the PGD attacks' (per point)
                steps = max(test["pgd"], key=int)
                racc, per_point_aa = test["pgd"][steps], True
                rule = f"per point, robust against every PGD attack run (PGD-{steps} and fewer steps)"
            rules.append(rule)
            row = [pct(test.get("clean_accuracy")), pct(racc)]
            row += [pct(test.get("autoattack"))] if autoattack else []
            rows.append(row + [num(s.get("as_score")), num(s.get("loss_clean")), num(s.get("loss_adv")),
                               num(s.get("head_norm"))])
        columns = ["Acc", "RAcc"] + (["RAcc (AA)"] if autoattack else []) + ["AS", "CE", "robust CE", "‖W‖"]
        frame = pd.DataFrame(rows, index=pd.Index(_method_labels(members), name="method"), columns=columns)
        without = [_method(r) for r in members if not r.summary]
        scored = [r for r in members if r.summary]
        tested = sorted({str(r.record["test"].get("n", "?")) for r in members}, key=lambda t: (len(t), t))
        notes = [f"RAcc: on {' / '.join(tested)} test images at eps {eps_text}: "
                 + "; ".join(dict.fromkeys(rules)) + ("; RAcc (AA): AutoAttack standard" if autoattack else "")
                 + (" on the points every PGD attack left correct: robust against every attack run"
                    if per_point_aa else "")]
        if scored:
            per_run, attack = _attacks(scored, fulfilled=False)
            if per_run:
                attack = ["attacks: " + ", ".join(f"{m}: {attack_text(r.summary)}" for r, m in
                                                  zip(members, frame.index) if r.summary)]
            notes.append(f"AS, CE, robust CE, ‖W‖: the score after transfer, over the {_points(scored)} (AS a PGD "
                         f"estimate); " + "; ".join(attack))
        if without:
            notes.append(f"no score after transfer: {', '.join(without)}")
        blocks.append(Block(f"{setting}, eps {eps_text}", frame, notes))
    return blocks


def _test_eps(r: Run) -> str:
    """The radius of a transfer run's test evaluation, as recorded."""
    test = r.record.get("test") or {}
    text = test.get("eps_text") or recorded(r, "eps")
    return str(text) if text is not None else "?"


def _method_labels(members: "list[Run]") -> "list[str]":
    """A row label per transfer run: its method, and where two runs share one, what sets them
    apart (``autolora (epochs 30)``), numbered where nothing does."""
    methods = [_method(r) for r in members]
    out = []
    for r, m in zip(members, methods):
        same = [x for x, y in zip(members, methods) if y == m]
        extra = settings(same, omit=("method", "peft"))[same.index(r)] if len(same) > 1 else ""
        if len(same) > 1 and not extra:  # none of the usual options: any other recorded setting
            extra = differences(same)[same.index(r)]
        out.append(f"{m} ({extra})" if extra else m)
    return numbered(out)


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
        acc, (racc, _) = r.record["test"].get("clean_accuracy"), robust_accuracy(r.record["test"])
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
                                [f"{relative(sweep)}" + (f"; {family}: " if family else "; ") + ", ".join(used),
                                 *_attacks(cells, fulfilled=False)[1]]))
    return blocks


def eps(runs: "list[Run]") -> "list[Block]":
    columns: "dict[str, dict[str, str]]" = {}
    index: "list[str]" = []
    notes = []
    for sweep, members in _by_sweep(runs, "eps", "eps").items():
        cells = sorted(members, key=lambda r: float(r.params["multiple"]))
        first = cells[0]
        s0 = _need(first, first.summary, ("clean_accuracy", "robust_accuracy", "prop_fulfilled"), "eps")
        p0 = first.points()
        if "fulfilled" not in p0:
            raise ConfigError(f"--style eps: {first.path} has no Theorem 2 criterion per datapoint (a regression or "
                              f"AS-only run)")
        fulfilled = set(p0.loc[p0["fulfilled"].astype(bool), "index"])
        rows = {"eps": ", ".join(str(recorded(r, "eps")) for r in cells),
                "n (scored points)": str(recorded(first, "n")),
                "attack": " / ".join(dict.fromkeys(attack_text(r.summary) for r in cells if r.summary)),
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
        name, k = _setting(cells), 2
        while name in columns:  # two sweeps of one setting (another seed, another eps): both kept
            name, k = f"{_setting(cells)} #{k}", k + 1
        columns[name] = rows  # keyed by row: sweeps with other multiples line up by name, never by position
        index += [key for key in rows if key not in index]
    frame = pd.DataFrame({name: [rows.get(key, "-") for key in index] for name, rows in columns.items()}, index=index)
    return [Block("Theorem 2 at eps multiples", frame,
                  ["fulfilled: sensitivity < margin at the first multiple, with the attack's sensitivity (an "
                   "empirical estimate: a stronger attack finds larger shifts, fewer fulfilled points); robust: no "
                   "point either attack evaluates at that multiple is misclassified", *notes])]


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
        tested = [r for r in cells if r.kind == "transfer"]
        blocks.append(Block(_setting(cells), frame, [
            f"{relative(sweep)}; prop. fulfilled, LHS, RHS: over the {_points(cells)}"
            + (f"; clean / robust acc: on the test split, {robust_accuracy(tested[0].record['test'])[1]}"
               if tested else ""),
            *_attacks(cells)[1]]))
    return blocks


def predict(runs: "list[Run]") -> "list[Block]":
    from asbound.predict import p_text  # torch, through scoring: only where a prediction is rendered

    rows, index, notes = [], [], []
    bounds = any(t.get("bound") for r in runs for t in (r.record.get("tasks") or []) if r.kind == "predict")
    for r in runs:
        if r.kind != "predict":
            raise ConfigError(f"--style predict: {r.path} is a {r.kind} run, not an 'asbound predict' directory")
        rec = r.record
        _need_predict(r)
        pre = rec["pretrain"]
        pre_rel = _rel_ce(pre.get("loss_clean"), pre.get("loss_adv"))
        index.append((model_label(r), pre["label"]))
        rows.append([num(pre["as_score"]), "1 (pretraining)" if pre["as_score"] != 0 else "undefined", "-",
                     _ce_pair(pre.get("loss_clean"), pre.get("loss_adv")),
                     num(pre_rel)] + (["-"] if bounds else []))
        for t in rec["tasks"]:
            m = t.get("measured") or {}
            index.append((model_label(r), t["label"]))
            undefined = t["ratio"] is None  # the pretraining AS is 0 (_need_predict)
            rows.append([num(t["as_score"]), "undefined" if undefined else num(t["ratio"]),
                         "-" if undefined else t["verdict"], _ce_pair(m.get("loss_clean"), m.get("loss_adv")),
                         num(m.get("relative_ce"))]
                        + ([num((t.get("bound") or {}).get("loss_increase"))] if bounds else []))
        if any(t["ratio"] is None for t in rec["tasks"]):
            notes.append(f"{model_label(r)}: " + UNDEFINED_RATIO.format(pre["label"]))
        for name, s in (rec.get("spearman") or {}).items():
            if s:
                notes.append(f"{model_label(r)}: Spearman {_pretty(name)}: rho {s['rho']:.3f} "
                             f"({p_text(s)}; {s['n']} tasks)")
        notes.append(f"{model_label(r)}: eps {rec['eps_text']} (L{rec['norm']}), verdict: ratio <= {rec['threshold']:g}")
    frame = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["Pretraining", "Downstream"]),
                         columns=["AS score", "AS ratio", "verdict", "clean / robust CE (LP)", "relative dif."]
                         + (["CE increase bound (Lem. 1)"] if bounds else []))
    return [Block("Prediction before transfer", frame, notes + [
        "relative dif.: (robust CE - CE) / CE after linear probing (measured); the pretraining row: the pretrained "
        "model's own head"] + (["CE increase bound (Lem. 1): L ‖W‖ AS with the recorded head norm, an estimate "
                                "(AS is a PGD lower bound)"] if bounds else []))]


def _pretty(name: str) -> str:
    """``ratio_vs_relative_ce`` -> ``ratio vs relative CE``."""
    upper = {"ce": "CE", "lp": "LP", "as": "AS", "adv": "adv."}
    return " ".join(upper.get(w, w) for w in name.split("_"))


def _need_predict(r: Run) -> None:
    rec = r.record
    missing = [k for k in ("pretrain", "tasks", "eps_text", "norm", "threshold") if rec.get(k) is None]
    missing += [f"pretrain.{k}" for k in ("label", "as_score") if not missing and rec["pretrain"].get(k) is None]
    # a ratio is undefined (null) only where the pretraining AS is 0
    undefined = not missing and rec["pretrain"].get("as_score") == 0
    for n, t in enumerate(rec.get("tasks") or []):
        missing += [f"tasks[{n}].{k}" for k in ("label", "as_score", "ratio", "verdict")
                    if t.get(k) is None and not (k == "ratio" and undefined)]
    if missing:
        raise ConfigError(f"--style predict: {r.path} lacks {', '.join(missing[:4])}"
                          + (f" and {len(missing) - 4} more" if len(missing) > 4 else "") + " in predict.json")


def _rel_ce(clean: Optional[float], adv: Optional[float]) -> Optional[float]:
    return None if clean is None or adv is None or clean == 0 else (adv - clean) / clean


def _ce_pair(clean: Optional[float], adv: Optional[float]) -> str:
    return "-" if clean is None or adv is None else f"{num(clean)} / {num(adv)}"


def certify(runs: "list[Run]") -> "list[Block]":
    """A row per run; eps, the bound's method and n (the points scored) in columns of their own,
    read from each run's summary, never from the sweep cell's requested values."""
    summaries = [_need(r, r.summary, ("rhs_certified", "as_score"), "certify") for r in runs]
    attack_column, attack_note = _attacks(runs)
    rows = []
    for s in summaries:
        vacuous = s.get("prop_vacuous") or 0.0
        # the bound computed: --certify crown over its budget computes crown-ibp (the run says so)
        rows.append([s.get("eps_text"), s.get("certify_used") or s.get("certify") or "ibp", s.get("n"),
                     num(s["as_score"]),
                     num(s["rhs_certified"]) + (" (vacuous)" if vacuous >= 1 else ""),
                     num(s.get("tightness")), pct(s.get("prop_fulfilled")), pct(s.get("prop_certified")),
                     pct(s.get("robust_accuracy"))] + ([attack_text(s)] if attack_column else []))
    frame = pd.DataFrame(rows, index=pd.Index(labels(runs, omit=("eps", "certify", "n")), name="run"),
                         columns=["eps", "bound", "n", "AS (PGD, lower)", "mean s_upper (certified)", "tightness",
                                  "prop. fulfilled", "prop. certified", "robust accuracy"]
                         + (["attack"] if attack_column else []))
    return [Block("Certified sensitivity", frame,
                  ["n: the points each run scored; s_upper bounds every point of the ball (bound ibp: interval "
                   "bound propagation; crown-ibp: linear relaxation over IBP's intermediate bounds; crown: full "
                   "CROWN, every layer's bounds by linear relaxation; all with operator norms where they are "
                   "tighter); prop. certified: s_upper < margin, a guarantee; prop. fulfilled: the attack's "
                   "sensitivity < margin, an empirical estimate", *attack_note])]


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
    try:
        blocks = BUILDERS[style](runs)
    except KeyError as exc:  # a record without a field the style reads
        raise ConfigError(f"--style {style}: the records under {', '.join(map(str, paths))} lack {exc} "
                          f"(not the asbound record format; docs/RECORDS.md)") from exc
    return Rendered(blocks, [relative(p) for p in paths], notes)


def render(rendered: "Rendered | pd.DataFrame", fmt: str, command: Optional[str] = None, *, width: int = 80,
           styled: bool = False) -> str:
    """Markdown (pipe tables), LaTeX (booktabs) or CSV (one long frame with a ``table`` column), with
    the command and the run directories as footer or comment lines. A bare DataFrame (one style's
    ``.blocks[k].frame``, or any) renders as one untitled block.

    ``console``: the same blocks as text laid out at ``width`` columns (rich,
    :class:`asbound.report.console.ConsoleTables`: every line at most ``width`` wide, long headers
    keyed or the columns split into several tables with the row labels repeated); ``styled``: with
    the terminal's bold, italics and dim (ANSI codes)."""
    if fmt not in (*FORMATS, CONSOLE):
        raise ConfigError(f"table format {fmt!r} is not valid; valid: {', '.join((*FORMATS, CONSOLE))}")
    if isinstance(rendered, pd.DataFrame):
        rendered = Rendered([Block("table", rendered)], [], [])
    provenance = ([f"command: {command}"] if command else []) + (
        [f"runs: {', '.join(rendered.sources)}"] if rendered.sources else [])
    notes = [*rendered.notes, NOTE]
    if fmt == CONSOLE:
        return _console(rendered.blocks, notes, provenance, width, styled)
    if fmt == "csv":
        frames = []
        for b in rendered.blocks:
            f = b.frame.copy()
            if isinstance(f.columns, pd.MultiIndex):
                f.columns = [" | ".join(map(str, c)) for c in f.columns]
            f.columns.name = None
            if not isinstance(f.index, pd.MultiIndex) and f.index.name is None:
                f = f.rename_axis("quantity")
            f = f.reset_index()
            f.insert(0, "table", b.title)
            frames.append(f)
        body = pd.concat(frames, ignore_index=True).fillna("-").to_csv(index=False)
        block_notes = [f"{b.title}: {n}" for b in rendered.blocks for n in b.notes]
        return "".join(f"# {line}\n" for line in provenance + block_notes + notes) + body
    out = []
    for b in rendered.blocks:
        if fmt == "md":
            out.append(f"**{b.title}**\n\n{_markdown(b.frame)}\n")
            out += [f"- {n}" for n in b.notes]
            out.append("")
        else:
            body = b.frame.to_latex(escape=True, caption=_tex_escape(b.title), multicolumn_format="c")
            # booktabs: group breaks as \addlinespace, not \cline
            lines = [ln for ln in body.splitlines() if not (ln.startswith(r"\cline") and "bottomrule" in ln)]
            lines = [r"\addlinespace" if ln.startswith(r"\cline") else ln for ln in lines]
            lines = [ln for k, ln in enumerate(lines) if not (ln == r"\addlinespace" and k + 1 < len(lines)
                                                               and lines[k + 1] == r"\bottomrule")]
            out.append("\n".join(lines).replace("→", r"$\to$").replace("‖W‖", r"$\|W\|$") + "\n")
            out += [f"% {n}" for n in b.notes]
    if fmt == "md":
        out += [f"_{_md_escape(n)}_  " for n in notes] + [f"`{line}`  " for line in provenance]
    else:
        out += [f"% {line}" for line in notes + provenance]
        out.append(r"% needs \usepackage{booktabs} (and \usepackage{multirow} for grouped rows)")
    return "\n".join(out).rstrip() + "\n"


def _console(blocks: "list[Block]", notes: "list[str]", provenance: "list[str]", width: int, styled: bool) -> str:
    import io

    from rich.console import Console

    from asbound.report.console import ConsoleTables

    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=styled, color_system="auto" if styled else None,
                      highlight=False, emoji=False, markup=False)
    console.print(ConsoleTables(blocks, notes, provenance))
    # rich pads every line to the width: no trailing spaces (the style codes among them are kept)
    tail = re.compile(r"(?:[ ]|\x1b\[[0-9;]*m)+$")
    return "".join(tail.sub(lambda m: m.group(0).replace(" ", ""), line) + "\n" for line in out.getvalue().splitlines())


def _markdown(frame: pd.DataFrame) -> str:
    """A pipe table: a (Pretraining, Downstream) header flattened to ``pretraining → downstream``,
    a row MultiIndex as leading columns with repeated group labels left blank (as in the paper)."""
    frame = frame.copy()
    if isinstance(frame.columns, pd.MultiIndex):
        frame.columns = [" → ".join(map(str, c)) for c in frame.columns]
    if not isinstance(frame.index, pd.MultiIndex):
        return frame.to_markdown()
    levels = list(frame.index.names)
    flat = frame.reset_index()
    keys = flat[levels[:-1]].astype(str).values.tolist()
    for k in range(len(flat) - 1, 0, -1):
        for j in range(len(levels) - 1):
            if keys[k][: j + 1] == keys[k - 1][: j + 1]:
                flat.iat[k, j] = ""
    return flat.to_markdown(index=False)


def _md_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("*", r"\*")


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("→", r"$\to$"), ("|", r"$|$")):
        text = text.replace(a, b)
    return text
