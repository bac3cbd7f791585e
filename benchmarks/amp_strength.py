"""Does a low-precision gradient path change the AS it reports? Per seed, against float32.

On the WideResNet-16-4 (random weights) and batch of ``attack_cost.py``, PGD (eps 8/255, 20 steps,
rel_step 0.7) runs with the float32 objective and with gradient passes under bf16 autocast
(:class:`asbound.attacks.FastObjective`, channels-last), each kept point re-evaluated in float32.
For each seed it prints every path's mean AS relative to float32 with the same seed, and float32's
own seed-to-seed spread, so a path's systematic shift stands apart from the random starts' noise:

* ``bf16``: eager autocast, ``g(x0)`` in float32 (what ``score --amp bf16`` runs);
* ``bf16, g(x0) in bf16``: the reference ``g(x0)`` rounded to bf16 as well;
* ``bf16 compiled``: the features ``torch.compile``-d under autocast (``score`` refuses this pair).

bf16 is measured only where the device computes it natively (CUDA, or a CPU with ``avx512_bf16`` /
``amx_bf16``).

    python benchmarks/amp_strength.py [--batch-size 64] [--seeds 3] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch

from asbound._compat import import_robustbench
from asbound.attacks import PGD, FastObjective, representation_shift
from asbound.devices import cpu_has_bf16
from asbound.models import frozen, split_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cpu" and not cpu_has_bf16():
        raise SystemExit("this CPU has no native bf16: nothing to measure here")

    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    torch.manual_seed(0)
    model = WideResNet(depth=16, widen_factor=4, num_classes=10).eval()
    x = torch.rand(args.batch_size, 3, 32, 32)
    split = split_model(model, x[:8]).to(device).to(memory_format=torch.channels_last)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    zeros = torch.zeros(len(x), device=device)
    with frozen(split):
        g0 = split.features(x).detach()
        exact = representation_shift(split.features, x, g0)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            g0_bf16 = split.features(x)
        paths = {
            "bf16": FastObjective(representation_shift(split.features, x, g0), torch.bfloat16, device.type),
            "bf16, g(x0) in bf16": FastObjective(representation_shift(split.features, x, g0_bf16), torch.bfloat16,
                                                 device.type),
            "bf16 compiled": FastObjective(representation_shift(torch.compile(split.features), x, g0), torch.bfloat16,
                                           device.type),
        }

        def mean_as(seed: int, fast=None) -> float:
            result = PGD(eps=8 / 255, steps=20, rel_step=0.7)(
                exact, x, generator=torch.Generator().manual_seed(seed), clean_value=zeros, fast=fast)
            return float(result.value.double().mean())

        seeds = list(range(1, args.seeds + 1))
        base = {seed: mean_as(seed) for seed in seeds}
        rows = {name: [mean_as(seed, fast) / base[seed] - 1 for seed in seeds] for name, fast in paths.items()}
    spread = [base[s] / base[seeds[0]] - 1 for s in seeds[1:]]
    print(f"device {device}, torch {torch.__version__}, WideResNet-16-4 (random), batch {args.batch_size}, "
          f"PGD eps 8/255, 20 steps; mean AS relative to float32 with the same seed")
    print(f"{'path':<24}" + "".join(f"{f'seed {s}':>11}" for s in seeds) + f"{'mean':>11}")
    for name, values in rows.items():
        print(f"{name:<24}" + "".join(f"{v:>+11.2e}" for v in values) + f"{sum(values) / len(values):>+11.2e}")
    print(f"{'float32, seed vs seed 1':<24}{'':>11}" + "".join(f"{v:>+11.2e}" for v in spread))


if __name__ == "__main__":
    main()
