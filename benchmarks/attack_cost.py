"""What asbound's AS attack costs, measured against its floor and against foolbox.

On a RobustBench WideResNet-16-4 with random weights and a batch of random 32x32 inputs, split
with :func:`asbound.models.split_model` and frozen with :func:`asbound.models.frozen`, the
objective is the AS objective ``||g(x') - g(x)||_2`` (:func:`asbound.attacks.representation_shift`).
One run measures:

* ``pgd``: asbound's ``PGD(eps=8/255, steps=S, rel_step=0.7)`` on that objective;
* ``grad``: one forward + input-gradient pass (``torch.autograd.grad`` w.r.t. the input only);
* ``foolbox``: foolbox's ``LinfPGD`` with the same steps on the same batch and objective
  (:func:`asbound.attacks.foolbox_pgd`).

and reports (a) ``pgd / (S * grad)``, how close the attack gets to the cost of its gradients
(PGD also runs one final forward pass, so about ``1 + 1/(3S)`` is the floor), and (b)
``pgd / foolbox`` (both evaluate the objective at their final point; foolbox's loop does not,
so :func:`asbound.attacks.foolbox_pgd` adds that forward pass). Each time is the median of ``--repeats`` rounds (the three measurements
interleaved in every round) after one warm-up call of each.

    python benchmarks/attack_cost.py [--batch-size 128] [--steps 20] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from asbound._compat import import_robustbench
from asbound.attacks import PGD, foolbox_pgd, representation_shift
from asbound.models import frozen, split_model
from timing import timed  # benchmarks/timing.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
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

    def attack(steps: int) -> PGD:
        return PGD(eps=8 / 255, steps=steps, rel_step=0.7)

    with frozen(split):
        objective = representation_shift(split.features, x)
        zeros = torch.zeros(len(x), device=device)

        def grad_pass() -> None:
            xr = x.clone().requires_grad_(True)
            torch.autograd.grad(objective(xr).sum(), xr)

        runs = {
            "grad": lambda steps: grad_pass(),
            # as `score` calls it: the objective at the clean input (0) is known, not evaluated
            "pgd": lambda steps: attack(steps)(
                objective, x, generator=torch.Generator().manual_seed(0), clean_value=zeros
            ),
            "foolbox": lambda steps: foolbox_pgd(attack(steps), objective, x),
        }
        for run in runs.values():  # warm-up: one short call of each
            run(1)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(lambda: run(args.steps), device))

    t = {name: statistics.median(values) for name, values in times.items()}
    s = args.steps
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model WideResNet-16-4 (random weights, feature dim {split.feature_dim}), "
          f"batch {args.batch_size}x3x32x32, L-inf PGD eps 8/255, {s} steps, rel_step 0.7, "
          f"median of {args.repeats}")
    print()
    print(f"{'measurement':<44}{'seconds':>10}")
    print(f"{'one forward + input-gradient pass':<44}{t['grad']:>10.3f}")
    print(f"{f'asbound PGD, {s} steps':<44}{t['pgd']:>10.3f}")
    print(f"{f'foolbox LinfPGD, {s} steps':<44}{t['foolbox']:>10.3f}")
    print()
    print(f"{'ratio':<44}{'value':>10}")
    print(f"{'(a) asbound PGD / (steps x grad pass)':<44}{t['pgd'] / (s * t['grad']):>10.3f}")
    print(f"{'(b) asbound PGD / foolbox LinfPGD':<44}{t['pgd'] / t['foolbox']:>10.3f}")


if __name__ == "__main__":
    main()
