"""CUDA runs give the CPU's numbers (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asbound import ScoreConfig, score

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_score_on_cuda_matches_cpu():
    cfg = ScoreConfig(model="builtin:lenet-standard", data="dsprites:shape", n=32, steps=5, batch_size=16)
    cpu = score(cfg, device="cpu", progress=False)
    gpu = score(cfg, device="cuda", progress=False)
    assert gpu.config["device"].startswith("cuda")
    np.testing.assert_allclose(gpu.points["s_rep"], cpu.points["s_rep"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gpu.points["margin"], cpu.points["margin"], rtol=1e-3, atol=1e-4)
    assert gpu.summary["lhs"] <= gpu.summary["rhs"]
