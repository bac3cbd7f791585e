"""The seed paper's own dSprites checkpoints and protocols: the ``builtin:lenet-reference``
layout (``--weights``), ``--protocol`` (target units, split order, attack box) and the record.

The authors' checkpoint is not shipped: these tests fabricate a state dict of its layout. With
``$ASBOUND_REFERENCE_ORIENTATION`` pointing at the real ``orientation.pth`` (branch
``dsprites-exp`` of lf-tcho/robustness_transfer) one more test checks its spectral norm
against the authors' result file.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asbound.attacks import PGD, representation_shift
from asbound.builtin.reference import ReferenceLeNet
from asbound.cli import main
from asbound.data.dsprites import DSPRITES_SIZE, dsprites_latents, render_dsprites
from asbound.errors import ConfigError, ModelError
from asbound.models import load_model, split_model
from asbound.protocol import PROTOCOLS, wrap_data, wrap_model
from asbound.scoring import ScoreConfig, score

#: the authors' result_th3_2_orientation_reg_on_val.json (dsprites-exp)
REFERENCE_SPECTRAL_NORM = 3.2972710132598877


def fabricate(path, *, seed: int = 0, outputs: int = 1, duplicate_feats: bool = False) -> dict:
    """A state dict of the reference layout with trained-looking batch-norm statistics (set by a
    train-mode pass over dSprites images) and a head of ``outputs`` rows; saved to ``path`` as
    the authors' scripts save theirs (``torch.save(model.state_dict())``)."""
    torch.manual_seed(seed)
    model = ReferenceLeNet(outputs).train()
    with torch.no_grad():
        model(render_dsprites(dsprites_latents(torch.arange(0, DSPRITES_SIZE, DSPRITES_SIZE // 64))[0]))
        model.fc.bias.fill_(19.5)  # near the mean orientation class: losses of ordinary size
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if duplicate_feats:  # the later scripts registered the body a second time as ``feats``
        for new, old in (("feats.0", "feature_extractor"), ("feats.2", "linear_projections"),
                         ("feats.3", "linear_projections_output")):
            state.update({new + k[len(old):]: v for k, v in state.items() if k.startswith(old + ".")})
    torch.save(state, path)
    return state


def by_hand(state: dict, x: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """The reference forward pass written out with functional ops on the state dict alone:
    ``(g(x), f(x))``, batch norm in eval mode without affine parameters."""
    def bn(h, name):
        return F.batch_norm(h, state[f"{name}.running_mean"], state[f"{name}.running_var"], training=False, eps=1e-5)

    h = F.avg_pool2d(F.relu(F.conv2d(x, state["feature_extractor.0.weight"], state["feature_extractor.0.bias"])), 2)
    h = bn(h, "feature_extractor.3")
    h = F.avg_pool2d(F.relu(F.conv2d(h, state["feature_extractor.4.weight"], state["feature_extractor.4.bias"])), 2)
    h = bn(h, "feature_extractor.7").flatten(1)
    h = bn(F.relu(F.linear(h, state["linear_projections.0.weight"], state["linear_projections.0.bias"])),
           "linear_projections.2")
    h = bn(F.relu(F.linear(h, state["linear_projections.3.weight"], state["linear_projections.3.bias"])),
           "linear_projections.5")
    g = bn(F.relu(F.linear(h, state["linear_projections_output.0.weight"], state["linear_projections_output.0.bias"])),
           "linear_projections_output.2")
    return g, F.linear(g, state["fc.weight"], state["fc.bias"])


# --- the layout --------------------------------------------------------------------------------


def test_reference_layout_has_affine_free_batch_norms_and_head_fc():
    model = ReferenceLeNet(1)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 5 and all(not m.affine for m in norms)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 84
    assert {k.split(".")[0] for k in model.state_dict()} == {
        "feature_extractor", "linear_projections", "linear_projections_output", "fc"}


@pytest.mark.parametrize("duplicate_feats", [False, True])
def test_checkpoint_of_the_reference_layout_loads_exactly(tmp_path, one_thread, duplicate_feats):
    path = tmp_path / "orientation.pth"
    state = fabricate(path, duplicate_feats=duplicate_feats)
    loaded = load_model("builtin:lenet-reference", weights=path)
    x = render_dsprites(dsprites_latents(torch.arange(600_000, 600_016))[0])
    split = split_model(loaded.module, x)
    g, out = by_hand(state, x)
    with torch.no_grad():
        assert torch.allclose(split.features(x), g, rtol=0, atol=1e-5)
        assert torch.allclose(loaded.module(x), out, rtol=0, atol=1e-4)
    # the spectral norm of the head is the state dict's own, bit for bit
    assert torch.linalg.matrix_norm(split.W, 2).item() == torch.linalg.matrix_norm(state["fc.weight"], 2).item()


def test_score_reproduces_spectral_norm_and_clean_loss(tmp_path, one_thread):
    """The dsprites-exp protocol on a fabricated checkpoint: ||W|| is the head's spectral norm
    and the squared error of the records is the reference forward pass's MSE against the latent
    class index, on the first images of the ordered test split."""
    path = tmp_path / "orientation.pth"
    state = fabricate(path)
    result = score(ScoreConfig(model="builtin:lenet-reference", weights=str(path), data="dsprites:orientation",
                               protocol="dsprites-exp", n=12, steps=1, device="cpu"),
                   out=tmp_path / "run", progress=False)
    # in float64, as every head norm asbound reports
    assert result.summary["head_norm"] == torch.linalg.matrix_norm(state["fc.weight"].double(), 2).item()
    p = result.points
    index = torch.tensor(p["index"].to_numpy())
    assert int(index.min()) >= int(0.8 * DSPRITES_SIZE)  # the ordered split's test part
    classes = dsprites_latents(index)[0]
    _, out = by_hand(state, render_dsprites(classes))
    expected = (out.squeeze(1).double() - classes[:, 3].double()) ** 2
    assert torch.equal(torch.tensor(p["label"].to_numpy()).long(), classes[:, 3])
    recorded = torch.tensor(p["loss_clean"].to_numpy()) ** 2
    assert torch.allclose(recorded, expected, rtol=1e-5, atol=0)
    assert math.isclose(float(recorded.mean()), float(expected.mean()), rel_tol=1e-5)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["protocol"] == "dsprites-exp"
    assert config["protocol_settings"]["box"] == [-1.0, 1.0]
    assert config["protocol_settings"]["targets"] == "classes"


@pytest.mark.skipif(not os.environ.get("ASBOUND_REFERENCE_ORIENTATION"),
                    reason="the authors' orientation.pth is not shipped")
def test_the_authors_checkpoint_spectral_norm():
    loaded = load_model("builtin:lenet-reference", weights=os.environ["ASBOUND_REFERENCE_ORIENTATION"])
    exact = torch.linalg.matrix_norm(loaded.module.fc.weight.detach().double(), 2).item()
    # the authors computed it in float32 on a GPU: their value is the float32 next to the exact
    # norm's nearest float32 (one ulp, 2.4e-7, a float32 reduction's rounding)
    nearest = np.float32(exact)
    assert float(np.nextafter(nearest, np.float32(np.inf))) == REFERENCE_SPECTRAL_NORM


def test_layout_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ModelError, match="--weights PATH"):
        load_model("builtin:lenet-reference")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 84), "fc.bias": torch.zeros(1)}, bad)
    with pytest.raises(ModelError, match="missing keys"):
        load_model("builtin:lenet-reference", weights=bad)
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(ModelError, match=r"fc.weight of shape \[K, 84\]"):
        load_model("builtin:lenet-reference", weights=bad)
    good = tmp_path / "good.pth"
    state = fabricate(good, duplicate_feats=True)
    state["feats.0.0.weight"] = state["feats.0.0.weight"] + 1
    torch.save(state, bad)
    with pytest.raises(ModelError, match="does not duplicate"):
        load_model("builtin:lenet-reference", weights=bad)
    with pytest.raises(ModelError, match="ships its weights"):
        load_model("builtin:lenet-standard", weights=good)
    with pytest.raises(ModelError, match="one head"):
        load_model("builtin:lenet-reference/orientation", weights=good)


def test_cli_reference_errors_are_one_line(capsys, tmp_path):
    rc = main(["score", "--model", "builtin:lenet-reference", "--data", "dsprites:orientation",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("asbound: error: ")
    assert "--weights PATH" in err
    rc = main(["score", "--model", "builtin:lenet-standard", "--data", "digits", "--protocol", "paper",
               "--out", str(tmp_path / "run2")])
    err = capsys.readouterr().err
    assert rc == 2 and "dsprites:FACTOR data only" in err and len(err.strip().splitlines()) == 1


# --- the protocols -----------------------------------------------------------------------------


def test_protocol_target_units_and_splits():
    from asbound.protocol import load_protocol_data
    from asbound.specs import parse_data_spec

    spec = parse_data_spec("dsprites:orientation")
    data = {name: load_protocol_data(p, spec, root=None, split="test", n=50, seed=3, input_format=None)
            for name, p in PROTOCOLS.items() if name != "asbound"}
    classes, values = dsprites_latents(data["paper"].index)
    assert torch.allclose(data["paper"].y.double(), classes[:, 3].double() / 39, atol=1e-7)
    assert float(data["paper"].y.min()) >= 0 and float(data["paper"].y.max()) <= 1
    classes, _ = dsprites_latents(data["dsprites-exp"].index)
    assert torch.equal(data["dsprites-exp"].y, classes[:, 3].float())
    assert int(data["dsprites-exp"].index.min()) >= 589_824  # the last 20% of the official order
    assert int(data["paper"].index.max()) < DSPRITES_SIZE
    train = load_protocol_data(PROTOCOLS["dsprites-exp"], spec, root=None, split="train", n=50, seed=3,
                               input_format=None)
    assert int(train.index.max()) < 589_824
    # the whole set: train and test images alike (about 80% of a random draw lie in either seeded split)
    whole = load_protocol_data(PROTOCOLS["paper"], spec, root=None, split="test", n=2000, seed=5, input_format=None)
    from asbound.data.base import split_members
    share = torch.isin(whole.index, split_members(DSPRITES_SIZE, "train")).double().mean()
    assert 0.75 < float(share) < 0.85


def test_box_minus_one_one_is_scored_exactly_by_the_change_of_variables():
    """On a linear representation ``g(x) = w . x`` at the all-zero image the largest shift over
    ``{|x' - x|_inf <= eps} ∩ [lo, hi]^d`` is ``eps * sum|w|`` in the box [-1, 1] but only
    ``eps * max(sum w+, sum w-)`` in [0, 1]; one sign step of size eps reaches the first."""
    torch.manual_seed(0)
    w = torch.randn(1, 16)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 1, bias=False)).eval()
    linear[1].weight.data = w.clone()
    linear.requires_grad_(False)
    x0 = torch.zeros(4, 1, 4, 4)

    class Images:
        transforms: list = []

        def batch(self, sel):
            return x0[sel]

    eps = 0.1
    results = {}
    for name in ("asbound", "dsprites-exp"):
        p = PROTOCOLS[name]
        model, data = wrap_model(p, linear), wrap_data(p, Images())
        z = data.batch(torch.arange(4))
        with torch.no_grad():
            g0 = model(z)
        attack = PGD(eps=eps / p.width, norm="inf", steps=3, rel_step=1.0)
        res = attack(representation_shift(model, z, g0), z, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            results[name] = (model(res.x_adv) - g0).abs().squeeze(1)
        # every evaluated point lies in the box, in the model's own units
        seen = p.box[0] + p.width * res.x_adv
        assert float(seen.min()) >= p.box[0] - 1e-7 and float((seen - 0).abs().max()) <= eps + 1e-6
    full = eps * w.abs().sum()
    assert torch.allclose(results["dsprites-exp"], full.expand(4), rtol=1e-5)
    one_sided = eps * max(w.clamp(min=0).sum(), (-w).clamp(min=0).sum())
    assert float(results["asbound"].max()) <= float(one_sided) + 1e-5 < float(full)


def test_unknown_protocol_is_refused():
    with pytest.raises(ConfigError, match="valid: asbound, paper, dsprites-exp"):
        ScoreConfig(protocol="seed").validated()


def test_cli_protocol_is_recorded(capsys, tmp_path, one_thread):
    path = tmp_path / "orientation.pth"
    fabricate(path)
    out = tmp_path / "run"
    rc = main(["score", "--model", "builtin:lenet-reference", "--weights", str(path), "--data", "dsprites:orientation",
               "--protocol", "paper", "--n", "4", "--steps", "1", "--out", str(out), "--json", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"] == "paper" and config["protocol_settings"]["targets"] == "minmax"
    assert config["protocol_settings"]["split"] == "whole"


def test_runs_recorded_before_protocols_resume(tmp_path, one_thread):
    """A run directory written before --protocol existed has neither key; it resumes as asbound's."""
    out = tmp_path / "run"
    cfg = ScoreConfig(model="builtin:lenet-standard", data="dsprites:orientation", n=4, steps=1, device="cpu")
    score(cfg, out=out, progress=False)
    config = json.loads((out / "config.json").read_text())
    del config["protocol"], config["protocol_settings"]
    (out / "config.json").write_text(json.dumps(config))
    again = score(cfg, out=out, progress=False)
    assert len(again.points) == 4
