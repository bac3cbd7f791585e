"""``torchrun --nproc-per-node 2 -m asbound transfer ...`` on the CPU (gloo), at tiny size.

What a data-parallel run is expected to match: every rank trains on its half of each *global*
batch (the same images in the same order as one process), gradients are averaged, and the
validation counts are summed. What is allowed to differ from one process: batch-norm statistics
are computed per rank over half a batch, and float sums run in another order, so losses and
accuracies agree closely but not bit for bit. The tolerances below say how closely.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

COMMON = ["--model", "builtin:digits-adversarial", "--data", "digits", "--classes", "5-9", "--device", "cpu",
          "--no-progress", "--batch-size", "64", "--n-train", "256", "--n-val", "40", "--n-test", "80",
          "--attack-steps", "3", "--eval-steps", "3", "--score-n", "20", "--score-steps", "3"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(args: list[str], **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "asbound", "transfer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    args = ["--method", "adv-ft,autolora", "--epochs", "2", "--lr-ft", "0.02", *COMMON]
    ddp = _torchrun([*args, "--out", str(tmp_path / "ddp")])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "asbound", "transfer", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert single.returncode == 0, single.stderr[-3000:]
    # rank 0 alone reports: one table, one line per method naming its run
    assert ddp.stdout.count("asbound transfer:") == 1 and ddp.stdout.count("clean accuracy") == 1
    for method in ("adv-ft", "autolora"):
        a, b = tmp_path / "ddp" / method, tmp_path / "one" / method
        assert json.loads((a / "config.json").read_text())["world_size"] == 2
        ea, eb = pd.read_csv(a / "epochs.csv"), pd.read_csv(b / "epochs.csv")
        assert len(ea) == len(eb) == 2
        # the same images per step: the training loss differs only through per-rank BN statistics
        assert ea["train_loss"].to_numpy() == pytest.approx(eb["train_loss"].to_numpy(), rel=0.03)
        assert ea["lr"].to_numpy() == pytest.approx(eb["lr"].to_numpy())
        # every validation image counted once: accuracies are multiples of 1/n_val and close
        n_val = json.loads((a / "config.json").read_text())["n_val"]
        assert n_val == json.loads((b / "config.json").read_text())["n_val"] > 20
        for col in ("val_accuracy", "val_robust_accuracy"):
            assert all(abs(v * n_val - round(v * n_val)) < 1e-6 for v in ea[col])
            assert abs(ea[col] - eb[col]).max() <= 0.1
        fa, fb = json.loads((a / "final.json").read_text()), json.loads((b / "final.json").read_text())
        assert fa["test"]["n"] == fb["test"]["n"] == 80
        assert abs(fa["test"]["clean_accuracy"] - fb["test"]["clean_accuracy"]) <= 0.1
        # the run re-enters as a model, like any other
        assert (a / "model.pt").exists() and (a / "score" / "after" / "summary.json").exists()
    if "lambda1" in pd.read_csv(tmp_path / "ddp" / "autolora" / "epochs.csv"):  # lambdas agree across ranks
        la = pd.read_csv(tmp_path / "ddp" / "autolora" / "epochs.csv")["lambda1"]
        lb = pd.read_csv(tmp_path / "one" / "autolora" / "epochs.csv")["lambda1"]
        assert abs(la - lb).max() <= 0.1


def test_an_interrupted_torchrun_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["--method", "adv-ft", "--epochs", "6", "--lr-ft", "0.02", "--no-score", *COMMON]
    whole = _torchrun([*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "split"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "asbound", "transfer", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        epochs = out / "epochs.csv"
        if epochs.exists() and len(epochs.read_text().splitlines()) >= 3:  # header + 2 epochs
            break
        time.sleep(0.02)
    psutil = pytest.importorskip("psutil")
    workers = psutil.Process(proc.pid).children(recursive=True)  # torchrun's workers have their own sessions
    for p in [psutil.Process(proc.pid), *workers]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(workers, timeout=30)
    done = len(pd.read_csv(out / "epochs.csv"))
    assert 2 <= done < 6 and not (out / "model.pt").exists(), done
    again = _torchrun([*args, "--out", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"after epoch {done}" in again.stdout + again.stderr  # torchrun may pass a rank's stderr on stdout
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    for k in a:  # two ranks on the CPU are deterministic: the resumed run equals the whole one
        assert torch.equal(a[k], b[k]), k


def test_ranks_started_with_different_options_are_refused_in_one_line(tmp_path):
    port = str(_free_port())
    procs = []
    for rank, lr in ((0, "0.01"), (1, "0.02")):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "asbound", "transfer", "--method", "lp", "--lr", lr, *COMMON,
             "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, err[-2000:]
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "ranks disagree on the configuration" in lines[0] and "lr" in lines[0], err
    assert not Path(tmp_path / "run").exists()


# --- the shards themselves (no processes needed) -----------------------------------------------------


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("n, batch_size", [(37, 8), (40, 8), (9, 9), (10, 3)])
def test_the_ranks_batches_are_disjoint_and_together_the_one_process_batch(tmp_path, ranks, n, batch_size):
    """Each row of a fabricated set carries its position; every global batch is split among the
    ranks without overlap or loss (a last batch with fewer rows than ranks is left out by all)."""
    from asbound.distributed import World

    data = _numbered(tmp_path, n)
    for shuffle in (False, True):
        whole = [y.tolist() for _, y in data.loader(batch_size, shuffle=shuffle, seed=5)]
        shares = [[y.tolist() for _, y in data.loader(batch_size, shuffle=shuffle, seed=5, shard=(r, ranks))]
                  for r in range(ranks)]
        kept = [b for b in whole if len(b) >= ranks]
        assert all(len(s) == len(kept) for s in shares)
        for i, batch in enumerate(kept):
            parts = [set(s[i]) for s in shares]
            assert sum(len(p) for p in parts) == len(batch)  # disjoint ...
            assert set().union(*parts) == set(batch)  # ... and together the batch
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    # validation: each rank counts its rows; together every row once
    rows = [World(rank=r, size=ranks).share(n).tolist() for r in range(ranks)]
    assert sorted(sum(rows, [])) == list(range(n))


def _numbered(folder: Path, n: int):
    """A data set whose label is the row's position (as many classes as rows)."""
    from asbound.data import load_data

    torch.save({"x": torch.rand(n, 1, 2, 2), "y": torch.arange(n), "num_classes": n}, folder / "t.pt")
    return load_data(f"tensors:{folder / 't.pt'}")
