"""What the transfer engine's training costs, measured against its floors in one run.

On a RobustBench WideResNet (random weights) at 32x32, batch 128, with the engine's own pieces
(:func:`asbound.transfer.loop.train_stage` and :func:`asbound.transfer.methods.batch_loss`):

* (a) ``lp``: E epochs of linear probing on features computed once, against the same E epochs
  running the frozen backbone on every batch (what a probe without the cache costs);
* (b) ``adv-ft``: one Madry PGD-K training step (the attack in eval mode, the update in train mode)
  against ``(K + 1) x`` one train-mode forward + backward pass; target at most 1.15;
* (c) ``roli`` stage 2 (the same step as ``ranli``) for ``--peft`` lora, adapter and bias: one
  Madry PGD-K training step of the PEFT model (backbone in eval mode) against ``(K + 1) x`` one
  forward + backward pass of that model in the stage's mode; target at most 1.15. ``--peft full``
  is the ``adv-ft`` step of (b);
* (d) ``autolora``: one training step (PGD-K on the feature-extractor branch, then the natural
  branch on ``x`` and the feature extractor on ``x~``) against ``K x`` one forward + backward of
  the feature-extractor branch ``+`` one of the natural branch ``+`` one of the feature extractor;
  target at most 1.15. Its lambda measurement (once per quarter epoch) is amortised over the
  epoch and not part of the step;
* on a GPU, training images per second of ``adv-ft`` with bf16 autocast against float32, and
  of the ``roli`` (lora) and ``autolora`` steps.

Each time is the median of ``--repeats`` rounds after a warm-up.

    python benchmarks/transfer_cost.py [--depth 16] [--widen 4] [--steps 10] [--epochs 5] [--device auto]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from asbound._compat import import_robustbench
from asbound.devices import resolve_device
from asbound.models import SplitModel, split_model
from asbound.models.peft import PeftSpec, apply_peft, natural_branch, natural_forward
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


class _Trainer:
    """A model's training step as the loop takes it (``batch_loss``, then the update) and its
    single forward + backward passes in the same training mode (the step's floor)."""

    def __init__(self, model: SplitModel, scope: str, objective: str, x: torch.Tensor, y: torch.Tensor,
                 attack: AttackSettings, lambdas: "tuple[float, float]" = (1.0, 0.0)) -> None:
        self.model, self.scope, self.objective = model, scope, objective
        self.x, self.y, self.attack, self.lambdas = x, y, attack, lambdas
        self.optimizer = torch.optim.SGD(set_scope(model, scope), lr=0.001, momentum=0.9)
        self.generator = torch.Generator().manual_seed(1)

    def step(self, amp: "Optional[torch.dtype]" = None) -> None:
        """One training step (float32, or under ``amp`` autocast)."""
        train_mode(self.model, self.scope)
        device = self.x.device.type
        with torch.autocast(device, dtype=amp) if amp is not None else contextlib.nullcontext():
            loss, _ = batch_loss(self.model, self.objective, self.x, self.y, attack=self.attack,
                                 generator=self.generator, trades_beta=6.0, lambdas=self.lambdas)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def fwd_bwd(self, forward: "Optional[Callable[[torch.Tensor], torch.Tensor]]" = None) -> None:
        """One forward (the model, or ``forward``) + backward of the cross-entropy in the step's mode."""
        train_mode(self.model, self.scope)
        loss = F.cross_entropy((forward or self.model)(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()


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

    # --- (b) adv-ft, (c) roli stage 2 per --peft, (d) autolora: a step against its passes -----
    x, y = x_all[:bs].to(device), y_all[:bs].to(device)
    ft = _Trainer(copy.deepcopy(base), "all", "madry", x, y, settings.attack)
    variants = ("lora", "adapter", "bias")  # --peft full: the adv-ft step
    roli = {v: _Trainer(apply_peft(copy.deepcopy(base), PeftSpec(v), seed=0), "peft", "madry", x, y, settings.attack)
            for v in variants}
    auto = _Trainer(apply_peft(copy.deepcopy(base), natural_branch(), seed=0), "all", "autolora", x, y,
                    settings.attack, lambdas=(0.5, 3.0))

    runs: "dict[str, Callable[[], None]]" = {
        "lp_cached": lambda: lp(True), "lp_backbone": lambda: lp(False), "adv_step": ft.step, "fwd_bwd": ft.fwd_bwd,
    }
    if device.type == "cuda":
        runs["adv_step_bf16"] = functools.partial(ft.step, torch.bfloat16)
    for v, tr in roli.items():
        runs[f"roli_{v}_step"], runs[f"roli_{v}_fwd_bwd"] = tr.step, tr.fwd_bwd
    runs["autolora_step"], runs["autolora_fe"] = auto.step, auto.fwd_bwd
    runs["autolora_nat"] = functools.partial(auto.fwd_bwd, functools.partial(natural_forward, auto.model))
    for fn in runs.values():
        fn()  # warm-up
    times: "dict[str, list[float]]" = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    t = {k: statistics.median(v) for k, v in times.items()}
    k = args.steps
    for v in variants:
        t[f"roli_{v}_floor"] = (k + 1) * t[f"roli_{v}_fwd_bwd"]
    t["autolora_floor"] = k * t["autolora_fe"] + t["autolora_nat"] + t["autolora_fe"]

    def row(label: str, value: float, fmt: str = ".3f") -> None:
        print(f"{label:<78}{value:>10{fmt}}")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model WideResNet-{args.depth}-{args.widen} (random weights, feature dim {base.feature_dim}), batch {bs}x3x32x32, "
          f"median of {args.repeats}")
    print()
    print(f"{'measurement':<78}{'seconds':>10}")
    row(f"lp, {args.epochs} epochs on cached features ({args.images} images)", t["lp_cached"])
    row(f"lp, {args.epochs} epochs through the frozen backbone", t["lp_backbone"])
    row(f"adv-ft, one PGD-{k} training step", t["adv_step"])
    row("one train-mode forward + backward", t["fwd_bwd"])
    if "adv_step_bf16" in t:
        row(f"adv-ft, one PGD-{k} training step, bf16 autocast", t["adv_step_bf16"])
    for v in variants:
        row(f"roli stage 2 (= ranli), --peft {v}, one PGD-{k} training step", t[f"roli_{v}_step"])
        row(f"roli stage 2, --peft {v}, one forward + backward (backbone eval)", t[f"roli_{v}_fwd_bwd"])
        row(f"roli stage 2, --peft {v}, floor ({k} + 1) x forward + backward", t[f"roli_{v}_floor"])
    row(f"autolora, one PGD-{k} training step (lambdas 0.5, 3.0)", t["autolora_step"])
    row("autolora, one train-mode forward + backward, feature-extractor branch", t["autolora_fe"])
    row("autolora, one train-mode forward + backward, natural branch", t["autolora_nat"])
    row(f"autolora, floor ({k} + 1) x feature extractor + 1 x natural branch", t["autolora_floor"])
    print()
    print(f"{'ratio':<78}{'value':>10}")
    row("(a) lp through the backbone / lp on cached features", t["lp_backbone"] / t["lp_cached"], ".2f")
    row(f"(b) adv-ft step / ({k} + 1) x forward+backward (target <= 1.15)", t["adv_step"] / ((k + 1) * t["fwd_bwd"]))
    row("    adv-ft training images per second, float32", bs / t["adv_step"], ".1f")
    if "adv_step_bf16" in t:
        row("    adv-ft training images per second, bf16", bs / t["adv_step_bf16"], ".1f")
        row("    adv-ft bf16 / float32 images per second", t["adv_step"] / t["adv_step_bf16"], ".2f")
    for i, v in enumerate(variants):
        row(f"{'(c)' if i == 0 else '   '} roli --peft {v} step / ({k} + 1) x forward+backward (target <= 1.15)",
            t[f"roli_{v}_step"] / t[f"roli_{v}_floor"])
    print("    roli --peft full: its stage 2 is the adv-ft step, see (b)")
    if device.type == "cuda":
        row("    roli --peft lora training images per second, float32", bs / t["roli_lora_step"], ".1f")
    row(f"(d) autolora step / ({k} + 1) x fe + 1 x natural fwd+bwd (target <= 1.15)",
        t["autolora_step"] / t["autolora_floor"])
    if device.type == "cuda":
        row("    autolora training images per second, float32", bs / t["autolora_step"], ".1f")
    print("    autolora's lambda measurement (4 eval-mode forwards of --autolora-lambda-n = 512 training")
    print("    images per epoch, natural branch) is amortised over the epoch and not part of the step")

if __name__ == "__main__":
    main()
