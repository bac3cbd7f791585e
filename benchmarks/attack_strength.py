"""How strong the AS attack is, and what it costs, against a strong reference (issue 9 B, the
measurement; the candidate attacks come next).

The AS score is a maximum over the ball; a weak attack understates it and makes every bound look
better than it is. Per model, on the same datapoints, this measures each PGD configuration's mean
AS relative to the reference (per datapoint the best over PGD with ``--ref-steps`` steps and
``--ref-restarts`` restarts and over every configuration measured) and its cost relative to the
seed protocol (20 steps, relative step 0.7, one restart), counted in forward+backward passes
(``steps x restarts``).

Models: the builtin representations on their own data (digits CNNs on digits 0-4, the dSprites
LeNets) and two RobustBench architectures with random weights (WideResNet-16-4, PreActResNet-18)
on the digits upsized to 32x32 RGB (no weights offline).

    python benchmarks/attack_strength.py [--n 64] [--rb-n 16] [--ref-steps 200] [--ref-restarts 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from asbound._compat import import_robustbench
from asbound.attacks import PGD, representation_shift
from asbound.data import load_data
from asbound.models import frozen, load_model, split_model
from asbound.specs import parse_model_spec

#: (name, steps, relative step, restarts); "seed" is the protocol the costs are relative to
CONFIGS = (("seed", 20, 0.7, 1), ("pgd-10", 10, 0.7, 1), ("pgd-10 rel 1.0", 10, 1.0, 1), ("pgd-20 rel 0.3", 20, 0.3, 1),
           ("pgd-40", 40, 0.7, 1), ("pgd-20 x2 restarts", 20, 0.7, 2))


def _models(n: int, rb_n: int) -> "list[tuple[str, torch.nn.Module, torch.Tensor, float]]":
    out = []
    for spec, data, classes, eps in (("builtin:digits-adversarial", "digits", "0-4", 8 / 255),
                                     ("builtin:digits-standard", "digits", "0-4", 8 / 255),
                                     ("builtin:lenet-shape-adversarial", "dsprites:shape", None, 8 / 255),
                                     ("builtin:lenet-adversarial", "dsprites:orientation", None, 8 / 255)):
        loaded = load_model(parse_model_spec(spec), builtin_head=data.split(":")[-1] if ":" in data else None)
        ds = load_data(data, n=n, classes=classes, input_format=loaded.input_format)
        x = ds.batch(torch.arange(len(ds)))
        out.append((spec.split(":")[1], split_model(loaded.module, x[:8]), x, eps))
    import_robustbench()
    from robustbench.model_zoo.architectures.resnet import PreActResNet18
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    x = load_data("digits", n=rb_n, resize=32).batch(torch.arange(rb_n)).expand(-1, 3, -1, -1).contiguous()
    for name, make in (("WideResNet-16-4 (random)", lambda: WideResNet(depth=16, widen_factor=4)),
                       ("PreActResNet-18 (random)", PreActResNet18)):
        torch.manual_seed(0)
        net = make().eval()
        out.append((name, split_model(net, x[:8]), x, 8 / 255))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="datapoints per builtin model")
    p.add_argument("--rb-n", type=int, default=16, help="datapoints per RobustBench architecture")
    p.add_argument("--ref-steps", type=int, default=200)
    p.add_argument("--ref-restarts", type=int, default=10)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_cost = 20 * 1
    print(f"reference: per datapoint the best of PGD {args.ref_steps} steps x {args.ref_restarts} restarts "
          f"(relative step 0.7) and every configuration below; cost in forward+backward passes relative to "
          f"the seed protocol (20 steps, 1 restart)")
    summary: "dict[str, list[float]]" = {}
    for name, split, x, eps in _models(args.n, args.rb_n):
        start = time.perf_counter()
        values = {}
        with frozen(split):
            g0 = split.features(x).detach()
            objective = representation_shift(split.features, x, g0)
            for cname, steps, rel, restarts in CONFIGS + (("reference", args.ref_steps, 0.7, args.ref_restarts),):
                attack = PGD(eps=eps, norm="inf", steps=steps, rel_step=rel, restarts=restarts)
                values[cname] = attack(objective, x, generator=torch.Generator().manual_seed(1)).value.detach()
        best = torch.stack(list(values.values())).max(0).values
        print(f"\n{name} ({len(x)} points, eps {eps * 255:.0f}/255, {time.perf_counter() - start:.0f} s):")
        for cname, steps, rel, restarts in CONFIGS + (("reference", args.ref_steps, 0.7, args.ref_restarts),):
            ratio = float(values[cname].mean() / best.mean())
            summary.setdefault(cname, []).append(ratio)
            print(f"  {cname:22s} AS {float(values[cname].mean()):9.4f}  relative to the reference {ratio:6.4f}  "
                  f"cost {steps * restarts / seed_cost:5.2f}x seed")
    print("\nmean over the models of AS relative to the reference:")
    for cname, ratios in summary.items():
        print(f"  {cname:22s} {sum(ratios) / len(ratios):.4f}")


if __name__ == "__main__":
    main()
