"""The authors' own dSprites checkpoints, scored by asbound at their protocol, against their JSON.

lf-tcho/robustness_transfer, branch ``dsprites-exp``, holds
``experiments/bs_128_ds_dsprites_eps_10_lr_0.001_lrs_cosine_tf_method_lp/models/{orientation,scale}.pth``
(whole ``Model_dsprites`` state dicts) and the results ``result_th3_2_{latent}_reg_on_val.json`` its
``dsprites_theory_analysis.py`` wrote: the head's spectral norm, the clean MSE ``loss``, ``loss_adv``
(MSE at foolbox L-inf PGD-20's last iterate, eps 8/255, relative step 0.01/0.3, bounds (-1, 1)),
``avg_feature_difference`` (``|g(x_adv) - g(x)|`` at that point) and ``C2`` (largest clean MSE),
all over the last 20% of the official order with the latent class index as target. The files
are not shipped with asbound; extract them from a clone of that repository::

    git show dsprites-exp:experiments/.../models/orientation.pth > orientation.pth

Every number here comes from ``asbound score --model builtin:lenet-reference --weights PATH
--protocol dsprites-exp``: the spectral norm from its summary (float64; the JSON's float32 GPU
value is compared at float32 precision), the clean MSE and C2 from the squared per-point
``loss_clean`` of a zero-step run over the whole test split, the attacked quantities from a
run with the script's attack on ``--n`` test images. Two more estimates on those images
separate the differences: the reference's estimator (the last PGD iterate, not the best
point asbound keeps) and asbound's own box [0, 1].

    python analyses/table7_reference.py --checkpoint orientation.pth:ref/orientation.json \\
        --checkpoint scale.pth:ref/scale.json --n 500 --runs reports/table7-reference \\
        --out reports/table7-reference.txt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from asbound.attacks import PGD
from asbound.models import load_model, split_model
from asbound.protocol import PROTOCOLS, load_protocol_data, wrap_data, wrap_model
from asbound.records import environment
from asbound.scoring import ScoreConfig, score
from asbound.specs import parse_data_spec

EPS, STEPS, REL_STEP = "8/255", 20, 0.01 / 0.3  # dsprites_theory_analysis.py: LinfPGD(steps=20), epsilon 8/255


def last_iterate(weights: str, factor: str, n: int, seed: int, box: str) -> "dict[str, float]":
    """The reference's estimator on the same ``n`` images: PGD on the squared error, its last
    iterate; the MSE there and ``|g(x_last) - g(x)|``."""
    protocol = PROTOCOLS["dsprites-exp"]
    loaded = load_model("builtin:lenet-reference", weights=weights)
    data = load_protocol_data(protocol, parse_data_spec(f"dsprites:{factor}"), root=None, split="test", n=n,
                              seed=seed, input_format=loaded.input_format)
    lo_hi = PROTOCOLS[box]
    module, data = wrap_model(lo_hi, loaded.module), wrap_data(lo_hi, data)
    x, y = data.batch(torch.arange(len(data))), data.y.float()
    model = split_model(module, x[:8])
    model.requires_grad_(False)
    attack = PGD(eps=(8 / 255) / lo_hi.width, norm="inf", steps=STEPS, rel_step=REL_STEP, select="last")
    mse, adv_mse, shift = [], [], []
    for i in range(0, len(x), 250):
        xb, yb = x[i:i + 250], y[i:i + 250]
        x_adv = attack(lambda z: (model(z).squeeze(1) - yb) ** 2, xb, generator=torch.Generator().manual_seed(seed + i),
                       value=False).x_adv
        with torch.no_grad():
            g0, g1 = model.features(xb), model.features(x_adv)
            mse.append((model.head(g0).squeeze(1) - yb) ** 2)
            adv_mse.append((model.head(g1).squeeze(1) - yb) ** 2)
            shift.append(torch.linalg.vector_norm(g1 - g0, dim=1))
    mse, adv_mse, shift = torch.cat(mse), torch.cat(adv_mse), torch.cat(shift)
    return {"loss": float(mse.double().mean()), "loss_adv": float(adv_mse.double().mean()),
            "avg_feature_difference": float(shift.double().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="WEIGHTS.pth:RESULT.json (the latent is read from the JSON's file name)")
    parser.add_argument("--n", type=int, default=500, help="test images for the attacked quantities")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("reports/table7-reference"))
    parser.add_argument("--out", type=Path, default=Path("reports/table7-reference.txt"))
    args = parser.parse_args()
    command = "python analyses/table7_reference.py " + " ".join(
        [f"--checkpoint {c}" for c in args.checkpoint] + [f"--n {args.n} --seed {args.seed} --runs {args.runs} --out {args.out}"])
    t0 = time.time()
    rows = {}
    for spec in args.checkpoint:
        weights, result = spec.rsplit(":", 1)
        theirs = json.loads(Path(result).read_text())
        factor = "orientation" if "orientation" in Path(result).name else "scale"
        base = dict(model="builtin:lenet-reference", weights=weights, data=f"dsprites:{factor}",
                    protocol="dsprites-exp", eps=EPS, norm="inf", device="cpu", seed=args.seed, batch_size=512)
        clean = score(ScoreConfig(**base, steps=0, n=None), out=args.runs / f"{factor}-clean", progress=False)
        sq = clean.points["loss_clean"].to_numpy(np.float64) ** 2
        attacked = score(ScoreConfig(**base, steps=STEPS, rel_step=REL_STEP, n=args.n),
                         out=args.runs / f"{factor}-pgd20", progress=False)
        p = attacked.points
        ours = {
            "W_spectral_norm": clean.summary["head_norm"],
            "loss": float(sq.mean()),
            "loss_adv": float((p["loss_adv"].to_numpy(np.float64) ** 2).mean()),
            "avg_feature_difference": float(p["s_loss"].mean()),
            "C2": float(sq.max()),
        }
        sub = {"loss": float((p["loss_clean"].to_numpy(np.float64) ** 2).mean())}
        last = last_iterate(weights, factor, args.n, args.seed, "dsprites-exp")
        last01 = last_iterate(weights, factor, args.n, args.seed, "asbound")
        rows[factor] = {"theirs": {k: theirs[k] for k in ours}, "asbound": ours, "n_clean": int(len(sq)),
                        "n_attacked": int(len(p)), "subset_clean_loss": sub["loss"],
                        "last_iterate_box_-1_1": last, "last_iterate_box_0_1": last01,
                        "float32_spectral_norm": float(np.float32(ours["W_spectral_norm"])),
                        "float32_ulp": float(np.spacing(np.float32(theirs["W_spectral_norm"])))}
        print(factor, json.dumps(rows[factor], indent=1), flush=True)
    table = Table(title="The authors' dsprites-exp checkpoints: their JSON against asbound score "
                        "--protocol dsprites-exp (procedural dSprites)", title_justify="left")
    for col in ("checkpoint", "quantity", "authors' JSON", "asbound", "ratio", "last iterate, box [-1,1]",
                "last iterate, box [0,1]"):
        table.add_column(col, justify="left" if col in ("checkpoint", "quantity") else "right")
    for factor, r in rows.items():
        for k in ("W_spectral_norm", "loss", "C2", "loss_adv", "avg_feature_difference"):
            a, b = r["theirs"][k], r["asbound"][k]
            last = r["last_iterate_box_-1_1"].get(k)
            last01 = r["last_iterate_box_0_1"].get(k)
            table.add_row(f"{factor}.pth", k, f"{a:.8g}", f"{b:.8g}", f"{b / a:.3g}",
                          "" if last is None else f"{last:.5g}", "" if last01 is None else f"{last01:.5g}",
                          end_section=k == "avg_feature_difference")
    console = Console(record=True, width=140)
    console.print(table)
    for factor, r in rows.items():
        console.print(f"{factor}: spectral norm in float32 {r['float32_spectral_norm']!r}, the JSON's "
                      f"{r['theirs']['W_spectral_norm']!r} (one float32 ulp = {r['float32_ulp']:.3g}); clean MSE "
                      f"and C2 over all {r['n_clean']} test images, the attacked quantities over {r['n_attacked']} "
                      f"of them (their clean MSE {r['subset_clean_loss']:.5g})", soft_wrap=True)
    console.print(f"made by: {command}  ({time.time() - t0:.0f} s)", soft_wrap=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(console.export_text())
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "seconds": round(time.time() - t0, 1), **environment(), "checkpoints": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
