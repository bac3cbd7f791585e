"""One command that checks asbound on a CUDA device against the CPU, and times it there.

    python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--out reports/gpu_check.txt]
                                   [--checks pytest,score,timing,transfer,certify]

Five checks, each through what users run (``asbound.api``'s ``score`` / ``transfer``, the command
line's ``main``), each a row of one summary table (pass, fail or skip, with its figures); the exit
code is 1 when a check fails. Sized to take under 8 minutes on one H200.

1. ``pytest``: the test suite's ``gpu`` marker (``pytest -m gpu`` on the test files that use it).
2. ``score``: a RobustBench WRN-28-10 (``cifar10/Linf/Carmon2019Unlabeled``) and PreActResNet-18
   (``cifar10/Linf/Wong2020Fast``), random weights built with RobustBench's own classes and saved
   as state dicts in the zoo layout of a temporary model directory, score fabricated CIFAR-sized
   tensors (``tensors:PATH``) on the device and on the CPU. Two runs each:

   * ``L2``: ``--norm 2 --eps 0.5 --amp off``, float32 on both devices. The clean records
     (``margin``, ``loss_clean``) are float32 evaluations at the same point on both devices and
     must agree to 1e-4 relative (one ulp of every weight moved them by about 1e-6; TF32 rounds
     to 10 bits, about 3e-4). The attacks draw their random starts on the CPU generator, so both
     start from the same points, and L2 steps move continuously with the gradient; but the
     iterates amplify rounding, by an amount that depends on the network: a one-ulp change of
     every weight moved a 5-step attack's ``s_loss`` by 2.5e-3 on a random WRN-28-10 on the CPU
     (4e-5 after one; 2 steps run here). So the CPU run is repeated with every
     weight moved by one ulp (``nextafter``), and the attack records (``s_rep``, ``s_loss``,
     ``sensitivity``, ``loss_adv``) must agree within 10 times that deviation, at least 1e-3
     (another random start moved them by 1e-1 to 5e-1 on a WRN-40-2 and the PreActResNet-18).
     Predictions must agree wherever the margin is not within 1e-3 of zero (relative to the
     largest).
   * ``Linf``: ``--eps 8/255`` with ``--amp auto`` (on CUDA bf16 gradient passes on a
     channels-last model, as users run it; float32 on the CPU): the clean records agree to 1e-4,
     the mean AS within 5% (different gradients, same float32 evaluation of what they find).

3. ``timing``: the AS attack (``PGD`` on ``representation_shift``, 20 steps, eps 8/255, as
   ``score`` runs it, TF32 off as in ``score``) on a random WRN-28-10, batch 128, in float32,
   float32 channels-last, bf16 and bf16 channels-last (``--amp auto`` on CUDA): seconds per step,
   images per second, the step against one forward + input-gradient pass of the same path (the
   limit; at most 1.5), the speed-up over float32 and the mean AS against float32's (within 2%).
4. ``transfer``: ``adv-ft``, ``trades-ft`` and ``autolora`` from the PreActResNet-18 on tensors
   data, ``--amp auto``, 2 epochs straight, and 2 epochs interrupted at the first step of epoch 2
   (as Ctrl-C would) and rerun. The rerun must say it resumes after epoch 1, and its last weights
   (``checkpoints/last.pt``) must equal the straight run's: bit for bit on the CPU; on CUDA
   (deterministic algorithms asked for, ``warn_only``) within 5% of epoch 2's own change of the
   weights (a resume without the optimiser's state was off by 12%, 8% and 100% of it for the
   three methods on the digits CNN, 4 steps an epoch) or within 1e-6 of their norm (AutoLoRa's
   rule may restore epoch 1's weights at epoch 2, leaving no change to compare with).
5. ``certify``: ``asbound score --certify crown`` on ``builtin:digits-adversarial`` through the
   command line, on the device and on the CPU: the float64 bounds ``s_upper`` agree to 1e-8.

``--device cpu`` runs the same code at tiny sizes (2 images, 1 step, a WRN-40-2
(``cifar10/corruptions/Hendrycks2020AugMix_WRN``) for the WRN-28-10, a WRN-10-1 for the timing,
the builtin digits CNN for the transfer, the device side on the CPU too) in well under a
minute; the tests run it so that the script cannot rot. Its timings mean nothing and are not judged.

On a machine whose Python lacks asbound's dependencies (robustbench, foolbox, pyautoattack,
platformdirs, ...), install them first; the checkout's ``asbound`` is imported (no install needed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (HERE, ROOT):  # benchmarks/timing.py; the checkout's asbound, installed or not
    if str(_path) not in sys.path:
        sys.path.insert(1, str(_path))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from timing import timed  # noqa: E402  (benchmarks/timing.py)

CHECKS = ("pytest", "score", "timing", "transfer", "certify")
#: a float32 evaluation at the same point on two devices
CLEAN_RTOL = 1e-4
CLEAN_COLUMNS = ("margin", "loss_clean")
ATTACK_COLUMNS = ("s_rep", "s_loss", "sensitivity", "loss_adv")
#: the attack records may differ by this many times what a one-ulp change of the weights does
ULP_FACTOR = 10.0
ATTACK_FLOOR = 1e-3  # another random start moved them by 1e-1 to 5e-1
AS_RTOL_AMP = 0.05  # mean AS of bf16 gradients against the CPU's float32
STEP_LIMIT = 1.5  # an attack step against one forward + input-gradient pass of its path
AS_RTOL_TIMING = 0.02
RESUME_RTOL_CUDA = 0.05  # resumed against straight weights, relative to epoch 2's change
RESUME_FLOOR_CUDA = 1e-6  # or relative to the weights' norm (AutoLoRa may restore epoch 1's at epoch 2)
CERTIFY_RTOL = 1e-8


@dataclass(frozen=True)
class Zoo:
    """A RobustBench zoo entry and what the table calls it."""

    label: str
    dataset: str
    threat: str
    name: str

    @property
    def spec(self) -> str:
        return f"robustbench:{self.dataset}/{self.threat}/{self.name}"


WRN_28_10 = Zoo("WRN-28-10", "cifar10", "Linf", "Carmon2019Unlabeled")
PRN_18 = Zoo("PRN-18", "cifar10", "Linf", "Wong2020Fast")  # PreActResNet-18
WRN_40_2 = Zoo("WRN-40-2", "cifar10", "corruptions", "Hendrycks2020AugMix_WRN")


@dataclass(frozen=True)
class Sizes:
    """How large each check runs."""

    zoo: "tuple[Zoo, ...]"
    score_n: int
    l2_steps: int
    linf_steps: int
    time_depth: int
    time_widen: int
    time_batch: int
    time_steps: int
    repeats: int
    transfer_model: str  # "zoo" (the PreActResNet-18 on tensors data) or a builtin spec on digits
    transfer_rows: int  # rows of the tensors file
    transfer_n: int
    transfer_batch: int
    transfer_val: int
    transfer_test: int
    transfer_attack_steps: int
    transfer_score_n: int  # 0: no score before / after
    certify_n: int
    certify_steps: int
    judged: bool  # timings and AS figures are judged (not at the tiny sizes)


FULL = Sizes(zoo=(WRN_28_10, PRN_18), score_n=8, l2_steps=2, linf_steps=5, time_depth=28, time_widen=10,
             time_batch=128, time_steps=20, repeats=3, transfer_model="zoo", transfer_rows=300, transfer_n=256,
             transfer_batch=64, transfer_val=8, transfer_test=32, transfer_attack_steps=10, transfer_score_n=8,
             certify_n=32, certify_steps=5, judged=True)
TINY = Sizes(zoo=(WRN_40_2, PRN_18), score_n=2, l2_steps=1, linf_steps=1, time_depth=10, time_widen=1,
             time_batch=2, time_steps=1, repeats=1, transfer_model="builtin:digits-adversarial", transfer_rows=0,
             transfer_n=4, transfer_batch=2, transfer_val=2, transfer_test=2, transfer_attack_steps=1,
             transfer_score_n=0, certify_n=2, certify_steps=1, judged=False)


@dataclass
class Row:
    """One line of the summary: a check, its result (pass, fail, skip) and its figures."""

    check: str
    result: str
    figures: str


def log(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


# --- shared pieces -------------------------------------------------------------------------------


def zoo_entry(zoo: Zoo) -> dict:
    from asbound._compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(zoo.dataset)][ThreatModel(zoo.threat)][zoo.name]


def one_ulp(state: "dict[str, torch.Tensor]", seed: int = 1) -> "dict[str, torch.Tensor]":
    """Every floating-point entry moved by one ulp, up or down at random."""
    gen = torch.Generator().manual_seed(seed)
    moved = {}
    for key, value in state.items():
        if value.is_floating_point():
            up = torch.rand(value.shape, generator=gen) < 0.5
            moved[key] = torch.nextafter(value, torch.where(up, math.inf, -math.inf).to(value.dtype))
        else:
            moved[key] = value
    return moved


def fabricate_zoo(model_dir: Path, zoos: "tuple[Zoo, ...]", moved: bool = False) -> None:
    """Random-weight zoo models saved as state dicts in RobustBench's layout (``moved``: by one ulp)."""
    for i, zoo in enumerate(zoos):
        with torch.random.fork_rng(devices=[]):  # the caller's generator untouched
            torch.manual_seed(i)
            state = zoo_entry(zoo)["model"]().eval().state_dict()
        path = model_dir / zoo.dataset / zoo.threat / f"{zoo.name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(one_ulp(state) if moved else state, path)


def fabricate_tensors(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` CIFAR-sized images in [0, 1] with labels of 10 classes, as ``tensors:PATH`` reads them."""
    gen = torch.Generator().manual_seed(seed)
    torch.save({"x": torch.rand(n, 3, 32, 32, generator=gen), "y": torch.randint(0, 10, (n,), generator=gen),
                "num_classes": 10}, path)
    return path


def rel_dev(a: pd.Series, b: pd.Series) -> float:
    """``max |a - b| / max(|a|, 1e-3 max |a|)``: relative, with a floor near zero (NaN: inf)."""
    x, y = a.to_numpy(float), b.to_numpy(float)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.inf
    floor = 1e-3 * max(float(np.abs(x).max(initial=0.0)), 1e-30)
    return float(np.max(np.abs(x - y) / np.maximum(np.abs(x), floor), initial=0.0))


def worst(a: pd.DataFrame, b: pd.DataFrame, columns: "tuple[str, ...]") -> float:
    return max((rel_dev(a[c], b[c]) for c in columns if c in a and c in b), default=0.0)


def verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- 1. the test suite's gpu marker ---------------------------------------------------------------


def check_pytest(device: torch.device, sizes: Sizes, work: Path) -> "list[Row]":
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    if not files:
        return [Row("pytest -m gpu", "fail", "no test file uses the gpu marker")]
    report = work / "pytest.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}",
               *files]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    seconds = time.perf_counter() - started
    if not report.exists():
        log(proc.stdout[-4000:] + proc.stderr[-4000:])
        return [Row("pytest -m gpu", "fail", f"pytest exited {proc.returncode} without a report")]
    suites = ElementTree.parse(report).getroot()
    suites = suites.findall("testsuite") if suites.tag == "testsuites" else [suites]
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    figures = (f"{passed} passed, {count['failures'] + count['errors']} failed, {count['skipped']} skipped "
               f"({', '.join(Path(f).name for f in files)}), {seconds:.0f} s")
    if failed:
        log("pytest -m gpu:\n" + proc.stdout[-6000:])
        return [Row("pytest -m gpu", "fail", figures + "; failed: " + ", ".join(failed[:4]))]
    if proc.returncode not in (0,):
        log(proc.stdout[-4000:] + proc.stderr[-4000:])
        return [Row("pytest -m gpu", "fail", f"pytest exited {proc.returncode}; " + figures)]
    if passed == 0:
        reason = "no CUDA device" if device.type != "cuda" else "every gpu test was skipped"
        return [Row("pytest -m gpu", "skip" if device.type != "cuda" else "fail", f"{reason}: " + figures)]
    return [Row("pytest -m gpu", "pass", figures)]


# --- 2. score on the device against the CPU ----------------------------------------------------------


def _score(zoo: Zoo, model_dir: Path, data: Path, device: torch.device, out: Path, sizes: Sizes,
           **options: object) -> "tuple[object, float]":
    from asbound.api import ScoreConfig, score

    cfg = ScoreConfig(model=zoo.spec, model_dir=str(model_dir), data=f"tensors:{data}", n=sizes.score_n,
                      batch_size=sizes.score_n, seed=0, device=str(device), **options)
    started = time.perf_counter()
    result = score(cfg, out=out, progress=False)
    sync(device)
    return result, time.perf_counter() - started


def _steps(k: int) -> str:
    return f"{k} step{'s' * (k != 1)}"


def _same_predictions(a: pd.DataFrame, b: pd.DataFrame) -> "tuple[int, int]":
    """Predictions that differ where the margin is clear of zero, and how many points are compared."""
    margin = a["margin"].to_numpy(float)
    clear = np.abs(margin) > 1e-3 * max(float(np.abs(margin).max(initial=0.0)), 1e-30)
    differ = (a["pred"].to_numpy() != b["pred"].to_numpy()) & clear
    return int(differ.sum()), int(clear.sum())


def check_score(device: torch.device, sizes: Sizes, work: Path) -> "list[Row]":
    zoo_dir, moved_dir = work / "zoo", work / "zoo-ulp"
    fabricate_zoo(zoo_dir, sizes.zoo)
    fabricate_zoo(moved_dir, sizes.zoo, moved=True)
    data = fabricate_tensors(work / "cifar-sized.pt", max(sizes.score_n, 8))
    cpu = torch.device("cpu")
    rows = []
    for zoo in sizes.zoo:
        # L2, float32 on both devices: same starts, continuous steps
        l2 = dict(norm="2", eps=0.5, steps=sizes.l2_steps, amp="off")
        log(f"score: {zoo.label} L2 float32 on the cpu, the cpu with weights one ulp off, {device}")
        ref, t_cpu = _score(zoo, zoo_dir, data, cpu, work / f"{zoo.name}-l2-cpu", sizes, **l2)
        moved, _ = _score(zoo, moved_dir, data, cpu, work / f"{zoo.name}-l2-ulp", sizes, **l2)
        dev, t_dev = _score(zoo, zoo_dir, data, device, work / f"{zoo.name}-l2-dev", sizes, **l2)
        a, b, u = ref.points, dev.points, moved.points
        clean, attack, ulp = worst(a, b, CLEAN_COLUMNS), worst(a, b, ATTACK_COLUMNS), worst(a, u, ATTACK_COLUMNS)
        tol = max(ULP_FACTOR * ulp, ATTACK_FLOOR)
        differ, compared = _same_predictions(a, b)
        ok = clean <= CLEAN_RTOL and attack <= tol and differ == 0 and dev.config["device"].startswith(device.type)
        rows.append(Row(f"score {zoo.label} L2", verdict(ok),
                        f"float32; clean {clean:.1e} <= {CLEAN_RTOL:.0e}; attack {attack:.1e} <= {tol:.1e} "
                        f"({ULP_FACTOR:.0f} x one ulp's {ulp:.1e}); pred {compared - differ}/{compared} same; "
                        f"{len(a)} images x {_steps(sizes.l2_steps)}, {t_cpu:.1f} s cpu, {t_dev:.1f} s {device.type}"))
        # L-inf, --amp auto: bf16 gradients on a channels-last model on CUDA, float32 on the CPU
        linf = dict(norm="inf", eps="8/255", steps=sizes.linf_steps, amp="auto")
        log(f"score: {zoo.label} Linf --amp auto on the cpu and {device}")
        ref, t_cpu = _score(zoo, zoo_dir, data, cpu, work / f"{zoo.name}-linf-cpu", sizes, **linf)
        dev, t_dev = _score(zoo, zoo_dir, data, device, work / f"{zoo.name}-linf-dev", sizes, **linf)
        clean = worst(ref.points, dev.points, CLEAN_COLUMNS)
        as_diff = dev.summary["as_score"] / ref.summary["as_score"] - 1 if ref.summary["as_score"] else math.inf
        grad = dev.config["grad_dtype"]
        expected = "float32" if device.type != "cuda" else (
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        ok = clean <= CLEAN_RTOL and abs(as_diff) <= AS_RTOL_AMP and grad == expected
        rows.append(Row(f"score {zoo.label} Linf", verdict(ok),
                        f"--amp auto: {grad} gradients; clean {clean:.1e} <= {CLEAN_RTOL:.0e}; mean AS "
                        f"{as_diff:+.1e} <= {AS_RTOL_AMP:.0%}; {len(dev.points)} images x {_steps(sizes.linf_steps)}, "
                        f"{t_cpu:.1f} s cpu, {t_dev:.1f} s {device.type}"))
    return rows


# --- 3. the attack step on the device ----------------------------------------------------------------


def check_timing(device: torch.device, sizes: Sizes, work: Path) -> "list[Row]":
    from asbound._compat import import_robustbench
    from asbound.attacks import PGD, FastObjective, representation_shift
    from asbound.devices import float32_exact
    from asbound.devices import cpu_has_bf16
    from asbound.models import frozen, split_model

    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WideResNet(depth=sizes.time_depth, widen_factor=sizes.time_widen, num_classes=10).eval()
    x_cpu = torch.rand(sizes.time_batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    split = split_model(model, x_cpu[:2]).to(device)
    split_cl = copy.deepcopy(split).to(memory_format=torch.channels_last)
    x = x_cpu.to(device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    name = f"WRN-{sizes.time_depth}-{sizes.time_widen}"
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else True  # tiny on the CPU: emulated is fine
    native = device.type == "cuda" or cpu_has_bf16()
    s, batch = sizes.time_steps, sizes.time_batch
    zeros = torch.zeros(batch, device=device)
    rows: "list[Row]" = []
    with frozen(split), frozen(split_cl), float32_exact():  # as score runs: no TF32
        g0 = split.features(x).detach()
        exact = representation_shift(split.features, x, g0)
        exact_cl = representation_shift(split_cl.features, x_cl, g0)
        # name -> (the objective of the steps or None, the float32 objective, inputs)
        paths: "dict[str, tuple[Optional[FastObjective], Callable, torch.Tensor]]" = {
            "f32": (None, exact, x),
            "f32 ch-last": (None, exact_cl, x_cl),
        }
        if bf16:
            paths["bf16"] = (FastObjective(exact, torch.bfloat16, device.type), exact, x)
            paths["bf16 ch-last"] = (FastObjective(exact_cl, torch.bfloat16, device.type), exact_cl, x_cl)
        else:
            rows.append(Row(f"timing bf16 {name}", "skip", "this GPU has no bf16"))

        def attack(fast: Optional[FastObjective], objective: Callable, inputs: torch.Tensor,
                   steps: int) -> torch.Tensor:
            return PGD(eps=8 / 255, steps=steps, rel_step=0.7)(
                objective, inputs, generator=torch.Generator().manual_seed(0), clean_value=zeros, fast=fast).value

        # one forward + input-gradient pass at the attack's random start (at x itself the shift's
        # gradient is 0 / 0), in the memory format of the inputs
        starts = {label: PGD(eps=8 / 255).start_point(inputs, torch.Generator().manual_seed(0))
                  for label, (_, _, inputs) in paths.items()}

        def grad_pass(fn: Callable, start: torch.Tensor) -> None:
            xr = start.detach().clone().requires_grad_(True)  # the clone keeps the memory format
            torch.autograd.grad(fn(xr).sum(), xr)

        for label, (fast, objective, inputs) in paths.items():  # warm-up: cuDNN's choices, allocations
            attack(fast, objective, inputs, min(s, 2))
            grad_pass(fast or objective, starts[label])
        times: "dict[str, list[float]]" = {}
        for _ in range(sizes.repeats):
            for label, (fast, objective, inputs) in paths.items():
                times.setdefault(f"{label} grad", []).append(
                    timed(lambda: grad_pass(fast or objective, starts[label]), device))
                times.setdefault(label, []).append(timed(lambda: attack(fast, objective, inputs, s), device))
        values = {label: attack(fast, objective, inputs, s) for label, (fast, objective, inputs) in paths.items()}
    t = {k: statistics.median(v) for k, v in times.items()}
    base_as = float(values["f32"].double().mean())
    for label in paths:
        step = t[label] / s
        ratio = step / t[f"{label} grad"]
        as_diff = float(values[label].double().mean()) / base_as - 1 if base_as else math.inf
        finite = all(math.isfinite(v) for v in (step, ratio, as_diff)) and bool(torch.isfinite(values[label]).all())
        ok = finite and (not sizes.judged or (ratio <= STEP_LIMIT and abs(as_diff) <= AS_RTOL_TIMING))
        note = "" if sizes.judged else "; tiny: not judged"
        if label.startswith("bf16") and not native:
            note += "; bf16 emulated"
        rows.append(Row(f"timing {label}", verdict(ok),
                        f"{name} x {batch}: {1e3 * step:.1f} ms/step, {batch / step:,.0f} img/s; {ratio:.2f} x "
                        f"its fwd+bwd <= {STEP_LIMIT}; {t['f32'] / t[label]:.2f} x f32's speed; mean AS "
                        f"{as_diff:+.1e} <= {AS_RTOL_TIMING:.0%}{note}"))
    return rows


# --- 4. transfer on the device, interrupted and resumed ------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """Stops a transfer run at a training step, as Ctrl-C would."""


@contextlib.contextmanager
def interrupted_at(step: int):  # noqa: ANN201
    """Transfer runs raise :class:`Interrupted` when their ``step``-th training batch is drawn
    (counted over the run), as the project's resume tests do."""
    from asbound.transfer import run as run_module

    original = run_module.train_stage
    drawn = {"n": 0}

    def interrupted(model, plan, settings, train_batches, *args, **kwargs):  # noqa: ANN001, ANN202
        def batches(seed, training):  # noqa: ANN001, ANN202
            for batch in train_batches(seed, training):
                drawn["n"] += bool(training)
                if drawn["n"] == step:
                    raise Interrupted
                yield batch

        return original(model, plan, settings, batches, *args, **kwargs)

    run_module.train_stage = interrupted
    try:
        yield
    finally:
        run_module.train_stage = original


@contextlib.contextmanager
def deterministic(device: torch.device):  # noqa: ANN201
    """On CUDA, deterministic algorithms where torch has them (a warning where not), restored after;
    yields the warnings' texts."""
    seen: "list[str]" = []
    if device.type != "cuda":
        yield seen
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(sorted({str(w.message).splitlines()[0] for w in caught if "determinis" in str(w.message)}))
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _weights(path: Path, checkpoint: bool = True) -> "dict[str, torch.Tensor]":
    """The weights of a ``checkpoints/*.pt`` (or, ``checkpoint=False``, of a ``model.pt``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"] if checkpoint else state


def _distance(a: "dict[str, torch.Tensor]", b: "dict[str, torch.Tensor]") -> float:
    """The L2 distance between two states' floating-point entries (inf when their keys differ)."""
    if a.keys() != b.keys():
        return math.inf
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()))


def check_transfer(device: torch.device, sizes: Sizes, work: Path) -> "list[Row]":
    from asbound.api import TransferConfig, transfer
    from asbound.transfer.loop import steps_per_epoch

    if sizes.transfer_model == "zoo":
        zoo_dir = work / "zoo"
        if not (zoo_dir / PRN_18.dataset / PRN_18.threat / f"{PRN_18.name}.pt").exists():
            fabricate_zoo(zoo_dir, (PRN_18,))
        data = fabricate_tensors(work / "transfer.pt", sizes.transfer_rows, seed=1)
        source = dict(model=PRN_18.spec, model_dir=str(zoo_dir), data=f"tensors:{data}")
        label = PRN_18.label
    else:
        source = dict(model=sizes.transfer_model, data="digits", classes="5-9", eps=0.1, attack_step=0.025)
        label = sizes.transfer_model.split(":")[-1]
    score_options = (dict(score_n=sizes.transfer_score_n, score_steps=2) if sizes.transfer_score_n
                     else dict(score=False))
    rows = []
    for method in ("adv-ft", "trades-ft", "autolora"):
        cfg = TransferConfig(**source, method=method, epochs=2, n=sizes.transfer_n, n_val=sizes.transfer_val,
                             n_test=sizes.transfer_test, batch_size=sizes.transfer_batch,
                             attack_steps=sizes.transfer_attack_steps, eval_steps=(sizes.transfer_attack_steps,),
                             device=str(device), amp="auto", seed=0, **score_options)
        base = work / f"transfer-{method}"
        lines: "list[str]" = []
        with deterministic(device) as nondeterministic:
            log(f"transfer: {method} on {device}, 2 epochs straight")
            started = time.perf_counter()
            straight = transfer(cfg, base / "straight", progress=False, printer=lambda s: None)[0]
            sync(device)
            seconds = time.perf_counter() - started
            log(f"transfer: {method}, interrupted at epoch 2's first step, then resumed")
            stop = steps_per_epoch(sizes.transfer_n, sizes.transfer_batch) + 1
            try:
                with interrupted_at(stop):
                    transfer(cfg, base / "split", progress=False, printer=lambda s: None)
                stopped = False
            except Interrupted:
                stopped = True
            resumed = transfer(cfg, base / "split", progress=False, printer=lines.append)[0]
        said = any(line.startswith(f"resuming {method}") and "after epoch 1" in line for line in lines)
        a, b = straight.out / "checkpoints", resumed.out / "checkpoints"
        last, other = _weights(a / "last.pt"), _weights(b / "last.pt")
        differ = _distance(last, other)
        change = _distance(last, _weights(a / "last.prev.pt"))  # epoch 2's own change
        ratio = differ / change if change > 0 else (0.0 if differ == 0 else math.inf)
        norm = _distance(last, {k: torch.zeros_like(v) for k, v in last.items()})
        close = ratio <= RESUME_RTOL_CUDA or differ <= RESUME_FLOOR_CUDA * norm
        equal = differ == 0 and _distance(_weights(straight.out / "model.pt", False),
                                          _weights(resumed.out / "model.pt", False)) == 0
        timing_free = ["seconds", "images_per_second"]
        epochs_a = pd.read_csv(straight.out / "epochs.csv").drop(columns=timing_free)
        epochs_b = pd.read_csv(resumed.out / "epochs.csv").drop(columns=timing_free)
        same_rows = epochs_a.equals(epochs_b)
        amp = json.loads((straight.out / "config.json").read_text())["amp"]
        finite = bool(np.isfinite(epochs_a["train_loss"]).all()) and len(epochs_a) == 2 == len(epochs_b)
        if device.type == "cuda":
            ok = stopped and said and finite and close
        else:
            ok = stopped and said and finite and equal and same_rows
        rate = pd.read_csv(straight.out / "epochs.csv")["images_per_second"].iloc[-1]
        apart = "bit for bit" if equal else (f"apart by {ratio:.1e} of epoch 2's change (<= {RESUME_RTOL_CUDA:.0%}), "
                                             f"{differ / norm:.1e} of their norm (<= {RESUME_FLOOR_CUDA:.0e})")
        if change == 0:
            apart += " (epoch 2 restored the best weights)"
        figures = (f"{label}, amp {amp}: {'stopped' if stopped else 'NOT stopped'} at epoch 2, "
                   f"{'resumed after epoch 1' if said else 'no resume line'}; last weights {apart}; "
                   f"epochs.csv {'equal' if same_rows else 'differs'}; {seconds:.1f} s, {rate:,.0f} img/s")
        if nondeterministic:
            figures += f"; {len(nondeterministic)} op(s) without a deterministic kernel"
            log(f"transfer {method}: " + "; ".join(nondeterministic))
        rows.append(Row(f"transfer {method}", verdict(ok), figures))
    return rows


# --- 5. certify crown on the device against the CPU ----------------------------------------------------


def check_certify(device: torch.device, sizes: Sizes, work: Path) -> "list[Row]":
    from asbound.cli import main as cli

    def run(where: torch.device, out: Path) -> "tuple[pd.DataFrame, float]":
        argv = ["score", "--model", "builtin:digits-adversarial", "--data", "digits", "--classes", "0-4",
                "--n", str(sizes.certify_n), "--steps", str(sizes.certify_steps), "--certify", "crown",
                "--device", str(where), "--seed", "0", "--no-progress", "--out", str(out)]
        printed, errors = io.StringIO(), io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
            code = cli(argv)
        sync(where)
        if code != 0:
            raise RuntimeError(f"asbound {' '.join(argv[:1])} on {where} exited {code}: {errors.getvalue().strip()}")
        return pd.read_csv(out / "points.csv"), time.perf_counter() - started

    log(f"certify: crown on the cpu and {device}")
    ref, t_cpu = run(torch.device("cpu"), work / "certify-cpu")
    dev, t_dev = run(device, work / "certify-dev")
    upper = rel_dev(ref["s_upper"], dev["s_upper"])
    # the run checks itself (a float32 s may pass s_upper by its rounding); here at 1e-5 relative
    sound = bool((dev["s_upper"] >= dev["sensitivity"] * (1 - 1e-5)).all())
    same = int((ref["certified"] == dev["certified"]).sum())
    n = len(ref)
    ok = upper <= CERTIFY_RTOL and sound and len(dev) == n
    return [Row("certify crown", verdict(ok),
                f"builtin:digits-adversarial: s_upper {upper:.1e} <= {CERTIFY_RTOL:.0e}; >= s on every point: "
                f"{'yes' if sound else 'NO'}; certified {int(dev['certified'].sum())}/{n} ({same}/{n} as on the "
                f"cpu); {t_cpu / n:.3f} s/point cpu, {t_dev / n:.3f} s/point {device.type}")]


RUNNERS: "dict[str, Callable[[torch.device, Sizes, Path], list[Row]]]" = {
    "pytest": check_pytest, "score": check_score, "timing": check_timing, "transfer": check_transfer,
    "certify": check_certify,
}


# --- the summary ---------------------------------------------------------------------------------------


def environment_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
        cudnn = torch.backends.cudnn.version()
        where = f"{name}, CUDA {torch.version.cuda}, cuDNN {cudnn}, bf16 {bf16}"
    else:
        where = "CPU, tiny sizes"
    threads = torch.get_num_threads()
    return f"device {device} ({where}); torch {torch.__version__}, {threads} thread{'s' * (threads != 1)}"


def render(rows: "list[Row]", header: "list[str]", footer: str) -> str:
    """The summary as plain text, 80 columns wide."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("figures", overflow="fold")
    for row in rows:
        table.add_row(row.check, row.result, row.figures)
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, color_system=None, force_terminal=False, highlight=False,
                      soft_wrap=False)
    for line in header:
        console.print(line, overflow="fold")
    console.print(table)
    console.print(footer, overflow="fold")
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def run_checks(device: torch.device, sizes: Sizes, checks: "tuple[str, ...]", work: Path) -> "list[Row]":
    rows: "list[Row]" = []
    for name in checks:
        started = time.perf_counter()
        log(f"{name} ...")
        try:
            rows.extend(RUNNERS[name](device, sizes, work))
        except Exception as exc:  # one check's failure is a row; the others still run
            traceback.print_exc()
            text = " ".join(str(exc).split()) or type(exc).__name__
            rows.append(Row(name, "fail", f"error: {type(exc).__name__}: {text[:300]}"))
        log(f"{name} done in {time.perf_counter() - started:.1f} s")
    return rows


def main(argv: "Optional[list[str]]" = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: CUDA when present (full sizes), else the CPU (tiny sizes)")
    parser.add_argument("--out", help="also write the summary to this file (e.g. reports/gpu_check.txt)")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"a comma-separated subset of {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    unknown = [c for c in checks if c not in CHECKS]
    if unknown or not checks:
        parser.error(f"--checks {args.checks!r}: unknown {', '.join(unknown) or 'empty'}; valid: {', '.join(CHECKS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu (tiny sizes)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    sizes = FULL if device.type == "cuda" else TINY
    if device.type == "cuda":  # cuBLAS's deterministic mode (check 4) needs it before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        rows = run_checks(device, sizes, checks, Path(tmp))
    seconds = time.perf_counter() - started
    failed = [r for r in rows if r.result == "fail"]
    footer = (f"{len(rows)} rows in {seconds:.0f} s: {len(rows) - len(failed)} passed or skipped, "
              f"{len(failed)} failed")
    models = "; ".join(f"{z.label} = {z.spec}" for z in sizes.zoo)
    text = render(rows, [f"asbound gpu_check: {environment_line(device)}", models], footer)
    sys.stdout.write(text)
    if args.out:
        from asbound.records import atomic_write

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda handle: handle.write(text.encode()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
