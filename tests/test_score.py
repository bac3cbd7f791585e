"""``score``'s per-datapoint semantics: every point an attack evaluates counts.

A point is robust only if no evaluated point of either attack (every step, every restart, the
clean input) changes its prediction; ``s_rep`` / ``s_loss`` are the largest representation
shifts each attack saw; ``loss_adv`` is the largest loss the loss attack saw (the clean point
included). Checked against an independent replay of every evaluated point, and on a hand-built
model whose loss attack passes through a misclassified point on its way to a higher loss.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import asbound.scoring as scoring
from asbound import ScoreConfig, score
from asbound.losses import cross_entropy

# --- a hand-built path: C (correct) -> A (misclassified) -> B (correct, higher loss) -------------

C = torch.tensor([2.0, 0.0, 0.0])
A = torch.tensor([1.0, 1.05, 0.0])  # class 1 wins
B = torch.tensor([1.0, 0.95, 0.95])  # class 0 wins again, with a higher cross-entropy than at A
X0 = 0.52


def _path_model() -> nn.Module:
    """1-pixel input x; g(x) = C + t1 (A - C) + t2 (B - A), t1 = clip((x - .5)/.1), t2 = clip((x - .6)/.1);
    the head is the identity, so the logits are g. L-inf PGD from x = .52 with step .1 and no random
    start evaluates x = .52, .62 (logits between A and B: misclassified) and .72 (logits B)."""
    first = nn.Linear(1, 2)
    first.weight.data = torch.tensor([[10.0], [10.0]])
    first.bias.data = torch.tensor([-5.0, -6.0])
    mix = nn.Linear(2, 3)
    mix.weight.data = torch.stack([A - C, B - A], dim=1)
    mix.bias.data = C.clone()
    head = nn.Linear(3, 3)
    head.weight.data, head.bias.data = torch.eye(3), torch.zeros(3)
    return nn.Sequential(nn.Flatten(), first, nn.Hardtanh(0.0, 1.0), mix, head)


@pytest.fixture(scope="module")
def path_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("path")
    torch.save(_path_model(), root / "path.pt")
    torch.save({"x": torch.full((2, 1, 1, 1), X0), "y": torch.zeros(2, dtype=torch.long), "num_classes": 3},
               root / "data.pt")
    return root


def _path_score(root, **overrides):
    options = dict(allow_pickle=True, eps=0.2, attack="pgd", rel_step=0.5, steps=2, random_start=False, n=None,
                   progress=False)  # the path PGD takes (the docstring of _path_model)
    options.update(overrides)
    return score(ScoreConfig(model=f"file:{root / 'path.pt'}", data=f"tensors:{root / 'data.pt'}"), **options)


def test_the_path_model_does_what_it_says():
    model = _path_model().eval()
    with torch.no_grad():
        logits = model(torch.tensor([X0, 0.62, 0.72]).view(3, 1, 1, 1))
    assert logits.argmax(1).tolist() == [0, 1, 0]
    ce = cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    assert ce[0] < ce[1] < ce[2]


@pytest.mark.parametrize("backend", ["asbound", "foolbox"])
def test_a_misclassified_iterate_makes_the_point_not_robust(path_files, backend):
    """The loss attack keeps x = .72 (highest loss, classified correctly); x = .62 was misclassified."""
    result = _path_score(path_files, backend=backend)
    pts = result.points
    ce_b = float(cross_entropy(B[None], torch.tensor([0])))
    ce_0 = float(cross_entropy((C + 0.2 * (A - C))[None], torch.tensor([0])))
    np.testing.assert_allclose(pts["loss_adv"], ce_b, rtol=1e-6)  # the kept point is B ...
    np.testing.assert_allclose(pts["loss_clean"], ce_0, rtol=1e-6)
    assert pts["correct"].all()
    assert not pts["robust"].any()  # ... but the iterate at .62 was classified 1 (robust before the fix)
    assert (pts["pred_adv"] == 1).all()  # the witness
    assert result.summary["robust_accuracy"] == 0.0


def test_the_loss_attack_can_win_the_sensitivity(path_files):
    """Without a random start the AS attack never moves (zero gradient at x' = x): s_rep = 0, and
    the loss attack's points give the sensitivity; Theorem 2 with the AS attack alone (the paper's
    estimator) is then fulfilled by a point that is not robust."""
    pts = _path_score(path_files).points
    g0 = C + 0.2 * (A - C)
    assert (pts["s_rep"] == 0).all()
    np.testing.assert_allclose(pts["s_loss"], float((B - g0).norm()), rtol=1e-6)
    np.testing.assert_allclose(pts["sensitivity"], pts["s_loss"])
    assert (pts["sensitivity_source"] == "loss").all()
    margin = min((g0[0] - g0[1]) / math.sqrt(2), (g0[0] - g0[2]) / math.sqrt(2))
    np.testing.assert_allclose(pts["margin"], float(margin), rtol=1e-6)
    assert float(margin) < float((B - g0).norm())
    assert not pts["fulfilled"].any()  # s_loss >= m
    assert pts["fulfilled_rep"].all()  # 0 < m: the paper's estimator says "fulfilled"
    summary = _path_score(path_files).summary
    assert summary["prop_fulfilled_rep"] == 1.0 and summary["rob_fulfilled_rep"] == 0.0
    assert summary["prop_fulfilled"] == 0.0 and summary["rob_fulfilled"] is None
    assert summary["as_score"] > summary["as_score_rep"] == 0.0


# --- an independent replay of every evaluated point ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(11)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 12), nn.Tanh(),
                        nn.Linear(12, 3))
    x = torch.rand(40, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::5] = (y[::5] + 1) % 3  # some misclassified points
    torch.save(net, root / "net.pt")
    torch.save({"x": x, "y": y, "num_classes": 3}, root / "data.pt")
    return root, net.eval(), x, y


def _recorded(monkeypatch):
    """Record every batch the AS objective and the loss objective are evaluated at."""
    seen = {"rep": [], "loss": []}

    def wrap(make, key):
        def factory(*args, **kwargs):
            objective = make(*args, **kwargs)

            def recording(x_adv):
                seen[key].append(x_adv.detach().clone())
                return objective(x_adv)

            recording.vanishes_at_x = getattr(objective, "vanishes_at_x", False)  # the shift stays a shift
            return recording

        return factory

    monkeypatch.setattr(scoring, "representation_shift", wrap(scoring.representation_shift, "rep"))
    monkeypatch.setattr(scoring, "loss_objective", wrap(scoring.loss_objective, "loss"))
    return seen


@pytest.mark.parametrize("backend,restarts,attack", [("asbound", 1, "pgd"), ("asbound", 3, "pgd"), ("foolbox", 2, "pgd"),
                                                     ("asbound", 2, "apgd"), ("asbound", 2, "nystrom")])
def test_records_agree_with_a_replay_of_every_evaluated_point(tiny_files, monkeypatch, backend, restarts, attack):
    root, net, x, y = tiny_files
    seen = _recorded(monkeypatch)
    result = score(
        ScoreConfig(model=f"file:{root / 'net.pt'}", data=f"tensors:{root / 'data.pt'}"), allow_pickle=True,
        eps=0.3, steps=4, restarts=restarts, n=None, batch_size=64, backend=backend, progress=False, attack=attack,
    )
    assert result.config["attack"] == attack and result.config["grad_dtype"] == "float32"
    assert result.config["rel_step"] == {"pgd": 0.7, "apgd": 2.0, "nystrom": 0.7}[attack]
    pts = result.points
    features = nn.Sequential(*list(net)[:-1])
    with torch.no_grad():
        g0 = features(x)
        clean = net(x)
        # every evaluated point, plus the clean input: [evaluations, N, ...]
        rep = torch.stack(seen["rep"] + [x])
        adv = torch.stack(seen["loss"] + [x])
        g_rep = features(rep.flatten(0, 1)).view(len(rep), len(x), -1)
        g_adv = features(adv.flatten(0, 1)).view(len(adv), len(x), -1)
        out = net(torch.cat([rep, adv]).flatten(0, 1)).view(len(rep) + len(adv), len(x), -1)
    per_restart = 4 + 1  # steps + the final point
    assert len(seen["rep"]) == len(seen["loss"]) >= restarts * per_restart
    np.testing.assert_allclose(pts["s_rep"], (g_rep - g0).norm(dim=2).amax(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pts["s_loss"], (g_adv - g0).norm(dim=2).amax(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pts["sensitivity"], np.maximum(pts["s_rep"], pts["s_loss"]))
    losses = torch.stack([cross_entropy(net(p), y) for p in adv]).detach()
    np.testing.assert_allclose(pts["loss_adv"], losses.amax(0).numpy(), rtol=1e-5, atol=1e-6)
    assert (pts["loss_adv"] >= pts["loss_clean"]).all()
    robust = (out.argmax(2) == y).all(0).numpy()
    assert (pts["robust"].to_numpy() == robust).all()
    assert (pts["correct"].to_numpy() == (clean.argmax(1) == y).numpy()).all()
    assert 0 < robust.sum() < pts["correct"].sum()  # the attack breaks some points, not all
    # Lemma 1 pointwise on every datapoint: the ratio is at most the shift of the loss attack
    assert (pts["lemma1_ratio"] <= pts["s_loss"] * (1 + 1e-5) + 1e-6).all()
    # Theorem 2 pointwise: every fulfilled point is robust under every evaluated point
    assert pts["robust"][pts["fulfilled"].astype(bool)].all()
    fulfilled = pts["sensitivity"].to_numpy() < pts["margin"].to_numpy()
    assert (pts["fulfilled"].to_numpy() == fulfilled).all()
    assert (pts["fulfilled_rep"].to_numpy() == (pts["s_rep"].to_numpy() < pts["margin"].to_numpy())).all()


@pytest.mark.parametrize("attack", ["apgd", "nystrom"])
def test_low_precision_gradients_report_float32_values_at_evaluated_points(tiny_files, monkeypatch, attack):
    root, net, x, y = tiny_files
    seen = _recorded(monkeypatch)
    result = score(ScoreConfig(model=f"file:{root / 'net.pt'}", data=f"tensors:{root / 'data.pt'}"), allow_pickle=True,
                   eps=0.3, steps=4, restarts=2, n=None, batch_size=64, amp="bf16", attack=attack, progress=False)
    assert result.config["amp"] == "bf16" and result.config["grad_dtype"] == "bfloat16"
    features = nn.Sequential(*list(net)[:-1])
    with torch.no_grad():
        g0 = features(x)
        shifts = torch.stack([(features(p) - g0).norm(dim=1) for p in seen["rep"]])  # float32, every point
    pts = result.points
    # each s_rep is the float32 shift at one of the evaluated points (a valid lower bound), not a bf16 value
    gap = (shifts.double() - torch.tensor(pts["s_rep"].to_numpy())).abs().amin(0)
    assert float(gap.max()) < 1e-5
    assert (pts["s_rep"] > 0).all()


def test_the_nystrom_attack_runs_its_model_on_the_shift_and_apgd_on_the_loss(tiny_files, monkeypatch):
    """--attack nystrom: the AS attack takes its model's steps; the loss attack, whose objective
    does not vanish at x, runs APGD with the same steps; the run records the attack."""
    from asbound import attacks

    root, _, _, _ = tiny_files
    calls = []
    original = attacks.Nystrom._model_step
    monkeypatch.setattr(attacks.Nystrom, "_model_step", lambda self, *a: calls.append(1) or original(self, *a))
    apgd_calls = []
    original_apgd = attacks.APGD._run_once
    monkeypatch.setattr(attacks.APGD, "_run_once", lambda self, *a, **k: apgd_calls.append(1) or original_apgd(self, *a, **k))
    seen = _recorded(monkeypatch)
    run = root / "nystrom-run"
    result = score(ScoreConfig(model=f"file:{root / 'net.pt'}", data=f"tensors:{root / 'data.pt'}"), allow_pickle=True,
                   eps=0.3, n=None, batch_size=64, progress=False, attack="nystrom", steps=10, out=run)
    assert (result.config["attack"], result.config["steps"], result.config["rel_step"]) == ("nystrom", 10, 0.7)
    assert (result.summary["attack"], result.summary["steps"]) == ("nystrom", 10)
    config = json.loads((run / "config.json").read_text())
    assert (config["attack"], config["steps"], config["rel_step"]) == ("nystrom", 10, 0.7)
    assert len(calls) == 10 - 2  # the model's steps of the one batch (the last two climb locally)
    assert len(apgd_calls) == 1  # the loss attack
    assert len(seen["rep"]) == len(seen["loss"]) == 10 + 1  # every pass, then the last point
    assert (result.points["s_rep"] > 0).all()


@pytest.mark.parametrize("options,message", [(dict(backend="foolbox", attack="apgd"), "foolbox"),
                                             (dict(backend="foolbox", amp="bf16"), "foolbox"),
                                             (dict(attack="cw"), "attack 'cw' is not valid"),
                                             (dict(amp="int8"), "amp 'int8' is not valid"),
                                             (dict(compile=True, amp="bf16"), "--compile with --amp bf16")])
def test_attack_options_are_checked(options, message):
    from asbound.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        ScoreConfig(**options).validated()


def test_foolbox_in_score_honours_seed_and_restarts(tiny_files):
    root = tiny_files[0]

    def run(**overrides):
        return score(ScoreConfig(model=f"file:{root / 'net.pt'}", data=f"tensors:{root / 'data.pt'}"),
                     allow_pickle=True, eps=0.1, steps=3, n=None, backend="foolbox", progress=False,
                     **overrides).points

    a, b = run(), run()
    np.testing.assert_array_equal(a["sensitivity"], b["sensitivity"])  # two runs differed before
    four = run(restarts=4)
    assert (four["s_rep"] >= a["s_rep"] - 1e-7).all() and (four["s_rep"] > a["s_rep"] + 1e-6).any()
    other = run(seed=1)
    assert not np.array_equal(other["s_rep"], a["s_rep"])


def test_restarts_without_a_random_start_are_refused(tiny_files):
    from asbound.errors import ConfigError

    root = tiny_files[0]
    with pytest.raises(ConfigError, match="random start"):
        score(ScoreConfig(model=f"file:{root / 'net.pt'}", data=f"tensors:{root / 'data.pt'}"),
              allow_pickle=True, restarts=2, random_start=False, progress=False)


# --- float precision: every judgment in the float64 arithmetic of the margin ---------------------


def test_near_ties_are_judged_like_the_margin(tmp_path):
    """Head rows w and w + 1e-6 u on g = 100 x: the float32 head picks another class than the exact
    f = W g + b on a few points. Predictions, robustness and margins must agree (a misclassified
    point has margin <= 0; a fulfilled point is robust)."""
    torch.manual_seed(0)
    d, n = 16, 400
    feat = nn.Linear(d, d)
    feat.weight.data, feat.bias.data = 100 * torch.eye(d), torch.zeros(d)
    head = nn.Linear(d, 2)
    w = torch.randn(d)
    head.weight.data, head.bias.data = torch.stack([w, w + 1e-6 * torch.randn(d)]), torch.zeros(2)
    net = nn.Sequential(nn.Flatten(), feat, head)
    x = torch.rand(n, 1, 4, 4)
    with torch.no_grad():
        g = feat(x.flatten(1))
        y = (g.double() @ head.weight.double().T).argmax(1)  # the exact winner as the label
        assert int((net(x).argmax(1) != y).sum()) > 0  # float32 disagrees somewhere
    torch.save(net, tmp_path / "net.pt")
    torch.save({"x": x, "y": y, "num_classes": 2}, tmp_path / "data.pt")
    for eps in (0.0, 0.002):
        pts = score(ScoreConfig(model=f"file:{tmp_path / 'net.pt'}", data=f"tensors:{tmp_path / 'data.pt'}"),
                    allow_pickle=True, eps=eps, n=None, progress=False).points
        assert pts["correct"].all()  # the float32 head misclassified 6 of these
        assert (pts["margin"][~pts["correct"].astype(bool)] <= 0).all()
        assert pts["robust"][pts["fulfilled"].astype(bool)].all()


def test_lemma1_ratio_is_bounded_by_the_shift_even_with_huge_losses(tmp_path):
    """Targets 1e6: a float32 loss rounds by a whole ulp (0.06), far more than L ||W|| shift; the
    float64 loss keeps the pointwise Lemma 1 inequality on every point."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.Tanh(), nn.Linear(8, 1))
    torch.save(net, tmp_path / "reg.pt")
    torch.save({"x": torch.rand(37, 3, 4, 4), "y": torch.full((37,), 1e6)}, tmp_path / "big.pt")
    result = score(ScoreConfig(model=f"file:{tmp_path / 'reg.pt'}", data=f"tensors:{tmp_path / 'big.pt'}"),
                   allow_pickle=True, n=None, eps=1e-3, progress=False)
    pts = result.points
    assert (pts["loss_adv"] > pts["loss_clean"]).any()
    assert (pts["lemma1_ratio"] <= pts["s_loss"] * (1 + 1e-9) + 1e-12).all()
    assert result.summary["lemma1_holds"]


def test_a_zero_head_gives_ratios_of_zero_not_nan(tmp_path):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.Tanh(), nn.Linear(8, 3))
    net[3].weight.data.zero_()
    torch.save(net, tmp_path / "zero.pt")
    torch.save({"x": torch.rand(6, 3, 4, 4), "y": torch.arange(6) % 3}, tmp_path / "d.pt")
    result = score(ScoreConfig(model=f"file:{tmp_path / 'zero.pt'}", data=f"tensors:{tmp_path / 'd.pt'}"),
                   allow_pickle=True, n=None, steps=2, progress=False)
    assert (result.points["lemma1_ratio"] == 0).all() and result.summary["lhs"] == 0


# --- what the mutations of the review survived ------------------------------------------------------


def test_points_fooled_by_the_as_attack_alone_are_not_robust(tmp_path, monkeypatch):
    """The loss attack made inert (a zero objective: it stays at its random start); the AS attack's
    iterates still misclassify points, and those points are not robust."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 12), nn.Tanh(),
                        nn.Linear(12, 3)).eval()
    x = torch.rand(40, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    root = tmp_path
    torch.save(net, root / "net.pt")
    torch.save({"x": x, "y": y, "num_classes": 3}, root / "data.pt")
    seen = _recorded(monkeypatch)
    make = scoring.loss_objective

    def inert(*args, **kwargs):
        objective = make(*args, **kwargs)
        return lambda x_adv: 0.0 * objective(x_adv)

    monkeypatch.setattr(scoring, "loss_objective", inert)
    pts = score(ScoreConfig(model=f"file:{root / 'net.pt'}", data=f"tensors:{root / 'data.pt'}"), allow_pickle=True,
                eps=0.3, steps=4, n=None, batch_size=64, progress=False).points
    with torch.no_grad():
        wrong_rep = torch.stack([net(p).argmax(1) != y for p in seen["rep"]]).any(0)
        wrong_loss = torch.stack([net(p).argmax(1) != y for p in seen["loss"] + [x]]).any(0)
    assert (pts["robust"].to_numpy() == (~(wrong_rep | wrong_loss)).numpy()).all()
    assert int((wrong_rep & ~wrong_loss).sum()) > 0  # points only the AS attack's iterates fooled


def test_a_point_on_the_decision_boundary_is_not_fulfilled(tmp_path):
    """g = x, two classes with w_0 = -w_1 and no bias: at x = 0 the classes tie; margin 0,
    sensitivity 0 at eps = 0, and 0 < 0 is false."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(1, 1, bias=False), nn.Linear(1, 2, bias=False))
    net[1].weight.data = torch.ones(1, 1)
    net[2].weight.data = torch.tensor([[1.0], [-1.0]])
    torch.save(net, tmp_path / "tie.pt")
    torch.save({"x": torch.zeros(1, 1, 1, 1), "y": torch.zeros(1, dtype=torch.long), "num_classes": 2},
               tmp_path / "d.pt")
    pts = score(ScoreConfig(model=f"file:{tmp_path / 'tie.pt'}", data=f"tensors:{tmp_path / 'd.pt'}"),
                allow_pickle=True, n=None, eps=0.0, progress=False).points
    assert pts["margin"][0] == 0 and pts["sensitivity"][0] == 0
    assert not pts["fulfilled"][0]


def test_each_batch_draws_its_own_random_starts(tmp_path):
    """Two copies of one image in two batches of one, one tiny step: their random starts differ."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.Tanh(), nn.Linear(8, 3))
    torch.save(net, tmp_path / "n.pt")
    torch.save({"x": torch.rand(1, 3, 4, 4).repeat(2, 1, 1, 1), "y": torch.zeros(2, dtype=torch.long),
                "num_classes": 3}, tmp_path / "d.pt")
    pts = score(ScoreConfig(model=f"file:{tmp_path / 'n.pt'}", data=f"tensors:{tmp_path / 'd.pt'}"),
                allow_pickle=True, n=None, steps=1, rel_step=1e-6, batch_size=1, progress=False).points
    assert pts["s_rep"][0] != pts["s_rep"][1]


def test_amp_auto_is_float32_on_every_cpu(monkeypatch, tiny_files):
    """auto must not depend on the CPU's flags: records reproduce on every CPU."""
    import asbound.devices as devices
    import asbound.scoring as scoring

    for native in (True, False):
        monkeypatch.setattr(devices, "cpu_has_bf16", lambda native=native: native)
        assert devices.attack_amp_dtype("auto", torch.device("cpu")) is None
        assert devices.attack_amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    root, net, x, y = tiny_files
    monkeypatch.setattr(scoring, "cpu_has_bf16", lambda: False)
    cfg = ScoreConfig(model=f"file:{root / 'net.pt'}", data=f"tensors:{root / 'data.pt'}")
    result = score(cfg, allow_pickle=True, eps=0.3, steps=2, n=4, progress=False)
    assert result.config["grad_dtype"] == "float32" and not any("native bf16" in n for n in result.notes)
    result = score(cfg, allow_pickle=True, eps=0.3, steps=2, n=4, amp="bf16", progress=False)
    assert result.config["grad_dtype"] == "bfloat16" and any("no native bf16" in n for n in result.notes)


def test_compiled_gradients_run_in_float32_and_report_evaluated_points(tiny_files, monkeypatch):
    root, net, x, y = tiny_files
    seen = _recorded(monkeypatch)
    result = score(ScoreConfig(model=f"file:{root / 'net.pt'}", data=f"tensors:{root / 'data.pt'}"), allow_pickle=True,
                   eps=0.3, steps=3, n=None, batch_size=64, compile=True, progress=False)
    assert result.config["compile"] is True and result.config["grad_dtype"] == "float32"  # auto: float32 compiled
    features = nn.Sequential(*list(net)[:-1])
    with torch.no_grad():
        g0 = features(x)
        shifts = torch.stack([(features(p) - g0).norm(dim=1) for p in seen["rep"]])
    gap = (shifts.double() - torch.tensor(result.points["s_rep"].to_numpy())).abs().amin(0)
    assert float(gap.max()) < 1e-5 and (result.points["s_rep"] > 0).all()
