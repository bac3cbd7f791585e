"""``transfer``: the methods over one loop, run directories that resume exactly, runs as models.

Tiny pickled CNNs on scikit-learn's bundled digits (8x8, real, offline); a few epochs each.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asbound.transfer.loop as loop
import asbound.transfer.run as run_module
from asbound import ScoreConfig, score
from asbound.cli import main
from asbound.errors import ResumeError
from asbound.transfer import TransferConfig, transfer
from fabricate import digits_cnn, interrupt_training, run_held_by_another_process


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A CNN briefly trained on digits 0-4 (the 'pretraining'), saved whole."""
    from asbound.data import load_data

    torch.manual_seed(0)
    net = digits_cnn()
    data = load_data("digits", split="train", classes="0-4")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    for _ in range(3):
        for x, y in data.loader(64, shuffle=True, seed=1):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    path = tmp_path_factory.mktemp("pretrained") / "cnn.pt"
    torch.save(net.eval(), path)
    return path


def _cfg(pretrained: Path, method: str, **kw) -> TransferConfig:
    options = dict(model=f"file:{pretrained}", data="digits", classes="5-9", method=method, epochs=2,
                   batch_size=64, allow_pickle=True, n=200, n_test=100, score_n=40, score_steps=5, eval_steps=(3,),
                   attack_steps=3, lr=0.05, lr_ft=0.01)
    options.update(kw)
    return TransferConfig(**options)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- what each method trains ---------------------------------------------------------------------


def test_lp_leaves_the_backbone_bit_for_bit_and_ft_changes_it(pretrained, tmp_path):
    base = torch.load(pretrained, weights_only=False).state_dict()
    results = transfer(_cfg(pretrained, "lp,ft", score=False, augment="none"), tmp_path / "run", progress=False,
                       printer=lambda s: None)
    lp, ft = (_state(r.out / "model.pt") for r in results)
    backbone = [k for k in base if not k.startswith("6.")]  # everything but the pretrained head
    assert any("running_mean" in k for k in backbone)  # BN buffers are among them
    for k in backbone:
        assert torch.equal(lp[f"backbone.{k}"], base[k]), k  # LP: parameters and buffers unchanged
    changed = [k for k in backbone if not torch.equal(ft[f"backbone.{k}"], base[k])]
    assert any("running_mean" in k for k in changed) and any(k.endswith("weight") for k in changed)
    assert lp["head.weight"].shape == (5, 16)
    finals = [r.final for r in results]
    assert finals[0]["stages"][0]["cached_features"] and not finals[1]["stages"][0]["cached_features"]


def test_lp_on_cached_features_equals_lp_through_the_backbone(pretrained, tmp_path, monkeypatch):
    a = transfer(_cfg(pretrained, "lp", score=False, augment="none"), tmp_path / "cached", progress=False,
                 printer=lambda s: None)[0]
    assert a.final["stages"][0]["cached_features"]
    plan = run_module.plan_stages

    def uncached(*args, **kwargs):
        import dataclasses

        return [dataclasses.replace(p, cache_features=False) for p in plan(*args, **kwargs)]

    monkeypatch.setattr(run_module, "plan_stages", uncached)
    b = transfer(_cfg(pretrained, "lp", score=False, augment="none"), tmp_path / "backbone", progress=False,
                 printer=lambda s: None)[0]
    assert not b.final["stages"][0]["cached_features"]
    for k, v in _state(a.out / "model.pt").items():
        torch.testing.assert_close(v, _state(b.out / "model.pt")[k], rtol=1e-5, atol=1e-6)


def test_lp_ft_second_stage_starts_from_the_lp_head(pretrained, tmp_path, monkeypatch):
    heads = []
    original = run_module.train_stage

    def spy(model, plan, *args, **kwargs):
        heads.append((plan.stage.name, model.head.weight.detach().clone()))
        return original(model, plan, *args, **kwargs)

    monkeypatch.setattr(run_module, "train_stage", spy)
    result = transfer(_cfg(pretrained, "lp-ft", score=False, epochs=2), tmp_path / "run", progress=False,
                      printer=lambda s: None)[0]
    assert [name for name, _ in heads] == ["lp", "ft"]
    lp_best = _state(result.out / "checkpoints" / "0-lp-best.pt")
    assert torch.equal(heads[1][1], lp_best["head.weight"])  # FT starts from the LP stage's selection
    stages = result.final["stages"]
    assert [s["epochs"] for s in stages] == [2, 1]  # FT for half the epochs
    assert [s["lr"] for s in stages] == [0.05, 0.01]
    rows = pd.read_csv(result.out / "epochs.csv")
    assert list(rows["stage"]) == ["lp", "lp", "ft"]


def _robust_ce(model_dir: Path, pretrained: Path) -> float:
    from asbound.attacks import PGD, loss_objective
    from asbound.data import load_data
    from asbound.losses import cross_entropy
    from asbound.models import frozen, load_model

    model = load_model(f"run:{model_dir}", allow_pickle=True).module
    data = load_data("digits", split="test", classes="5-9")
    x, y = data.x, data.y
    with frozen(model):
        adv = PGD(eps=0.1, steps=10, rel_step=0.25)(loss_objective(model, cross_entropy, y), x).x_adv
        return float(cross_entropy(model(adv), y).mean())


def test_adversarial_training_lowers_the_robust_loss(pretrained, tmp_path):
    common = dict(score=False, eps=0.1, attack_step=0.025, attack_steps=5, epochs=4, n=None, lr_ft=0.05)
    results = transfer(_cfg(pretrained, "ft,adv-ft,trades-ft", **common), tmp_path / "run", progress=False,
                       printer=lambda s: None)
    ce = {r.method: _robust_ce(r.out, pretrained) for r in results}
    assert ce["adv-ft"] < ce["ft"] and ce["trades-ft"] < ce["ft"], ce
    pgd = {r.method: r.final["test"]["pgd"]["3"] for r in results}
    assert pgd["adv-ft"] > pgd["ft"], pgd


# --- runs: resume, locks, records ----------------------------------------------------------------


def test_resume_after_an_interruption_equals_an_uninterrupted_run(pretrained, tmp_path, monkeypatch):
    cfg = _cfg(pretrained, "lp-ft", score=False, epochs=4, augment="crop")
    whole = transfer(cfg, tmp_path / "whole", progress=False, printer=lambda s: None)[0]

    Stop, original = interrupt_training(monkeypatch, run_module, 9)  # inside LP's third epoch (4 steps each)
    with pytest.raises(Stop):
        transfer(cfg, tmp_path / "split", progress=False, printer=lambda s: None)
    assert len(pd.read_csv(tmp_path / "split" / "epochs.csv")) == 2  # two complete epochs kept
    assert not (tmp_path / "split" / "model.pt").exists()
    monkeypatch.setattr(run_module, "train_stage", original)
    lines = []
    resumed = transfer(cfg, tmp_path / "split", progress=False, printer=lines.append)[0]
    assert any("resuming lp-ft" in line and "after epoch 2" in line for line in lines)
    a, b = _state(whole.out / "model.pt"), _state(resumed.out / "model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit on the CPU with the same seed
    pd.testing.assert_frame_equal(
        pd.read_csv(whole.out / "epochs.csv").drop(columns=["seconds", "images_per_second"]),
        pd.read_csv(resumed.out / "epochs.csv").drop(columns=["seconds", "images_per_second"]),
    )


def test_a_finished_run_is_reread_and_other_settings_are_refused(pretrained, tmp_path, monkeypatch, capsys):
    cfg = _cfg(pretrained, "lp", score=False)
    first = transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)[0]
    monkeypatch.setattr(run_module, "train_stage", lambda *a, **k: pytest.fail("a finished run was retrained"))
    again = transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)[0]
    assert again.final == json.loads((first.out / "final.json").read_text())
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"}
    rc = main(["transfer", "--method", "lp", "--model", f"file:{pretrained}", "--allow-pickle", "--data", "digits",
               "--classes", "5-9", "--epochs", "3", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "other settings" in err and "epochs" in err and len(err.strip().splitlines()) == 1
    assert before == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"}


def test_a_locked_run_directory_is_refused(pretrained, tmp_path):
    out = tmp_path / "run"
    with run_held_by_another_process(out) as pid:
        second = subprocess.run(
            [sys.executable, "-m", "asbound", "transfer", "--method", "lp", "--model", f"file:{pretrained}",
             "--allow-pickle", "--data", "digits", "--classes", "5-9", "--out", str(out)],
            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"being written by asbound pid {pid}" in second.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_nan_loss_stops_with_the_epoch_and_step_and_keeps_the_last_checkpoint(pretrained, tmp_path, monkeypatch):
    original = loop.batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, logits = original(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 6 else loss), logits  # epoch 2, step 2 (4 steps per epoch)

    monkeypatch.setattr(loop, "batch_loss", poisoned)
    from asbound.transfer.loop import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"nan in stage ft, epoch 2, step 2.*after epoch 1"):
        transfer(_cfg(pretrained, "ft", score=False, epochs=3), tmp_path / "run", progress=False, printer=lambda s: None)
    last = _state(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["progress"]["epoch"] == 1 and not (tmp_path / "run" / "model.pt").exists()
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# --- runs as models and the table --------------------------------------------------------------------


def test_run_dir_round_trips_through_score(pretrained, tmp_path):
    result = transfer(_cfg(pretrained, "lp"), tmp_path / "run", progress=False, printer=lambda s: None)[0]
    final = result.final
    assert final["score_before"]["task_note"].startswith("the AS score only")
    after = final["score_after"]
    assert after["model"] == f"run:{result.out}" and after["n"] == 40 and after["lhs"] <= after["rhs"] + 1e-9
    # LP does not touch the representation: the AS attack finds the same number before and after
    assert final["score_before"]["as_score"] == pytest.approx(after["as_score_rep"], rel=1e-6)
    assert after["as_score"] >= after["as_score_rep"]
    again = score(ScoreConfig(model=f"run:{result.out}", data="digits", classes="5-9", n=None, steps=2),
                  allow_pickle=True, progress=False)
    from asbound.data import load_data
    from asbound.models import load_model

    model = load_model(f"run:{result.out}", allow_pickle=True).module
    test = load_data("digits", split="test", classes="5-9")
    with torch.no_grad():
        acc = float((model(test.x).argmax(1) == test.y).float().mean())
    assert again.summary["clean_accuracy"] == pytest.approx(acc)
    sub = load_data("digits", split="test", classes="5-9", n=100)
    with torch.no_grad():
        sub_acc = float((model(sub.x).argmax(1) == sub.y).float().mean())
    assert final["test"]["clean_accuracy"] == pytest.approx(sub_acc)


def test_run_spec_errors(pretrained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for spec, expected in ((tmp_path / "missing", "not a directory"), (tmp_path / "empty", "no `asbound transfer` run")):
        rc = main(["score", "--model", f"run:{spec}", "--data", "digits", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err and len(err.strip().splitlines()) == 1
    result = transfer(_cfg(pretrained, "lp", score=False), tmp_path / "run", progress=False, printer=lambda s: None)[0]
    (result.out / "model.pt").rename(result.out / "model.bak")
    rc = main(["score", "--model", f"run:{result.out}", "--allow-pickle", "--data", "digits", "--no-progress"])
    assert rc == 2 and "has not finished training" in capsys.readouterr().err
    (result.out / "model.bak").rename(result.out / "model.pt")
    rc = main(["score", "--model", f"run:{result.out}", "--data", "digits", "--no-progress"])  # base is file:
    assert rc == 2 and "--allow-pickle" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--method", "xx"], ["unknown method 'xx'", "lp, ft, lp-ft"]),
    (["--method", "lp", "--eps", "2"], ["eps", "[0, 1]"]),
    (["--method", "lp", "--epochs", "0"], ["epochs must be >= 1"]),
    (["--method", "lp", "--lr", "0"], ["lr must lie in (0, 10]"]),
    (["--method", "lp", "--batch-size", "0"], ["batch size must be >= 1"]),
    (["--method", "lp", "--val-fraction", "1.5"], ["validation fraction", "(0, 1)"]),
    (["--method", "lp", "--classes", "5-12"], ["12"]),
    (["--method", "lp", "--attack-step", "0"], ["attack step must be > 0"]),
    (["--method", "lp", "--score-steps", "0"], ["score steps", ">= 1"]),
    (["--method", "lp", "--n-val", "0"], ["n-val"]),
])
def test_bad_transfer_input_is_one_line_exit_2(pretrained, tmp_path, capsys, args, expected):
    rc = main(["transfer", "--model", f"file:{pretrained}", "--allow-pickle", "--data", "digits",
               "--out", str(tmp_path / "run"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_the_cli_prints_one_column_per_method(pretrained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    rc = main(["transfer", "--method", "lp,adv-lp", "--model", f"file:{pretrained}", "--allow-pickle",
               "--data", "digits", "--classes", "5-9", "--epochs", "1", "--n", "100", "--n-test", "50",
               "--score-n", "20", "--eval-steps", "2,3", "--attack-steps", "2", "--out", str(tmp_path / "run"),
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    for label in ("clean accuracy", "PGD-2 accuracy (8/255)", "PGD-3 accuracy", "AS before transfer",
                  "AS after transfer", "RHS after = AS, both attacks", "CE clean / robust", "||W||_(q)", "Lemma 1 LHS", "prop. fulfilled",
                  "lp", "adv-lp", f"run:{tmp_path / 'run' / 'lp'}"):
        assert label in out, label
    final = json.loads((tmp_path / "run" / "adv-lp" / "final.json").read_text())
    assert f"{100 * final['test']['clean_accuracy']:.1f}%" in out
    # the AS before transfer is computed once and shared
    assert (tmp_path / "run" / "adv-lp" / "score" / "before" / "points.csv").read_bytes() == \
        (tmp_path / "run" / "lp" / "score" / "before" / "points.csv").read_bytes()


def test_n_training_rows_are_a_seeded_draw_not_the_first_rows():
    """dSprites is stored ordered by shape: the first n rows would all be squares."""
    labels = torch.arange(3).repeat_interleave(1000)  # sorted by class
    train, val = run_module.training_positions(len(labels), 0.05, 30, seed=0)
    assert len(train) == 30 and len(val) == 150
    assert set(labels[train].tolist()) == {0, 1, 2}
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(train, train.sort().values)
    again, _ = run_module.training_positions(len(labels), 0.05, 30, seed=0)
    other, _ = run_module.training_positions(len(labels), 0.05, 30, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)
    everything, _ = run_module.training_positions(len(labels), 0.05, None, seed=0)
    assert len(everything) == 2850
    _, few = run_module.training_positions(len(labels), 0.05, 30, seed=0, n_val=12)
    assert len(few) == 12 and set(few.tolist()) <= set(val.tolist()) and set(labels[few].tolist()) == {0, 1, 2}


def test_bf16_training_runs_channels_last_and_reports_float32(pretrained, tmp_path, monkeypatch):
    """--amp bf16 on the CPU: training in bf16 autocast with channels-last, the reported numbers in float32."""
    from asbound.devices import memory_format, to_format

    seen = []
    batch_loss = loop.batch_loss

    def spy(model, kind, x, *args, **kwargs):
        seen.append((x.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu"),
                     next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight.is_contiguous(
                         memory_format=torch.channels_last)))
        return batch_loss(model, kind, x, *args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss", spy)

    assert memory_format(torch.bfloat16) == torch.channels_last
    assert memory_format(None) == torch.contiguous_format
    x = torch.rand(2, 3, 4, 5)
    assert to_format(x, torch.channels_last).is_contiguous(memory_format=torch.channels_last)
    assert to_format(x[0], torch.channels_last).shape == (3, 4, 5)
    r = transfer(_cfg(pretrained, "adv-ft", amp="bf16", device="cpu", epochs=1), tmp_path / "bf16", progress=False,
                 printer=lambda s: None)[0]
    config = json.loads((r.out / "config.json").read_text())
    assert config["amp"] == "bfloat16"
    assert seen and all(all(flags) for flags in seen)
    state = _state(r.out / "model.pt")
    assert all(v.dtype == torch.float32 for k, v in state.items() if v.is_floating_point())
    assert 0.0 <= r.final["test"]["clean_accuracy"] <= 1.0 and r.final["score_after"]["as_score"] > 0


def test_transfer_then_score_offline_on_a_robustbench_checkpoint_and_fabricated_cifar10(tmp_path, capsys,
                                                                                       monkeypatch):
    """`transfer --method lp,ft,lp-ft` from a RobustBench CIFAR-100 checkpoint in the zoo's layout,
    loaded by RobustBench's own loader, to CIFAR-10 (torchvision's on-disk format, fabricated), then
    `score --model run:DIR`. The zoo entry is a two-convolution network with batch norm registered
    for the test (random weights): the real PreActResNet-18 made this test 30x slower, and
    tests/test_models.py loads and splits real zoo architectures."""
    from asbound._compat import import_robustbench
    from fabricate import bypass_cifar_md5, make_cifar10

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    def tiny() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 100))

    name = "Tiny2026Fabricated"
    monkeypatch.setitem(model_dicts[BenchmarkDataset("cifar100")][ThreatModel("Linf")], name,
                        {"model": tiny, "gdrive_id": "fabricated"})
    torch.manual_seed(0)
    model_dir = tmp_path / "models"
    (model_dir / "cifar100" / "Linf").mkdir(parents=True)
    torch.save(tiny().state_dict(), model_dir / "cifar100" / "Linf" / f"{name}.pt")
    make_cifar10(tmp_path / "data", n_per_split=16)
    bypass_cifar_md5(monkeypatch)
    common = ["--model-dir", str(model_dir), "--data", "cifar10", "--data-root", str(tmp_path / "data"),
              "--no-progress"]
    out = tmp_path / "c10"
    rc = main(["transfer", "--method", "lp,ft,lp-ft", "--model", f"robustbench:cifar100/Linf/{name}", *common,
               "--epochs", "2", "--batch-size", "8", "--n-test", "8", "--score-n", "4", "--eval-steps", "1",
               "--attack-steps", "1", "--score-steps", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for method in ("lp", "ft", "lp-ft"):
        config = json.loads((out / method / "config.json").read_text())
        assert config["augment"] == "crop-flip" and config["n_train"] + config["n_val"] == 16
        assert config["model"] == f"robustbench:cifar100/Linf/{name}"
        assert (out / method / "score" / "after" / "points.csv").is_file()
        assert json.loads((out / method / "score" / "after" / "config.json").read_text())["steps"] == 2
    lp_ft = pd.read_csv(out / "lp-ft" / "epochs.csv")
    assert list(lp_ft["stage"]) == ["lp", "lp", "ft"]
    rc = main(["score", "--model", f"run:{out / 'lp'}", *common, "--n", "4", "--steps", "1", "--json",
               "--out", str(tmp_path / "score")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["model"] == f"run:{out / 'lp'}" and summary["n"] == 4 and summary["as_score"] > 0


def test_autoattack_accuracy_is_at_most_pgd_accuracy_and_at_most_clean(tmp_path):
    """--autoattack runs pyautoattack's standard version; a stronger attack cannot leave more points
    correct. On a one-hidden-layer MLP (pretrained on digits 0-4 here), whose forward pass is cheap:
    the points PGD leaves correct take Square's 5000 queries, which cost twice as much on the CNN."""
    from asbound.data import load_data

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for x, y in load_data("digits", split="train", classes="0-4").loader(64, shuffle=True, seed=1):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    torch.save(net.eval(), tmp_path / "mlp.pt")
    r = transfer(_cfg(tmp_path / "mlp.pt", "lp", autoattack=True, n_test=12, eval_steps=(10,), epochs=1, score=False),
                 tmp_path / "aa", progress=False, printer=lambda s: None)[0]
    test = r.final["test"]
    assert test["autoattack"] is not None
    assert test["pgd"]["10"] > 0  # some point survives PGD, so every AutoAttack stage runs on it
    assert test["autoattack"] <= test["clean_accuracy"]
    assert test["autoattack"] <= test["pgd"]["10"] + 1e-9


@pytest.mark.parametrize("args, expected", [
    (["--classes", "3"], ["at least 2 classes", "digits --classes 3 has 1"]),
    (["--classes", "5-7", "--autoattack"], ["--autoattack", "at least 4 classes", "digits --classes 5-7 has 3"]),
])
def test_too_few_classes_are_refused_before_training(pretrained, tmp_path, capsys, args, expected):
    rc = main(["transfer", "--method", "lp", "--model", f"file:{pretrained}", "--allow-pickle", "--data", "digits",
               "--out", str(tmp_path / "run"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "run" / "epochs.csv").exists()


def test_evaluation_settings_may_change_until_the_evaluation_finished(pretrained, tmp_path, monkeypatch):
    """A crash after training (e.g. in the evaluation) must not strand the trained weights: a rerun
    with other evaluation settings reuses them; once final.json exists the run is fixed."""
    cfg = _cfg(pretrained, "lp", score=False)
    crash = run_module.evaluate

    def crashing(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(run_module, "evaluate", crashing)
    with pytest.raises(RuntimeError):
        transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)
    assert (tmp_path / "run" / "model.pt").exists() and not (tmp_path / "run" / "final.json").exists()
    monkeypatch.setattr(run_module, "evaluate", crash)
    monkeypatch.setattr(run_module, "train_stage", lambda *a, **k: pytest.fail("the trained weights were not reused"))
    other = dataclasses.replace(cfg, eval_steps=(2,), n_test=60, workers=1)
    result = transfer(other, tmp_path / "run", progress=False, printer=lambda s: None)[0]
    assert result.final["test"]["n"] == 60 and set(result.final["test"]["pgd"]) == {"2"}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["n_test"] == 60 and config["eval_steps"] == [2]
    with pytest.raises(Exception, match="other settings"):
        transfer(dataclasses.replace(other, n_test=50), tmp_path / "run", progress=False, printer=lambda s: None)
    transfer(dataclasses.replace(other, workers=0), tmp_path / "run", progress=False, printer=lambda s: None)


def test_a_run_recorded_before_an_option_existed_is_reread(pretrained, tmp_path, monkeypatch):
    cfg = _cfg(pretrained, "lp", score=False, score_steps=20)
    first = transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)[0]
    config = json.loads((first.out / "config.json").read_text())
    del config["score_steps"]  # as written by a version without --score-steps (its default: 20)
    (first.out / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(run_module, "train_stage", lambda *a, **k: pytest.fail("a finished run was retrained"))
    again = transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)[0]
    assert again.final == first.final
    with pytest.raises(Exception, match="score_steps: 20 -> 5"):
        transfer(dataclasses.replace(cfg, score_steps=5), tmp_path / "run", progress=False, printer=lambda s: None)


def test_a_run_recorded_before_the_image_counts_were_resolved_is_reread(pretrained, tmp_path, monkeypatch):
    """Runs made before --n-val and --n-test took 'auto' recorded null for a whole split; the same
    command then resolves them to counts (35 validation, 190 test images) and refused the run
    ("other settings (n_test: None -> 190, n_val: None -> 35)"): null reads as the whole split."""
    cfg = _cfg(pretrained, "lp", score=False, n=None, n_val="auto", n_test="auto", epochs=1)
    first = transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)[0]
    config = json.loads((first.out / "config.json").read_text())
    assert (config["n_val"], config["n_test"]) == (35, 190)
    (first.out / "config.json").write_text(json.dumps({**config, "n_val": None, "n_test": None}))
    monkeypatch.setattr(run_module, "train_stage", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)[0].final == first.final
    (first.out / "config.json").write_text(json.dumps({**config, "n_val": None, "n_test": None}))
    with pytest.raises(ResumeError, match=r"n_test: 190 -> 50"):  # null is the whole split, not any count
        transfer(dataclasses.replace(cfg, n_test=50), tmp_path / "run", progress=False, printer=lambda s: None)


def test_run_dir_keeps_its_classes_and_loads_from_any_directory(pretrained, tmp_path, capsys, monkeypatch):
    """score --model run:DIR on the run's own data uses the run's --classes (its head's labels mean
    them), refuses another order, and the run loads from another working directory."""
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(pretrained, work / "cnn.pt")
    monkeypatch.chdir(work)
    rc = main(["transfer", "--method", "lp", "--model", "file:cnn.pt", "--allow-pickle", "--data", "digits",
               "--classes", "9,5", "--epochs", "1", "--n", "60", "--n-test", "20", "--no-score", "--out", "run",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["base"]["model"] == f"file:{work / 'cnn.pt'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    rc = main(["score", "--model", f"run:{work / 'run'}", "--allow-pickle", "--data", "digits", "--n", "20",
               "--steps", "1", "--json", "--no-progress", "--out", "s"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert json.loads((elsewhere / "s" / "config.json").read_text())["classes"] == "9,5"
    final = json.loads((work / "run" / "final.json").read_text())
    assert summary["clean_accuracy"] == pytest.approx(final["test"]["clean_accuracy"])  # same 20 test images
    rc = main(["score", "--model", f"run:{work / 'run'}", "--allow-pickle", "--data", "digits", "--classes", "5,9",
               "--n", "20", "--steps", "1", "--no-progress", "--out", "s2"])
    err = capsys.readouterr().err
    assert rc == 2 and "would relabel" in err and len(err.strip().splitlines()) == 1


def test_non_finite_weights_after_a_finite_loss_are_never_checkpointed(pretrained, tmp_path, monkeypatch):
    """An infinite gradient with a finite loss (here: on the last step of epoch 2) leaves NaN weights;
    the run stops naming the epoch, and the checkpoints hold only the good epoch 1."""
    original = loop.batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, logits = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8:  # epoch 2, step 4 of 4: loss value finite, gradient infinite
            loss = loss + torch.sqrt(logits.sum() * 0.0)  # value 0, gradient inf * 0 = nan
        return loss, logits

    monkeypatch.setattr(loop, "batch_loss", poisoned)
    from asbound.transfer.loop import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"weights became non-finite .*epoch 2.*after epoch 1"):
        transfer(_cfg(pretrained, "ft", score=False, epochs=3), tmp_path / "run", progress=False, printer=lambda s: None)
    for name in ("last.pt", "best.pt"):
        path = tmp_path / "run" / "checkpoints" / name
        if path.exists():
            state = _state(path)
            tensors = [v for v in (state.get("model") or state).values() if torch.is_tensor(v) and v.is_floating_point()]
            assert tensors and all(torch.isfinite(v).all() for v in tensors), name
    assert _state(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]["epoch"] == 1


def test_a_lone_last_image_for_batchnorm1d_is_refused_before_training(tmp_path, capsys):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).eval()
    torch.save(net, tmp_path / "bn1d.pt")
    common = ["transfer", "--model", f"file:{tmp_path / 'bn1d.pt'}", "--allow-pickle", "--data", "digits",
              "--classes", "5-9", "--epochs", "1", "--n", "65", "--batch-size", "64", "--no-score", "--no-progress"]
    rc = main([*common, "--method", "ft", "--out", str(tmp_path / "ft")])
    err = capsys.readouterr().err
    assert rc == 2 and "batch of one image" in err and "65 training images" in err
    assert "ft train the backbone" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ft" / "epochs.csv").exists()
    rc = main([*common, "--method", "lp", "--out", str(tmp_path / "lp")])  # the backbone stays in eval mode
    err = capsys.readouterr().err
    assert rc == 0, err
    common[common.index("--batch-size") + 1] = "1"
    common[common.index("--n") + 1] = "5"
    rc = main([*common, "--method", "trades-ft", "--out", str(tmp_path / "bs1")])
    err = capsys.readouterr().err
    assert rc == 2 and "--batch-size 1" in err and len(err.strip().splitlines()) == 1, err


def test_batchnorm2d_on_1x1_maps_with_a_lone_last_image_is_refused(tmp_path, capsys):
    net = nn.Sequential(nn.Conv2d(1, 4, 8), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 5)).eval()
    torch.save(net, tmp_path / "bn2d.pt")
    rc = main(["transfer", "--model", f"file:{tmp_path / 'bn2d.pt'}", "--allow-pickle", "--data", "digits",
               "--classes", "5-9", "--epochs", "1", "--n", "65", "--batch-size", "64", "--no-score", "--no-progress",
               "--method", "adv-ft", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "batch of one image" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("epochs, ft_epochs", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (20, 10)])
def test_lp_ft_plans_half_the_epochs_rounded_up(epochs, ft_epochs):
    from asbound.transfer.config import TransferConfig as Config
    from asbound.transfer.methods import METHODS

    cfg = Config(model="builtin:digits-standard", data="digits", method="lp-ft", epochs=epochs, lr=0.03,
                 lr_ft=0.002).validated()
    lp, ft = run_module.plan_stages(METHODS["lp-ft"], cfg, "none")
    assert (lp.epochs, ft.epochs) == (epochs, ft_epochs)
    assert (lp.lr, ft.lr) == (0.03, 0.002)
    assert lp.cache_features and not ft.cache_features


def test_a_transfer_chain_to_other_classes_and_as_only_scores_of_a_run(pretrained, tmp_path, capsys):
    """run:A trained on digits 5-9 re-enters as the pretrained model of a transfer to digits 0-4 (its
    AS-only score before transfer uses no labels), and `score --as-only` takes any classes."""
    a = transfer(_cfg(pretrained, "lp", score=False, epochs=1), tmp_path / "A", progress=False,
                 printer=lambda s: None)[0]
    b = transfer(TransferConfig(model=f"run:{a.out}", data="digits", classes="0-4", method="lp", epochs=1, n=60,
                                n_test=20, score_n=10, score_steps=2, eval_steps=(1,), allow_pickle=True),
                 tmp_path / "B", progress=False, printer=lambda s: None)[0]
    assert b.final["score_before"]["as_score"] > 0 and b.final["score_after"]["n"] == 10
    rc = main(["score", "--model", f"run:{a.out}", "--allow-pickle", "--data", "digits", "--classes", "0-4",
               "--as-only", "--n", "10", "--steps", "1", "--no-progress", "--out", str(tmp_path / "s")])
    assert rc == 0, capsys.readouterr().err


def test_run_classes_are_kept_whatever_the_spelling_of_the_data(pretrained, tmp_path, capsys, monkeypatch):
    from fabricate import make_tensors_file

    monkeypatch.chdir(tmp_path)
    make_tensors_file(tmp_path / "t.pt", n=60, shape=(1, 8, 8), num_classes=10)
    a = transfer(_cfg(pretrained, "lp", score=False, epochs=1, data="tensors:t.pt", classes="9,5", n=None,
                      n_test=None), tmp_path / "A", progress=False, printer=lambda s: None)[0]
    assert json.loads((a.out / "config.json").read_text())["data"] == f"tensors:{tmp_path / 't.pt'}"
    rc = main(["score", "--model", f"run:{a.out}", "--allow-pickle", "--data", f"tensors:{tmp_path / 't.pt'}",
               "--classes", "5,9", "--n", "10", "--steps", "1", "--no-progress", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "would relabel" in err, err


class _Cap(nn.Module):
    """An activation cap whose buffer is infinite by design (no cap)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("hi", torch.tensor(float("inf")))

    def forward(self, x):
        return torch.clamp(x, max=self.hi)


def test_a_buffer_that_is_infinite_by_design_does_not_stop_training(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), _Cap(), nn.ReLU(), nn.Linear(16, 5)).eval()
    torch.save(net, tmp_path / "cap.pt")
    results = transfer(TransferConfig(model=f"file:{tmp_path / 'cap.pt'}", data="digits", classes="5-9",
                                      method="lp,ft", epochs=1, n=64, n_test=20, score=False, eval_steps=(1,),
                                      allow_pickle=True), tmp_path / "run", progress=False, printer=lambda s: None)
    assert all(r.final["test"]["clean_accuracy"] >= 0 for r in results)


# --- how many images each phase uses ------------------------------------------------------------


def test_image_counts_follow_n_and_all_takes_a_whole_split():
    from asbound.transfer.config import SCORE_N_CAP, image_counts

    sizes = (560_000, 29_491, 147_456)  # dSprites' training, validation and test splits
    assert image_counts(256, "auto", "auto", "auto", sizes) == {"train": 256, "val": 256, "test": 256, "score": 256}
    assert image_counts(None, "auto", "auto", "auto", sizes) == {
        "train": 560_000, "val": 29_491, "test": 147_456, "score": SCORE_N_CAP}
    assert image_counts(50_000, "auto", "auto", "auto", sizes) == {
        "train": 50_000, "val": 29_491, "test": 50_000, "score": SCORE_N_CAP}
    assert image_counts(256, None, None, None, sizes) == {"train": 256, "val": 29_491, "test": 147_456,
                                                          "score": 147_456}
    assert image_counts(256, 40, 500, "auto", sizes) == {"train": 256, "val": 40, "test": 500, "score": 500}
    assert image_counts(256, "auto", 100, 5000, sizes)["score"] == 5000


def test_n_bounds_every_phase_of_a_run_and_the_config_records_the_counts(pretrained, tmp_path, capsys):
    """--n 60 (digits 5-9: a validation split of 35, a test split of 190): every phase uses at most
    60 images; the console says how many of how many; 'all' is one option away."""
    rc = main(["transfer", "--method", "lp", "--model", f"file:{pretrained}", "--allow-pickle", "--data", "digits",
               "--classes", "5-9", "--epochs", "1", "--n", "60", "--eval-steps", "1", "--score-steps", "1",
               "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["n_train"], config["n_val"], config["n_test"], config["score_n"]) == (60, 35, 60, 60)
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["test"]["n"] == 60 and final["score_after"]["n"] == 60 and final["score_before"]["n"] == 60
    said = " ".join(err.split())
    assert "training 60 of 671, validation 35 of 35, test 60 of 190, scored before and after transfer 60" in said
    whole = transfer(_cfg(pretrained, "lp", n=60, n_val=None, n_test=None, score_n="auto", score=False, epochs=1),
                     tmp_path / "all", progress=False, printer=lambda s: None)[0]
    config = json.loads((whole.out / "config.json").read_text())
    assert (config["n_train"], config["n_val"], config["n_test"]) == (60, 35, 190) and whole.final["test"]["n"] == 190


def test_the_scores_stop_at_their_cap_whatever_the_test_count(pretrained, tmp_path, monkeypatch):
    """--score-n auto follows the test count up to SCORE_N_CAP (here lowered to 30): the scores
    before and after transfer attack 30 of the 60 test images, and config.json says so."""
    import asbound.transfer.config as config_module

    monkeypatch.setattr(config_module, "SCORE_N_CAP", 30)
    r = transfer(_cfg(pretrained, "lp", n=60, n_test="auto", score_n="auto", epochs=1, eval_steps=(1,),
                      score_steps=1), tmp_path / "run", progress=False, printer=lambda s: None)[0]
    config = json.loads((r.out / "config.json").read_text())
    assert (config["n_test"], config["score_n"]) == (60, 30) and r.final["test"]["n"] == 60
    assert r.final["score_before"]["n"] == r.final["score_after"]["n"] == 30


def test_every_pass_over_many_images_shows_progress(pretrained, tmp_path, monkeypatch):
    """Cached features, validation and the test evaluation each drive a bar over their images."""
    shown = []

    def enter(self):
        self.enabled = False  # no terminal here: record what would be drawn
        return self

    def show(self, key, description, total):
        if key != self.key:
            self.key = key
            shown.append([description, total, 0])

    def advance(self, k, info=""):
        shown[-1][2] += k

    for name, method in (("__enter__", enter), ("show", show), ("advance", advance)):
        monkeypatch.setattr(run_module._Bar, name, method)
    r = transfer(_cfg(pretrained, "lp", score=False, augment="none", epochs=2, eval_steps=(1, 2), n_val=20),
                 tmp_path / "run", progress=True, printer=lambda s: None)[0]
    config = json.loads((r.out / "config.json").read_text())
    assert (config["n_train"], config["n_val"], config["n_test"]) == (200, 20, 100)  # --n-val below --n and the split
    passes = {d: (total, done) for d, total, done in shown if not d.startswith("lp epoch") or ":" in d}
    assert passes["lp: features"] == (config["n_train"],) * 2
    assert passes["lp epoch 1/2: validation"] == passes["lp epoch 2/2: validation"] == (config["n_val"],) * 2
    assert passes["test: clean, PGD-1, PGD-2"] == (config["n_test"],) * 2


# --- robust accuracy per point ----------------------------------------------------------------------


class _Points:
    """Test points whose first pixel names their position (position / 100)."""

    num_classes = 3

    def __init__(self, n: int) -> None:
        self.x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        self.x[:, 0, 0, 0] = torch.arange(n) / 100
        self.y = torch.zeros(n, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def loader(self, batch_size: int, shuffle: bool = False):
        return [(self.x[i:i + batch_size], self.y[i:i + batch_size]) for i in range(0, len(self.y), batch_size)]


@pytest.mark.parametrize("few, many", [(10, 20), (5, 20), (9, 10)])
def test_robust_accuracy_counts_a_point_only_if_every_attack_fails(monkeypatch, few, many):
    """The PGD with fewer steps fools points 0-2, the one with more (from other random starts)
    3-4, AutoAttack 5: the longer PGD alone would leave 80%, more than the shorter one's 70%;
    counted per point it leaves 50%, AutoAttack 40%. The step counts are ordered as numbers (5
    before 20 and 9 before 10, which strings order the other way round)."""
    from asbound.models import SplitModel

    fooled = {few: {0, 1, 2}, many: {3, 4}, "autoattack": {5}}

    def survivors(x, by):
        return torch.tensor([round(float(v) * 100) not in fooled[by] for v in x[:, 0, 0, 0]])

    monkeypatch.setattr(loop, "robust_correct", lambda model, x, y, attack, steps, gen, g0=None: survivors(x, steps))
    monkeypatch.setattr(run_module, "_autoattacker", lambda *a: lambda x, y: survivors(x, "autoattack"))
    model = SplitModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), nn.Linear(4, 3)).eval()
    data = _Points(10)
    with torch.no_grad():
        data.y = model(data.x).argmax(1)  # every point correct when clean
    cfg = TransferConfig(model="file:m.pt", data="digits", eval_steps=(many, few), batch_size=4,
                         autoattack=True).validated()
    out = run_module.evaluate(model, data, cfg, torch.device("cpu"))
    assert out["clean_accuracy"] == 1.0
    assert out["pgd"] == {str(few): pytest.approx(0.7), str(many): pytest.approx(0.5)}
    assert out["autoattack"] == pytest.approx(0.4) and out["robust_accuracy"] == pytest.approx(0.4)
    assert out["robust_rule"] == run_module.ROBUST_RULE == "per point, robust against every attack run"


def test_robust_accuracy_never_rises_with_more_steps_on_a_trained_run(pretrained, tmp_path):
    r = transfer(_cfg(pretrained, "adv-lp", score=False, epochs=1, eval_steps=(1, 2, 5)), tmp_path / "run",
                 progress=False, printer=lambda s: None)[0]
    test = r.final["test"]
    values = [test["pgd"][k] for k in ("1", "2", "5")]
    assert values == sorted(values, reverse=True) and values[0] <= test["clean_accuracy"]
    assert test["robust_accuracy"] == test["pgd"]["5"] and test["autoattack"] is None


# --- moving, damaged checkpoints, 80 columns --------------------------------------------------------


def test_a_moved_run_resumes_and_loads(pretrained, tmp_path, capsys, monkeypatch):
    """A run stopped after its score after transfer began, moved, then rerun: the score resumes in
    the new place (its record names the run relatively), and run:NEW loads; a record written with
    the absolute name of the old place is renamed."""
    import shutil

    cfg = _cfg(pretrained, "lp", epochs=1)
    transfer(cfg, tmp_path / "old", progress=False, printer=lambda s: None)
    after = tmp_path / "old" / "score" / "after"
    assert json.loads((after / "config.json").read_text())["model"] == "run:../.."
    (tmp_path / "old" / "final.json").unlink()  # as if stopped while scoring after transfer
    shutil.move(tmp_path / "old", tmp_path / "new")
    monkeypatch.setattr(run_module, "train_stage", lambda *a, **k: pytest.fail("a trained run was retrained"))
    again = transfer(cfg, tmp_path / "new", progress=False, printer=lambda s: None)[0]
    assert again.final["score_after"]["n"] == 40
    config = json.loads((tmp_path / "new" / "score" / "after" / "config.json").read_text())
    config["model"] = f"run:{tmp_path / 'new'}"  # an absolute name, as written before
    (tmp_path / "new" / "score" / "after" / "config.json").write_text(json.dumps(config))
    (tmp_path / "new" / "final.json").unlink()
    shutil.move(tmp_path / "new", tmp_path / "newer")
    transfer(cfg, tmp_path / "newer", progress=False, printer=lambda s: None)
    assert json.loads((tmp_path / "newer" / "score" / "after" / "config.json").read_text())["model"] == "run:../.."
    rc = main(["score", "--model", f"run:{tmp_path / 'newer'}", "--allow-pickle", "--data", "digits", "--n", "10",
               "--steps", "1", "--no-progress", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)["model"] == f"run:{tmp_path / 'newer'}"


def test_a_run_moved_while_it_trains_stops_in_one_line_and_resumes_in_its_new_place(pretrained, tmp_path,
                                                                                     monkeypatch, capsys):
    """Moving the directory of a run that is training stopped it with a FileNotFoundError
    traceback at its next checkpoint: now one line names the new place, and the run resumes there
    to the weights of an uninterrupted run."""
    import shutil

    cfg = _cfg(pretrained, "ft", score=False, epochs=3)
    whole = transfer(cfg, tmp_path / "whole", progress=False, printer=lambda s: None)[0]
    original = run_module.train_stage
    calls = {"n": 0}

    def moving(model, plan, settings, train_batches, *args, **kwargs):
        def batches(seed, training):
            for batch in train_batches(seed, training):
                calls["n"] += training
                if calls["n"] == 6:  # inside epoch 2 (4 steps each)
                    shutil.move(tmp_path / "old", tmp_path / "new")
                yield batch

        return original(model, plan, settings, batches, *args, **kwargs)

    monkeypatch.setattr(run_module, "train_stage", moving)
    args = ["transfer", "--method", "ft", "--model", f"file:{pretrained}", "--allow-pickle", "--data", "digits",
            "--classes", "5-9", "--epochs", "3", "--batch-size", "64", "--n", "200", "--n-test", "100",
            "--eval-steps", "3", "--attack-steps", "3", "--lr", "0.05", "--lr-ft", "0.01", "--no-score",
            "--no-progress"]
    capsys.readouterr()
    rc = main([*args, "--out", str(tmp_path / "old")])
    err = capsys.readouterr().err
    *said, last = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err and not any("error" in line for line in said), err
    assert last.startswith(f"asbound: error: {tmp_path / 'old'} was moved to {tmp_path / 'new'} while this "
                           f"process wrote to it"), err
    assert not (tmp_path / "old").exists()
    monkeypatch.setattr(run_module, "train_stage", original)
    assert main([*args, "--out", str(tmp_path / "new")]) == 0
    assert "resuming ft: stage ft, after epoch 1" in capsys.readouterr().err
    a, b = _state(whole.out / "model.pt"), _state(tmp_path / "new" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(pd.read_csv(tmp_path / "new" / "epochs.csv")) == 3


def test_a_truncated_last_checkpoint_falls_back_to_the_previous_one(pretrained, tmp_path, monkeypatch, capsys):
    cfg = _cfg(pretrained, "ft", score=False, epochs=4)
    whole = transfer(cfg, tmp_path / "whole", progress=False, printer=lambda s: None)[0]
    Stop, original = interrupt_training(monkeypatch, run_module, 13)  # inside epoch 4 (4 steps each)
    with pytest.raises(Stop):
        transfer(cfg, tmp_path / "split", progress=False, printer=lambda s: None)
    monkeypatch.setattr(run_module, "train_stage", original)
    checkpoints = tmp_path / "split" / "checkpoints"
    assert _state(checkpoints / "last.prev.pt")["progress"]["epoch"] == 2
    last = (checkpoints / "last.pt").read_bytes()
    (checkpoints / "last.pt").write_bytes(last[: len(last) // 2])  # a copy cut short
    lines = []
    resumed = transfer(cfg, tmp_path / "split", progress=False, printer=lines.append)[0]
    assert any("after epoch 2" in line for line in lines), lines
    assert any("checkpoints/last.pt is unreadable" in line and "last.prev.pt" in line for line in lines), lines
    a, b = _state(whole.out / "model.pt"), _state(resumed.out / "model.pt")
    for k in a:  # the fallback is a whole epoch's state: the result is the uninterrupted run's
        assert torch.equal(a[k], b[k]), k
    assert len(pd.read_csv(resumed.out / "epochs.csv")) == 4
    # neither readable: one line naming the file and what to do
    (resumed.out / "model.pt").unlink()
    (resumed.out / "final.json").unlink()
    (checkpoints / "last.pt").write_bytes(b"PK\x03\x04 cut")
    (checkpoints / "last.prev.pt").write_bytes(b"")
    args = ["transfer", "--method", "ft", "--model", f"file:{pretrained}", "--allow-pickle", "--data", "digits",
            "--classes", "5-9", "--epochs", "4", "--batch-size", "64", "--n", "200", "--n-test", "100",
            "--score-n", "40", "--score-steps", "5", "--eval-steps", "3", "--attack-steps", "3", "--lr", "0.05",
            "--lr-ft", "0.01", "--no-score", "--out", str(tmp_path / "split"), "--no-progress"]
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{checkpoints / 'last.pt'} is unreadable (truncated?)" in err and f"delete {checkpoints}" in err


def test_after_a_fallback_the_damaged_checkpoint_never_becomes_the_fallback(pretrained, tmp_path, monkeypatch):
    """A run resumed from last.prev.pt (last.pt cut short) kept the damaged last.pt, and its next
    checkpoint moved it to last.prev.pt: one more damaged last.pt then had no fallback. The
    fallback stays a readable checkpoint, and the run ends at the uninterrupted weights."""
    cfg = _cfg(pretrained, "ft", score=False, epochs=4)
    whole = transfer(cfg, tmp_path / "whole", progress=False, printer=lambda s: None)[0]
    Stop, original = interrupt_training(monkeypatch, run_module, 13)  # inside epoch 4 (4 steps each)
    with pytest.raises(Stop):
        transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)
    checkpoints = tmp_path / "run" / "checkpoints"
    last = (checkpoints / "last.pt").read_bytes()
    (checkpoints / "last.pt").write_bytes(last[: len(last) // 2])
    monkeypatch.setattr(run_module, "train_stage", original)
    Stop, original = interrupt_training(monkeypatch, run_module, 6)  # resumed after epoch 2: inside epoch 4
    with pytest.raises(Stop):
        transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)
    assert _state(checkpoints / "last.pt")["progress"]["epoch"] == 3
    assert _state(checkpoints / "last.prev.pt")["progress"]["epoch"] == 2  # readable, an epoch earlier
    monkeypatch.setattr(run_module, "train_stage", original)
    resumed = transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)[0]
    a, b = _state(whole.out / "model.pt"), _state(resumed.out / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_lines_transfer_prints_fit_80_columns(pretrained, tmp_path, capsys, monkeypatch):
    from asbound.transfer.config import image_counts
    from asbound.transfer.loop import EpochRecord
    from asbound.transfer.methods import METHODS

    cfg = TransferConfig(model="builtin:lenet-random", data="digits", epochs=100).validated()
    for method in METHODS.values():
        for select in ("robust", "clean", "last"):
            for plan in run_module.plan_stages(method, dataclasses.replace(cfg, select=select), "none"):
                assert len(run_module._stage_line(method.name, plan)) <= 80, run_module._stage_line(method.name, plan)
    worst = EpochRecord(stage="adv-lp", epoch=100, train_loss=12.3456, train_accuracy=1.0, lr=0.000123456,
                        val_accuracy=1.0, val_robust_accuracy=1.0, seconds=0.01, images_per_second=987654.0,
                        selected=True)
    assert len(run_module._epoch_line(worst, 100)) <= 80, run_module._epoch_line(worst, 100)
    sizes = (1_281_167, 67_430, 50_000)
    for n in (None, 256, 1_000_000):
        text = run_module._images_line(image_counts(n, "auto", "auto", "auto", sizes), sizes, True)
        assert all(len(line) <= 80 for line in text.splitlines()), text
    monkeypatch.setenv("COLUMNS", "80")
    rc = main(["transfer", "--method", "lp-ft", "--model", f"file:{pretrained}", "--allow-pickle", "--data", "digits",
               "--classes", "5-9", "--epochs", "2", "--n", "60", "--eval-steps", "1", "--score-steps", "1",
               "--out", str(tmp_path / "r"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = (captured.out + captured.err).splitlines()
    assert len(lines) > 20 and all(len(line) <= 80 for line in lines if str(tmp_path) not in line), \
        [line for line in lines if len(line) > 80]


@pytest.mark.parametrize("args", [["--attack-steps", "0"], ["--eval-steps", "10,0"], ["--score-steps", "0"]])
def test_no_attack_steps_are_refused(pretrained, tmp_path, capsys, args):
    rc = main(["transfer", "--method", "lp", "--model", f"file:{pretrained}", "--allow-pickle", "--data", "digits",
               "--out", str(tmp_path / "run"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and ">= 1" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [
    ["score", "--model", "builtin:digits-adversarial", "--data", "digits", "--steps", "0"],
    ["score", "--steps", "0"],
    ["sweep", "eps", "--model", "builtin:digits-adversarial", "--data", "digits", "--steps", "0"],
    ["predict", "--model", "builtin:digits-adversarial", "--pretrain-data", "digits", "--data", "digits",
     "--steps", "0"],
])
def test_scores_without_an_attack_step_are_refused(tmp_path, capsys, command):
    """0 steps would score the random start alone (robust accuracy 100%)."""
    rc = main([*command, "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "steps must be >= 1, got 0" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="steps must be >= 1"):
        ScoreConfig(steps=0).validated()
