"""What asbound's AS attack costs, measured against its floor and against foolbox, in float32 and
on the fast gradient paths.

On a RobustBench WideResNet-16-4 with random weights and a batch of random 32x32 inputs, split
with :func:`asbound.models.split_model` and frozen with :func:`asbound.models.frozen`, the
objective is the AS objective ``||g(x') - g(x)||_2`` (:func:`asbound.attacks.representation_shift`).
One run measures, each the median of ``--repeats`` rounds (interleaved) after one warm-up call:

* ``grad``: one float32 forward + input-gradient pass, the float32 floor of a step;
* ``foolbox``: foolbox's ``LinfPGD`` (:func:`asbound.attacks.foolbox_pgd`), ``S`` steps;
* ``pgd float32``: asbound's ``PGD(eps=8/255, steps=S, rel_step=0.7)``, as ``score`` runs it;
* the fast paths (``asbound.attacks.FastObjective``: gradient passes in low precision and/or
  compiled, the kept point re-evaluated in float32, as ``score --amp / --compile`` run them):
  channels-last, ``torch.compile`` (+ channels-last), and autocast bf16 / fp16 (+ channels-last).
  bf16 is measured on the CPU only where it computes bf16 natively (``avx512_bf16`` / ``amx_bf16``):
  elsewhere torch emulates it (a single gradient pass ran 29x slower than float32 on an AVX2 CPU here).

It prints each time, its throughput (images per second: batch x steps / seconds), its ratio to
``S x grad`` (the float32 floor) and to foolbox, and, per fast path, the AS it reports against the
float32 attack's, next to the run-to-run noise of the random starts (float32 with another seed).

    python benchmarks/attack_cost.py [--batch-size 128] [--steps 20] [--device auto|cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Callable, Optional

import torch

from asbound._compat import import_robustbench
from asbound.attacks import PGD, FastObjective, foolbox_pgd, representation_shift
from asbound.devices import cpu_has_bf16
from asbound.models import frozen, split_model
from timing import timed  # benchmarks/timing.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile paths")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)

    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    torch.manual_seed(0)
    model = WideResNet(depth=16, widen_factor=4, num_classes=10).eval()
    x = torch.rand(args.batch_size, 3, 32, 32).to(device)
    split = split_model(model, x[:8].cpu()).to(device)
    split_cl = copy.deepcopy(split).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    attack = PGD(eps=8 / 255, steps=args.steps, rel_step=0.7)
    s, zeros = args.steps, torch.zeros(len(x), device=device)
    native_bf16 = device.type == "cuda" or cpu_has_bf16()

    # name -> (model, input, autocast dtype or None, compiled); None: the float32 path without FastObjective
    fast_paths: "dict[str, tuple]" = {"pgd channels-last": (split_cl, x_cl, None, False)}
    if not args.no_compile:
        fast_paths["pgd compiled"] = (split, x, None, True)
        fast_paths["pgd compiled + channels-last"] = (split_cl, x_cl, None, True)
    if native_bf16:
        fast_paths["pgd bf16"] = (split, x, torch.bfloat16, False)
        fast_paths["pgd bf16 + channels-last"] = (split_cl, x_cl, torch.bfloat16, False)
    if native_bf16 and not args.no_compile:
        fast_paths["pgd bf16 + channels-last, compiled"] = (split_cl, x_cl, torch.bfloat16, True)
    if device.type == "cuda":
        fast_paths["pgd fp16 + channels-last"] = (split_cl, x_cl, torch.float16, False)

    with frozen(split), frozen(split_cl):
        g0 = split.features(x).detach()
        objective = representation_shift(split.features, x, g0)

        def grad_pass() -> None:
            xr = x.clone().requires_grad_(True)
            torch.autograd.grad(objective(xr).sum(), xr)

        def pgd(steps: int, seed: int = 0, fast: Optional[FastObjective] = None, exact=objective, inputs=x):
            return PGD(eps=attack.eps, steps=steps, rel_step=attack.rel_step)(
                exact, inputs, generator=torch.Generator().manual_seed(seed), clean_value=zeros, fast=fast).value

        runs: "dict[str, Callable[[int], object]]" = {
            "grad": lambda steps: grad_pass(),
            "foolbox LinfPGD": lambda steps: foolbox_pgd(PGD(eps=8 / 255, steps=steps, rel_step=0.7), objective, x),
            "pgd float32": lambda steps: pgd(steps),
        }
        makers = {}
        for name, (net, inputs, dtype, compiled) in fast_paths.items():
            features = torch.compile(net.features) if compiled else net.features
            exact = representation_shift(net.features, inputs, g0)
            fast = FastObjective(representation_shift(features, inputs, g0), dtype, device.type)  # as score builds it
            makers[name] = (fast, exact, inputs)
            runs[name] = (lambda f, e, i: (lambda steps: pgd(steps, fast=f, exact=e, inputs=i)))(fast, exact, inputs)
        for run in runs.values():  # warm-up (and compilation): one short call of each
            run(1)
        times: "dict[str, list[float]]" = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(lambda: run(s), device))
        # what each path reports: the mean AS, against float32 and against float32 with another seed
        as_values = {"pgd float32": pgd(s), "pgd float32, another seed": pgd(s, seed=1)}
        for name, (fast, exact, inputs) in makers.items():
            as_values[name] = pgd(s, fast=fast, exact=exact, inputs=inputs)

    t = {name: statistics.median(values) for name, values in times.items()}
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"native bf16: {'yes' if native_bf16 else 'no (bf16 not measured: emulated, 29x slower on an AVX2 CPU here)'}")
    print(f"model WideResNet-16-4 (random weights, feature dim {split.feature_dim}), batch {args.batch_size}x3x32x32, "
          f"L-inf PGD eps 8/255, {s} steps, rel_step 0.7, median of {args.repeats}")
    print()
    print(f"{'measurement':<40}{'seconds':>9}{'images/s':>10}{'/ floor':>9}{'/ foolbox':>11}")
    floor = s * t["grad"]
    print(f"{'one forward + input-gradient pass':<40}{t['grad']:>9.3f}{args.batch_size / t['grad']:>10.1f}")
    for name in runs:
        if name == "grad":
            continue
        throughput = args.batch_size * s / t[name]
        print(f"{name + f', {s} steps':<40}{t[name]:>9.3f}{throughput:>10.1f}{t[name] / floor:>9.3f}"
              f"{t[name] / t['foolbox LinfPGD']:>11.3f}")
    print()
    base = as_values["pgd float32"].double()
    noise = float((as_values["pgd float32, another seed"].double().mean() - base.mean()).abs() / base.mean())
    print(f"mean AS (the float32 objective at the kept points); run-to-run noise of the random starts: {noise:.2e}")
    print(f"{'path':<40}{'mean AS':>10}{'rel. diff':>11}")
    for name, value in as_values.items():
        diff = float((value.double().mean() - base.mean()) / base.mean())
        print(f"{name:<40}{float(value.double().mean()):>10.5f}{diff:>+11.2e}")


if __name__ == "__main__":
    main()
