"""Why the random LeNet's AS is 0.004 here and 29.25 in seed 001's Table 7: a run that shows it.

A randomly initialised network's batch norms hold their initial running statistics (mean 0,
variance 1), so in eval mode they pass the raw, tiny activations of a random network through:
``builtin:lenet-random`` has a spread of ``g`` of about 0.02. The seed paper's code probes
every representation linearly with the network in train mode (``dsprites_lp.py``:
``model.train()``, only ``fc`` trainable), and a batch norm in train mode updates its running
statistics whatever the optimiser does: after probing, each of the random network's batch norms
standardises with the statistics of the data, every feature has unit variance over the data
and ``g`` spreads over about ``sqrt(2 * 84) = 13``.

This script scores, at the paper's protocol (``--protocol paper``, eps 16/255, 50 steps,
relative step 1.0, L-inf and L2, AS only), the shipped random LeNet as it is, the same weights
with batch-norm statistics estimated on clean training images (train-mode passes, cumulative
average), and more random initialisations of the affine-free reference layout treated the same
way. Every number is an ``asbound score`` run (records under ``--runs``).

    python analyses/table7_random_bn.py --n 200 --runs runs-paper/random-bn --out reports/table7-random-bn.txt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from asbound.builtin import load_checkpoint
from asbound.builtin.reference import ReferenceLeNet
from asbound.data import load_data
from asbound.models import load_model, split_model
from asbound.protocol import PROTOCOLS, load_protocol_data
from asbound.records import atomic_write, environment
from asbound.scoring import ScoreConfig, score
from asbound.specs import parse_data_spec

PAPER_AS = {"inf": 29.25, "2": 1.69}  # seed 001 Table 7, random pretraining, RHS


def reference_from_shipped_random() -> ReferenceLeNet:
    """``builtin:lenet-random``'s weights in the affine-free layout: its batch norms are at their
    initial scale 1 and shift 0, so the two compute the same function."""
    state = load_checkpoint("lenet-random")
    f = state["features"]
    for k, v in f.items():
        if k.endswith(".weight") and v.dim() == 1:
            assert torch.equal(v, torch.ones_like(v)), k
        if k.endswith(".bias") and k.replace(".bias", ".running_mean") in f:
            assert torch.equal(v, torch.zeros_like(v)), k
    model = ReferenceLeNet(1)
    pairs = [("conv.0", "feature_extractor.0"), ("conv.3", "feature_extractor.3"), ("conv.4", "feature_extractor.4"),
             ("conv.7", "feature_extractor.7"), ("fc.1", "linear_projections.0"), ("fc.3", "linear_projections.2"),
             ("fc.4", "linear_projections.3"), ("fc.6", "linear_projections.5"), ("fc.7", "linear_projections_output.0"),
             ("fc.9", "linear_projections_output.2")]
    target = model.state_dict()
    for ours, theirs in pairs:
        for k, v in f.items():
            if k.startswith(ours + ".") and target.get(theirs + k[len(ours):]) is not None:
                target[theirs + k[len(ours):]] = v.clone()
    head = state["heads"]["orientation"]
    target["fc.weight"], target["fc.bias"] = head["weight"], head["bias"]
    model.load_state_dict(target)
    shipped = load_model("builtin:lenet-random/orientation").module
    x = torch.rand(16, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), shipped(x), rtol=0, atol=1e-6), "the layouts disagree"
    return model.eval()


@torch.no_grad()
def estimate_bn(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for i in range(0, len(x), batch):
        model(x[i:i + batch])
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model.eval()


def spread(model_spec: str, weights: "str | None", n: int, seed: int) -> float:
    loaded = load_model(model_spec, weights=weights)
    data = load_protocol_data(PROTOCOLS["paper"], parse_data_spec("dsprites:orientation"), root=None, split="test",
                              n=n, seed=seed, input_format=loaded.input_format)
    x = data.batch(torch.arange(len(data)))
    with torch.no_grad():
        g = split_model(loaded.module, x[:8]).features(x).double()
    return float(torch.pdist(g).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1, help="draws the images from the whole set")
    parser.add_argument("--inits", type=int, default=4, help="more random initialisations of the reference layout")
    parser.add_argument("--bn-images", type=int, default=20000)
    parser.add_argument("--runs", type=Path, default=Path("runs-paper/random-bn"))
    parser.add_argument("--out", type=Path, default=Path("reports/table7-random-bn.txt"))
    args = parser.parse_args()
    command = (f"python analyses/table7_random_bn.py --n {args.n} --seed {args.seed} --inits {args.inits} "
               f"--bn-images {args.bn_images} --runs {args.runs} --out {args.out}")
    t0 = time.time()
    torch.set_num_threads(1)
    args.runs.mkdir(parents=True, exist_ok=True)
    train = load_data("dsprites:orientation", split="train", n=args.bn_images, seed=args.seed + 100)
    xt = train.batch(torch.arange(len(train)))
    nets: "list[tuple[str, str, str | None]]" = [("builtin:lenet-random as shipped (statistics 0, 1)",
                                                  "builtin:lenet-random", None)]
    same = estimate_bn(reference_from_shipped_random(), xt)
    path = args.runs / "lenet-random-data-bn.pth"
    atomic_write(path, lambda h: torch.save(same.state_dict(), h))
    nets.append(("the same weights, statistics estimated on the data", "builtin:lenet-reference", str(path)))
    for init in range(1, args.inits + 1):
        torch.manual_seed(init)
        net = estimate_bn(ReferenceLeNet(1), xt)
        path = args.runs / f"reference-init{init}-data-bn.pth"
        atomic_write(path, lambda h: torch.save(net.state_dict(), h))
        nets.append((f"reference layout, init seed {init}, data statistics", "builtin:lenet-reference", str(path)))
    rows = []
    for label, model, weights in nets:
        row = {"network": label, "spread": spread(model, weights, args.n, args.seed)}
        for norm in ("inf", "2"):
            for eps in (("8/255", "16/255") if weights is None else ("16/255",)):
                cfg = ScoreConfig(model=model, weights=weights, data="dsprites:orientation", protocol="paper", eps=eps,
                                  norm=norm, steps=50, rel_step=1.0, n=args.n, seed=args.seed, as_only=True,
                                  device="cpu")
                slug = f"{Path(weights).stem if weights else 'lenet-random'}-L{norm}-{eps.replace('/', '_')}"
                result = score(cfg, out=args.runs / slug, progress=False)
                row[f"L{norm} {eps}"] = result.summary["as_score"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = Table(title=f"Random LeNets at the paper's protocol (AS only, n = {args.n} images of the whole set, "
                        f"PGD 50 steps, relative step 1.0)", title_justify="left")
    for col in ("network", "spread of g", "L-inf 8/255", "L-inf 16/255", "L2 16/255"):
        table.add_column(col, justify="left" if col == "network" else "right")
    for r in rows:
        table.add_row(r["network"], f"{r['spread']:.4g}", f"{r['Linf 8/255']:.4g}" if "Linf 8/255" in r else "",
                      f"{r['Linf 16/255']:.4g}", f"{r['L2 16/255']:.4g}")
    table.add_row("seed 001 Table 7, random", "", "", f"{PAPER_AS['inf']}", f"{PAPER_AS['2']}")
    console = Console(record=True, width=120)
    console.print(table)
    console.print(f"made by: {command}  ({time.time() - t0:.0f} s)", soft_wrap=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(console.export_text())
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "seconds": round(time.time() - t0, 1), **environment(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
