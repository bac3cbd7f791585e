"""The analysis scripts' own logic: Table 7's verdicts (``analyses/table7_paper.py``) and the
scale a paper-protocol LeNet's record states (``analyses/train_builtin.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ANALYSES = Path(__file__).resolve().parent.parent / "analyses"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"analyses_{name}", ANALYSES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def t7():
    return load("table7_paper")


def test_within_tolerance_is_symmetric_and_inclusive(t7):
    assert t7.judge(2.0, 3.0) == "within 1.5x"
    assert t7.judge(3.0, 2.0) == "within 1.5x"
    assert t7.judge(2.0, 3.0001).startswith("1.5x: off")
    assert t7.judge(3.0001, 2.0).startswith("1/1.5x: off")
    assert t7.judge(1.0, None) == "not trained"
    assert t7.judge(1.0, 0.0) == "not trained"
    assert t7.judge(1.0, float("nan")) == "not trained"


def test_each_reason_needs_its_run(t7):
    paper, ours = 10.0, 2.0  # 1/5x
    assert t7.judge(paper, ours) == "1/5x: off"
    # sampling: the paper's value within 1.5x of the 95% interval
    assert t7.judge(paper, ours, interval=(1.0, 7.0)).startswith("1/5x: sampling")
    assert t7.judge(paper, ours, interval=(1.0, 6.0)) == "1/5x: off"
    # last iterate: the paper's value within 1.5x of the same cell at PGD's last iterate
    assert t7.judge(paper, ours, last=7.0) == "1/5x: last iterate (7)"
    assert t7.judge(paper, ours, last=6.0) == "1/5x: off"
    assert t7.judge(paper, ours, last=float("nan")) == "1/5x: off"
    # seed spread: within 1.5x of the range of this value and the other seeds'
    assert t7.judge(paper, ours, seeds=(3.0, 7.0)).startswith("1/5x: seed spread (2-7, 3 seeds)")
    assert t7.judge(paper, ours, seeds=(3.0, 6.0)) == "1/5x: off"
    assert t7.judge(paper, ours, seeds=(float("nan"),)) == "1/5x: off"
    # scale: within 1.5x of the range the training scale spans (either order)
    assert t7.judge(paper, ours, scale=(ours, 8.0)) == "1/5x: scale (2-8)"
    assert t7.judge(paper, ours, scale=(30.0, ours)) == "1/5x: scale (2-30)"
    assert t7.judge(paper, ours, scale=(ours, 6.0)) == "1/5x: off"
    assert t7.judge(paper, ours, scale=(ours, float("inf"))) == "1/5x: off"
    # the first reason that holds is the one named
    assert "sampling" in t7.judge(paper, ours, interval=(1.0, 7.0), seeds=(3.0, 7.0), scale=(ours, 8.0))
    assert "seed spread" in t7.judge(paper, ours, interval=(1.0, 2.5), seeds=(3.0, 7.0), scale=(ours, 8.0))
    assert "last iterate" in t7.judge(paper, ours, last=8.0, seeds=(3.0, 7.0), scale=(ours, 8.0))
    assert t7.kind(t7.judge(paper, ours, last=8.0)) == "last iterate"
    assert t7.kind(t7.judge(paper, ours, scale=(ours, 8.0))) == "scale"
    assert t7.judge(paper, ours, scale=(ours, 8.0), scale_kind="training") == "1/5x: training (2-8)"
    assert t7.kind(t7.judge(paper, ours)) == "off"
    assert t7.kind(t7.judge(paper, paper)) == "within 1.5x"


def _cells(t7, value: float, rhs: float) -> dict:
    return {(m, n, f): {"lhs_paper_estimator": value, "lhs_interval95": (value, value),
                        "rhs_as_attack": rhs, "rhs_interval95": (rhs, rhs),
                        "lhs_last_iterate": value, "rhs_last_iterate": rhs}
            for m in t7.MODELS for n in t7.NORMS for f in t7.FACTORS}


def test_rows_compute_every_verdict_from_the_runs(t7):
    ours_protocol = {f"{m}/L{n}/{f}": {"lhs": 1.0, "rhs_as_attack": 1.0}
                     for m in t7.MODELS for n in t7.NORMS for f in t7.FACTORS}
    cells = _cells(t7, 1.0, 10.0)
    rows = t7.build_rows(cells, ours_protocol, [], {})
    assert len(rows) == 30  # 3 pretrainings x 2 attacks x (4 LHS + 1 RHS)
    for r in rows:  # every verdict follows from the ratio alone without other runs
        paper = r["paper"]
        expect = 1 / 1.5 <= r["_value"] / paper <= 1.5
        assert (r["verdict (paper protocol)"] == "within 1.5x") == expect
        assert r["_scale"] is None and r["_seeds"] == ()
    # the standard network at the reduced scale: its own range, and the adversarial rows' factor,
    # cell by cell; the random row has none
    reduced = {k: v for k, v in _cells(t7, 0.5, 2.0).items() if k[0] == "standard"}
    rows = t7.build_rows(cells, ours_protocol, [], reduced)
    for r in rows:
        rhs = r["cell"] == "RHS"
        if r["pretraining"] == "standard":
            assert r["_scale"] == ((2.0, 10.0) if rhs else (0.5, 1.0))
            assert t7.kind(r["verdict (paper protocol)"]) in ("within 1.5x", "training", "off")
        elif r["pretraining"] == "adversarial":
            assert r["_scale"] == pytest.approx((10.0, 50.0) if rhs else (1.0, 2.0))
            assert r["_moved"] == pytest.approx(5.0 if rhs else 2.0)
        else:
            assert r["_scale"] is None
    std = {(r["attack"], r["cell"]): t7.kind(r["verdict (paper protocol)"]) for r in rows
           if r["pretraining"] == "standard"}
    assert std[("L2 PGD", "RHS")] == "training"  # 3.15 against 10 at the whole split, 2 at the reduced
    assert std[("L-inf PGD", "RHS")] == "off"  # 23.8: above 1.5 x 10
    # another seed's cells join the seed range of the same model and cell only
    other = _cells(t7, 7.0, 70.0)
    rows = t7.build_rows(cells, ours_protocol, [other], {})
    assert all(r["_seeds"] == ((70.0,) if r["cell"] == "RHS" else (7.0,)) for r in rows)
    # the last iterate of the cell itself, the RHS's from the first factor's run
    lasts = {k: {**v, "lhs_last_iterate": 100.0 + i, "rhs_last_iterate": 200.0 + i}
             for i, (k, v) in enumerate(cells.items())}
    rows = t7.build_rows(lasts, ours_protocol, [], {})
    for r in rows:
        m, n = r["pretraining"], "inf" if r["attack"] == "L-inf PGD" else "2"
        f = t7.FACTORS[0] if r["cell"] == "RHS" else r["cell"].split()[1]
        want = lasts[(m, n, f)]["rhs_last_iterate" if r["cell"] == "RHS" else "lhs_last_iterate"]
        assert r["last iterate"] == f"{want:.3g}"
    missing = {k: v for k, v in cells.items() if k[0] != "adversarial"}
    rows = t7.build_rows(missing, ours_protocol, [], {})
    assert [r["verdict (paper protocol)"] for r in rows if r["pretraining"] == "adversarial"] == ["not trained"] * 10


def test_paper_record_states_the_scale_trained():
    tb = load("train_builtin")
    import argparse

    args = argparse.Namespace(epochs=10, batch=512, optimizer="adam", lr=1e-3, pgd_steps=20, eps="8/255",
                              pgd_rel_step=0.01 / 0.3, bn_images=20000, n_probe=10000)
    adv = tb.paper_scale("adversarial", args, 20000)
    assert (adv["n_train"], adv["of_train_split"], adv["epochs"], adv["pgd_steps"], adv["pgd_eps"]) == (
        20000, 589824, 10, 20, "8/255")
    std = tb.paper_scale("standard", args, 589824)
    assert (std["n_train"], std["epochs"], std["pgd_steps"], std["pgd_eps"]) == (589824, 10, 0, None)
    rnd = tb.paper_scale("random", args, 589824)
    assert (rnd["n_train"], rnd["epochs"], rnd["pgd_steps"]) == (0, 0, 0)
