"""What the transfer engine's training costs, measured against its floors in one run.

On a RobustBench WideResNet (random weights) at 32x32, batch 128, with the engine's own pieces
(:func:`asbound.transfer.loop.train_stage` and :func:`asbound.transfer.methods.batch_loss`):

* ``lp``: E epochs of linear probing on features computed once, against the same E epochs
  running the frozen backbone on every batch (what a probe without the cache costs);
* ``adv-ft``: one Madry PGD-K training step (the attack in eval mode, the update in train mode)
  against ``(K + 1) x`` one train-mode forward + backward pass; target at most 1.15;
* on a GPU, training images per second of ``adv-ft`` with bf16 autocast against float32.

Each time is the median of ``--repeats`` rounds after a warm-up.

    python benchmarks/transfer_cost.py [--depth 16] [--widen 4] [--steps 10] [--epochs 5] [--device auto]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from asbound._compat import import_robustbench
from asbound.devices import resolve_device
from asbound.models import split_model
from asbound.transfer.loop import Checkpointer, Settings, StagePlan, StageProgress, train_stage
from asbound.transfer.methods import METHODS, AttackSettings, batch_loss, set_scope, train_mode
from timing import timed  # benchmarks/timing.py


class _Memory(Checkpointer):
    def __init__(self) -> None:
        self.best: dict = {}

    def save_last(self, plan, model, progress) -> None:  # noqa: ANN001
        pass

    def save_best(self, plan, model) -> None:  # noqa: ANN001
        self.best = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def load_best(self, plan) -> dict:  # noqa: ANN001
        return self.best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--widen", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=512, help="training images of the LP comparison")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="K of the PGD-K training attack")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    torch.manual_seed(0)
    model = WideResNet(depth=args.depth, widen_factor=args.widen, num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    x_all = torch.rand(args.images, 3, 32, 32, generator=gen)
    y_all = torch.randint(0, 10, (args.images,), generator=gen)
    base = split_model(model, x_all[:8]).to(device)
    bs = args.batch_size

    # --- LP: cached features against the backbone on every batch ---------------------------------
    def batches(seed: int, training: bool):  # noqa: ANN202
        order = torch.randperm(args.images, generator=torch.Generator().manual_seed(seed)) if training else \
            torch.arange(args.images)
        for i in range(0, args.images, bs):
            sel = order[i:i + bs]
            yield x_all[sel], y_all[sel]

    def val():  # noqa: ANN202 - 8 images: the per-epoch validation (PGD on the last) must not dominate
        return iter([(x_all[:8], y_all[:8])])

    stage = METHODS["lp"].stages[0]
    settings = Settings(optimizer="sgd", momentum=0.9, weight_decay=0.0, schedule="cosine", batch_size=bs,
                        attack=AttackSettings(eps=8 / 255, steps=args.steps, step=2 / 255), trades_beta=6.0,
                        seed=0, method="lp", device=device, amp=None)

    def lp(cache: bool) -> None:
        plan = StagePlan(stage=stage, index=0, epochs=args.epochs, lr=0.01, select="clean", augment="none",
                         cache_features=cache)
        train_stage(copy.deepcopy(base), plan, settings, batches, args.images, val, _Memory(), StageProgress())

    # --- adv-ft: one PGD-K step against (K + 1) train-mode forward + backward ----------------------
    x, y = x_all[:bs].to(device), y_all[:bs].to(device)
    ft = copy.deepcopy(base)
    params = set_scope(ft, "all")
    opt = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    attack_gen = torch.Generator().manual_seed(1)

    def adv_step(amp: "torch.dtype | None" = None) -> None:
        train_mode(ft, "all")
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            loss, _ = batch_loss(ft, "madry", x, y, attack=settings.attack, generator=attack_gen, trades_beta=6.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def fwd_bwd() -> None:
        train_mode(ft, "all")
        loss = F.cross_entropy(ft(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    runs: "dict[str, Callable[[], None]]" = {
        "lp_cached": lambda: lp(True), "lp_backbone": lambda: lp(False), "adv_step": adv_step, "fwd_bwd": fwd_bwd,
    }
    if device.type == "cuda":
        runs["adv_step_bf16"] = lambda: adv_step(torch.bfloat16)
    for fn in runs.values():
        fn()  # warm-up
    times: "dict[str, list[float]]" = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    t = {k: statistics.median(v) for k, v in times.items()}
    k = args.steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model WideResNet-{args.depth}-{args.widen} (random weights, feature dim {base.feature_dim}), batch {bs}x3x32x32, "
          f"median of {args.repeats}")
    print()
    print(f"{'measurement':<58}{'seconds':>10}")
    print(f"{f'lp, {args.epochs} epochs on cached features ({args.images} images)':<58}{t['lp_cached']:>10.3f}")
    print(f"{f'lp, {args.epochs} epochs through the frozen backbone':<58}{t['lp_backbone']:>10.3f}")
    print(f"{f'adv-ft, one PGD-{k} training step':<58}{t['adv_step']:>10.3f}")
    print(f"{'one train-mode forward + backward':<58}{t['fwd_bwd']:>10.3f}")
    if "adv_step_bf16" in t:
        print(f"{f'adv-ft, one PGD-{k} training step, bf16 autocast':<58}{t['adv_step_bf16']:>10.3f}")
    print()
    print(f"{'ratio':<58}{'value':>10}")
    print(f"{'(a) lp through the backbone / lp on cached features':<58}{t['lp_backbone'] / t['lp_cached']:>10.2f}")
    print(f"{f'(b) adv-ft step / ({k} + 1) x forward+backward (target <= 1.15)':<58}"
          f"{t['adv_step'] / ((k + 1) * t['fwd_bwd']):>10.3f}")
    print(f"{'    adv-ft training images per second, float32':<58}{bs / t['adv_step']:>10.1f}")
    if "adv_step_bf16" in t:
        print(f"{'    adv-ft training images per second, bf16':<58}{bs / t['adv_step_bf16']:>10.1f}")
        print(f"{'(c) bf16 / float32 images per second':<58}{t['adv_step'] / t['adv_step_bf16']:>10.2f}")


if __name__ == "__main__":
    main()
