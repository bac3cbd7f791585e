"""``asbound predict``: the AS ratio against closed forms on a linear representation, Lemma 1's
loss-increase bound, the measured predictive power (Spearman) and bad input."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from asbound.cli import main
from asbound.errors import ConfigError, ResumeError
from asbound.predict import PredictConfig, Task, parse_tasks, predict, spearman


def _linear(tmp_path, A):
    model = nn.Sequential(nn.Flatten(), nn.Linear(A.shape[1], A.shape[0], bias=False), nn.Linear(A.shape[0], 3))
    model[1].weight.data = A.clone()
    path = tmp_path / "linear.pt"
    torch.save(model, path)
    return path


def _linf_max(A, lo, hi):
    """max ||A d||_2 over the box lo <= d <= hi: at a vertex (the norm is convex)."""
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=A.shape[1])), dtype=torch.float64)
    d = lo + corners * (hi - lo)
    return float((d @ A.double().T).norm(dim=1).max())


def test_predict_on_a_linear_representation_gives_the_closed_form_ratio(tmp_path):
    """g(x) = A x. Interior points (the L-inf ball inside [0, 1]^d): s = max over the vertices of
    [-eps, eps]^d. Points at the corner x = 0: the box leaves only [0, eps]^d. So the ratio of the
    two data sets' AS is the ratio of two vertex maxima, the same for every point."""
    torch.manual_seed(3)
    A = torch.randn(3, 4)
    eps = 0.05
    interior = torch.rand(12, 1, 2, 2) * 0.5 + 0.25
    corner = torch.zeros(10, 1, 2, 2)
    torch.save({"x": interior, "y": torch.randint(0, 3, (12,))}, tmp_path / "pre.pt")
    torch.save({"x": corner, "y": torch.randint(0, 3, (10,))}, tmp_path / "down.pt")
    cfg = PredictConfig(model=f"file:{_linear(tmp_path, A)}", pretrain_data=f"tensors:{tmp_path / 'pre.pt'}",
                        data=f"tensors:{tmp_path / 'down.pt'},tensors:{tmp_path / 'pre.pt'}@classes=0-2", eps=eps,
                        steps=60, rel_step=0.5, restarts=12, n=None, batch_size=16, device="cpu", allow_pickle=True,
                        head_norm=2.5, threshold=0.9)
    rec = predict(cfg, tmp_path / "out", progress=False, printer=lambda _: None)
    s_pre = _linf_max(A, -eps * torch.ones(4), eps * torch.ones(4))
    s_corner = _linf_max(A, torch.zeros(4), eps * torch.ones(4))
    assert rec["pretrain"]["as_score"] == pytest.approx(s_pre, rel=2e-4)
    down, same = rec["tasks"]
    assert down["as_score"] == pytest.approx(s_corner, rel=2e-4)
    assert down["ratio"] == pytest.approx(s_corner / s_pre, rel=4e-4)
    assert same["ratio"] == pytest.approx(1.0, rel=4e-4)
    assert s_corner / s_pre < 0.9 and down["verdict"] == "transfers"
    assert same["verdict"] == "does not transfer"  # threshold 0.9 < 1
    # Lemma 1 multiplied out: L ||W|| AS with L = 2 for cross-entropy in the max norm
    assert down["bound"]["loss_increase"] == pytest.approx(2 * 2.5 * down["as_score"])
    assert down["bound"]["source"] == "--head-norm" and down["measured"] is None
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["tasks"][0]["ratio"] == down["ratio"]
    # rerunning reuses every score run; a task added runs alone; other settings are refused
    again = predict(cfg, tmp_path / "out", progress=False, printer=lambda line: pytest.fail(line))
    assert again["tasks"] == rec["tasks"]
    ran = []
    wider = dataclasses.replace(cfg, data=cfg.data + f",tensors:{tmp_path / 'down.pt'}@classes=0-1")
    more = predict(wider, tmp_path / "out", progress=False, printer=ran.append)
    assert len(ran) == 1 and more["tasks"][:2] == rec["tasks"] and len(more["tasks"]) == 3
    with pytest.raises(ResumeError, match="holds a prediction with other settings .*eps"):
        predict(dataclasses.replace(cfg, eps=0.04), tmp_path / "out", progress=False, printer=lambda _: None)
    with pytest.raises(ResumeError, match="holds a prediction with other settings .*attack"):
        predict(dataclasses.replace(cfg, attack="apgd"), tmp_path / "out", progress=False, printer=lambda _: None)
    # a prediction written before --attack existed ran PGD: it is still the same prediction
    manifest = tmp_path / "out" / "predict.json"
    old = json.loads(manifest.read_text())
    del old["config"]["attack"]
    manifest.write_text(json.dumps(old))
    assert predict(cfg, tmp_path / "out", progress=False, printer=lambda line: pytest.fail(line))["tasks"] == rec["tasks"]


def test_measured_predictive_power_and_the_head_norm_of_a_reference_run(tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["predict", "--model", "builtin:digits-adversarial", "--pretrain-data", "digits", "--pretrain-classes",
            "0-4", "--data", "digits@classes=5-9,digits@classes=0,2,4,6,8,digits@classes=1,3,5,7,9", "--n", "16",
            "--steps", "3", "--batch-size", "16", "--measure", "lp,adv-lp", "--epochs", "1", "--n-train", "48",
            "--n-test", "16", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    rec = json.loads((out / "predict.json").read_text())
    assert [t["label"] for t in rec["tasks"]] == ["digits [5-9]", "digits [0,2,4,6,8]", "digits [1,3,5,7,9]"]
    for t in rec["tasks"]:
        m = t["measured"]
        final = json.loads((out / m["dir"] / "final.json").read_text())
        after = final["score_after"]
        assert m["relative_ce"] == pytest.approx((after["loss_adv"] - after["loss_clean"]) / after["loss_clean"])
        assert m["clean_accuracy"] == final["test"]["clean_accuracy"]
        assert m["robust_accuracy"] == final["test"]["pgd"]["20"]
        assert (out / m["adv_lp"]["dir"] / "final.json").exists()
    s = rec["spearman"]["ratio_vs_relative_ce"]
    assert s["n"] == 3
    assert s["rho"] == pytest.approx(spearman([t["ratio"] for t in rec["tasks"]],
                                              [t["measured"]["relative_ce"] for t in rec["tasks"]])["rho"])
    assert "lp_accuracy_vs_adv_lp_robust_accuracy" in rec["spearman"]
    shown = capsys.readouterr().out
    assert "Spearman ratio vs relative ce" in shown and "digits [5-9]" in shown
    # the LP run's head norm as --head-norm run:DIR
    lp = out / rec["tasks"][0]["measured"]["dir"]
    rec2 = predict(PredictConfig(model="builtin:digits-adversarial", pretrain_data="digits", pretrain_classes="0-4",
                                 data="digits@classes=5-9", n=24, steps=3, batch_size=16, device="cpu",
                                 head_norm=f"run:{lp}"), tmp_path / "p2", progress=False, printer=lambda _: None)
    b = rec2["tasks"][0]["bound"]
    head = json.loads((lp / "final.json").read_text())["score_after"]["head_norms"]["row_max"]
    assert b["head_norm"] == head and b["source"] == f"run:{lp}"
    assert b["loss_increase"] == pytest.approx(2 * head * rec2["tasks"][0]["as_score"])


def test_task_grammar():
    assert parse_tasks("cifar10,digits@classes=0,2,4@resize=16") == [
        Task("cifar10"), Task("digits", classes="0,2,4", resize=16)]
    assert parse_tasks("digits@corruption=zoom_blur:2")[0] == Task("digits", corruption="zoom_blur", severity=2)
    with pytest.raises(ConfigError, match="modifier 'size=3' is not valid"):
        parse_task_text = "digits@size=3"
        parse_tasks(parse_task_text)
    with pytest.raises(ConfigError, match="NAME:SEVERITY"):
        parse_tasks("digits@corruption=zoom_blur")
    with pytest.raises(ConfigError, match="given twice"):
        parse_tasks("digits,digits")


def test_spearman_needs_three_varying_pairs():
    assert spearman([1, 2], [3, 4]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2, 3], [3, 2, 1])["rho"] == pytest.approx(-1)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--measure", "ft"], "--measure ft is not valid; valid: lp, adv-lp"),
        (["--measure", "adv-lp"], "give --measure lp,adv-lp"),
        (["--head-norm", "-1"], "--head-norm must be a number > 0 or run:DIR"),
        (["--head-norm", "run:/nonexistent"], "holds no finished transfer run"),
        (["--threshold", "0"], "threshold must be a number > 0"),
        (["--data", "digits@classes"], "modifier 'classes' is not valid"),
        (["--data", "imagenet"], "unknown data spec 'imagenet'"),
    ],
)
def test_bad_predict_input_is_one_line_exit_2(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["predict", "--model", "builtin:digits-adversarial", "--pretrain-data", "digits", "--data", "digits",
            "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("asbound: error:")
    assert not out.exists()


def test_the_measuring_lp_evaluates_as_many_test_images_as_are_scored():
    from asbound.predict import _transfer_config

    cfg = PredictConfig(model="builtin:digits-adversarial", pretrain_data="digits", data="digits", n=300).validated()
    assert _transfer_config(cfg, Task("digits"), "lp")["n_test"] == 300
    assert _transfer_config(PredictConfig(**{**cfg.__dict__, "n_test": None}), Task("digits"), "lp")["n_test"] is None
    with pytest.raises(ConfigError, match="n-test must be"):
        PredictConfig(model="builtin:digits-adversarial", pretrain_data="digits", data="digits", n_test=0).validated()


def test_spearman_p_is_exact_for_few_tasks_and_task_directories_never_collide():
    s = spearman([1, 2, 3], [0.1, 0.5, 2.0])
    assert s["rho"] == pytest.approx(1.0) and s["p"] == pytest.approx(1 / 3) and s["p_method"] == "exact permutation"
    assert spearman([1, 2, 3, 4], [1, 2, 3, 4])["p"] == pytest.approx(1 / 12)
    assert spearman(list(range(12)), list(range(12)))["p_method"] == "t approximation"
    with pytest.raises(ConfigError, match="would share the run directory digits-0-2"):
        parse_tasks("digits@classes=0,2,digits@classes=0-2")


def test_the_ratio_divides_by_the_pretraining_as_of_the_representation_attack_alone(tmp_path):
    """The tasks' AS comes from the representation attack alone (no labels), so the ratio's
    denominator must too, though the pretraining run, having labels, also ran the loss attack (its
    ``as_score`` is the larger shift of both). A 2-step attack on the digits CNN makes them differ."""
    out = tmp_path / "p"
    rec = predict(PredictConfig(model="builtin:digits-adversarial", pretrain_data="digits", pretrain_classes="0-4",
                                data="digits@classes=5-9", n=16, steps=2, batch_size=16, device="cpu"),
                  out, progress=False, printer=lambda _: None)
    pre = json.loads((out / rec["pretrain"]["dir"] / "summary.json").read_text())
    assert pre["as_score"] > 1.02 * pre["as_score_rep"]  # the two AS differ here (a linear map: equal)
    task = rec["tasks"][0]
    down = json.loads((out / task["dir"] / "summary.json").read_text())
    assert task["as_score"] == down["as_score"] == down["as_score_rep"]  # the AS-only run: one attack
    assert rec["pretrain"]["as_score"] == pre["as_score_rep"] and rec["pretrain"]["as_score_both"] == pre["as_score"]
    assert task["ratio"] == pytest.approx(down["as_score_rep"] / pre["as_score_rep"], rel=1e-12)


def test_spearman_beyond_exact_n_gives_the_t_approximation_and_a_permutation_p():
    from scipy.stats import rankdata

    from asbound.predict import PERMUTATIONS, p_text

    x = list(range(9))
    y = [2, 0, 1, 5, 3, 8, 4, 6, 7]
    s = spearman(x, y)
    assert s["p_method"] == "t approximation" and s["permutations"] == PERMUTATIONS
    ra, rb = rankdata(x), rankdata(y)
    perms = torch.tensor(list(itertools.permutations(rb)), dtype=torch.float64)  # all 9! orderings: the exact p
    centred = perms - perms.mean(1, keepdim=True)
    ca = torch.tensor(ra - ra.mean())
    rhos = centred @ ca / (centred.norm(dim=1) * ca.norm())
    exact = float((rhos.abs() >= abs(s["rho"]) - 1e-12).double().mean())
    assert 0.01 < exact < 0.2
    assert s["p_permutation"] == pytest.approx(exact, abs=4 * (exact * (1 - exact) / PERMUTATIONS) ** 0.5)
    assert s["p"] != pytest.approx(exact, rel=0.02)  # the t approximation is another number
    assert p_text(s) == (f"p {s['p']:.2g}, t approximation; {s['p_permutation']:.2g} by {PERMUTATIONS:,} random "
                         f"permutations")
    assert p_text({"p": 0.0003, "n": 20}) == "p 0.0003, t approximation"  # written before p_method was


def test_the_measured_robust_accuracy_is_the_strongest_evaluation_recorded():
    from asbound.predict import _strongest

    test = {"robust_accuracy": 0.3, "autoattack": 0.5, "pgd": {"5": 0.7, "20": 0.6}}
    assert _strongest(test) == 0.3  # a point robust only if every attack failed on it
    del test["robust_accuracy"]
    assert _strongest(test) == 0.5
    del test["autoattack"]
    assert _strongest(test) == 0.6  # PGD-20, the most steps (not the string-largest key "5")


def test_spearman_is_exact_up_to_exact_n_tasks_and_the_permutation_p_counts_the_observed_ordering():
    """8 tasks (EXACT_N): the exact test over 8! orderings, whose p at rho = 1 is 2 / 8!; 9 tasks:
    the t approximation with the Monte Carlo p beside it, which counts the observed ordering:
    at rho = 1 over 12 tasks no random ordering reaches it, and p is 1 / (B + 1), never 0."""
    import math

    from asbound.predict import EXACT_N, PERMUTATIONS

    exact = spearman(list(range(EXACT_N)), list(range(EXACT_N)))
    assert exact["p_method"] == "exact permutation" and exact["p"] == pytest.approx(2 / math.factorial(EXACT_N))
    assert spearman(list(range(EXACT_N + 1)), list(range(EXACT_N + 1)))["p_method"] == "t approximation"
    perfect = spearman(list(range(12)), [x ** 2 for x in range(12)])
    assert perfect["rho"] == pytest.approx(1.0) and perfect["p_permutation"] == 1 / (PERMUTATIONS + 1)


def _relu_files(folder: Path) -> None:
    """relu.pt: g(x) = relu(x_1 + ... + x_4 - 1) on 1x2x2 inputs, a head of 3 classes; pre.pt: 10
    images of 0 (g is 0 on their eps-box), down.pt: 10 images of 0.5 (g is linear there)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 3))
    with torch.no_grad():
        model[1].weight.fill_(1.0)
        model[1].bias.fill_(-1.0)
    torch.save(model, folder / "relu.pt")
    y = torch.arange(10) % 3
    torch.save({"x": torch.zeros(10, 1, 2, 2), "y": y}, folder / "pre.pt")
    torch.save({"x": torch.full((10, 1, 2, 2), 0.5), "y": y}, folder / "down.pt")


def test_a_ratio_at_the_threshold_transfers(tmp_path, capsys):
    """The task is the pretraining data itself: the ratio is exactly 1, at most --threshold 1."""
    _relu_files(tmp_path)
    out = tmp_path / "p"
    argv = ["predict", "--model", f"file:{tmp_path / 'relu.pt'}", "--allow-pickle", "--pretrain-data",
            f"tensors:{tmp_path / 'down.pt'}", "--data", f"tensors:{tmp_path / 'down.pt'}@classes=0-2",
            "--threshold", "1", "--eps", "0.05", "--steps", "5", "--n", "all", "--device", "cpu", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    task = json.loads((out / "predict.json").read_text())["tasks"][0]
    assert task["ratio"] == 1.0 and task["verdict"] == "transfers"


def test_a_pretraining_as_of_zero_leaves_the_ratio_undefined(tmp_path, capsys):
    """g(x) = relu(x_1 + ... + x_4 - 1): 0 on the whole eps-box around x = 0 (the pretraining
    data: AS 0), linear around x = 0.5 (the task: AS > 0). The ratio AS / 0 is undefined: recorded
    as null with the verdict ``undefined``, shown so in every table with a note, left out of the
    plot. Before: ``predict`` stopped with a ValueError traceback (an infinite ratio written to
    JSON); a record holding the null ratio made ``table`` refuse the whole prediction."""
    from asbound.report.plots import predict as predict_plot
    from asbound.report.runs import collect

    _relu_files(tmp_path)
    out = tmp_path / "p"
    argv = ["predict", "--model", f"file:{tmp_path / 'relu.pt'}", "--allow-pickle", "--pretrain-data",
            f"tensors:{tmp_path / 'pre.pt'}", "--data", f"tensors:{tmp_path / 'down.pt'}", "--eps", "0.05",
            "--steps", "5", "--n", "all", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    shown = " ".join(capsys.readouterr().out.split())
    rec = json.loads((out / "predict.json").read_text())
    task = rec["tasks"][0]
    assert rec["pretrain"]["as_score"] == 0 and task["as_score"] == pytest.approx(4 * 0.05, rel=1e-5)
    assert task["ratio"] is None and task["verdict"] == "undefined"
    note = f"ratio undefined: the AS on {rec['pretrain']['label']} is 0 (no attack moved the representation there)"
    assert "undefined" in shown and note in shown
    for verdict in ("undefined", "does not transfer"):  # as predict writes it, and as it wrote it before
        task["verdict"] = verdict
        (out / "predict.json").write_text(json.dumps(rec))
        assert main(["table", str(out), "--style", "predict"]) == 0
        table = capsys.readouterr().out
        row = next(line for line in table.splitlines() if "down.pt" in line and "|" in line)
        assert [c.strip() for c in row.split("|")][4:6] == ["undefined", "-"], row
        pre = next(line for line in table.splitlines() if "pre.pt" in line and "|" in line)
        assert [c.strip() for c in pre.split("|")][4:6] == ["undefined", "-"], pre  # not "1 (pretraining)"
        assert note in table
    # measured tasks: the one without a ratio is left out of the plot, the other drawn
    task["measured"] = {"relative_ce": 0.5}
    rec["tasks"].append({**task, "label": "other", "ratio": 0.8, "verdict": "transfers",
                         "measured": {"relative_ce": 0.25}})
    (out / "predict.json").write_text(json.dumps(rec))
    fig = predict_plot(collect([out])[0])
    points = fig.axes[0].collections[0].get_offsets()
    assert points.tolist() == [[0.8, 0.25]]
    assert "1 task without a ratio left out" in fig.axes[0].get_title()
