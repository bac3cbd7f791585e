"""Tables rendered from summaries (which are derived from per-datapoint records only).

Paper layout (seed 001, Tables 1 and 3): one row per quantity, one column per run. The AS
score is a PGD estimate of a maximum (a lower bound), so "RHS", the Theorem 1 bound and the
Theorem 2 criterion are estimates, and the rows say so.

Every table reads at 80 columns (:class:`LabelledTable`): the specs, which have no spaces to
break at, stand whole in the title, and the row labels wrap only where the values could not fit
beside them otherwise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text


class LabelledTable(Table):
    """A rich table whose first column holds row labels, laid out for the console's width.

    Rich narrows the widest columns first, which can leave a value column narrower than its
    longest word (cut mid-word) while the labels keep their full width. Here every column gets at
    least its longest word; the labels keep their line where the values still fit beside them,
    else they wrap at their spaces too; what room is left goes to each column in proportion to
    what it lacks for one line per cell. The table is at least as wide as the longest word of its
    title, which wraps at the table's width. Where the console is too narrow for every word to
    stand whole, a cell folds its longest words onto the next line (rich's default cuts them to an
    ellipsis: ``dsprites:orienta…``): nothing is lost at any width.
    """

    def add_column(self, *args: Any, overflow: Any = "fold", **kwargs: Any) -> None:
        super().add_column(*args, overflow=overflow, **kwargs)

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
        least = [max([m.minimum for m in ms] + [c.min_width or 0]) for ms, c in zip(measured, self.columns)]
        natural = [max(n, m) for n, m in zip(natural, least)]
        self._natural = natural[0]
        room = options.max_width - self._extra_width - sum(self._get_padding_width(i) for i in range(len(natural)))
        if sum(natural) <= room:
            return None
        if natural[0] + sum(least[1:]) <= room:
            least[0] = natural[0]  # the labels keep their line
        elif sum(least) > room:
            return None
        spare, wants = room - sum(least), [n - m for n, m in zip(natural, least)]
        return [m + s for m, s in zip(least, self._shares(spare, wants))]

    @staticmethod
    def _shares(spare: int, wants: "list[int]") -> "list[int]":
        """``spare`` columns of room, to each column in proportion to what it lacks for one line per cell."""
        shares = [spare * w // sum(wants) for w in wants]
        for i in sorted(range(len(wants)), key=lambda i: -wants[i])[: spare - sum(shares)]:
            shares[i] += 1
        return shares


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


# --- asbound table on a terminal: seed 001's tables laid out for the console's width ----------------

#: a value column is right-aligned when every cell is a number, a percentage or "-"
_NUMBER = re.compile(r"^(-|[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?%?)$", re.IGNORECASE)


class FrameTable(LabelledTable):
    """A :class:`LabelledTable` in the look of ``asbound table``'s console tables: a rule under the
    header, no vertical lines, two spaces between columns, none at the edges. A column's
    ``min_width`` is kept (its cells on one line); the room left goes first to the columns that
    need the least of it to stand on one line (a header whole rather than two headers half)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, **options)

    @staticmethod
    def _shares(spare: int, wants: "list[int]") -> "list[int]":
        shares = [0] * len(wants)
        for i in sorted(range(len(wants)), key=lambda i: wants[i]):
            shares[i] = min(wants[i], spare)
            spare -= shares[i]
        return shares


def _text(value: Any) -> str:
    """A frame's cell as the Markdown shows it; a missing one as the tables' own ``-``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(value)


def _longest_word(text: str) -> int:
    return max((cell_len(word) for word in text.split()), default=0)


@dataclass
class _Rows:
    """A frame as rows for the console: a row label column (a row MultiIndex as group headings,
    each level indented under the one above, instead of a column per level) and value columns.
    Where the labels do not tell the rows apart (the certify table: a row per run and eps), the
    fewest leading value columns that do are ``keys``, repeated beside the labels in every table."""

    labels: "list[tuple[str, int, bool]]"  # (label, depth, is a group heading)
    label_header: str
    headers: "list[str]"
    columns: "list[list[str]]"  # per value column, a cell per row ("" on the headings)
    keys: int = 0

    @classmethod
    def of(cls, frame: Any) -> "_Rows":
        levels = frame.index.nlevels
        labels: "list[tuple[str, int, bool]]" = []
        positions: "list[Optional[int]]" = []
        previous: "Optional[tuple[str, ...]]" = None
        for k, key in enumerate(frame.index):
            key = tuple(_text(x) for x in (key if levels > 1 else (key,)))
            for depth in range(levels - 1):
                if previous is None or key[: depth + 1] != previous[: depth + 1]:
                    labels.append((key[depth], depth, True))
                    positions.append(None)
            labels.append((key[-1], levels - 1, False))
            positions.append(k)
            previous = key
        names = list(frame.index.names)
        header = "\n".join("  " * d + str(n) for d, n in enumerate(names) if n is not None)
        headers = [" → ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
        columns = [["" if k is None else _text(frame.iat[k, j]) for k in positions] for j in range(frame.shape[1])]
        rows = [tuple(_text(x) for x in (key if levels > 1 else (key,))) for key in frame.index]
        keys = next((k for k in range(frame.shape[1] + 1)
                     if len({(*r, *(_text(frame.iat[i, j]) for j in range(k))) for i, r in enumerate(rows)})
                     == len(rows)), 0)
        return cls(labels, header, headers, columns, keys if keys < frame.shape[1] else 0)

    def label_width(self) -> int:
        """The widest row label on one line (its indent included), or the header's widest line."""
        widths = [cell_len(text) + 2 * depth for text, depth, _ in self.labels]
        return max(widths + [cell_len(line) for line in self.label_header.splitlines()] + [0])

    def comfortable(self, headers: "list[str]") -> "list[int]":
        """Per value column: its widest cell on one line, and no narrower than its header's longest
        word (the header wraps at its spaces above the values)."""
        return [max([cell_len(c) for c in cells] + [_longest_word(h)]) for h, cells in zip(headers, self.columns)]

    def fits(self, headers: "list[str]", chunk: "list[int]", width: int) -> bool:
        """Whether the labels, the key columns and ``chunk`` stand in ``width`` with every cell on one line."""
        wants, shown = self.comfortable(headers), [*range(self.keys), *chunk]
        return self.label_width() + sum(wants[j] for j in shown) + _overhead(len(shown) + 1) <= width

    def chunks(self, headers: "list[str]", width: int) -> "list[list[int]]":
        """The value columns after the keys, in order, in as few tables as fit ``width`` with every
        label and value on one line, the row labels (and keys) repeated in each; a column too wide
        for that stands alone (its cells then wrap at their spaces)."""
        chunks: "list[list[int]]" = [[]]
        for i in range(self.keys, len(headers)):
            if chunks[-1] and not self.fits(headers, chunks[-1] + [i], width):
                chunks.append([i])
            else:
                chunks[-1].append(i)
        return chunks

    def table(self, headers: "list[str]", chunk: "list[int]", width: int) -> FrameTable:
        """The table of the key columns and the value columns ``chunk``; each keeps its cells on one
        line where they fit ``width`` so (else the cells of its widest column wrap at their spaces)."""
        shown = [*range(self.keys), *chunk]
        wants = self.comfortable(headers) if self.fits(headers, chunk, width) else [0] * len(headers)
        table = FrameTable()
        table.add_column(Text(self.label_header), style=None)
        for j in shown:
            numeric = all(_NUMBER.match(c) for c in self.columns[j] if c)
            table.add_column(Text(headers[j]), justify="right" if numeric else "left", min_width=wants[j])
        for k, (label, depth, heading) in enumerate(self.labels):
            if heading and depth == 0 and k:
                table.add_section()
            cell = Text(label, style="bold" if heading else "")
            table.add_row(Padding(cell, (0, 0, 0, 2 * depth), expand=False) if depth else cell,
                          *(self.columns[j][k] for j in shown))
        return table


def _overhead(columns: int) -> int:
    """The width a :class:`FrameTable` of ``columns`` columns takes beyond its cells."""
    table = FrameTable()
    for _ in range(columns):
        table.add_column()
    return table._extra_width + sum(table._get_padding_width(i) for i in range(columns))


def _bullets(lines: "Iterable[str]", style: str = "", bullet: str = "-") -> Table:
    """Lines as a list, each wrapped at the width with its continuation indented under its text."""
    grid = Table.grid(padding=(0, 1, 0, 0))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold", style=style)
    for line in lines:
        grid.add_row(bullet, line)
    return grid


class ConsoleTables:
    """The blocks of ``asbound table`` (title, table, notes) laid out at the console's width.

    A block whose table fits the width with every label and value on one line prints as one table.
    Else its columns: where the rows are quantities and the columns runs (headers such as
    ``pretraining → downstream``), the headers become keys ``(1)``, ``(2)``, ... listed under the
    title, if that needs fewer tables; then the value columns are split into as few tables as fit,
    each repeating the row labels. A row MultiIndex becomes group headings, each level indented
    under the one above. The notes, the command and the run directories wrap at their spaces.
    """

    def __init__(self, blocks: "list[Any]", notes: "list[str]", provenance: "list[str]") -> None:
        self.blocks, self.notes, self.provenance = blocks, notes, provenance

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        for block in self.blocks:
            yield Text(block.title, style="bold")
            yield Text("")
            rows = _Rows.of(block.frame)
            headers = rows.headers
            chunks = rows.chunks(headers, width)
            if len(chunks) > 1 and block.frame.index.names[-1] in (None, "quantity"):
                keys = [f"({i})" for i in range(1, len(headers) + 1)]
                keyed = rows.chunks(keys, width)
                if len(keyed) < len(chunks):
                    yield _keys(keys, headers)
                    yield Text("")
                    headers, chunks = keys, keyed
            for chunk in chunks:
                yield rows.table(headers, chunk, width)
                yield Text("")
            if block.notes:
                yield _bullets(block.notes)
                yield Text("")
        yield _bullets(self.notes, style="italic")
        grid = Table.grid(padding=(0, 1, 0, 0))
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(overflow="fold", style="dim")
        for line in self.provenance:
            key, _, value = line.partition(": ")
            grid.add_row(f"{key}:", value)
        yield grid


def _keys(keys: "list[str]", headers: "list[str]") -> Table:
    grid = Table.grid(padding=(0, 1, 0, 0))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for key, header in zip(keys, headers):
        grid.add_row(key, header)
    return grid
