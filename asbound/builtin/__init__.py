"""The small models shipped with asbound, for offline runs and demos.

Each ``builtin:NAME[/HEAD]`` is a representation with one or more linear heads; the weights and
the records of the runs that made them come from ``analyses/train_builtin.py``:

* ``lenet-{random,standard,adversarial}``: the LeNet of seed 001 Table 6 on 64x64 dSprites, at
  random initialisation, trained on orientation regression, and adversarially trained on it
  (seed 001 B.2); heads for every dSprites factor (``orientation``, ``scale``, ``posx``,
  ``posy``: regression; ``shape``: 3 classes), fitted by linear probing;
* ``lenet-shape-{standard,adversarial}``: the same LeNet trained to classify the dSprites shape
  (standard, and adversarially), with the same linear-probe heads;
* ``digits-{random,standard,adversarial}``: a small CNN (:mod:`asbound.builtin.digits`) on
  scikit-learn's 8x8 digits 0-4, random, trained, and adversarially trained; head ``digits0-4``
  (the pretraining classifier, 5 classes), for transfer to digits 5-9;
* ``lenet-reference``: a layout without shipped weights, the LeNet as the seed paper's code
  built it (:mod:`asbound.builtin.reference`: affine-free batch norms, head ``fc``); its
  weights are a state dict of that code, given with ``--weights PATH``.
* ``lenet-paper-{random,standard,adversarial}``: the LeNet in that layout, made as the code
  behind seed 001's Table 7 made its three (``analyses/train_builtin.py --protocol paper``,
  records in ``reports/paper-lenets/``): random (seed 0), trained on orientation regression on
  the whole train split (589,824 images, 10 epochs, Adam), and adversarially trained with L-inf
  PGD-20 at 8/255 on 20,000 of those images (10 epochs); batch-norm statistics re-estimated on
  clean images, heads fitted on targets scaled to [0, 1], as ``--protocol paper`` reads dSprites.

Without ``/HEAD`` the head is the dSprites factor of ``--data`` when the model has it, else the
model's default head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from asbound.errors import ModelError
from asbound.specs import InputFormat, ModelSpec

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Architecture:
    build: Callable[[int], nn.Module]  # number of outputs -> model with .features and .head
    input_format: InputFormat


def _lenet(k: int) -> nn.Module:
    from asbound.builtin.lenet import LeNet

    return LeNet(num_outputs=k)


def _reference(k: int) -> nn.Module:
    from asbound.builtin.reference import ReferenceLeNet

    return ReferenceLeNet(num_outputs=k)


def _digits(k: int) -> nn.Module:
    from asbound.builtin.digits import DigitsNet

    return DigitsNet(num_outputs=k)


ARCHITECTURES = {
    "lenet": Architecture(_lenet, InputFormat(1, 64, 64)),
    "digits-cnn": Architecture(_digits, InputFormat(1, 8, 8)),
    "lenet-reference": Architecture(_reference, InputFormat(1, 64, 64)),
}

BUILTINS = {
    "lenet-random": "LeNet (seed 001 Table 6), random initialisation, linear-probe heads",
    "lenet-standard": "LeNet trained on dSprites orientation regression, linear-probe heads",
    "lenet-adversarial": "LeNet adversarially trained (L-inf PGD) on dSprites orientation, linear-probe heads",
    "lenet-shape-standard": "LeNet trained to classify the dSprites shape, linear-probe heads",
    "lenet-shape-adversarial": "LeNet adversarially trained to classify the dSprites shape, linear-probe heads",
    "digits-random": "digits CNN, random initialisation, head digits0-4 fitted by linear probing",
    "digits-standard": "digits CNN trained on digits 0-4",
    "digits-adversarial": "digits CNN adversarially trained (L-inf PGD) on digits 0-4",
    "lenet-paper-random": "LeNet in the seed code's layout, random init; heads on targets in [0, 1] "
                          "(--protocol paper)",
    "lenet-paper-standard": "LeNet in the seed code's layout trained on orientation, 589,824 images x 10 "
                            "epochs; heads on targets in [0, 1] (--protocol paper)",
    "lenet-paper-adversarial": "LeNet in the seed code's layout, adversarial (L-inf PGD-20, 8/255) at 20,000 "
                               "images x 10 epochs; heads on targets in [0, 1] (--protocol paper)",
    "lenet-reference": "LeNet in the layout of the seed paper's code (affine-free batch norms, head fc); "
                       "weights: a state dict of that layout given with --weights PATH",
}
#: builtins that are layouts only: their weights come with ``--weights PATH``
LAYOUTS = ("lenet-reference",)
#: the heads of the dSprites LeNets (kept for the training script)
HEADS = ("orientation", "scale", "posx", "posy", "shape")
DEFAULT_HEAD = "orientation"
INPUT_FORMAT = ARCHITECTURES["lenet"].input_format


def list_builtins() -> "list[str]":
    return sorted(BUILTINS)


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.pt"


def load_checkpoint(name: str) -> dict:
    """The shipped state: ``{"arch", "features": state_dict, "heads": {name: {weight, bias}},
    "default_head", "meta"}`` (the first LeNets predate ``arch`` and ``default_head``)."""
    path = weights_path(name)
    if not path.is_file():
        raise ModelError(
            f"the weights of builtin:{name} are missing at {path}; reinstall asbound or "
            f"regenerate them with `python analyses/train_builtin.py`"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def load_builtin(
    name: str, head: Optional[str], data_factor: Optional[str] = None, weights: "str | Path | None" = None,
) -> "tuple[nn.Module, InputFormat, list[str], ModelSpec]":
    """Build ``builtin:NAME/HEAD``. Without ``head``: the data's dSprites factor when the model has
    a head for it, else the model's default head. A layout (:data:`LAYOUTS`) takes its whole
    state dict from ``weights`` and has the one head that state dict holds."""
    if name not in BUILTINS:
        raise ModelError(f"unknown builtin model {name!r}; valid: {', '.join(list_builtins())}")
    if name in LAYOUTS:
        return _load_layout(name, head, weights)
    if weights is not None:
        raise ModelError(f"builtin:{name} ships its weights; --weights applies to the layouts "
                         f"{', '.join('builtin:' + n for n in LAYOUTS)} and to torchvision:ARCH")
    state = load_checkpoint(name)
    heads = state["heads"]
    if head is None:
        head = data_factor if data_factor in heads else state.get("default_head", DEFAULT_HEAD)
    if head not in heads:
        raise ModelError(f"builtin:{name} has no head {head!r}; valid heads: {', '.join(heads)}")
    arch_name = state.get("arch", "lenet")
    arch = ARCHITECTURES[arch_name]
    model = arch.build(heads[head]["weight"].shape[0])
    if arch_name == "lenet-reference":  # one state dict, the head named fc
        model.load_state_dict({**state["features"], **{f"fc.{k}": v for k, v in heads[head].items()}},
                              strict=True)
    else:
        model.features.load_state_dict(state["features"], strict=True)
        model.head.load_state_dict(heads[head], strict=True)
    notes = [f"builtin weights {weights_path(name).name}, head {head}"]
    meta = state.get("meta", {})
    if meta.get("bn_statistics"):
        notes.append(f"batch-norm statistics: {meta['bn_statistics']}")
    if meta.get("targets", "values") != "values":  # as a named protocol reads dSprites, not as asbound's
        units = {"minmax": "scaled to [0, 1] (minmax)"}.get(meta["targets"], f"in {meta['targets']} units")
        notes.append(f"heads fitted on dSprites targets {units}, as --protocol "
                     f"{meta.get('protocol', 'paper')} reads them")
    return model.eval(), arch.input_format, notes, ModelSpec("builtin", name, head=head)


def _load_layout(name: str, head: Optional[str], weights: "str | Path | None"
                 ) -> "tuple[nn.Module, InputFormat, list[str], ModelSpec]":
    from asbound.builtin.reference import read_reference_state

    if weights is None:
        raise ModelError(f"builtin:{name} is a layout without shipped weights; give its state dict "
                         f"with --weights PATH (a Model_dsprites state dict of the seed paper's code)")
    if head is not None:
        raise ModelError(f"builtin:{name} has the one head its --weights hold; drop /{head}")
    model, _ = read_reference_state(weights)
    path = Path(weights).expanduser().resolve()
    notes = [f"weights {path} (layout {name}, weights_only=True)"]
    return model, ARCHITECTURES[name].input_format, notes, ModelSpec("builtin", name)
