"""``asbound`` command line: a thin layer over :mod:`asbound.api`.

    asbound score                                   # the embedded offline default
    asbound score --model robustbench:cifar100/Linf/Addepalli2022Efficient_WRN_34_10 \\
                  --data cifar10 --eps 8/255 --n 1000 --out runs/c100-to-c10
    asbound transfer --method lp,ft,lp-ft --model builtin:... --data digits --classes 5-9 --out runs/d
    asbound score --model run:runs/d/lp --data digits --classes 5-9
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import textwrap
from types import SimpleNamespace
from typing import NoReturn, Optional, Sequence

from asbound.defaults import config_defaults, constant, default_data_root, default_model_dir, first_arguments
from asbound.errors import AsboundError, ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one line ``asbound: error: ...`` and exit code 2, like every other
    error of the command line (argparse's own prints the whole usage block). Subparsers inherit
    the class; ``--help`` is untouched."""

    commands: "Optional[dict[str, argparse.ArgumentParser]]" = None  # set on the top-level parser

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        if self.commands and "required: COMMAND" in message:
            message += f" (choose from {', '.join(self.commands)})"
        self.exit(2, f"asbound: error: {message}; see '{self.prog} --help'\n")

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        # unknown options are reported by the subcommand's parser, which knows its options
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = (self.commands or {}).get(getattr(parsed, "command", None), self)
            options = {o.lstrip("-"): o for a in parser._actions for o in a.option_strings if o.startswith("--")}
            hints = []
            for extra in extras:
                name = extra.split("=")[0]
                close = difflib.get_close_matches(name.lstrip("-"), options, n=1) if name.startswith("--") else []
                if close:
                    hints.append(f"{name}: did you mean {options[close[0]]}?")
            hint = f" ({'; '.join(hints)})" if hints else ""
            parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to an option's help unless the default is None (the option's help
    then says what happens without it), the option is a flag, or the help already names it.
    Lines break at spaces only, so that paths and option names stay whole."""

    def _split_lines(self, text: str, width: int) -> "list[str]":
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.nargs == 0 or "(default:" in text:
            return text
        return super()._get_help_string(action)


def _defaults(module: str, name: str) -> SimpleNamespace:
    """The defaults of the config dataclass ``module.name`` as attributes (``d.seed``), read from its
    declaration: building the parser imports no torch (:mod:`asbound.defaults`)."""
    return SimpleNamespace(**config_defaults(module, name))
ATTACK_CHOICES = ("pgd", "apgd", "nystrom")
ATTACK_HELP = ("pgd: PGD with foolbox semantics (the seed protocol); apgd: Auto-PGD (step halving, momentum); "
               "nystrom: for the representation objective, each step to the best point of a model of J^T J "
               "built from every gradient (the loss attack runs apgd)")
REL_STEP_DEFAULT = "(default: 0.7 for pgd and nystrom, 2 for apgd)"


def _escape(path: object) -> str:
    return str(path).replace("%", "%%")  # help strings are %-formatted


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _n(text: str) -> Optional[int]:
    if text.lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or 'all', got {text!r}") from None


def _n_auto(text: str) -> "int | str | None":
    return "auto" if text.lower() == "auto" else _n(text)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _model_options(p: argparse.ArgumentParser, *, with_head: bool, default: str = "") -> None:
    """The model options; ``default``: what runs without --model and --data."""
    g = p.add_argument_group("model")
    g.add_argument("--model", help="robustbench:[DATASET/THREAT/]NAME | file:PATH | torchvision:ARCH | builtin:NAME[/HEAD] | "
                   "run:DIR (a finished transfer run)" + (f"; without --model and --data: {default}" if default else ""))
    g.add_argument("--model-dir", help="RobustBench model dir (MODEL_DIR/<dataset>/<threat>/<name>.pt) "
                   f"(default: $ASBOUND_MODEL_DIR or the user cache, here {_escape(default_model_dir())})")
    g.add_argument("--weights", help="state dict for torchvision:ARCH (without it: random weights) or for the "
                   "layout builtin:lenet-reference; loaded with weights_only=True")
    if with_head:
        g.add_argument("--head", help="a linear head for the task: torch.save(nn.Linear.state_dict()); without it: the model's last layer")
    g.add_argument("--feature-layer", help="module whose output is the representation g(x); without it: found automatically")
    g.add_argument("--allow-pickle", action="store_true", help="allow file:PATH (unpickling runs code)")


def _data_options(p: argparse.ArgumentParser, seed: int) -> argparse._ArgumentGroup:
    g = p.add_argument_group("data")
    g.add_argument("--data", help="cifar10 | cifar100 | fashion-mnist | mnist | digits | folder:PATH | tensors:PATH | dsprites[:FACTOR]")
    g.add_argument("--data-root", help="where torchvision data sets (and the dSprites .npz) live "
                   f"(default: $ASBOUND_DATA_ROOT or the user cache, here {_escape(default_data_root())})")
    g.add_argument("--classes", help="a subset of classes, relabelled 0..k-1 in the order given, e.g. 0-4, 5-9 or 0,2,4; "
                   "without it: every class")
    g.add_argument("--seed", type=_whole, default=seed, help="subset selection, splits and every random draw")
    g.add_argument("--resize", type=_whole, help="resize inputs to RESIZE x RESIZE; without it: the model's input format")
    g.add_argument("--corruption", help="corrupt every image (distribution shift), e.g. gaussian_noise, zoom_blur; "
                   "without it: the images as they are")
    g.add_argument("--severity", type=_whole, help="the corruption's severity, 1-5")
    g.add_argument("--corruption-params", default="auto", choices=("auto", "cifar", "imagenet"),
                   help="CIFAR-10-C's constants or ImageNet-C's (imagecorruptions); auto: CIFAR-10-C where it "
                        "defines the corruption")
    g.add_argument("--download", action="store_true", help="download missing data sets / checkpoints")
    return g


def build_parser() -> argparse.ArgumentParser:
    from asbound import __version__

    d = _defaults("asbound.scoring", "ScoreConfig")
    DEFAULT_N, DEFAULT_TASKS = constant("asbound.scoring", "DEFAULT_N"), constant("asbound.scoring", "DEFAULT_TASKS")
    parser = _Parser(
        prog="asbound", description="Verify robustness theory for transfer learning on real models."
    )
    parser.add_argument("--version", action="version", version=f"asbound {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "score",
        help="AS score, Lemma 1 / Theorem 1 and the Theorem 2 criterion per datapoint",
        description=(
            "Attack the representation (AS score) and the loss with PGD; write one record per "
            "datapoint and the bounds of Nern et al. (2023). Without --model and --data: the "
            "embedded offline default (builtin adversarially trained LeNets on procedural dSprites:"
            " orientation regression and shape classification)."
        ),
        formatter_class=_DefaultsFormatter,
    )
    default_subs = ",".join(task.split(":")[1] for task in DEFAULT_TASKS)
    _model_options(p, with_head=True, default="the embedded default")
    g = _data_options(p, d.seed)
    g.add_argument("--split", default=d.split, choices=("train", "test"), help="which split to draw from")
    g.add_argument("--n", type=_n, default=argparse.SUPPRESS,
                   help=f"datapoints, or 'all' (default: {d.n}; {DEFAULT_N} for the embedded default)")
    g.add_argument("--protocol", default=d.protocol, choices=("asbound", "paper", "dsprites-exp"),
                   help="whose choices: asbound (pixels in [0, 1], eps in pixels, latent values, seeded "
                        "split); paper, dsprites-exp: the seed paper's dSprites code (target units, split "
                        "and attack box, recorded in config.json)")
    g = p.add_argument_group("attack")
    g.add_argument("--eps", default=d.eps, help="radius in pixel units (in the box of --protocol), a number or a fraction")
    g.add_argument("--norm", default=d.norm, help="inf or 2")
    g.add_argument("--attack", default=d.attack, choices=ATTACK_CHOICES, help=ATTACK_HELP)
    g.add_argument("--steps", type=_whole, default=d.steps, help="gradient steps per restart")
    g.add_argument("--rel-step", type=_number, default=d.rel_step,
                   help=f"(initial) step size relative to eps {REL_STEP_DEFAULT}")
    g.add_argument("--restarts", type=_whole, default=d.restarts, help="random restarts of each attack (every point they evaluate counts); more than 1 needs the random start")
    g.add_argument("--amp", default=d.amp, choices=("auto", "off", "bf16", "fp16"),
                   help="gradient passes under autocast; each kept point is re-evaluated in float32, so every "
                        "reported number is float32 (auto: bf16 on CUDA, float32 on the CPU so that records match on every CPU, "
                        "float32 with --compile)")
    g.add_argument("--compile", action="store_true", help="torch.compile the gradient passes (pays on long runs; in float32: not with --amp bf16/fp16)")
    g.add_argument("--no-random-start", action="store_true", help="start PGD at the clean input")
    g.add_argument("--batch-size", type=_whole, default=d.batch_size, help="datapoints per batch")
    g.add_argument("--backend", default=d.backend, choices=("asbound", "foolbox"), help="PGD implementation")
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    g.add_argument("--as-only", action="store_true", help="the AS score alone: no labels, no loss attack")
    g.add_argument("--certify", choices=constant("asbound.certify", "METHODS"), help="also bound every s_i from above (ibp: interval bound "
                   "propagation; crown-ibp: linear relaxation over IBP's intermediate bounds; crown: full CROWN, every "
                   "layer's bounds by linear relaxation, the tightest and slowest, crown-ibp where over its budget; "
                   "all with operator norms for linear chains): a sound Lemma 1 RHS and a certified Theorem 2 "
                   "criterion")
    g = p.add_argument_group("bounds")
    g.add_argument("--delta", type=_number, default=d.delta, help="Theorem 1 confidence 1 - delta")
    g.add_argument("--loss-cap", type=_number, default=d.loss_cap, help="Theorem 1 cap C on the loss, fixed in advance")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run directory; rerunning resumes (default: runs/<model>__<data>, "
                   f"runs/default/{{{default_subs}}} for the embedded default)")
    g.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")
    _transfer_parser(sub)
    _sweep_parser(sub)
    _predict_parser(sub)
    _table_parser(sub)
    _plot_parser(sub)
    parser.commands = dict(sub.choices)
    return parser


def _steps_list(text: str) -> "tuple[int, ...]":
    try:
        steps = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be whole numbers separated by commas, got {text!r}") from None
    if not steps:
        raise argparse.ArgumentTypeError(f"must name at least one step count, got {text!r}")
    return steps


def _transfer_parser(sub: "argparse._SubParsersAction") -> None:
    METHODS = first_arguments("asbound.transfer.methods", "METHODS", "Method")
    CONDITIONS = constant("asbound.transfer.autolr", "CONDITIONS")
    AMPS, AUGMENTS, HEAD_INITS, PEFTS, PROMPT_DEPTHS, SCORE_N_CAP, SELECTS = (
        constant("asbound.transfer.config", name)
        for name in ("AMPS", "AUGMENTS", "HEAD_INITS", "PEFTS", "PROMPT_DEPTHS", "SCORE_N_CAP", "SELECTS"))
    OPTIMIZERS, SCHEDULES = constant("asbound.transfer.optim", "OPTIMIZERS"), constant("asbound.transfer.optim", "SCHEDULES")

    d = _defaults("asbound.transfer.config", "TransferConfig")
    p = sub.add_parser(
        "transfer",
        help="transfer a pretrained model (LP, FT, LP-FT, adversarial LP / FT, TRADES, RanLI, RoLI, AutoLoRa) "
             "and tabulate it against the bounds",
        description=(
            "Train downstream models from a pretrained representation, one run directory per method "
            "(it resumes after the last complete epoch), evaluate clean / PGD / AutoAttack accuracy on "
            "the test split, and score the representation before and after transfer. Each run is a "
            "model again: --model run:DIR. Under `torchrun --nproc-per-node N -m asbound transfer ...` "
            "the ranks train data-parallel (--batch-size is the global batch) and rank 0 writes."
        ),
        formatter_class=_DefaultsFormatter,
    )
    g = p.add_argument_group("method")
    g.add_argument("--method", required=True, help=f"one or several, comma-separated: {', '.join(METHODS)}")
    g.add_argument("--epochs", type=_whole, default=d.epochs, help="epochs per method (LP-FT: LP, then half as many of FT)")
    g.add_argument("--batch-size", type=_whole, default=d.batch_size, help="training and evaluation batch size")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="optimiser")
    g.add_argument("--lr", type=_number, default=d.lr, help="learning rate of head-only stages (LP, adv-LP)")
    g.add_argument("--lr-ft", type=_number, default=d.lr_ft,
                   help="learning rate of stages that train everything (FT, adv-FT, TRADES; RanLI / RoLI with --peft full)")
    g.add_argument("--head-init", default=d.head_init, choices=HEAD_INITS,
                   help="the new head: torch (nn.Linear's default), roli (seed 000's code: kaiming-normal "
                        "fan-out weights, bias -log 99) or zeros")
    g.add_argument("--momentum", type=_number, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=_number, default=d.weight_decay, help="weight decay")
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="learning-rate schedule, stepped per iteration")
    g.add_argument("--augment", default=d.augment, choices=AUGMENTS,
                   help="training augmentation; auto: random crop and flip for natural images, crop for digits, none for dSprites and tensors")
    g.add_argument("--val-fraction", type=_number, default=d.val_fraction, help="seeded validation split of the training data, for model selection")
    g.add_argument("--select", default=d.select, choices=SELECTS,
                   help="model selection; auto: best robust validation accuracy for adversarial stages, best clean for the others")
    g.add_argument("--amp", default=d.amp, choices=AMPS, help="mixed precision for training; auto: bf16 on CUDA, off on the CPU")
    g.add_argument("--workers", type=_whole, default=d.workers, help="data loader worker processes")
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    g = p.add_argument_group("RanLI / RoLI (seed 000) and AutoLoRa (seed 002)")
    g.add_argument("--peft", default=d.peft, choices=PEFTS,
                   help="what RanLI / RoLI's adversarial stage trains besides the head (lora, adapter, bias, "
                        "prompt: at --lr; prompt: ViTs, timm's VisionTransformer)")
    g.add_argument("--peft-rank", type=_whole, default=d.peft_rank, help="LoRA rank (--peft lora)")
    g.add_argument("--peft-alpha", type=_number, default=d.peft_alpha, help="LoRA alpha; the update is scaled by alpha / rank")
    g.add_argument("--adapter-reduction", type=_whole, default=d.adapter_reduction,
                   help="adapter bottleneck: width / reduction (--peft adapter)")
    g.add_argument("--prompt-tokens", type=_whole, default=d.prompt_tokens,
                   help="prompt tokens per block (--peft prompt)")
    g.add_argument("--prompt-depth", default=d.prompt_depth, choices=PROMPT_DEPTHS,
                   help="deep: new prompts before every block (VPT-deep, seed 000's code); shallow: before the first")
    g.add_argument("--autolora-lr", type=_number, default=d.autolora_lr, help="AutoLoRa's initial learning rate")
    g.add_argument("--autolora-rank", type=_whole, default=d.autolora_rank, help="rank of AutoLoRa's natural branch")
    g.add_argument("--autolora-alpha", type=_number, default=d.autolora_alpha, help="alpha of AutoLoRa's natural branch")
    g.add_argument("--autolora-scale", type=_number, default=d.autolora_scale, help="lambda2 = scale * a (a: the LoRA branch's accuracy)")
    g.add_argument("--autolora-rho", type=_number, default=d.autolora_rho,
                   help="halve the lr at a checkpoint epoch when fewer than rho of the epochs since the last improved")
    g.add_argument("--autolora-divide", type=_number, default=d.autolora_divide, help="the lr's divisor at a halving")
    g.add_argument("--autolora-condition2", default=d.autolora_condition2, choices=CONDITIONS,
                   help="the halving rule's second condition: the reference code's, or Auto-PGD's")
    g.add_argument("--autolora-lambda-n", type=_whole, default=d.autolora_lambda_n,
                   help="training images on which the LoRA branch's accuracy a is measured (at each epoch's "
                        "start and after each of its first three quarters)")
    g = p.add_argument_group("attack (training and evaluation; L-inf)")
    g.add_argument("--eps", default=d.eps, help="radius in pixel units, a number or a fraction")
    g.add_argument("--attack-steps", type=_whole, default=d.attack_steps, help="PGD steps of the training and validation attack")
    g.add_argument("--attack-step", default=d.attack_step, help="PGD step size in pixel units")
    g.add_argument("--trades-beta", type=_number, default=d.trades_beta, help="TRADES weight of the KL term")
    g.add_argument("--eval-steps", type=_steps_list, default=d.eval_steps,
                   help="PGD step counts of the test evaluation, comma-separated (default: 10,20); a test "
                        "point is robust only if every attack run on it fails: PGD-k accuracy counts the "
                        "points that every PGD with at most k steps left correct")
    g.add_argument("--autoattack", action="store_true",
                   help="also run AutoAttack standard on the test data (its accuracy counts the points that "
                        "it and every PGD left correct)")
    _model_options(p, with_head=False)
    g = _data_options(p, d.seed)
    g.add_argument("--n", "--n-train", dest="n", type=_n, default=None,
                   help="training images, or 'all' (default: all); it bounds every phase: --n-val, --n-test "
                        "and --score-n follow it unless given; under torchrun write --n-train (torchrun "
                        "takes --n for an abbreviation of its own options)")
    g.add_argument("--n-val", type=_n_auto, default=d.n_val,
                   help="validation images drawn from the validation split, or 'all'; auto: as many as "
                        "--n (at most the split), all without --n")
    g.add_argument("--n-test", type=_n_auto, default=d.n_test,
                   help="test images of the evaluation, or 'all'; auto: as many as --n (at most the "
                        "split), all without --n")
    g.add_argument("--score-n", type=_n_auto, default=d.score_n,
                   help=f"test images of `score` before and after transfer, or 'all'; auto: as many as "
                        f"--n-test, at most {SCORE_N_CAP}")
    g.add_argument("--score-steps", type=_whole, default=d.score_steps,
                   help="PGD steps of the scores before and after transfer (relative step 0.7)")
    g.add_argument("--no-score", action="store_true", help="skip `score` before and after transfer")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="run directory (OUT for one method, OUT/<method> for several); rerunning resumes")
    g.add_argument("--json", action="store_true", help="print the final records as JSON on stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def _score(args: argparse.Namespace) -> int:
    from rich.console import Console

    from asbound.api import DEFAULT_N, ScoreConfig, score, score_default, summary_table

    options = dict(
        eps=args.eps, norm=args.norm, steps=args.steps, rel_step=args.rel_step, restarts=args.restarts,
        random_start=not args.no_random_start, batch_size=args.batch_size, split=args.split, seed=args.seed,
        delta=args.delta, loss_cap=args.loss_cap, device=args.device, backend=args.backend,
        model_dir=args.model_dir, data_root=args.data_root, weights=args.weights, head=args.head,
        feature_layer=args.feature_layer, resize=args.resize, allow_pickle=args.allow_pickle,
        download=args.download, classes=args.classes, as_only=args.as_only, corruption=args.corruption,
        severity=args.severity, corruption_params=args.corruption_params, certify=args.certify,
        attack=args.attack, amp=args.amp, compile=args.compile, protocol=args.protocol,
    )
    progress = not args.no_progress
    if args.model is None and args.data is None:
        options["n"] = getattr(args, "n", DEFAULT_N)
        results = score_default(args.out or "runs/default", progress=progress, **options)
    else:
        if args.model is None or args.data is None:
            raise ConfigError("give both --model and --data, or neither for the embedded default")
        ScoreConfig(model=args.model, data=args.data).validated()  # spec errors before any loading
        options["n"] = getattr(args, "n", ScoreConfig.n)
        out = args.out or f"runs/{_slug(args.model)}__{_slug(args.data)}"
        results = [score(ScoreConfig(model=args.model, data=args.data), out=out, progress=progress, **options)]
    summaries = [r.summary for r in results]
    if args.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
        return 0
    console = Console()
    console.print(summary_table(summaries))
    for r in results:
        for note in r.notes:
            console.print(f"[dim]{r.summary['data']}: {note}[/dim]")
        console.print(f"records: {r.out}/points.csv, summary.json, config.json")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from rich.console import Console

    from asbound.api import TransferConfig, transfer, transfer_table

    cfg = TransferConfig(
        model=args.model or "", data=args.data or "", method=args.method, classes=args.classes, epochs=args.epochs,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, lr_ft=args.lr_ft, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, eps=args.eps, attack_steps=args.attack_steps,
        attack_step=args.attack_step, trades_beta=args.trades_beta, val_fraction=args.val_fraction,
        select=args.select, augment=args.augment, n=args.n, n_val=args.n_val, n_test=args.n_test, score_n=args.score_n, score_steps=args.score_steps,
        eval_steps=args.eval_steps, autoattack=args.autoattack, score=not args.no_score, seed=args.seed,
        device=args.device, amp=args.amp, workers=args.workers, model_dir=args.model_dir, data_root=args.data_root,
        weights=args.weights, feature_layer=args.feature_layer, resize=args.resize, allow_pickle=args.allow_pickle,
        download=args.download, peft=args.peft, peft_rank=args.peft_rank, peft_alpha=args.peft_alpha,
        adapter_reduction=args.adapter_reduction, prompt_tokens=args.prompt_tokens,
        prompt_depth=args.prompt_depth, head_init=args.head_init, autolora_lr=args.autolora_lr,
        autolora_rank=args.autolora_rank,
        autolora_alpha=args.autolora_alpha, autolora_scale=args.autolora_scale, autolora_rho=args.autolora_rho,
        autolora_divide=args.autolora_divide, autolora_condition2=args.autolora_condition2,
        autolora_lambda_n=args.autolora_lambda_n, corruption=args.corruption, severity=args.severity,
        corruption_params=args.corruption_params,
    )
    if args.model is None or args.data is None:
        raise ConfigError("give --model and --data (the pretrained model and the downstream data)")
    err = Console(stderr=True)
    results = transfer(cfg, args.out, progress=not args.no_progress, printer=lambda line: err.print(line, highlight=False, soft_wrap=True))
    if not results:  # a torchrun rank other than 0: rank 0 reports
        return 0
    finals = [r.final for r in results]
    if args.json:
        print(json.dumps(finals[0] if len(finals) == 1 else finals, indent=2))
        return 0
    console = Console()
    console.print(transfer_table(finals, title=f"asbound transfer: {cfg.model} -> {cfg.data}"
                                 + (f" (classes {cfg.classes})" if cfg.classes else "")))
    for r in results:
        console.print(f"{r.method}: --model run:{r.out}")
    return 0


# --- sweep and predict --------------------------------------------------------------------------


def _common_run_options(p: argparse.ArgumentParser, *, resize: bool = True) -> None:
    """The options a sweep's cells share (score cells; transfer cells with --method)."""
    d, t = _defaults("asbound.scoring", "ScoreConfig"), _defaults("asbound.transfer.config", "TransferConfig")
    model, data = _sweep_default()
    _model_options(p, with_head=True, default=f"score cells of the embedded default's classification, {model} on {data}")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="cifar10 | cifar100 | fashion-mnist | mnist | digits | folder:PATH | tensors:PATH | dsprites[:FACTOR]")
    g.add_argument("--data-root", help="where torchvision data sets (and the dSprites .npz) live")
    g.add_argument("--classes", help="a subset of classes, relabelled 0..k-1 in the order given")
    g.add_argument("--seed", type=_whole, default=d.seed, help="subset selection, splits and every random draw")
    if resize:
        g.add_argument("--resize", type=_whole, help="resize inputs to RESIZE x RESIZE; without it: the model's input format")
    g.add_argument("--download", action="store_true", help="download missing data sets / checkpoints")
    g.add_argument("--split", default=d.split, choices=("train", "test"), help="score cells: which split to draw from")
    g.add_argument("--n", type=_n, default=argparse.SUPPRESS,
                   help="datapoints scored per cell (transfer cells: scored before and after), or 'all' "
                        f"(default: {d.n}; {constant('asbound.scoring', 'DEFAULT_N')} for the embedded default; "
                        f"transfer cells: as many as their test images, at most "
                        f"{constant('asbound.transfer.config', 'SCORE_N_CAP')})")
    g = _pgd_options(p, d)
    g.add_argument("--as-only", action="store_true", help="score cells: the AS score alone (no labels, no loss attack)")
    g = p.add_argument_group("transfer cells (with --method)")
    g.add_argument("--method", help="make every cell a transfer run of this one method (e.g. lp), scored after; "
                   "without it: score cells. Other transfer options: use a grid file")
    g.add_argument("--epochs", type=_whole, default=t.epochs, help="epochs of each transfer cell")
    g.add_argument("--lr", type=_number, default=t.lr, help="learning rate of head-only stages")
    g.add_argument("--n-train", type=_n, default=t.n, help="training images per transfer cell, or 'all' (default: all)")
    g.add_argument("--n-test", type=_n_auto, default=t.n_test,
                   help="test images of the evaluation, 'all', or 'auto': as many as --n-train (all without it)")
    _executor_options(p)


def _pgd_options(p: argparse.ArgumentParser, d: object) -> argparse._ArgumentGroup:
    """The scores' PGD options (sweeps, predict), with ``d``'s defaults."""
    g = p.add_argument_group("attack")
    g.add_argument("--eps", default=d.eps, help="radius in pixel units, a number or a fraction")
    g.add_argument("--norm", default=d.norm, help="inf or 2")
    g.add_argument("--attack", default=d.attack, choices=ATTACK_CHOICES, help=f"the scores' attack; {ATTACK_HELP}")
    g.add_argument("--steps", type=_whole, default=d.steps, help="gradient steps of the scores")
    g.add_argument("--rel-step", type=_number, default=d.rel_step,
                   help=f"(initial) step size relative to eps {REL_STEP_DEFAULT}")
    g.add_argument("--restarts", type=_whole, default=d.restarts, help="random restarts of each attack")
    g.add_argument("--batch-size", type=_whole, default=d.batch_size, help="datapoints per batch")
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    return g


def _executor_options(p: argparse.ArgumentParser) -> None:
    EXECUTORS = constant("asbound.sweep.engine", "EXECUTORS")

    g = p.add_argument_group("executor")
    g.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: in this process; submitit-local: a subprocess per cell; slurm: a Slurm job per cell "
                        "(both through submitit: pip install 'asbound[slurm]')")
    g.add_argument("--slurm-partition", help="Slurm partition (default: the cluster's)")
    g.add_argument("--slurm-time", type=_whole, default=240, help="minutes per cell job")
    g.add_argument("--slurm-gpus", type=_whole, default=0, help="GPUs per cell job")
    g.add_argument("--slurm-cpus", type=_whole, default=4, help="CPUs per cell job")
    g.add_argument("--slurm-mem-gb", type=_whole, help="memory per cell job (default: the cluster's)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="sweep directory: OUT/sweep.json and one run directory per cell; "
                   "rerunning reruns only the cells not done")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (on stderr)")


def _sweep_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "sweep", help="grids of score or transfer runs: corruption shift, eps multiples, input sizes, or a grid file",
        description="Run a grid of ordinary score (or transfer) runs, one directory per cell, locally or on a "
                    "cluster through submitit. Cells already done are reused; an interrupted sweep reruns only "
                    "what is missing. Tables: asbound table OUT --style shift|eps|resize.",
    )
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    fmt = _DefaultsFormatter
    s = kinds.add_parser("shift", help="the uncorrupted data and each corruption at each severity (seed 001 Tables 12, 13)",
                         formatter_class=fmt)
    g = s.add_argument_group("shift")
    g.add_argument("--corruption", required=True, help="corruptions, comma-separated (e.g. gaussian_noise,zoom_blur)")
    g.add_argument("--severity", default="1,2,5", help="severities 1-5, comma-separated")
    g.add_argument("--corruption-params", default="auto", choices=("auto", "cifar", "imagenet"),
                   help="parameter set: CIFAR-10-C's constants (32x32 data) or ImageNet-C's (imagecorruptions); "
                        "auto: CIFAR-10-C where it defines the corruption")
    _common_run_options(s)
    s = kinds.add_parser("eps", help="the same points at eps times each multiple (seed 001 Table 8)", formatter_class=fmt)
    s.add_argument("--multiples", default="1,2,3", help="multiples of --eps, comma-separated")
    _common_run_options(s)
    s = kinds.add_parser("resize", help="inputs resized to each side (seed 001 Table 10)", formatter_class=fmt)
    s.add_argument("--sizes", required=True, help="sides in pixels, comma-separated (e.g. 256,128,64)")
    _common_run_options(s, resize=False)
    s = kinds.add_parser("grid", help="the cartesian product of a TOML grid file's lists", formatter_class=fmt,
                         description="A grid file: run = \"score\" | \"transfer\"; [base] options every cell shares; "
                                     "[grid] lists, one cell per combination (keys: the fields of ScoreConfig / "
                                     "TransferConfig, e.g. eps, seed, method, corruption, severity, resize).")
    s.add_argument("--config", required=True, help="the TOML grid file")
    s.add_argument("--device", help="override the grid's device for every cell")
    _executor_options(s)


def _sweep_default() -> "tuple[str, str]":
    """(model, data) of a sweep without --model and --data: the embedded default's Theorem 2 row,
    shape classification (the sweep tables read accuracies and the Theorem 2 criterion, which its
    orientation regression row has not)."""
    model, data = constant("asbound.scoring", "DEFAULT_RUNS")[1]
    return model, data


#: a sweep's options that only one kind of cell takes: option dest -> the config field it sets
_SCORE_CELL_ONLY = {"head": "head", "split": "split", "as_only": "as_only", "attack": "attack", "rel_step": "rel_step",
                    "restarts": "restarts"}
_TRANSFER_CELL_ONLY = {"epochs": "epochs", "lr": "lr", "n_train": "n", "n_test": "n_test"}


def _sweep_base(args: argparse.Namespace) -> "tuple[str, dict]":
    from asbound.api import DEFAULT_N, ScoreConfig, TransferConfig

    model, data = args.model, args.data
    n = getattr(args, "n", ScoreConfig.n)
    if model is None and data is None:
        if args.method is not None:
            raise ConfigError("transfer cells (--method) need --model and --data; without both, a sweep scores "
                              "the embedded default")
        model, data = _sweep_default()
        n = getattr(args, "n", DEFAULT_N)
    elif model is None or data is None:
        raise ConfigError("give both --model and --data, or neither for the embedded default")
    # an option the cells would not use is refused, not dropped
    config, only = (TransferConfig, _TRANSFER_CELL_ONLY) if args.method is None else (ScoreConfig, _SCORE_CELL_ONLY)
    unused = ["--" + dest.replace("_", "-") for dest, field in only.items()
              if hasattr(args, dest) and getattr(args, dest) != getattr(config, field)]
    if unused:
        cells = "score cells (without --method)" if args.method is None else "transfer cells (--method)"
        raise ConfigError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to {cells}; "
                          f"leave {'it' if len(unused) == 1 else 'them'} out, or use a grid file")
    shared = dict(model=model, data=data, classes=args.classes, seed=args.seed, eps=args.eps,
                  batch_size=args.batch_size, device=args.device, model_dir=args.model_dir, data_root=args.data_root,
                  weights=args.weights, feature_layer=args.feature_layer, allow_pickle=args.allow_pickle,
                  download=args.download)
    if getattr(args, "resize", None) is not None:
        shared["resize"] = args.resize
    if args.method is None:
        return "score", dict(shared, norm=args.norm, steps=args.steps, rel_step=args.rel_step, restarts=args.restarts,
                             attack=args.attack, n=n, split=args.split, head=args.head, as_only=args.as_only)
    if "," in args.method:
        raise ConfigError(f"--method {args.method}: a sweep's transfer cells run one method each; "
                          f"use a grid file with method as an axis for several")
    if args.norm not in ("inf", "Linf", "linf"):
        raise ConfigError("transfer cells attack in L-inf; leave --norm out with --method")
    # without --n, a transfer cell scores as transfer does: as many test images as it evaluates, at most 1000
    return "transfer", dict(shared, method=args.method, epochs=args.epochs, lr=args.lr, n=args.n_train,
                            n_test=args.n_test, score_n=getattr(args, "n", TransferConfig.score_n),
                            score_steps=args.steps)


def _sweep(args: argparse.Namespace, argv: "Sequence[str]") -> int:
    from rich.console import Console

    from asbound.api import SlurmOptions, eps_sweep, grid_sweep, resize_sweep, run_sweep, shift_sweep
    from asbound.sweep.grid import parse_list

    if args.kind == "grid":
        sweep = grid_sweep(args.config, {"device": args.device})
    else:
        run, base = _sweep_base(args)
        if args.kind == "shift":
            sweep = shift_sweep(base, parse_list(args.corruption, str, "--corruption"),
                                parse_list(args.severity, int, "--severity"), run=run, params=args.corruption_params)
        elif args.kind == "eps":
            sweep = eps_sweep(base, args.eps, parse_list(args.multiples, float, "--multiples"), run=run)
        else:
            sweep = resize_sweep(base, parse_list(args.sizes, int, "--sizes"), run=run)
    err = Console(stderr=True)
    slurm = SlurmOptions(partition=args.slurm_partition, time_min=args.slurm_time, gpus_per_node=args.slurm_gpus,
                         cpus_per_task=args.slurm_cpus, mem_gb=args.slurm_mem_gb)
    result = run_sweep(sweep, args.out, executor=args.executor, command=_command(argv), progress=not args.no_progress,
                       slurm=slurm, printer=lambda line: err.print(line, highlight=False, soft_wrap=True))
    console = Console()
    console.print(f"sweep {args.out}: {len(result.reused)} cells reused, {len(result.ran)} run, "
                  f"{len(result.failed)} failed")
    style = {"grid": "lemma1"}.get(sweep.kind, sweep.kind)
    console.print(f"table: asbound table {args.out} --style {style}", highlight=False)
    if result.failed:
        for name, error in result.failed.items():
            print(f"asbound: error: cell {name}: {error}", file=sys.stderr)
        return 1
    return 0


def _predict_parser(sub: "argparse._SubParsersAction") -> None:
    MEASURES = constant("asbound.predict", "MEASURES")

    d = _defaults("asbound.predict", "PredictConfig")
    p = sub.add_parser(
        "predict", help="will robustness transfer? the AS score on unlabelled pretraining and downstream data",
        description="Score the representation on the pretraining data and on each downstream task (no labels "
                    "needed) and predict from AS(downstream) / AS(pretraining) whether robustness transfers by "
                    "linear probing (seed 001 section 6.1). With --head-norm, Lemma 1 bounds the increase of the "
                    "adversarial loss. With --measure lp, each task is also linear-probed and the Spearman rank "
                    "correlation between the predicted ratio and the measured (robust CE - CE) / CE is reported.",
        formatter_class=_DefaultsFormatter,
    )
    _model_options(p, with_head=False)
    g = p.add_argument_group("data")
    g.add_argument("--pretrain-data", required=True, help="the (unlabelled) pretraining data, a data spec")
    g.add_argument("--pretrain-classes", help="a class subset of the pretraining data (e.g. 0-4)")
    g.add_argument("--data", required=True,
                   help="downstream tasks, comma-separated data specs with optional modifiers "
                        "@classes=LIST, @corruption=NAME:SEVERITY, @resize=SIDE (e.g. cifar10,digits@classes=5-9)")
    g.add_argument("--data-root", help="where torchvision data sets (and the dSprites .npz) live")
    g.add_argument("--download", action="store_true", help="download missing data sets / checkpoints")
    g.add_argument("--n", type=_n, default=d.n, help="datapoints scored per data set, or 'all'")
    g.add_argument("--seed", type=_whole, default=d.seed, help="subset selection and every random draw")
    _pgd_options(p, d)
    g = p.add_argument_group("prediction")
    g.add_argument("--threshold", type=_number, default=d.threshold,
                   help="AS ratio up to which robustness is predicted to transfer by LP")
    g.add_argument("--head-norm", help="max_k ||w_k||_2 of the downstream head, a number, or run:DIR of an LP run: "
                   "Lemma 1 then bounds the mean increase of the CE under attack by 2 * B * AS")
    g.add_argument("--measure", default=",".join(d.measure), help=f"also train and measure, comma-separated: {', '.join(MEASURES)} "
                   "(lp: the relative CE increase; lp,adv-lp: also seed 000's predictor)")
    g.add_argument("--epochs", type=_whole, default=d.epochs, help="epochs of the measuring LP runs")
    g.add_argument("--n-train", type=_n, default=None, help="training images of the LP runs, or 'all' (default: all)")
    g.add_argument("--n-test", type=_n, default=argparse.SUPPRESS,
                   help="test images of the LP runs' evaluation, or 'all' (default: as many as --n)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="OUT/predict.json and one run directory per attack; rerunning resumes")
    g.add_argument("--json", action="store_true", help="print predict.json on stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")


def _predict(args: argparse.Namespace, argv: "Sequence[str]") -> int:
    from rich.console import Console

    from asbound.api import PredictConfig, predict, predict_table

    cfg = PredictConfig(
        model=args.model or "", pretrain_data=args.pretrain_data, data=args.data, pretrain_classes=args.pretrain_classes,
        eps=args.eps, norm=args.norm, steps=args.steps, rel_step=args.rel_step, restarts=args.restarts, n=args.n,
        seed=args.seed, attack=args.attack,
        batch_size=args.batch_size, threshold=args.threshold, head_norm=args.head_norm, measure=args.measure,
        epochs=args.epochs, n_train=args.n_train, n_test=getattr(args, "n_test", "as-n"), device=args.device,
        model_dir=args.model_dir,
        data_root=args.data_root, weights=args.weights, feature_layer=args.feature_layer,
        allow_pickle=args.allow_pickle, download=args.download,
    )
    if not args.model:
        raise ConfigError("give --model (the pretrained representation)")
    err = Console(stderr=True)
    rec = predict(cfg, args.out, progress=not args.no_progress, command=_command(argv),
                  printer=lambda line: err.print(line, highlight=False, soft_wrap=True))
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    console = Console()
    console.print(predict_table(rec))
    for name, s in (rec.get("spearman") or {}).items():
        if s:
            console.print(f"Spearman {name.replace('_', ' ')}: rho {s['rho']:.3f} (p {s['p']:.3g}, {s['n']} tasks)")
    console.print("AS is a PGD estimate (a lower bound on the sensitivity), so the ratio and 2 B AS are estimates.")
    console.print(f"records: {args.out}/predict.json; table: asbound table {args.out} --style predict", highlight=False)
    return 0


# --- table and plot ------------------------------------------------------------------------------


def _table_parser(sub: "argparse._SubParsersAction") -> None:
    FORMATS, STYLES = constant("asbound.report.tables", "FORMATS"), constant("asbound.report.tables", "STYLES")

    p = sub.add_parser(
        "table", help="seed 001's tables from stored run records (console, Markdown, LaTeX, CSV)",
        description="Render a paper-style table from run directories (score, transfer, sweep, predict, or folders "
                    "of them), from their records only: nothing is recomputed. lemma1: Tables 1, 2, 7; theorem2: "
                    "Table 3; transfer: Tables 5, 9; shift: Tables 12, 13; eps: Table 8; resize: Table 10; "
                    "predict: Table 4; certify: runs of score --certify. On a terminal (no --out) the table is laid "
                    "out for its width; piped, redirected or with --out, it is Markdown unless --format says "
                    "otherwise: 'asbound table RUN --style S > t.md' writes Markdown.",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--style", required=True, choices=STYLES, help="which table")
    p.add_argument("--format", choices=(*FORMATS, "console"),
                   help="md: Markdown, tex: LaTeX (booktabs), csv; console: laid out for the terminal's width "
                        "(COLUMNS; 80 with --out), wide tables split into several with their row labels repeated. "
                        "Default: console on a terminal, md when piped, redirected or with --out; a format given "
                        "is always the one used")
    p.add_argument("--out", help="write the table to this file (default: print it)")


def _plot_parser(sub: "argparse._SubParsersAction") -> None:
    KINDS = constant("asbound.report.plots", "KINDS")

    p = sub.add_parser(
        "plot", help="figures from stored run records (PNG and PDF)",
        description="Draw a figure from run directories' records: lhs-rhs (Lemma 1), margin-vs-sensitivity "
                    "(Theorem 2 per datapoint), shift, eps (sweeps), predict (predicted against measured).",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--kind", required=True, choices=KINDS, help="which figure")
    p.add_argument("--out", required=True, help="FIG.png or FIG.pdf: both are written")


def _table(args: argparse.Namespace, argv: "Optional[Sequence[str]]" = None) -> int:
    import shutil

    from asbound.api import render, table

    terminal = args.out is None and sys.stdout.isatty()
    fmt = args.format or ("console" if terminal else "md")
    width = shutil.get_terminal_size().columns if args.out is None else 80  # COLUMNS, the terminal's, or 80
    text = render(table(args.runs, args.style), fmt, command=_command(argv), width=width, styled=terminal)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    from asbound.records import write_output

    print(f"table: {write_output(args.out, lambda f: f.write(text.encode()))}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from asbound.api import plot

    for path in plot(args.runs, args.kind, args.out):
        print(f"figure: {path}")
    return 0


def _command(argv: "Optional[Sequence[str]]") -> str:
    import shlex

    return "asbound " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed on one line
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        if args.command == "score":
            return _score(args)
        if args.command == "transfer":
            return _transfer(args)
        if args.command == "sweep":
            return _sweep(args, argv)
        if args.command == "predict":
            return _predict(args, argv)
        if args.command == "table":
            return _table(args, argv)
        if args.command == "plot":
            return _plot(args)
    except AsboundError as exc:
        # one line, whatever the message holds (an underlying library's error may span several)
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"asbound: error: {message or type(exc).__name__}", file=sys.stderr, flush=True)
        _leave_process_group()
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "asbound: interrupted; the records and checkpoints written so far are kept, rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        return 130
    return 0


def _leave_process_group() -> None:
    """A torchrun rank stopping on an error leaves its process group (else gloo aborts it at exit)."""
    if "torch" in sys.modules:
        from asbound.distributed import leave

        leave()


if __name__ == "__main__":
    sys.exit(main())
