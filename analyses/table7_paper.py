"""Seed 001's Table 7 cell by cell: the paper, asbound at the paper's protocol, asbound at its own.

The paper's protocol (``--protocol paper``; the code of branch ``harsh/rep_attack`` of
lf-tcho/robustness_transfer): the LeNets ``lenet-paper-{adversarial,standard,random}`` trained by
``analyses/train_builtin.py --protocol paper`` (their weights under ``--weights-dir``), images
drawn from the whole set, targets scaled to [0, 1], eps 16/255, PGD 50 steps with relative step
1.0, L-inf and L2. The paper's estimators are the squared error's rise over the spectral norm
(``LHS = mean(MSE(x_adv) - MSE(x)) / ||W||_2``) and the representation attack's mean shift
(RHS); asbound's own Lemma 1 LHS uses the Euclidean error, which is 1-Lipschitz (the squared
error is not Lipschitz, so the paper's LHS is not bounded by its RHS in general). Both are read
from the same per-point records: asbound's loss attack maximises ``|f(x) - y|``, and so the
squared error, at the same points.

asbound's protocol: ``reports/table7.json`` (``analyses/table7.py``: the shipped ``lenet-*``,
eps 8/255, latent values as targets, the seeded test split).

A row whose LeNet is not trained yet is marked pending.

    python analyses/table7_paper.py --weights-dir runs-paper/weights --n 200 \\
        --runs runs-paper/table7-paper --out reports/table7-paper.md
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from asbound.records import atomic_write, environment
from asbound.scoring import ScoreConfig, score

MODELS = ("adversarial", "standard", "random")
FACTORS = ("scale", "orientation", "posx", "posy")
NORMS = {"inf": "L-inf PGD", "2": "L2 PGD"}
#: seed 001 Table 7 (LHS per factor, RHS); the first block is L-inf, the second L2
PAPER = {
    ("adversarial", "inf"): ((0.10, 0.09, 0.02, 0.02), 2.29),
    ("standard", "inf"): ((3.32, 1.20, 2.02, 2.95), 23.80),
    ("random", "inf"): ((2.33, 2.29, 2.43, 1.84), 29.25),
    ("adversarial", "2"): ((0.004, 0.003, 0.001, 0.001), 0.15),
    ("standard", "2"): ((0.33, 0.22, 0.17, 0.19), 3.15),
    ("random", "2"): ((0.19, 0.21, 0.14, 0.12), 1.69),
}


def export_head(weights: Path, factor: str, dest: Path) -> Path:
    """A ``lenet-paper-*`` builtin file as one reference state dict with the head of ``factor``."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    full = {**state["features"], **{f"fc.{k}": v for k, v in state["heads"][factor].items()}}
    path = dest / f"{weights.stem}-{factor}.pth"
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda h: torch.save(full, h))
    return path


def ratio(ours: "float | None", paper: float) -> "float | None":
    if ours is None or not math.isfinite(ours) or ours <= 0:
        return None
    return ours / paper


def verdict(r: "float | None") -> str:
    if r is None:
        return "pending"
    return "within 1.5x" if 1 / 1.5 <= r <= 1.5 else (f"{r:.3g}x" if r > 1 else f"1/{1 / r:.3g}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-dir", type=Path, default=Path("runs-paper/weights"))
    parser.add_argument("--ours", type=Path, default=Path("reports/table7.json"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--eps", default="16/255")
    parser.add_argument("--runs", type=Path, default=Path("runs-paper/table7-paper"))
    parser.add_argument("--out", type=Path, default=Path("reports/table7-paper.md"))
    args = parser.parse_args()
    command = (f"python analyses/table7_paper.py --weights-dir {args.weights_dir} --ours {args.ours} --n {args.n} "
               f"--seed {args.seed} --eps {args.eps} --runs {args.runs} --out {args.out}")
    t0 = time.time()
    ours_protocol = json.loads(args.ours.read_text())["cells"]
    cells, trained = {}, {}
    for model in MODELS:
        weights = args.weights_dir / f"lenet-paper-{model}.pt"
        trained[model] = weights.is_file()
        for norm in NORMS:
            for factor in FACTORS:
                cell = {}
                if weights.is_file():
                    path = export_head(weights, factor, args.runs / "heads")
                    cfg = ScoreConfig(model="builtin:lenet-reference", weights=str(path), data=f"dsprites:{factor}",
                                      protocol="paper", eps=args.eps, norm=norm, steps=50, rel_step=1.0, n=args.n,
                                      seed=args.seed, device="cpu")
                    result = score(cfg, out=args.runs / f"{model}-L{norm}-{factor}", progress=False)
                    p, s = result.points, result.summary
                    sq_gain = p["loss_adv"].to_numpy(np.float64) ** 2 - p["loss_clean"].to_numpy(np.float64) ** 2
                    cell = {"lhs_paper_estimator": float(sq_gain.mean() / s["head_norm"]),
                            "rhs_as_attack": s["as_score_rep"], "lhs_asbound": s["lhs"], "rhs_both": s["as_score"],
                            "head_norm": s["head_norm"], "clean_mse": float((p["loss_clean"] ** 2).mean())}
                theirs = ours_protocol[f"{model}/L{norm}/{factor}"]
                cell.update(ours_protocol_lhs=theirs["lhs"], ours_protocol_rhs=theirs["rhs_as_attack"])
                cells[(model, norm, factor)] = cell
                print(model, norm, factor, json.dumps(cell), flush=True)
    rows = []
    for model in MODELS:
        for norm, attack in NORMS.items():
            lhs_paper, rhs_paper = PAPER[(model, norm)]
            first = cells[(model, norm, FACTORS[0])]  # one RHS a row: the same images and representation
            entries = [(f"LHS {f}", lhs_paper[i], cells[(model, norm, f)].get("lhs_paper_estimator"),
                        cells[(model, norm, f)]["ours_protocol_lhs"]) for i, f in enumerate(FACTORS)]
            entries.append(("RHS", rhs_paper, first.get("rhs_as_attack"), first["ours_protocol_rhs"]))
            for name, paper, at_paper, at_ours in entries:
                r_paper, r_ours = ratio(at_paper, paper), ratio(at_ours, paper)
                rows.append({
                    "pretraining": model, "attack": attack, "cell": name, "paper": paper,
                    "paper protocol": "pending" if at_paper is None else f"{at_paper:.3g}",
                    "ratio (paper protocol)": "" if r_paper is None else f"{r_paper:.3g}",
                    "verdict (paper protocol)": verdict(r_paper),
                    "asbound protocol": f"{at_ours:.3g}",
                    "ratio (asbound protocol)": "" if r_ours is None else f"{r_ours:.3g}",
                    "verdict (asbound protocol)": verdict(r_ours),
                })
    table = pd.DataFrame(rows)
    lines = [
        "# Seed 001 Table 7: the paper, asbound at the paper's protocol, asbound at its own",
        "",
        "Made by `analyses/table7_paper.py` (command at the end); every number of the two asbound columns",
        "is an `asbound score` run. The paper's protocol: the `lenet-paper-*` LeNets of",
        "`analyses/train_builtin.py --protocol paper`, `--protocol paper` (targets scaled to [0, 1], images",
        f"from the whole set), eps {args.eps}, PGD 50 steps, relative step 1.0, n = {args.n}, the paper's",
        "estimators (squared-error LHS over the spectral norm, the representation attack's mean shift).",
        "asbound's protocol: `reports/table7.json` (the shipped `lenet-*`, eps 8/255, latent values,",
        "Euclidean-error LHS). Ratio = asbound / paper.",
        "",
        "LeNets trained at the paper's protocol: "
        + ", ".join(f"{m} {'yes' if trained[m] else 'pending'}" for m in MODELS) + ".",
        "",
        table.to_markdown(index=False),
        "",
        "## Why cells are off (each reason shown by a committed run)",
        "",
        "- asbound's protocol, random row (thousands of times smaller): `builtin:lenet-random` keeps its batch",
        "  norms' initial statistics (0, 1); the seed's code probes linearly in train mode, which sets them",
        "  from the data. The same weights with statistics estimated on the data score 20.8 (L-inf) and 1.24",
        "  (L2) at eps 16/255 against 0.0082 and 0.00024 as shipped (`reports/table7-random-bn.txt`). The",
        "  seed's eps is 16/255 (branch `harsh/rep_attack`), ours 8/255: another factor 2 (0.0041 -> 0.0082).",
        "- asbound's protocol, standard and adversarial rows: other LeNets (SGD at 0.05, 10,000 images, 4",
        "  epochs, PGD-5, targets in radians: `reports/builtin_training.json`), eps 8/255 and the",
        "  Euclidean-error LHS, against the seed's squared error on targets in [0, 1]: not like for like.",
        "  The paper-protocol rows are the like-for-like comparison.",
        "- the paper's protocol, random row: one initialisation (seed 0). Over five initialisations the RHS",
        "  ranges over 9.9-27.5 (L-inf) and 0.60-2.39 (L2) (`reports/table7-random-bn.txt`): cells within",
        "  a factor 3 of the paper lie within the spread between initialisations.",
        "- pending rows: `lenet-paper-standard` is trained by `analyses/train_builtin.py --protocol paper",
        "  --models random,standard` (589,824 images, 10 epochs, resumable); `lenet-paper-adversarial` needs",
        "  PGD-20 adversarial training at about 40 times that cost, for a GPU: `analyses/train_builtin.py",
        "  --protocol paper --models adversarial --device cuda --work runs-paper`.",
        "",
        f"made by: `{command}` ({time.time() - t0:.0f} s)",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, **environment(), "trained": trained,
         "cells": {f"{m}/L{n}/{f}": c for (m, n, f), c in cells.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
