"""Scoring protocols: asbound's own, and those of the seed paper's code, chosen on purpose.

asbound's protocol (``asbound``, the default) states every choice in principled units: inputs
are pixels in [0, 1], ``eps`` is in pixels, the threat set is clipped to [0, 1], dSprites is
split by a seeded permutation and its regression targets are the latent values. The seed
paper's code made other choices; a named protocol reproduces them so that its numbers can be
checked (``--protocol NAME``). Each protocol resolves to settings that ``score`` records in
``config.json``:

* ``targets``: units of dSprites regression targets (``values``, ``classes``, ``minmax``);
* ``split``: how dSprites is split (``seeded``, ``ordered``: the official order,
  ``whole``: no split);
* ``box``: the box the attacks clip to, in the units of the model's inputs; ``eps`` is in the
  same units. A box other than [0, 1] is scored exactly through an affine change of variables:
  the data become ``(x - lo) / (hi - lo)``, the model reads ``lo + (hi - lo) z`` and the attack
  runs with ``eps / (hi - lo)`` in [0, 1].

Protocols (the reference code is ``lf-tcho/robustness_transfer``):

* ``paper``: the code of seed 001's Table 7 (branch ``harsh/rep_attack``): targets scaled to
  [0, 1], the whole set (its evaluation loader ignores the train/test split), box [0, 1];
* ``dsprites-exp``: the code that made the authors' checkpoint ``orientation.pth`` and its
  result JSON (branch ``dsprites-exp``): latent class indices as targets, the ordered split,
  box [-1, 1] (foolbox bounds (-1, 1) on pixel inputs: the ``Normalize(0.5, 0.5)`` it lists
  is never applied, its dSprites dataset ignores transforms).

Batch norm is a property of the model, not of the protocol: the affine-free layout is
``builtin:lenet-reference``, and how a builtin's running statistics were set is recorded with
its weights and reported in the run's notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from asbound.data.base import DataSet
from asbound.data.dsprites import dsprites_source
from asbound.data.loaders import default_data_root, select_indices
from asbound.data.transforms import plan_transform
from asbound.errors import ConfigError
from asbound.specs import DataSpec, InputFormat


@dataclass(frozen=True)
class Protocol:
    name: str
    targets: str
    split: str
    box: "tuple[float, float]"
    about: str

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_PROTOCOL

    @property
    def width(self) -> float:
        return self.box[1] - self.box[0]

    def settings(self) -> dict:
        """What ``config.json`` records under ``protocol_settings``."""
        return {"targets": self.targets, "split": self.split, "box": list(self.box), "about": self.about}


DEFAULT_PROTOCOL = "asbound"
PROTOCOLS = {
    "asbound": Protocol("asbound", "values", "seeded", (0.0, 1.0),
                        "pixels in [0, 1], eps in pixels, latent values, seeded 80/20 split"),
    "paper": Protocol("paper", "minmax", "whole", (0.0, 1.0),
                      "seed 001 Table 7 code: targets scaled to [0, 1], the whole set, box [0, 1]"),
    "dsprites-exp": Protocol("dsprites-exp", "classes", "ordered", (-1.0, 1.0),
                             "dsprites-exp checkpoint code: class-index targets, ordered split, "
                             "box [-1, 1] on pixel inputs, eps in those units"),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"protocol {name!r} is not valid; valid: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


class FromUnitBox(nn.Module):
    """``z -> lo + (hi - lo) z``: a model on the box [lo, hi] read from the unit box."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.width = float(lo), float(hi - lo)

    def forward(self, z: Tensor) -> Tensor:
        return z * self.width + self.lo

    def extra_repr(self) -> str:
        return f"box=[{self.lo:g}, {self.lo + self.width:g}]"


class _UnitBoxData:
    """A :class:`DataSet` whose images ``x`` (in [lo, hi]) are returned as ``(x - lo) / (hi - lo)``."""

    def __init__(self, data: DataSet, lo: float, hi: float) -> None:
        self._data, self._lo, self._width = data, float(lo), float(hi - lo)
        shift = f"x + {-lo:g}" if lo < 0 else f"x - {lo:g}"
        self.transforms = [*data.transforms, f"box [{lo:g}, {hi:g}] read as [0, 1]: ({shift}) / {hi - lo:g}"]

    def __getattr__(self, name: str) -> object:
        return getattr(self._data, name)

    def __len__(self) -> int:
        return len(self._data)

    def batch(self, sel: "Tensor") -> Tensor:
        return (self._data.batch(sel) - self._lo) / self._width


def wrap_model(protocol: Protocol, module: nn.Module) -> nn.Module:
    """The model as the attack sees it under ``protocol`` (unchanged on the box [0, 1])."""
    if protocol.box == (0.0, 1.0):
        return module
    return nn.Sequential(FromUnitBox(*protocol.box), module).eval()


def wrap_data(protocol: Protocol, data: DataSet) -> DataSet:
    """The data as the attack sees them under ``protocol`` (unchanged on the box [0, 1])."""
    if protocol.box == (0.0, 1.0):
        return data
    return _UnitBoxData(data, *protocol.box)  # type: ignore[return-value]


def load_protocol_data(
    protocol: Protocol, spec: DataSpec, *, root: Optional[str], split: str, n: Optional[int], seed: int,
    input_format: Optional[InputFormat],
) -> DataSet:
    """``split`` of dSprites as ``protocol`` draws it (its split order and target units); ``n``
    rows drawn by a permutation seeded with ``seed``, as :func:`asbound.data.load_data` does."""
    if spec.source != "dsprites":
        raise ConfigError(f"--protocol {protocol.name} reproduces the seed paper's dSprites code and applies "
                          f"to dsprites:FACTOR data only, not {spec}")
    data_root = default_data_root() if root is None else Path(root).expanduser()
    raw = dsprites_source(spec.factor or "orientation", data_root, split, order=protocol.split,
                          units=protocol.targets)
    pos = select_indices(raw.size, n, seed)
    y = raw.targets(pos)
    what = f"data set {spec} ({raw.source})"
    plan, transforms = plan_transform(raw.channels, raw.sizes_of(pos), input_format, None, what)
    split_name = "whole set" if protocol.split == "whole" else f"{split} split ({protocol.split})"
    transforms = [f"dSprites {split_name}, targets in {protocol.targets}", *transforms]
    index, rows = raw.index_of(pos), pos
    if raw.preload is not None:
        raw, rows = raw.preload(pos), torch.arange(len(pos))
    return DataSet(spec=str(spec), split=split, task=raw.task, num_classes=raw.num_classes,
                   class_names=raw.class_names, source=raw.source, transforms=transforms,
                   index=index, y=y, raw=raw,
                   rows=rows, plan=plan)
