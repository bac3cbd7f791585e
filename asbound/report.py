"""Tables rendered from summaries (which are derived from per-datapoint records only).

Paper layout (seed 001, Tables 1 and 3): one row per quantity, one column per run.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from rich.table import Table


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


def _lemma(s: dict) -> str:
    if s.get("lhs") is None:
        return "-"
    return "yes" if s.get("lemma1_holds") else "NO"


ROWS: "list[tuple[str, Callable[[dict], str]]]" = [
    ("task", lambda s: s["task"] + (f" ({s['loss']})" if s.get("loss") else " (AS only)")),
    ("n", lambda s: str(s["n"])),
    ("eps", lambda s: f"{s['eps_text']} (L{s['norm']}, {s['steps']} steps)"),
    ("AS score = RHS", lambda s: _num(s.get("as_score"))),
    ("loss clean / adv", _loss_pair),
    ("diff. loss", lambda s: _num(s.get("loss_diff"))),
    ("q, L", lambda s: "-" if s.get("q") is None else f"{s['q']}, {s['lipschitz']:.4g}"),
    ("||W||_(q)", lambda s: "-" if s.get("head_norm") is None else f"{s['head_norm']:.4g} ({s['head_norm_name']})"),
    ("Lemma 1 LHS", lambda s: _num(s.get("lhs"))),
    ("LHS <= RHS", _lemma),
    ("Thm 1 capped LHS", _thm1_lhs),
    ("Thm 1 bound", _thm1),
    ("clean accuracy", lambda s: _pct(s.get("clean_accuracy"))),
    ("robust accuracy", lambda s: _pct(s.get("robust_accuracy"))),
    ("prop. fulfilled", lambda s: _pct(s.get("prop_fulfilled"))),
    ("rob. fulfilled", lambda s: _pct(s.get("rob_fulfilled"))),
    ("rob. fulfilled, AS attack only", lambda s: _pct(s.get("rob_fulfilled_rep"))),
]


def summary_table(summaries: Iterable[dict], title: str = "asbound score") -> Table:
    """One row per quantity, one column per run (``model -> data``)."""
    summaries = list(summaries)
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    for s in summaries:
        table.add_column(f"{s['model']}\n-> {s['data']}", justify="right")
    for label, cell in ROWS:
        table.add_row(label, *(cell(s) for s in summaries))
    return table
