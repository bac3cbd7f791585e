"""Train the builtin classification representations with asbound's own transfer engine; record them.

Pretraining from scratch is transfer from a random representation with every layer trained
(``ft`` / ``adv-ft``), so the engine of ``asbound transfer`` makes these models:

* ``digits-random``: the digits CNN (:mod:`asbound.builtin.digits`) at its seeded default
  initialisation, with a linear-probe head for digits 0-4 (``transfer --method lp``);
* ``digits-standard``: ``transfer --method ft`` from ``digits-random`` on digits 0-4;
* ``digits-adversarial``: ``transfer --method adv-ft`` (L-inf PGD-10, eps 8/255, step 2/255);
* ``lenet-shape-standard``: ``transfer --method ft`` from ``lenet-random`` on dSprites shape;
* ``lenet-shape-adversarial``: ``transfer --method adv-ft`` with FGSM and a uniform random start
  (Wong et al. 2020: one step of 1.25 eps, eps 8/255), PGD being too slow for 64x64 on a CPU.

The LeNets then get linear-probe heads for every dSprites factor (as ``train_builtin.py`` fits
them); the digits CNNs keep their trained ``digits0-4`` head. Each model's transfer run
(``config.json``, ``epochs.csv``, ``final.json``) is kept under ``--runs``.

    python analyses/train_classifiers.py --runs reports/builtin_runs --record reports/builtin_classifiers.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from asbound.builtin import weights_path
from asbound.builtin.digits import DigitsNet
from asbound.records import environment
from asbound.transfer import TransferConfig, transfer

import train_builtin  # noqa: E402 - the LeNet probes and dSprites samples of the first builtins


def _features_state(model_pt: Path) -> dict:
    """The representation's weights from a run's ``model.pt`` (``backbone.features.*``)."""
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    prefix = "backbone.features."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _head_state(model_pt: Path) -> dict:
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    return {"weight": state["head.weight"], "bias": state["head.bias"]}


def _save(name: str, arch: str, features: dict, heads: dict, default_head: str, meta: dict, out: Path) -> None:
    torch.save({"arch": arch, "features": features, "heads": heads, "default_head": default_head, "meta": meta},
               out / f"{name}.pt")


def _train(name: str, runs: Path, printer, **config) -> dict:
    folder = runs / name
    result = transfer(TransferConfig(**config), folder, progress=False, printer=printer)[0]
    keep = {"config.json", "epochs.csv", "final.json", "stages.json"}
    for p in folder.iterdir():  # checkpoints and scores are not part of the record
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else None
    return result.final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/builtin"), help="where the transfer runs go")
    parser.add_argument("--out", type=Path, default=weights_path("x").parent)
    parser.add_argument("--record", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits-epochs", type=int, default=30)
    parser.add_argument("--shape-epochs", type=int, default=4)
    parser.add_argument("--shape-n", type=int, default=20000)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    runs, out = args.runs, args.out
    runs.mkdir(parents=True, exist_ok=True)
    record: dict = {"config": {k: str(v) for k, v in vars(args).items()}, **environment(), "models": {}}
    t0 = time.time()

    def log(line: str) -> None:
        print(line, flush=True)

    # digits: a seeded random CNN, saved first so that the engine can start from it
    torch.manual_seed(args.seed)
    net = DigitsNet(5).eval()
    random_features = {k: v.clone() for k, v in net.features.state_dict().items()}
    _save("digits-random", "digits-cnn", random_features,
          {"digits0-4": {k: v.clone() for k, v in net.head.state_dict().items()}}, "digits0-4",
          {"name": "digits-random", "seed": args.seed}, out)
    digits = dict(data="digits", classes="0-4", device=args.device, seed=args.seed, score=False,
                  batch_size=64, epochs=args.digits_epochs, lr=0.05, lr_ft=0.05, n_test=None)
    plans = {
        "digits-random": dict(method="lp"),
        "digits-standard": dict(method="ft"),
        "digits-adversarial": dict(method="adv-ft", eps="8/255", attack_steps=10, attack_step="2/255"),
    }
    for name, plan in plans.items():
        start = time.time()
        log(f"{name}: transfer {plan['method']} from builtin:digits-random on digits 0-4")
        final = _train(name, runs, log, model="builtin:digits-random", **digits, **plan)
        features = random_features if plan["method"] == "lp" else _features_state(runs / name / "model.pt")
        head = _head_state(runs / name / "model.pt")
        meta = {"name": name, "method": plan["method"], "eps": 8 / 255 if "adv" in plan["method"] else 0.0,
                "seed": args.seed, "run": str(runs / name)}
        _save(name, "digits-cnn", features, {"digits0-4": head}, "digits0-4", meta, out)
        record["models"][name] = {"seconds": round(time.time() - start, 1), "test": final["test"],
                                  "stages": final["stages"]}
    # dSprites shape: LeNets trained from the random LeNet
    shape = dict(model="builtin:lenet-random/shape", data="dsprites:shape", device=args.device, seed=args.seed,
                 score=False, batch_size=128, epochs=args.shape_epochs, lr_ft=0.05, n=args.shape_n, n_test=2000,
                 eval_steps=(10,))
    x, cls, val = train_builtin.sample("train", 10000, args.seed + 1)
    xe, clse, vale = train_builtin.sample("test", 2000, args.seed + 2)
    from asbound.builtin.lenet import LeNet

    for name, plan in {
        "lenet-shape-standard": dict(method="ft"),
        "lenet-shape-adversarial": dict(method="adv-ft", eps="8/255", attack_steps=1, attack_step=str(1.25 * 8 / 255)),
    }.items():
        start = time.time()
        log(f"{name}: transfer {plan['method']} from builtin:lenet-random on dSprites shape")
        final = _train(name, runs, log, **shape, **plan)
        model = LeNet(3)
        model.features.load_state_dict(_features_state(runs / name / "model.pt"))
        heads = train_builtin.fit_heads(model, x, cls, val, torch.device("cpu"))
        metrics = train_builtin.evaluate(model, heads, xe, clse, vale, torch.device("cpu"))
        meta = {"name": name, "method": plan["method"], "eps": 8 / 255 if "adv" in plan["method"] else 0.0,
                "seed": args.seed, "run": str(runs / name)}
        _save(name, "lenet", _features_state(runs / name / "model.pt"), heads, "shape", meta, out)
        record["models"][name] = {"seconds": round(time.time() - start, 1), "test": final["test"],
                                  "stages": final["stages"], "probe_test_metrics": metrics}
        log(f"  probes: {metrics}")
    record["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(record, indent=2)
    print(text)
    if args.record:
        args.record.write_text(text + "\n")


if __name__ == "__main__":
    main()
