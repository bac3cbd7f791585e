"""Tables rendered from summaries (which are derived from per-datapoint records only).

Paper layout (seed 001, Tables 1 and 3): one row per quantity, one column per run. The AS
score is a PGD estimate of a maximum (a lower bound), so "RHS", the Theorem 1 bound and the
Theorem 2 criterion are estimates, and the rows say so.

Every table reads at 80 columns (:class:`LabelledTable`): the specs, which have no spaces to
break at, stand whole in the title, and the row labels wrap only where the values could not fit
beside them otherwise.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table


class LabelledTable(Table):
    """A rich table whose first column holds row labels, laid out for the console's width.

    Rich narrows the widest columns first, which can leave a value column narrower than its
    longest word (cut mid-word) while the labels keep their full width. Here every column gets at
    least its longest word; the labels keep their line where the values still fit beside them,
    else they wrap at their spaces too; what room is left goes to each column in proportion to
    what it lacks for one line per cell. The table is at least as wide as the longest word of its
    title, which wraps at the table's width.
    """

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        title = Measurement.get(console, options, self.title).minimum if self.title else 0
        self.min_width = min(title, options.max_width) or None
        widths = self._widths(console, options) if self.columns else None
        for i, column in enumerate(self.columns):
            column.width = widths[i] if widths else None
            column.no_wrap = bool(widths) and i == 0 and widths[0] >= self._natural
        yield from super().__rich_console__(console, options)

    def _widths(self, console: Console, options: ConsoleOptions) -> "Optional[list[int]]":
        """Content widths that fit the console with no word cut; None where rich's own layout does
        as well (everything fits on one line) or nothing can (a word wider than any layout allows)."""
        for column in self.columns:
            column.width = None
        measured = [[Measurement.get(console, options, cell)
                     for cell in ([c.header] if self.show_header else []) + list(c.cells)] for c in self.columns]
        natural = [max((m.maximum for m in ms), default=0) for ms in measured]
        least = [max((m.minimum for m in ms), default=0) for ms in measured]
        self._natural = natural[0]
        room = options.max_width - self._extra_width - sum(self._get_padding_width(i) for i in range(len(natural)))
        if sum(natural) <= room:
            return None
        if natural[0] + sum(least[1:]) <= room:
            least[0] = natural[0]  # the labels keep their line
        elif sum(least) > room:
            return None
        spare, wants = room - sum(least), [n - m for n, m in zip(natural, least)]
        shares = [spare * w // sum(wants) for w in wants]
        for i in sorted(range(len(wants)), key=lambda i: -wants[i])[: spare - sum(shares)]:
            shares[i] += 1
        return [m + s for m, s in zip(least, shares)]


def _num(value: Optional[float], fmt: str = "{:.4g}") -> str:
    return "-" if value is None else fmt.format(value)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _loss_pair(s: dict) -> str:
    if not s.get("loss"):
        return "-"
    return f"{_num(s['loss_clean'], '{:.4f}')} / {_num(s['loss_adv'], '{:.4f}')}"


def _thm1(s: dict) -> str:
    t = s.get("theorem1")
    if not t:
        return "-"
    return f"{_num(t['bound'])} = {_num(t['lipschitz_term'])} + {_num(t['confidence'])}"


def _thm1_lhs(s: dict) -> str:
    t = s.get("theorem1")
    return "-" if not t else f"{_num(t['lhs_capped'])} (C={t['cap']:g}, delta={t['delta']:g})"


def _holds(key: str) -> Callable[[dict], str]:
    def cell(s: dict) -> str:
        if s.get("lhs") is None or s.get(key) is None:
            return "-"
        return "yes" if s[key] else "NO"

    return cell


# Every sensitivity here is a PGD estimate (a lower bound on s_i), so the Lemma 1 RHS, the
# Theorem 1 bound and the Theorem 2 criterion are estimates, not guarantees; the labels say so.
ROWS: "list[tuple[str, Callable[[dict], str]]]" = [
    ("task", lambda s: s["task"] + (f" ({s['loss']})" if s.get("loss") else " (AS only)")),
    ("n", lambda s: str(s["n"])),
    ("eps", lambda s: f"{s['eps_text']} (L{s['norm']}, {s['steps']} steps)"),
    ("AS score = RHS (both attacks)", lambda s: _num(s.get("as_score"))),
    ("AS score, AS attack alone", lambda s: _num(s.get("as_score_rep"))),
    ("loss clean / adv", _loss_pair),
    ("diff. loss", lambda s: _num(s.get("loss_diff"))),
    ("q, L", lambda s: "-" if s.get("q") is None else f"{s['q']}, {s['lipschitz']:.4g}"),
    ("||W||_(q)", lambda s: "-" if s.get("head_norm") is None else f"{s['head_norm']:.4g} ({s['head_norm_name']})"),
    ("Lemma 1 LHS", lambda s: _num(s.get("lhs"))),
    ("LHS <= RHS (holds by construction)", _holds("lemma1_holds")),
    ("LHS <= AS attack alone (paper)", _holds("lemma1_holds_rep")),
    ("Thm 1 capped LHS", _thm1_lhs),
    ("Thm 1 bound (estimate: PGD AS)", _thm1),
    ("clean accuracy", lambda s: _pct(s.get("clean_accuracy"))),
    ("robust accuracy (every iterate)", lambda s: _pct(s.get("robust_accuracy"))),
    ("prop. fulfilled (criterion)", lambda s: _pct(s.get("prop_fulfilled"))),
    ("rob. fulfilled (both attacks)", lambda s: _pct(s.get("rob_fulfilled"))),
    ("rob. fulfilled, AS attack only (paper)", lambda s: _pct(s.get("rob_fulfilled_rep"))),
]

#: with --certify: an upper bound on every s_i, so a sound RHS and a certified criterion
CERTIFIED_ROWS: "list[tuple[str, Callable[[dict], str]]]" = [
    ("certified RHS = mean(s_upper)", lambda s: _certified(s, _num(s.get("rhs_certified")))),
    ("tightness mean(s_upper) / mean(s)", lambda s: _num(s.get("tightness"))),
    ("prop. certified (s_upper < m)", lambda s: _certified(s, _pct(s.get("prop_certified")))),
]


def _certified(s: dict, text: str) -> str:
    if s.get("prop_vacuous") is not None and s["prop_vacuous"] >= 1:
        return f"vacuous ({text})"  # no better than the bound over the whole input domain
    return text


#: the longest data spec that heads a column; longer ones stand in the title, keyed (1), (2), ...
SHORT = 20


def summary_table(summaries: Iterable[dict], title: str = "asbound score") -> Table:
    """One row per quantity, one column per run.

    The runs' specs go to the title, where they stand whole: one run, ``title: model -> data``;
    runs of one model, ``title: model`` and the data as column headers (up to :data:`SHORT`
    characters; else one title line ``(k) data`` per run, ``(k)`` heading its column); runs of
    several models, one title line ``(k) model -> data`` per run.
    """
    summaries = list(summaries)
    models = list(dict.fromkeys(s["model"] for s in summaries))
    keys = [f"({k})" for k in range(1, len(summaries) + 1)]
    if len(summaries) == 1:
        lines, headers = [f"{title}: {models[0]} -> {summaries[0]['data']}"], [""]
    elif len(models) == 1 and all(len(s["data"]) <= SHORT for s in summaries):
        lines, headers = [f"{title}: {models[0]}"], [s["data"] for s in summaries]
    elif len(models) == 1:
        lines, headers = [f"{title}: {models[0]}"] + [f"{k} {s['data']}" for k, s in zip(keys, summaries)], keys
    else:
        lines, headers = [title] + [f"{k} {s['model']} -> {s['data']}" for k, s in zip(keys, summaries)], keys
    table = LabelledTable(title="\n".join(lines), title_justify="left", show_header=any(headers))
    table.add_column("", style="bold")
    for header in headers:
        table.add_column(header, justify="right", overflow="fold")
    rows = ROWS + (CERTIFIED_ROWS if any(s.get("rhs_certified") is not None for s in summaries) else [])
    for label, cell in rows:
        table.add_row(label, *(cell(s) for s in summaries))
    return table


# --- transfer: seed 001 Tables 5 and 9, one column per method -------------------------------------


def _after(key: str, fmt: Callable[[Optional[float]], str] = _num) -> Callable[[dict], str]:
    return lambda f: fmt((f.get("score_after") or {}).get(key))


def _pgd(k: str) -> Callable[[dict], str]:
    return lambda f: _pct(f["test"]["pgd"].get(k))


def _stages(f: dict) -> str:
    return ", ".join(f"{s['stage']} {s['selected_epoch']}/{s['epochs']}" for s in f.get("stages", []))


def transfer_rows(finals: "list[dict]") -> "list[tuple[str, Callable[[dict], str]]]":
    """The rows of the transfer table; the PGD rows follow the evaluated step counts."""
    steps = sorted({k for f in finals for k in f["test"]["pgd"]}, key=int)
    eps = finals[0]["test"].get("eps_text", "")
    rows: "list[tuple[str, Callable[[dict], str]]]" = [
        ("test images", lambda f: str(f["test"]["n"])),
        ("clean accuracy", lambda f: _pct(f["test"].get("clean_accuracy"))),
        *((f"PGD-{k} accuracy ({eps})", _pgd(k)) for k in steps),
    ]
    if any(f["test"].get("autoattack") is not None for f in finals):
        rows.append(("AutoAttack accuracy", lambda f: _pct(f["test"].get("autoattack"))))
    rows += [
        ("AS before transfer (AS attack)", lambda f: _num((f.get("score_before") or {}).get("as_score"))),
        ("AS after transfer (AS attack)", _after("as_score_rep")),
        ("RHS after = AS, both attacks", _after("as_score")),
        ("CE clean / robust", lambda f: _loss_pair(f.get("score_after") or {})),
        ("||W||_(q)", _after("head_norm")),
        ("Lemma 1 LHS", _after("lhs")),
        ("prop. fulfilled (criterion)", _after("prop_fulfilled", _pct)),
        ("rob. fulfilled (both attacks)", _after("rob_fulfilled", _pct)),
        ("selected epoch / epochs", _stages),
    ]
    return rows


def transfer_table(finals: "list[dict]", title: str = "asbound transfer") -> Table:
    """One column per method (seed 001, Tables 5 and 9), read from each run's ``final.json``."""
    table = LabelledTable(title=title, title_justify="left")
    table.add_column("", style="bold")
    for f in finals:  # RanLI / RoLI: with what --peft trained
        table.add_column(f["method"] + (f" ({f['peft']})" if f.get("peft") else ""), justify="right")
    for label, cell in transfer_rows(finals):
        table.add_row(label, *(cell(f) for f in finals))
    if any(f["test"].get("robust_rule") for f in finals):
        table.caption = ("robust accuracy per point: a point counts only if every attack run on it failed "
                         "(PGD-k: every PGD with at most k steps; AutoAttack: it and every PGD)")
        table.caption_justify = "left"
    return table


# --- predict: one row per downstream task -----------------------------------------------------------


def predict_table(rec: dict) -> Table:
    """The AS ratio and its verdict per downstream task, read from ``predict.json``."""
    pre = rec["pretrain"]
    table = LabelledTable(title=f"asbound predict: {rec['model']}, eps {rec['eps_text']} (L{rec['norm']}); "
                                f"AS on {pre['label']} = {pre['as_score']:.4g}", title_justify="left")
    for col in ("downstream", "AS score", "ratio", f"verdict (ratio <= {rec['threshold']:g})", "2 B AS (Lemma 1)",
                "measured (rob. CE - CE) / CE"):
        table.add_column(col, justify="left" if col == "downstream" else "right")
    for t in rec["tasks"]:
        bound = t["bound"]
        measured = (t["measured"] or {}).get("relative_ce")
        undefined = t["ratio"] is None
        table.add_row(t["label"], f"{t['as_score']:.4g}", "undefined" if undefined else f"{t['ratio']:.3g}",
                      "-" if undefined else t["verdict"], "-" if bound is None else f"{bound['loss_increase']:.4g}",
                      "-" if measured is None else f"{measured:.3g}")
    if any(t["ratio"] is None for t in rec["tasks"]):
        table.caption = UNDEFINED_RATIO.format(pre["label"])
        table.caption_justify = "left"
    return table


#: the note beside a prediction whose ratios are undefined
UNDEFINED_RATIO = ("ratio undefined: the AS on {} is 0 (no attack moved the representation there), so "
                   "no ratio and no verdict")
