"""The score table: each row shows its own summary key (a value that no other key holds)."""

from __future__ import annotations

from rich.console import Console

from asbound.report.console import ROWS, summary_table


def _summary(**changes) -> dict:
    s = {
        "model": "builtin:m", "data": "dsprites:shape", "task": "classification", "loss": "cross_entropy",
        "n": 123, "eps_text": "8/255", "norm": "inf", "steps": 20,
        "as_score": 1.111, "as_score_rep": 2.222, "loss_clean": 0.3333, "loss_adv": 0.4444, "loss_diff": 5.555,
        "q": "inf", "lipschitz": 2.0, "head_norm": 6.666, "head_norm_name": "row_max", "lhs": 7.777,
        "lemma1_holds": True, "lemma1_holds_rep": False,
        "theorem1": {"lhs_capped": 8.888, "cap": 10.0, "delta": 0.05, "bound": 9.999, "lipschitz_term": 9.5,
                     "confidence": 0.499},
        "clean_accuracy": 0.111, "robust_accuracy": 0.222, "prop_fulfilled": 0.333, "rob_fulfilled": 0.444,
        "rob_fulfilled_rep": 0.555,
    }
    s.update(changes)
    return s


def _cells(summary: dict) -> "dict[str, str]":
    return {label: cell(summary) for label, cell in ROWS}


def test_each_row_reads_its_own_key():
    cells = _cells(_summary())
    assert cells["AS score = RHS (both attacks)"] == "1.111"
    assert cells["AS score, AS attack alone"] == "2.222"
    assert cells["loss clean / adv"] == "0.3333 / 0.4444"
    assert cells["diff. loss"] == "5.555"
    assert cells["||W||_(q)"] == "6.666 (row_max)"
    assert cells["Lemma 1 LHS"] == "7.777"
    assert cells["LHS <= RHS (holds by construction)"] == "yes"
    assert cells["LHS <= AS attack alone (paper)"] == "NO"
    assert cells["Thm 1 capped LHS"].startswith("8.888")
    assert cells["Thm 1 bound (estimate: PGD AS)"] == "9.999 = 9.5 + 0.499"
    assert cells["clean accuracy"] == "11.1%"
    assert cells["robust accuracy (every iterate)"] == "22.2%"
    assert cells["prop. fulfilled (criterion)"] == "33.3%"
    assert cells["rob. fulfilled (both attacks)"] == "44.4%"
    assert cells["rob. fulfilled, AS attack only (paper)"] == "55.5%"
    flipped = _cells(_summary(lemma1_holds=False, lemma1_holds_rep=True))
    assert flipped["LHS <= RHS (holds by construction)"] == "NO"
    assert flipped["LHS <= AS attack alone (paper)"] == "yes"


def test_an_as_only_run_shows_dashes():
    s = {"model": "builtin:m", "data": "cifar10", "task": "classification", "n": 5, "eps_text": "8/255",
         "norm": "inf", "steps": 20, "as_score": 0.5, "as_score_rep": 0.5}
    cells = _cells(s)
    assert cells["task"] == "classification (AS only)"
    assert cells["Lemma 1 LHS"] == "-" and cells["LHS <= RHS (holds by construction)"] == "-"
    assert cells["rob. fulfilled (both attacks)"] == "-" and cells["Thm 1 bound (estimate: PGD AS)"] == "-"


def test_a_shared_model_goes_to_the_title():
    console = Console(width=100, record=True)
    console.print(summary_table([_summary(data="dsprites:orientation"), _summary()]))
    text = console.export_text()
    assert "asbound score: builtin:m" in text and "dsprites:orientation" in text and "-> " not in text
    console = Console(width=100, record=True)
    console.print(summary_table([_summary()]))
    text = console.export_text()
    assert "builtin:m" in text and "-> dsprites:shape" in text


def test_the_transfer_rows_order_the_pgd_steps_as_numbers():
    """PGD-5 comes before PGD-20 (as strings "20" sorts first) and each row reads its own key."""
    from asbound.report.console import transfer_rows

    final = {"method": "lp", "test": {"n": 10, "clean_accuracy": 0.9, "eps_text": "8/255",
                                      "pgd": {"20": 0.25, "5": 0.5, "100": 0.125}}}
    rows = [(label, cell(final)) for label, cell in transfer_rows([final]) if label.startswith("PGD-")]
    assert rows == [("PGD-5 accuracy (8/255)", "50.0%"), ("PGD-20 accuracy (8/255)", "25.0%"),
                    ("PGD-100 accuracy (8/255)", "12.5%")]
