"""The paper-protocol LeNets shipped as builtins, ``builtin:lenet-paper-{random,standard,adversarial}``:
each loads from its shipped file with ``weights_only=True``, states the scale it was trained at,
is the network its training record describes (``reports/paper-lenets/``: the record's test
metrics are reproduced from the shipped file), and scores through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asbound.builtin import BUILTINS, HEADS, weights_path
from asbound.builtin.reference import ReferenceLeNet
from asbound.cli import main
from asbound.data.dsprites import FACTOR_COLUMN, dsprites_latents, factor_targets, render_dsprites, split_members
from asbound.models import load_model

RECORDS = Path(__file__).resolve().parent.parent / "reports" / "paper-lenets"
#: the record of the run that made each LeNet (the random one is made with the standard one)
RECORD = {"random": "standard.json", "standard": "standard.json", "adversarial": "adversarial.json"}


def record_of(kind: str) -> dict:
    return json.loads((RECORDS / RECORD[kind]).read_text())["models"][f"lenet-paper-{kind}"]


@pytest.mark.parametrize("kind", RECORD)
def test_loads_with_weights_only_and_states_its_scale(kind):
    name = f"lenet-paper-{kind}"
    state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    assert state["arch"] == "lenet-reference" and set(state["heads"]) == set(HEADS)
    meta, scale = state["meta"], record_of(kind)["scale"]
    assert meta["protocol"] == "paper" and meta["targets"] == "minmax"
    assert meta["epochs"] == scale["epochs"]
    if scale["n_train"]:  # the description states the scale the record gives
        assert meta["n_train"] == scale["n_train"]
        assert f"{scale['n_train']:,} images x {scale['epochs']} epochs" in BUILTINS[name]
    if scale["pgd_steps"]:
        assert f"PGD-{scale['pgd_steps']}, {scale['pgd_eps']}" in BUILTINS[name]
    loaded = load_model(f"builtin:{name}/shape")
    assert isinstance(loaded.module, ReferenceLeNet) and not loaded.module.training
    assert any("batch-norm statistics" in n for n in loaded.notes)
    assert any("minmax" in n and "--protocol paper" in n for n in loaded.notes)
    assert loaded.module(torch.zeros(2, 1, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("kind", RECORD)
def test_reproduces_the_records_test_metrics(kind):
    """The record's test metrics (2,000 test images drawn with seed 2) from the shipped file."""
    members = split_members(737_280, "test")
    pick = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(2))[:2000]]
    classes, values = dsprites_latents(pick)
    x = render_dsprites(classes)
    expected = record_of(kind)["test_metrics"]
    for factor in HEADS:
        with torch.no_grad():
            out = load_model(f"builtin:lenet-paper-{kind}/{factor}").module(x)
        if factor == "shape":
            got = float((out.argmax(1) == classes[:, FACTOR_COLUMN["shape"]]).float().mean())
            assert got == pytest.approx(expected["shape_accuracy"], abs=1e-3)
        else:
            target = factor_targets(factor, classes, values.float(), "minmax")
            got = float((out.squeeze(1) - target).pow(2).mean().sqrt())
            assert got == pytest.approx(expected[f"{factor}_rmse"], rel=1e-4)


def test_random_representation_has_data_statistics():
    """Batch-norm statistics estimated on the data: g spreads like a standardised representation,
    not like the shipped lenet-random's (its statistics stay at (0, 1): a spread of about 0.02)."""
    x = render_dsprites(dsprites_latents(torch.arange(0, 737_280, 737_280 // 256))[0])
    with torch.no_grad():
        g = load_model("builtin:lenet-paper-random").module.features(x)
    assert 0.3 < float(g.std(0).mean()) < 3


def test_scores_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["score", "--model", "builtin:lenet-paper-standard", "--data", "dsprites:scale",
               "--protocol", "paper", "--eps", "16/255", "--n", "4", "--steps", "2", "--batch-size", "4",
               "--no-progress", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["n"] == 4 and summary["as_score"] > 0 and summary["lhs"] <= summary["rhs"] + 1e-9
    assert config["protocol"] == "paper" and config["model"] == "builtin:lenet-paper-standard/scale"
