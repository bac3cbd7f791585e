"""Seed 001's tables and figures, offline, from asbound's own commands: every run a directory under
``reports/paper/``, every table and figure rendered from those records by ``asbound table`` /
``asbound plot`` (the exact commands are listed in ``reports/README.md`` and in each table's footer).

    python analyses/paper_tables.py                 # run what is missing, then render everything
    python analyses/paper_tables.py --only table8   # one entry
    python analyses/paper_tables.py --render-only   # re-render from the stored records
    python analyses/paper_tables.py --paper         # print the commands at the paper's setting

The offline setting (shipped models, the package's own data; see each entry's note) keeps the
shape of each experiment, not its numbers: the digits CNNs (8x8, adversarially or normally
trained on digits 0-4) stand in for the RobustBench CIFAR-100 WRN-34-10, digits 5-9, the odd
digits and dSprites shapes for CIFAR-10 / Fashion-MNIST / Intel Image.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from asbound.cli import main as asbound

ROOT = Path(__file__).resolve().parent.parent
RUNS = "reports/paper"
DIGITS_A, DIGITS_S = "builtin:digits-adversarial", "builtin:digits-standard"
SHAPE_A = "builtin:lenet-shape-adversarial"


@dataclass
class Entry:
    name: str
    what: str
    runs: "list[list[str]]"  # asbound commands that make the records (rerun: reused)
    render: "list[list[str]]"  # asbound table / plot commands
    paper: "list[str]" = field(default_factory=list)  # the commands at the paper's setting
    note: str = ""


def _table(style: str, out: str, *runs: str) -> "list[list[str]]":
    return [["table", *runs, "--style", style, "--format", fmt, "--out", f"{RUNS}/{out}.{ext}"]
            for fmt, ext in (("md", "md"), ("tex", "tex"), ("csv", "csv"))]


def _plot(kind: str, out: str, *runs: str) -> "list[str]":
    return ["plot", *runs, "--kind", kind, "--out", f"{RUNS}/{out}.png"]


PREDICT_TASKS = ",".join([
    "digits@classes=0-4", "digits@classes=5-9", "digits@classes=1,3,5,7,9", "digits@classes=0,2,4,6,8",
    "digits@classes=0-9", "dsprites:shape",
    *(f"digits@classes=5-9@corruption={c}:{s}" for c in ("gaussian_noise", "zoom_blur") for s in (1, 2, 3, 4, 5)),
    *(f"digits@classes=5-9@corruption={c}:{s}" for c in ("impulse_noise", "contrast") for s in (2, 5)),
])
C100 = "robustbench:cifar100/Linf/Addepalli2022Efficient_WRN_34_10"

ENTRIES = [
    Entry(
        "table1", "Tables 1 and 3: Lemma 1 (Diff. CE, ||W||, LHS, AS) and the Theorem 2 criterion after LP",
        [["sweep", "grid", "--config", "analyses/sweeps/table1.toml", "--out", f"{RUNS}/table1"]],
        [*_table("lemma1", "table1", f"{RUNS}/table1"), *_table("theorem2", "table3", f"{RUNS}/table1"),
         _plot("lhs-rhs", "fig_lhs_rhs", f"{RUNS}/table1", f"{RUNS}/table2"),
         _plot("margin-vs-sensitivity", "fig_margin_sensitivity", f"{RUNS}/table1")],
        paper=["asbound sweep grid --config analyses/sweeps/table1-cifar100.toml --out runs/table1"],
        note="pretraining: the digits CNNs (digits 0-4); downstream: digits 5-9, odd digits, dSprites shapes at 8x8; eps 0.1",
    ),
    Entry(
        "table2", "Table 2: Table 1 with a weight-decayed head (smaller ||W||)",
        [["sweep", "grid", "--config", "analyses/sweeps/table2.toml", "--out", f"{RUNS}/table2"]],
        _table("lemma1", "table2", f"{RUNS}/table2"),
        note="as Table 1, LP with weight decay 0.05",
    ),
    Entry(
        "table4", "Table 4 and the predictive-power figure: AS ratio before transfer against the measured "
                  "relative CE increase after LP (and seed 000's predictor)",
        [["predict", "--model", DIGITS_A, "--pretrain-data", "digits", "--pretrain-classes", "0-4",
          "--data", PREDICT_TASKS, "--eps", "0.1", "--n", "400", "--measure", "lp,adv-lp", "--epochs", "20",
          "--n-train", "3000", "--n-test", "400", "--out", f"{RUNS}/table4-adversarial"],
         ["predict", "--model", DIGITS_S, "--pretrain-data", "digits", "--pretrain-classes", "0-4",
          "--data", PREDICT_TASKS, "--eps", "0.1", "--n", "400", "--measure", "lp,adv-lp", "--epochs", "20",
          "--n-train", "3000", "--n-test", "400", "--out", f"{RUNS}/table4-standard"]],
        [*_table("predict", "table4", f"{RUNS}/table4-adversarial", f"{RUNS}/table4-standard"),
         _plot("predict", "fig_predict", f"{RUNS}/table4-adversarial", f"{RUNS}/table4-standard")],
        paper=[f"asbound predict --model {C100} --pretrain-data cifar100 --data cifar10,fashion-mnist,folder:data/intel-image/seg_test "
               f"--measure lp --out runs/predict"],
        note="20 downstream tasks: digit class splits, dSprites shapes, digits 5-9 under 4 corruptions",
    ),
    Entry(
        "table5", "Tables 5 and 9: LP, FT, LP-FT (and the adversarial methods) per downstream task",
        [],
        [*_table("transfer", "table5", "reports/transfer/digits", "reports/transfer/dsprites")],
        note="the runs of analyses/transfer_tables.py (reports/transfer/)",
    ),
    Entry(
        "table7", "Table 7: Lemma 1 for dSprites regression (LeNets, L-inf and L2)",
        [], [*_table("lemma1", "table7", "reports/table7")],
        note="the runs of analyses/table7.py (reports/table7/)",
    ),
    Entry(
        "table8", "Table 8: robust accuracy of the points fulfilling Theorem 2 at 1, 2, 3 eps",
        [["sweep", "eps", "--model", DIGITS_A, "--data", "digits", "--classes", "0-4", "--eps", "0.05",
          "--multiples", "1,2,3", "--n", "all", "--out", f"{RUNS}/table8-digits"],
         ["sweep", "eps", "--model", SHAPE_A, "--data", "dsprites:shape", "--eps", "4/255", "--multiples", "1,2,3",
          "--n", "500", "--out", f"{RUNS}/table8-dsprites"]],
        [*_table("eps", "table8", f"{RUNS}/table8-digits", f"{RUNS}/table8-dsprites"),
         _plot("eps", "fig_eps", f"{RUNS}/table8-digits", f"{RUNS}/table8-dsprites")],
        paper=["asbound sweep eps --model run:runs/table1/data=cifar10 --data cifar10 --eps 8/255 --multiples 1,2,3 "
               "--out runs/table8"],
        note="the digits CNN on its own digits 0-4 (eps 0.05) and the shape LeNet on dSprites (eps 4/255)",
    ),
    Entry(
        "table10", "Table 10: input resizing before the representation, then LP",
        [["sweep", "resize", "--model", "torchvision:resnet18", "--data", "digits", "--classes", "5-9",
          "--sizes", "64,32,16", "--method", "lp", "--epochs", "10", "--eps", "2/255", "--n", "200",
          "--n-test", "200", "--out", f"{RUNS}/table10"]],
        _table("resize", "table10", f"{RUNS}/table10"),
        paper=["asbound sweep resize --model robustbench:imagenet/Linf/Salman2020Do_50_2 --data cifar10 "
               "--sizes 256,128,64 --method lp --eps 1/255 --out runs/table10"],
        note="a random-weight torchvision ResNet-18 (no weights offline) on digits 5-9 upsized to 64, 32, 16",
    ),
    Entry(
        "table12", "Tables 12 and 13: Gaussian noise and zoom blur (CIFAR-10-C parameters) at severities 1, 2, 5",
        [["sweep", "shift", "--model", DIGITS_A, "--data", "digits", "--classes", "0-4",
          "--corruption", "gaussian_noise,zoom_blur", "--severity", "1,2,5", "--eps", "0.1", "--n", "all",
          "--out", f"{RUNS}/table12-digits"],
         ["sweep", "shift", "--model", SHAPE_A, "--data", "dsprites:shape",
          "--corruption", "gaussian_noise,zoom_blur", "--severity", "1,2,5", "--n", "500",
          "--out", f"{RUNS}/table12-dsprites"]],
        [*_table("shift", "table12", f"{RUNS}/table12-digits", f"{RUNS}/table12-dsprites"),
         _plot("shift", "fig_shift", f"{RUNS}/table12-digits", f"{RUNS}/table12-dsprites")],
        paper=[f"asbound sweep shift --model {C100} --data cifar100 --corruption gaussian_noise,zoom_blur "
               f"--severity 1,2,5 --out runs/shift"],
        note="each model on its own pretraining data (its own head), corrupted",
    ),
    Entry(
        "certify", "Certified sensitivity: the IBP, CROWN-IBP and CROWN bounds against the PGD AS "
                   "(reports/certify.*)",
        [],
        [["table", "reports/certify", "reports/certify-crown-ibp", "reports/certify-crown", "--style", "certify",
          "--format", fmt, "--out", f"reports/certify.{fmt}"] for fmt in ("md", "tex", "csv")],
        note="the sweeps of analyses/sweeps/certify.toml, certify-crown-ibp.toml and certify-crown.toml "
             "(reports/certify/, reports/certify-crown-ibp/, reports/certify-crown/; reports/README.md has "
             "their commands)",
    ),
]


def _run(argv: "list[str]", log) -> None:
    line = "asbound " + " ".join(shlex.quote(a) for a in argv)
    print(f"$ {line}", file=log, flush=True)
    print(f"$ {line}", flush=True)
    start = time.time()
    code = asbound(argv)
    print(f"  (exit {code}, {time.time() - start:.0f} s)", file=log, flush=True)
    if code != 0:
        sys.exit(f"failed: {line}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated entries: " + ", ".join(e.name for e in ENTRIES))
    p.add_argument("--render-only", action="store_true", help="render from the stored records only")
    p.add_argument("--runs-only", action="store_true", help="make the records, render nothing")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the transfer runs' model.pt files")
    p.add_argument("--paper", action="store_true", help="print the commands at the paper's setting and exit")
    args = p.parse_args()
    entries = [e for e in ENTRIES if not args.only or e.name in args.only.split(",")]
    if args.paper:
        for e in entries:
            for line in e.paper:
                print(f"# {e.name}: {e.what}\n{line}")
        return
    import os

    os.chdir(ROOT)
    Path(RUNS).mkdir(parents=True, exist_ok=True)
    with open(f"{RUNS}/commands.log", "a") as log:
        for e in entries:
            print(f"# {e.name}: {e.what}", file=log)
            if not args.render_only:
                for argv in e.runs:
                    _run([*argv, "--no-progress"], log)
            for argv in [] if args.runs_only else e.render:
                _run(argv, log)
    if not args.keep_checkpoints:  # the records stay; the weights would bloat the repository
        for ckpt in Path(RUNS).rglob("*.pt"):
            ckpt.unlink()
        for folder in Path(RUNS).rglob(".submitit"):
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
