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

``--protocol paper`` trains ``lenet-paper-{random,standard,adversarial}`` as the code behind
seed 001's Table 7 did (lf-tcho/robustness_transfer, branch ``harsh/rep_attack``): the
affine-free layout of ``builtin:lenet-reference``, the whole train split (589,824 images),
targets scaled to [0, 1], Adam at 1e-3 with a cosine schedule of 100 epochs stepped once an
epoch, batch 512, 10 epochs, the network in train mode throughout (the adversary's passes use
batch statistics and move the running statistics, as foolbox's calls on a model in train mode
do); adversarial training on L-inf PGD-20 with foolbox's default relative step 0.01/0.3 at eps
8/255. The text of B.2 says SGD with momentum 0.9 and relative step 1.0; ``--optimizer sgd``
and ``--pgd-rel-step 1`` give those. Then, as the reference's linear probing (train mode,
frozen weights) does, every batch norm's running statistics are re-estimated on clean training
images, and the heads are fitted by least squares on the eval-mode representation. The run
resumes from ``--work`` (a checkpoint every ``--save-every`` batches; the training images are
rendered once into a bit-packed cache there)::

    nice -n 19 python analyses/train_builtin.py --protocol paper --models standard \
        --work runs-paper --record runs-paper/standard.json
    python analyses/train_builtin.py --protocol paper --models adversarial --device cuda \
        --work runs-paper --record runs-paper/adversarial.json     # the full scale: a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asbound.attacks import PGD, loss_objective
from asbound.builtin import HEADS, weights_path
from asbound.builtin.lenet import LeNet
from asbound.builtin.reference import ReferenceLeNet
from asbound.data import dsprites_latents, render_dsprites
from asbound.data.dsprites import FACTOR_COLUMN, factor_targets, split_members
from asbound.models import frozen
from asbound.records import atomic_write, environment, write_json
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
def features(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
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


def fit_heads(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, values: torch.Tensor, device: torch.device,
              units: str = "values") -> dict:
    f = features(model, x, device)
    heads = {}
    for factor in HEADS:
        col = FACTOR_COLUMN[factor]
        if factor == "shape":
            heads[factor] = probe_classification(f, classes[:, col], 3)
        else:
            heads[factor] = probe_regression(f, factor_targets(factor, classes, values, units))
    return heads


@torch.no_grad()
def evaluate(model: nn.Module, heads: dict, x: torch.Tensor, classes: torch.Tensor, values: torch.Tensor,
             device: torch.device, units: str = "values") -> dict:
    f = features(model, x, device)
    metrics = {}
    for factor, head in heads.items():
        out = f @ head["weight"].T + head["bias"]
        col = FACTOR_COLUMN[factor]
        if factor == "shape":
            metrics["shape_accuracy"] = float((out.argmax(1) == classes[:, col]).float().mean())
        else:
            target = factor_targets(factor, classes, values, units)
            metrics[f"{factor}_rmse"] = float((out.squeeze(1) - target).pow(2).mean().sqrt())
    return metrics


def main_asbound(args: argparse.Namespace) -> None:
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



# --- the paper's protocol ----------------------------------------------------------------------

PAPER_NAMES = {"random": "lenet-paper-random", "standard": "lenet-paper-standard",
               "adversarial": "lenet-paper-adversarial"}


class PackedImages:
    """The training split's images rendered once and kept bit-packed (512 bytes an image) in a
    file under ``work``; ``batch(rows)`` unpacks rows to float32 [b, 1, 64, 64]."""

    def __init__(self, members: torch.Tensor, work: Path, chunk: int = 8192) -> None:
        path = work / f"images-{len(members)}-{int(members.sum())}.npy"
        if not path.exists():
            print(f"rendering {len(members)} images into {path} ...", flush=True)
            packed = np.empty((len(members), 512), dtype=np.uint8)
            for i in range(0, len(members), chunk):
                img = render_dsprites(dsprites_latents(members[i:i + chunk])[0]).to(torch.uint8)
                packed[i:i + chunk] = np.packbits(img.reshape(len(img), -1).numpy(), axis=1)
            atomic_write(path, lambda h: np.save(h, packed))
        self.packed = np.load(path, mmap_mode="r")

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        bits = np.unpackbits(self.packed[np.sort(rows.numpy())], axis=1)
        order = np.argsort(np.argsort(rows.numpy()))
        return torch.from_numpy(bits[order].astype(np.float32)).view(-1, 1, 64, 64)


def batch_norms(model: nn.Module) -> "list[nn.modules.batchnorm._BatchNorm]":
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def estimate_bn(model: nn.Module, images: PackedImages, rows: torch.Tensor, batch: int, device: torch.device) -> None:
    """Running statistics of every batch norm re-estimated on clean images: train-mode passes with
    a cumulative average (momentum None), then eval mode."""
    for m in batch_norms(model):
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(0, len(rows), batch):
        model(images.batch(rows[i:i + batch]).to(device))
    for m in batch_norms(model):
        m.momentum = 0.1
    model.eval()


def train_paper(name: str, images: PackedImages, y: torch.Tensor, args: argparse.Namespace,
                device: torch.device) -> "tuple[ReferenceLeNet, list]":
    """Train one LeNet of the paper's protocol, resuming from ``work/NAME.state.pt``."""
    torch.manual_seed(args.seed)
    model = ReferenceLeNet(1).to(device)
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.tmax_epochs)
    attack = None
    if name == "adversarial":
        attack = PGD(eps=parse_eps(args.eps), norm="inf", steps=args.pgd_steps, rel_step=args.pgd_rel_step,
                     select="last")
    state_path = args.work / f"{PAPER_NAMES[name]}.state.pt"
    epoch, start, history, total, seen = 0, 0, [], 0.0, 0
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        epoch, start, total, seen = int(st["epoch"]), int(st["batch"]), float(st["total"]), int(st["seen"])
        history = [dict(zip(("epoch", "train_loss", "seconds"), h)) for h in st["history"].tolist()]
        print(f"  resuming {name} at epoch {epoch + 1}, batch {start}", flush=True)

    def save(epoch: int, batch: int) -> None:
        st = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "epoch": torch.tensor(epoch), "batch": torch.tensor(batch), "total": torch.tensor(total),
              "seen": torch.tensor(seen),
              "history": torch.tensor([[h["epoch"], h["train_loss"], h["seconds"]] for h in history],
                                      dtype=torch.float64).reshape(-1, 3)}
        atomic_write(state_path, lambda h: torch.save(st, h))

    n, b = len(y), args.batch
    batches = (n + b - 1) // b
    t0 = time.time()
    while epoch < args.epochs:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        model.train()
        for i in range(start, batches):
            sel = order[i * b:(i + 1) * b]
            xb, yb = images.batch(sel).to(device), y[sel].to(device)
            if attack is not None:  # in train mode, as the reference's foolbox calls on its training model
                gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch * batches + i)
                for p in model.parameters():
                    p.requires_grad_(False)
                xb = attack(lambda z: squared_error(model(z), yb), xb, generator=gen, value=False).x_adv
                for p in model.parameters():
                    p.requires_grad_(True)
            loss = squared_error(model(xb), yb).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + float(loss.detach()) * len(sel), seen + len(sel)
            if (i + 1) % args.save_every == 0 and i + 1 < batches:
                save(epoch, i + 1)
                print(f"  {name} epoch {epoch + 1} batch {i + 1}/{batches}: train loss {total / seen:.5f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
        sched.step()
        history.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1), "seconds": time.time() - t0})
        print(f"  {name} epoch {epoch + 1}/{args.epochs}: train loss {total / max(seen, 1):.5f}", flush=True)
        epoch, start, total, seen = epoch + 1, 0, 0.0, 0
        save(epoch, 0)
    return model.eval(), history


def paper_scale(name: str, args: argparse.Namespace, n_train: int) -> dict:
    """The scale ``name`` (random, standard, adversarial) is trained at, as its record states it."""
    trained, adversarial = name != "random", name == "adversarial"
    return {"n_train": n_train if trained else 0, "of_train_split": int(split_members(737_280, "train").numel()),
            "epochs": args.epochs if trained else 0, "batch": args.batch, "optimizer": args.optimizer,
            "lr": args.lr, "pgd_steps": args.pgd_steps if adversarial else 0,
            "pgd_eps": args.eps if adversarial else None, "pgd_rel_step": args.pgd_rel_step if adversarial else None,
            "bn_images": args.bn_images, "probe_images": args.n_probe}


def main_paper(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    members = split_members(737_280, "train")
    if args.n_train is not None and args.n_train < len(members):
        members = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(args.seed))[:args.n_train]]
        members = members.sort().values
    images = PackedImages(members, args.work)
    classes, values = dsprites_latents(members)
    y = factor_targets("orientation", classes, values, "minmax")
    bn_rows = torch.randperm(len(members), generator=torch.Generator().manual_seed(args.seed + 7))[:args.bn_images]
    xp, clsp, valp = sample("train", args.n_probe, args.seed + 1)
    xe, clse, vale = sample("test", args.n_eval, args.seed + 2)
    config = {k: str(v) for k, v in vars(args).items()}
    config["n_train"] = str(len(members))
    record = {"config": config, **environment(), "device": str(device), "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        start = time.time()
        print(f"{PAPER_NAMES[name]}:", flush=True)
        if name == "random":
            torch.manual_seed(args.seed)
            model, history = ReferenceLeNet(1).to(device), []
        else:
            model, history = train_paper(name, images, y, args, device)
        # the reference's linear probing runs the frozen network in train mode: its batch norms'
        # running statistics become those of the clean training images (also for a random network)
        estimate_bn(model, images, bn_rows, 1000, device)
        heads = fit_heads(model, xp, clsp, valp, device, units="minmax")
        metrics = evaluate(model, heads, xe, clse, vale, device, units="minmax")
        bn = (f"re-estimated on {len(bn_rows)} clean training images in train mode (cumulative average), "
              f"as the reference's linear probing sets them")
        state = {
            "arch": "lenet-reference",
            "features": {k: v.detach().cpu().clone() for k, v in model.body_state().items()},
            "heads": heads,
            "default_head": "orientation",
            "meta": {"name": PAPER_NAMES[name], "protocol": "paper", "targets": "minmax",
                     "eps": parse_eps(args.eps) if name == "adversarial" else 0.0, "seed": args.seed,
                     "pgd_steps": args.pgd_steps if name == "adversarial" else 0,
                     "n_train": len(members), "epochs": 0 if name == "random" else args.epochs,
                     "bn_statistics": bn},
        }
        atomic_write(args.out / f"{PAPER_NAMES[name]}.pt", lambda h: torch.save(state, h))
        record["models"][PAPER_NAMES[name]] = {"seconds": round(time.time() - start, 1), "history": history,
                                              "test_metrics": metrics, "bn_statistics": bn,
                                              "scale": paper_scale(name, args, len(members))}
        print(f"  {metrics}", flush=True)
        if args.record:
            record["seconds"] = round(time.time() - t0, 1)
            args.record.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.record, record)
    print(json.dumps(record, indent=2))


PROTOCOL_DEFAULTS = {
    "asbound": {"n_train": 20000, "lr": 0.05, "pgd_steps": 10, "pgd_rel_step": 0.25, "optimizer": "sgd"},
    "paper": {"n_train": None, "lr": 1e-3, "pgd_steps": 20, "pgd_rel_step": 0.01 / 0.3, "optimizer": "adam"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=tuple(PROTOCOL_DEFAULTS), default="asbound",
                        help="asbound: the shipped lenet-*; paper: lenet-paper-* as the seed's code trained them")
    parser.add_argument("--models", type=lambda t: t.split(","), default=["random", "standard", "adversarial"],
                        help="paper protocol: which of random,standard,adversarial")
    parser.add_argument("--work", type=Path, default=Path("runs-paper"),
                        help="paper protocol: resumable training state and the image cache")
    parser.add_argument("--save-every", type=int, default=100, help="paper protocol: batches between checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bn-images", type=int, default=20000,
                        help="paper protocol: clean training images for the batch-norm statistics")
    parser.add_argument("--tmax-epochs", type=int, default=100, help="paper protocol: T_max of the cosine schedule")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    parser.add_argument("--n-train", type=int, default=None,
                        help="training images (asbound: 20000; paper: the whole train split)")
    parser.add_argument("--n-probe", type=int, default=10000)
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=None, help="asbound: 0.05 (SGD); paper: 1e-3 (Adam)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--eps", default="8/255", help="L-inf PGD radius for adversarial training")
    parser.add_argument("--pgd-steps", type=int, default=None, help="asbound: 10; paper: 20")
    parser.add_argument("--pgd-rel-step", type=float, default=None, help="asbound: 0.25; paper: 0.01/0.3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=weights_path("x").parent)
    parser.add_argument("--record", type=Path, default=None, help="write the run record (JSON) here")
    args = parser.parse_args()
    for key, value in PROTOCOL_DEFAULTS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    main_paper(args) if args.protocol == "paper" else main_asbound(args)


if __name__ == "__main__":
    main()
