"""Train the builtin LeNets of seed 001 B.2 and their linear-probe heads; record the run.

Three representations of the Table 6 LeNet on procedural dSprites (64x64):

* ``lenet-random``: default (Kaiming-uniform) initialisation, no training;
* ``lenet-standard``: trained to regress the orientation (squared error), SGD momentum 0.9,
  cosine learning rate, batch 512;
* ``lenet-adversarial``: the same, on L-inf PGD examples of the squared error (Madry et al.).

Each then gets linear-probe heads on its frozen representation (eval mode, so batch-norm
statistics stay fixed): least squares for ``orientation``, ``scale``, ``posx``, ``posy`` and
multinomial logistic regression for ``shape`` (3 classes).

    python analyses/train_builtin.py                       # writes asbound/builtin/weights/*.pt
    python analyses/train_builtin.py --record reports/builtin_training.json

The seed's learning rate and PGD eps were lost in extraction; the values below are ours and
are recorded with the run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asbound.attacks import PGD, loss_objective
from asbound.builtin import HEADS, weights_path
from asbound.builtin.lenet import LeNet
from asbound.data import dsprites_latents, render_dsprites
from asbound.data.dsprites import FACTOR_COLUMN, split_members
from asbound.models import frozen
from asbound.records import environment
from asbound.specs import parse_eps


def sample(split: str, n: int, seed: int) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """``n`` random dSprites images of ``split`` with their latent classes and values."""
    members = split_members(737_280, split)
    pick = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))[:n]]
    classes, values = dsprites_latents(pick)
    return render_dsprites(classes), classes, values.float()


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.squeeze(1) - y) ** 2


def train(
    x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch: int, device: torch.device,
    attack: "PGD | None", seed: int,
) -> LeNet:
    torch.manual_seed(seed)
    model = LeNet(1).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch):
            sel = order[i : i + batch]
            xb, yb = x[sel].to(device), y[sel].to(device)
            if attack is not None:
                with frozen(model):
                    xb = attack(loss_objective(model, squared_error, yb), xb, generator=gen).x_adv
            model.train()
            loss = squared_error(model(xb), yb).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(sel)
        print(f"  epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def features(model: LeNet, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(x[i : i + 1024].to(device)).cpu() for i in range(0, len(x), 1024)])


def probe_regression(f: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> "dict[str, torch.Tensor]":
    """Least squares (with a small ridge) ``y ≈ w·f + b`` in closed form."""
    a = torch.cat([f, torch.ones(len(f), 1)], dim=1).double()
    sol = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y.double())
    return {"weight": sol[:-1].float().view(1, -1), "bias": sol[-1:].float()}


def probe_classification(f: torch.Tensor, labels: torch.Tensor, classes: int) -> "dict[str, torch.Tensor]":
    """Multinomial logistic regression on the frozen features (L-BFGS, small L2 penalty)."""
    head = nn.Linear(f.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(f), labels) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def fit_heads(model: LeNet, x: torch.Tensor, classes: torch.Tensor, values: torch.Tensor, device: torch.device) -> dict:
    f = features(model, x, device)
    heads = {}
    for factor in HEADS:
        col = FACTOR_COLUMN[factor]
        if factor == "shape":
            heads[factor] = probe_classification(f, classes[:, col], 3)
        else:
            heads[factor] = probe_regression(f, values[:, col])
    return heads


@torch.no_grad()
def evaluate(model: LeNet, heads: dict, x: torch.Tensor, classes: torch.Tensor, values: torch.Tensor, device: torch.device) -> dict:
    f = features(model, x, device)
    metrics = {}
    for factor, head in heads.items():
        out = f @ head["weight"].T + head["bias"]
        col = FACTOR_COLUMN[factor]
        if factor == "shape":
            metrics["shape_accuracy"] = float((out.argmax(1) == classes[:, col]).float().mean())
        else:
            metrics[f"{factor}_rmse"] = float((out.squeeze(1) - values[:, col]).pow(2).mean().sqrt())
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-probe", type=int, default=10000)
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--eps", default="8/255", help="L-inf PGD radius for adversarial training")
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--pgd-rel-step", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=weights_path("x").parent)
    parser.add_argument("--record", type=Path, default=None, help="write the run record (JSON) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    eps = parse_eps(args.eps)
    t0 = time.time()
    x, cls, val = sample("train", args.n_train, args.seed)
    xp, clsp, valp = sample("train", args.n_probe, args.seed + 1)
    xe, clse, vale = sample("test", args.n_eval, args.seed + 2)
    orientation = val[:, FACTOR_COLUMN["orientation"]]
    attack = PGD(eps=eps, norm="inf", steps=args.pgd_steps, rel_step=args.pgd_rel_step)
    record = {"config": {k: str(v) for k, v in vars(args).items()}, **environment(), "device": str(device), "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("lenet-random", "lenet-standard", "lenet-adversarial"):
        start = time.time()
        print(f"{name}:", flush=True)
        if name == "lenet-random":
            torch.manual_seed(args.seed)
            model = LeNet(1).to(device).eval()
        else:
            model = train(
                x, orientation, epochs=args.epochs, lr=args.lr, batch=args.batch, device=device,
                attack=attack if name == "lenet-adversarial" else None, seed=args.seed,
            )
        heads = fit_heads(model, xp, clsp, valp, device)
        metrics = evaluate(model, heads, xe, clse, vale, device)
        state = {
            "features": {k: v.detach().cpu().clone() for k, v in model.features.state_dict().items()},
            "heads": heads,
            "meta": {"name": name, "eps": eps if name == "lenet-adversarial" else 0.0, "seed": args.seed},
        }
        torch.save(state, args.out / f"{name}.pt")
        record["models"][name] = {"seconds": round(time.time() - start, 1), "test_metrics": metrics}
        print(f"  {metrics}", flush=True)
    record["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(record, indent=2)
    print(text)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(text + "\n")


if __name__ == "__main__":
    main()
