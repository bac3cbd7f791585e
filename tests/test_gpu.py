"""CUDA runs give the CPU's numbers (the ``gpu`` marker: skipped without a CUDA device), and the
CUDA settings a run makes, checked on any machine.

What a CUDA run must reproduce, and how closely: a float32 evaluation at the same point (the
clean ``g(x)``, margins, losses) agrees to float32 rounding in another order (1e-4 relative; one
ulp of every weight moved them by about 1e-6, TF32's 10-bit rounding is about 3e-4); the attacks
draw their random starts on the CPU generator, so they start from the same points on both
devices, but their iterates amplify rounding (one ulp of every weight moved a 5-step L2 attack's
records by up to 2.5e-3 on a random WRN-28-10), so they are compared loosely; certificates are
float64 (1e-8 relative). ``benchmarks/gpu_check.py`` runs these tests and the larger checks in
one command.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from asbound.api import ScoreConfig, TransferConfig, score, transfer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: a float32 evaluation at the same point on two devices (reduction order only)
CLEAN_RTOL = 1e-4
CLEAN = ("margin", "loss_clean")


def _rel_dev(a: pd.Series, b: pd.Series) -> float:
    """``max |a - b| / max(|a|, 1e-3 max |a|)``: relative, with a floor near zero."""
    x, y = a.to_numpy(float), b.to_numpy(float)
    floor = 1e-3 * max(float(np.abs(x).max()), 1e-30)
    return float(np.max(np.abs(x - y) / np.maximum(np.abs(x), floor)))


# --- on any machine: the settings a CUDA run makes -----------------------------------------------------


def test_score_evaluates_in_ieee_float32_and_restores_tf32(monkeypatch):
    """cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa): score turns TF32 off
    while it attacks and records (every recorded value is a float32 evaluation), and restores the
    caller's setting afterwards. The flags are plain settings, so the CPU shows it."""
    from asbound import scoring

    seen = []
    original = scoring._Scorer.__call__

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(scoring._Scorer, "__call__", spy)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        score(ScoreConfig(model="builtin:digits-adversarial", data="digits", classes="0-4", n=4, steps=1,
                          batch_size=2, device="cpu"), progress=False)
        assert seen == [(False, False), (False, False)]  # two batches, each without TF32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_transfer_evaluates_the_test_data_in_ieee_float32(monkeypatch, tmp_path):
    """The test metrics of a transfer run (clean and PGD accuracy) are float32 evaluations too:
    TF32 is off while the evaluation attacks, whatever the caller set, and restored after."""
    from asbound.transfer import loop
    from asbound.transfer import run as run_module

    seen, evaluating = [], []
    original_eval, original_robust = run_module.evaluate, loop.robust_correct

    def spy_eval(*args, **kwargs):  # noqa: ANN001, ANN202
        evaluating.append(True)
        try:
            return original_eval(*args, **kwargs)
        finally:
            evaluating.pop()

    def spy_robust(*args, **kwargs):  # noqa: ANN001, ANN202
        if evaluating:
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return original_robust(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", spy_eval)
    monkeypatch.setattr(loop, "robust_correct", spy_robust)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        transfer(TransferConfig(model="builtin:digits-adversarial", data="digits", classes="5-9", method="lp",
                                epochs=1, n=16, n_val=4, n_test=4, batch_size=16, eval_steps=(1,), attack_steps=1,
                                score=False, device="cpu"), tmp_path / "run", progress=False, printer=lambda s: None)
        assert seen == [(False, False)]  # one test batch, one PGD
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_validation_is_ieee_float32_too(monkeypatch, tmp_path):
    """epochs.csv's validation accuracies are reported numbers as well: TF32 is off in every
    attack a transfer run evaluates with (validation of an adversarial stage and the test)."""
    from asbound.transfer import loop

    seen, original = [], loop.robust_correct

    def spy(*args, **kwargs):  # noqa: ANN001, ANN202
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "robust_correct", spy)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        transfer(TransferConfig(model="builtin:digits-adversarial", data="digits", classes="5-9", method="adv-lp",
                                epochs=1, n=16, n_val=4, n_test=4, batch_size=16, eval_steps=(1,), attack_steps=1,
                                score=False, device="cpu"), tmp_path / "run", progress=False, printer=lambda s: None)
        assert len(seen) >= 2 and set(seen) == {(False, False)}, seen  # validation and test
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --- on a CUDA device ---------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_score_on_cuda_matches_cpu_in_float32():
    """``--amp off``: the same float32 evaluations; L2 steps move continuously with the gradient,
    so one step from the same random start stays within float rounding of the CPU's."""
    cfg = ScoreConfig(model="builtin:lenet-standard", data="dsprites:shape", n=32, steps=1, batch_size=16,
                      norm="2", eps=0.5, amp="off")
    cpu = score(cfg, device="cpu", progress=False)
    gpu = score(cfg, device="cuda", progress=False)
    assert gpu.config["device"].startswith("cuda") and gpu.config["grad_dtype"] == "float32"
    for column in CLEAN:
        assert _rel_dev(cpu.points[column], gpu.points[column]) < CLEAN_RTOL, column
    for column in ("s_rep", "s_loss", "sensitivity"):
        assert _rel_dev(cpu.points[column], gpu.points[column]) < 1e-3, column
    assert (gpu.points["pred"] == cpu.points["pred"]).all()
    assert gpu.summary["lhs"] <= gpu.summary["rhs"]


@pytest.mark.gpu
@needs_cuda
def test_score_on_cuda_with_bf16_gradients_records_float32_values():
    """``--amp auto`` on CUDA: bf16 gradient passes on a channels-last model; the clean records
    are still the float32 ones, and the AS stays close to the CPU's float32 attack."""
    cfg = ScoreConfig(model="builtin:lenet-standard", data="dsprites:shape", n=64, steps=5, batch_size=32)
    cpu = score(cfg, device="cpu", progress=False)
    gpu = score(cfg, device="cuda", progress=False)
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert gpu.config["grad_dtype"] == expected and cpu.config["grad_dtype"] == "float32"
    for column in CLEAN:
        assert _rel_dev(cpu.points[column], gpu.points[column]) < CLEAN_RTOL, column
    assert np.isfinite(gpu.points["s_rep"]).all() and (gpu.points["s_rep"] >= 0).all()
    assert abs(gpu.summary["as_score"] / cpu.summary["as_score"] - 1) < 0.05
    assert gpu.summary["lhs"] <= gpu.summary["rhs"]


@pytest.mark.gpu
@needs_cuda
def test_certify_on_cuda_equals_cpu():
    """``--certify crown`` in float64 on CUDA: the same bounds as on the CPU, every batch checked."""
    cfg = ScoreConfig(model="builtin:digits-adversarial", data="digits", classes="0-4", n=16, steps=2,
                      certify="crown")
    cpu = score(cfg, device="cpu", progress=False)
    gpu = score(cfg, device="cuda", progress=False)
    np.testing.assert_allclose(gpu.points["s_upper"], cpu.points["s_upper"], rtol=1e-8)
    assert (gpu.points["s_upper"] >= gpu.points["s_rep"]).all()


@pytest.mark.gpu
@needs_cuda
def test_an_adversarial_transfer_epoch_on_cuda_with_bf16(tmp_path):
    """One epoch of adv-FT on CUDA under autocast (pinned memory, channels-last), checkpointed;
    its ``run:DIR`` scores on the CPU."""
    cfg = TransferConfig(model="builtin:digits-adversarial", data="digits", classes="5-9", method="adv-ft",
                         epochs=1, n=128, n_val=16, n_test=32, batch_size=64, attack_steps=3, eval_steps=(3,),
                         score_n=8, score_steps=2, device="cuda", amp="auto", eps=0.1, attack_step=0.025)
    result = transfer(cfg, tmp_path / "run", progress=False, printer=lambda s: None)[0]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["device"].startswith("cuda") and config["amp"] in ("bfloat16", "float16")
    rows = pd.read_csv(tmp_path / "run" / "epochs.csv")
    assert len(rows) == 1 and np.isfinite(rows["train_loss"]).all()
    assert 0.0 <= result.final["test"]["clean_accuracy"] <= 1.0
    state = torch.load(tmp_path / "run" / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    after = score(ScoreConfig(model=f"run:{tmp_path / 'run'}", data="digits", classes="5-9", n=8, steps=1,
                              device="cpu"), progress=False)
    assert np.isfinite(after.summary["as_score"])

