"""Seed 001 Tables 5 and 9 for every method of ``asbound transfer``, offline on shipped models, with
seed 000's RoLI-against-RanLI comparison per PEFT variant and seed 002's AutoLoRa against vanilla
TRADES finetuning.

Two split-task transfers, every method from one pretrained representation, each method's run kept
(``config.json``, ``epochs.csv``, ``final.json``, the ``score`` runs before and after with their
per-datapoint records; checkpoints are dropped to keep the repository small):

* ``digits``: ``builtin:digits-adversarial`` (adversarially trained on digits 0-4, eps 0.1) to
  digits 5-9 (real 8x8 scans); L-inf eps 0.1 (the digits have 17 grey levels: 8/255 is half a
  level), PGD-10 training attacks with step 0.025;
* ``dsprites``: ``builtin:lenet-adversarial`` (adversarially trained on dSprites *orientation*
  regression) to dSprites *shape* classification (3 classes), on a seeded draw of ``--dsprites-n``
  training images; L-inf eps 8/255, step 2/255, lr 0.05 for every stage. The orientation
  representation barely separates the shapes (its probe reaches 44%, near the 33% of chance), and
  four epochs of full finetuning from it stay below 50% as well, while the same ``ft`` from the
  random LeNet reaches 99.5% test accuracy (``reports/builtin_classifiers.json``, ``lenet-shape-standard``):
  the adversarially trained orientation features are a poor start for the shape, whatever the
  method.

Each of the two tables holds the part-1 methods and ``autolora`` (against ``trades-ft``, seed
002's vanilla RFT). Then, per task, ``ranli,roli`` once per ``--peft`` variant (full, lora,
adapter, bias; seed 000's comparison), in ``<task>-peft-<variant>``: the dSprites ones on a
smaller draw (``--dsprites-peft-n``) to keep the CPU time in bounds.

    python analyses/transfer_tables.py --runs reports/transfer --out reports/transfer_tables.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import pandas as pd
from rich.console import Console

from asbound.records import environment
from asbound.report import transfer_table
from asbound.transfer import TransferConfig, transfer

METHODS = "lp,ft,lp-ft,adv-lp,adv-ft,trades-ft,autolora"
PEFTS = ("full", "lora", "adapter", "bias")


def experiments(args: argparse.Namespace) -> dict:
    main = _main_experiments(args)
    out = dict(main)
    for task, cfg in main.items():
        for variant in PEFTS:
            extra = {"n": args.dsprites_peft_n} if task == "dsprites" else {}
            out[f"{task}-peft-{variant}"] = dataclasses.replace(cfg, method="ranli,roli", peft=variant, **extra)
    return out


def _main_experiments(args: argparse.Namespace) -> dict:
    return {
        "digits": TransferConfig(
            model="builtin:digits-adversarial", data="digits", classes="5-9", method=METHODS, eps="0.1",
            attack_step="0.025", epochs=args.digits_epochs, batch_size=64, lr=0.05, lr_ft=0.01, seed=args.seed,
            device="cpu", score_n=None),
        "dsprites": TransferConfig(
            model="builtin:lenet-adversarial", data="dsprites:shape", method=METHODS, epochs=args.dsprites_epochs,
            n=args.dsprites_n, n_val=1000, n_test=args.dsprites_n_test, score_n=args.dsprites_score_n, lr=0.05,
            lr_ft=args.dsprites_lr_ft,
            seed=args.seed, device="cpu"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("reports/transfer"))
    parser.add_argument("--out", type=Path, default=Path("reports/transfer_tables.txt"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits-epochs", type=int, default=20)
    parser.add_argument("--dsprites-epochs", type=int, default=4)
    parser.add_argument("--dsprites-n", type=int, default=10000)
    parser.add_argument("--dsprites-lr-ft", type=float, default=0.05,
                        help="0.01 left every method near 44%% clean accuracy after 4 epochs on 5000 images")
    parser.add_argument("--dsprites-n-test", type=int, default=1000)
    parser.add_argument("--dsprites-score-n", type=int, default=300)
    parser.add_argument("--dsprites-peft-n", type=int, default=5000, help="training images of the dSprites RanLI / RoLI runs")
    parser.add_argument("--only", nargs="*", help="experiment names to run (default: all)")
    args = parser.parse_args()
    command = "python analyses/transfer_tables.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if v is not None)
    console = Console(record=True, width=160)
    record: dict = {"command": command, **environment(), "experiments": {}}
    t0 = time.time()
    peft_tables: "dict[str, list]" = {}  # task -> the RanLI / RoLI finals of every --peft variant
    for name, cfg in experiments(args).items():
        if args.only and name not in args.only:
            continue
        start = time.time()
        results = transfer(cfg, args.runs / name, progress=False, printer=lambda line: print(line, flush=True))
        for r in results:  # the checkpoints are not part of the record
            shutil.rmtree(r.out / "checkpoints", ignore_errors=True)
        finals = [r.final for r in results]
        title = (f"{{name}}: {cfg.model} -> {cfg.data}{' classes ' + cfg.classes if cfg.classes else ''} "
                 f"(L-inf eps {cfg.eps}{f'; {cfg.n} training images' if cfg.n else ''}; "
                 f"score: AS and bounds on the test data)")
        if "-peft-" in name:
            task = name.split("-peft-")[0]
            peft_tables.setdefault(task, [title.format(name=f"{task}, RoLI against RanLI per --peft (seed 000)"), []])
            peft_tables[task][1].extend(finals)
        else:
            console.print(transfer_table(finals, title=title.format(name=name)))
        record["experiments"][name] = {
            "wall_seconds_this_invocation": round(time.time() - start, 1),
            "training_seconds": {r.method: round(float(pd.read_csv(r.out / "epochs.csv")["seconds"].sum()), 1)
                                 for r in results},
            "finals": finals}
    for title, finals in peft_tables.values():
        console.print(transfer_table(finals, title=title))
    console.print(f"made by: {command}  ({time.time() - t0:.0f} s, CPU; finished runs under --runs are reread)",
                  soft_wrap=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(console.export_text())
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
