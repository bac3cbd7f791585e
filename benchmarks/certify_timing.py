"""What each ``--certify`` method costs per point: the dSprites LeNet (64x64) and a CIFAR ResNet-18.

Seconds per point of each method's box on ``g`` (:data:`asbound.certify.OUTPUT_BOXES`: ``ibp``,
``crown-ibp``, ``crown``) on one CPU thread, in float64, batched over the points:

* ``lenet``: ``builtin:lenet-adversarial`` on ``--lenet-n`` dSprites test images (64x64), L-inf
  and L2;
* ``resnet18``: torchvision's ResNet-18 in its CIFAR layout (3x3 stem, stride 1, no max pooling)
  with random weights, its batch norms' statistics taken from uniform noise (so that its layers
  are normalised as a trained network's are), the representation the 512 features before ``fc``;
  ``--resnet-n`` uniform inputs at each size of ``--sizes`` (32 is CIFAR's), L-inf; full CROWN
  at the sizes of ``--crown-sizes`` only (``-`` elsewhere: its cost grows about 16x per doubling
  of the side, see the multiply-adds column);
* ``mlp``: ``3072-h-h-10`` ReLU MLPs with random weights at each width of ``--mlp-widths``, one
  uniform 3x32x32 input, L-inf ``--mlp-eps`` (8/255: every ReLU unstable), the case where the
  maps' fan-in, not their sizes, sets the cost.

Each call has ``--limit`` seconds; one that runs longer is stopped and recorded as ``> limit``,
and the method is not tried at larger sizes. Besides the times: the mean bound (``||max(u - g(x),
g(x) - l)||_2``, without the operator-norm bound ``score`` also takes), the multiply-adds full
CROWN's backward passes would take per point (:func:`asbound.certify.crown_cost`) and what
``score --certify crown`` computes there (:func:`asbound.certify.method_for`: ``crown``, or
``crown-ibp`` over :data:`asbound.certify.CROWN_BUDGET`).

    OMP_NUM_THREADS=1 python benchmarks/certify_timing.py [--lenet-n 4] [--resnet-n 1]
        [--sizes 8,16,32] [--crown-sizes 8,16] [--limit 3000] [--out reports/certify_reference.md]

With ``--out`` the table replaces the section ``## Time per point`` of that file (the rest is kept);
``--json FILE`` also writes the measured rows, which ``--render FILE`` renders again without
measuring.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from fractions import Fraction
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from asbound.certify import OUTPUT_BOXES, Bounder, _box_shift, crown_cost, method_for
from asbound.data import load_data
from asbound.models import load_model, split_model
from timing import write_section  # benchmarks/timing.py

HEADING = "## Time per point"
METHODS = ("ibp", "crown-ibp", "crown")
COST = "full CROWN multiply-adds"


class _TooLong(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001 - signal handler
    raise _TooLong


def noise_statistics(net: nn.Module) -> nn.Module:
    """Batch norm statistics from uniform noise (cumulative averages over four batches of 32 at
    32x32), so that the layers are normalised as a trained network's are."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.rand(32, 3, 32, 32))
    return net.eval()


def resnet18_cifar(seed: int = 0) -> nn.Module:
    """torchvision's ResNet-18 in the CIFAR layout, random weights, batch norm statistics from
    uniform noise (:func:`noise_statistics`)."""
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return noise_statistics(net)


def _time(bounder: Bounder, x: torch.Tensor, eps: float, norm: str, method: str,
          limit: int) -> "tuple[float | None, float | None]":
    """Seconds per point and the mean bound, or ``(None, None)`` past ``limit`` seconds."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        start = time.perf_counter()
        box = OUTPUT_BOXES[method](bounder, x, eps, norm)
        seconds = (time.perf_counter() - start) / len(x)
    except _TooLong:
        return None, None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    with torch.no_grad():
        g = bounder(x, x).mid.flatten(1)
    return seconds, float(_box_shift(g, box).mean())


def _unstable(bounder: Bounder, x: torch.Tensor, eps: float) -> float:
    """The share of ReLU inputs that interval arithmetic over the L-inf box leaves unstable
    (``l < 0 < u``): those full CROWN bounds by backward passes."""
    with torch.no_grad():
        env = bounder.boxes((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    boxes = [env[name] for name in bounder.relu_inputs]
    return sum(int(((b.lo < 0) & (b.hi > 0)).sum()) for b in boxes) / sum(b.lo.numel() for b in boxes)


def _rows(name: str, backbone: nn.Module, x: torch.Tensor, grid: "list[tuple[str, str]]", limit: int,
          skip: "set[str]") -> "list[dict]":
    bounder = Bounder(backbone)
    x = x.double()
    rows = []
    for norm, text in grid:
        cost = crown_cost(bounder, x, norm)
        used, _ = method_for(bounder, "crown", x, norm)
        row = {"network": name, "input": "x".join(map(str, x.shape[1:])), "n": len(x),
               "norm": "L-inf" if norm == "inf" else "L2", "eps": text}
        for method in METHODS:
            if method in skip:  # past the limit at a smaller size, or not asked for: not tried
                row[f"{method} s"], row[method] = "-", None
                continue
            seconds, bound = _time(bounder, x, float(Fraction(text)), norm, method, limit)
            if seconds is None:
                skip.add(method)
            row[f"{method} s"], row[method] = (seconds if seconds is not None else f"> {limit}"), bound
        if norm == "inf":
            row["unstable ReLUs (IBP)"] = _unstable(bounder, x, float(Fraction(text)))
        row[COST] = cost
        row["score --certify crown computes"] = used
        rows.append(row)
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    return rows


def render(rows: "list[dict]", command: str, note: str = "") -> str:
    """The timing section: the table, where full CROWN was not run after a size where it was, its
    time estimated by the ratio of :func:`crown_cost` (``crown s, estimated``), ``note`` (where
    the rows come from several runs, say which) and the command."""
    rows = [dict(r) for r in rows]
    last: "dict[str, dict]" = {}
    for r in rows:
        if isinstance(r["crown s"], float):
            last[r["network"]] = r
        elif r["network"] in last:
            prev = last[r["network"]]
            r["crown s, estimated"] = prev["crown s"] * r[COST] / prev[COST]
    for r in rows:
        for key, value in r.items():
            r[key] = f"{value:.4g}" if isinstance(value, float) else "-" if value is None else value
    table = pd.DataFrame(rows).fillna("-").to_markdown(index=False)
    return ("Seconds per point (float64, one CPU thread, batched over the n points), the mean bound "
            "||max(u - g(x), g(x) - l)||_2 of each method (without the operator-norm bound), the share of "
            "ReLU inputs interval arithmetic leaves unstable over the L-inf box (full CROWN bounds those by "
            "backward passes), the multiply-adds full CROWN's backward passes would take per point with all "
            "of them unstable (asbound.certify.crown_cost) and what `score --certify crown` computes there. "
            "The ResNet-18 and the MLPs have random weights: their bounds are vacuous and their times near "
            "the worst case.\n\n"
            + table + (f"\n\n{note}" if note else "") + f"\n\n`command: {command}`")


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lenet-n", type=int, default=4)
    p.add_argument("--resnet-n", type=int, default=1)
    p.add_argument("--sizes", default="8,16,32", help="ResNet-18 input sizes")
    p.add_argument("--linf", default="2/255")
    p.add_argument("--l2", default="8/255", help="L2 eps for the LeNet ('' for none)")
    p.add_argument("--crown-sizes", default="8,16", help="ResNet-18 sizes at which full CROWN is tried")
    p.add_argument("--limit", type=int, default=3000, help="seconds per call")
    p.add_argument("--mlp-widths", default="4096,8192", help="hidden widths of the MLPs ('' for none)")
    p.add_argument("--mlp-eps", default="8/255")
    p.add_argument("--only", choices=("lenet", "resnet18", "mlp"), help="one network")
    p.add_argument("--out", type=Path, help="markdown file whose timing section is replaced")
    p.add_argument("--json", type=Path, help="also write the measured rows here")
    p.add_argument("--render", type=Path, metavar="JSON", help="render rows written by --json; measure nothing")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        text = render(saved["rows"], saved["command"], saved.get("note", ""))
        print(text)
        if args.out:
            write_section(args.out, HEADING, text)
        return 0
    command = f"OMP_NUM_THREADS=1 python benchmarks/certify_timing.py {' '.join(argv or sys.argv[1:])}"
    torch.set_num_threads(1)
    rows: "list[dict]" = []
    if args.only in (None, "lenet"):
        loaded = load_model("builtin:lenet-adversarial")
        data = load_data("dsprites:orientation", n=args.lenet_n, seed=0, input_format=loaded.input_format)
        x = data.batch(torch.arange(len(data)))
        split = split_model(loaded.module.float(), x.float())
        grid = [("inf", e) for e in args.linf.split(",")] + [("2", e) for e in args.l2.split(",") if e]
        rows += _rows("lenet-adversarial (dSprites)", split.backbone, x, grid, args.limit, set())
    if args.only in (None, "resnet18"):
        net = resnet18_cifar()
        split = split_model(net, torch.rand(8, 3, 32, 32))
        skip: "set[str]" = set()
        crown_sizes = {int(s) for s in args.crown_sizes.split(",") if s}
        for size in map(int, args.sizes.split(",")):
            if size not in crown_sizes:
                skip.add("crown")
            x = torch.rand(args.resnet_n, 3, size, size, generator=torch.Generator().manual_seed(size))
            rows += _rows("resnet18 (CIFAR layout, random)", split.backbone, x,
                          [("inf", e) for e in args.linf.split(",")], args.limit, skip)
    if args.only in (None, "mlp"):
        for width in (int(w) for w in args.mlp_widths.split(",") if w):
            torch.manual_seed(0)
            mlp = nn.Sequential(nn.Flatten(), nn.Linear(3072, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                nn.Linear(width, 10))
            backbone = split_model(mlp.eval(), torch.rand(2, 3, 32, 32)).backbone
            x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(width))
            rows += _rows(f"mlp 3072-{width}-{width}-10 (random)", backbone, x, [("inf", args.mlp_eps)],
                          args.limit, set())
    if args.json:
        args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    text = render(rows, command)
    print(text)
    if args.out:
        write_section(args.out, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
