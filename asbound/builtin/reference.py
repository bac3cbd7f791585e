"""The dSprites LeNet in the layout of the seed paper's code (``Model_dsprites``).

Same layers as :class:`asbound.builtin.lenet.LeNet` (seed 001, Table 6), but

* every batch norm is affine-free (``affine=False``): it only standardises with its running
  statistics, it has no scale or shift of its own;
* the modules carry the names of the authors' state dicts: ``feature_extractor`` (the two
  convolutions), ``linear_projections`` (layers 3 and 4), ``linear_projections_output``
  (layer 5) and the head ``fc``.

So a state dict saved by the authors' training scripts loads into :class:`ReferenceLeNet`
unchanged (:func:`read_reference_state`). Their later scripts also registered the body a
second time as ``feats`` (the same modules under a second name); those duplicate entries are
checked to be equal and dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from asbound.errors import ModelError, describe

FEATURE_DIM = 84
#: the spatial side after the two convolutions and poolings of a 64x64 input
_SIDE = ((64 - 4) // 2 - 4) // 2


class ReferenceLeNet(nn.Module):
    """Table 6 LeNet with affine-free batch norms and the reference code's module names.

    ``features(x)`` is the 84-dimensional representation (layer 5 after its batch norm),
    ``forward(x)`` the head ``fc`` on it: ``[N, 1, 64, 64] -> [N, K]``.
    """

    def __init__(self, num_outputs: int = 1) -> None:
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.AvgPool2d(2), nn.BatchNorm2d(6, affine=False),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2), nn.BatchNorm2d(16, affine=False),
        )
        self.linear_projections = nn.Sequential(
            nn.Linear(16 * _SIDE * _SIDE, 120), nn.ReLU(), nn.BatchNorm1d(120, affine=False),
            nn.Linear(120, 84), nn.ReLU(), nn.BatchNorm1d(84, affine=False),
        )
        self.linear_projections_output = nn.Sequential(
            nn.Linear(84, FEATURE_DIM), nn.ReLU(), nn.BatchNorm1d(FEATURE_DIM, affine=False),
        )
        self.fc = nn.Linear(FEATURE_DIM, num_outputs)

    def features(self, x: Tensor) -> Tensor:
        h = self.feature_extractor(x).flatten(1)
        return self.linear_projections_output(self.linear_projections(h))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def body_state(self) -> "dict[str, Tensor]":
        """The state of everything but the head (the ``features`` entry of a builtin)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("fc.")}


def _drop_duplicates(state: "dict[str, Tensor]", source: str) -> "dict[str, Tensor]":
    """Drop the ``feats.*`` aliases of a state dict that registered the body twice, after
    checking that each alias holds the same tensor as the entry it duplicates."""
    aliases = [k for k in state if k.startswith("feats.")]
    if not aliases:
        return state
    names = {"0": "feature_extractor", "2": "linear_projections", "3": "linear_projections_output"}
    for key in aliases:
        part = key.split(".")
        original = ".".join([names.get(part[1], "?"), *part[2:]])
        if original not in state or not torch.equal(state[original], state[key]):
            raise ModelError(f"{source}: {key} does not duplicate {original}; expected the layout "
                             f"of builtin:lenet-reference (a Model_dsprites state dict)")
    return {k: v for k, v in state.items() if not k.startswith("feats.")}


def read_reference_state(path: "str | Path") -> "tuple[ReferenceLeNet, dict[str, Tensor]]":
    """Load a ``Model_dsprites`` state dict (``torch.load(..., weights_only=True)``, mapped to
    the CPU) into a :class:`ReferenceLeNet` with as many outputs as its ``fc`` has; return the
    model (in eval mode) and the state as read."""
    p = Path(path).expanduser()
    source = f"--weights {p}"
    if not p.is_file():
        raise ModelError(f"{source} does not exist; builtin:lenet-reference needs a state dict of "
                         f"that layout (torch.save(model.state_dict(), PATH))")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{source} is not loadable with weights_only=True ({describe(exc)}); "
                         f"save a state dict with torch.save(model.state_dict(), PATH)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{source} holds a {type(state).__name__}, not a state dict of tensors")
    state = _drop_duplicates(state, source)
    weight = state.get("fc.weight")
    if not (isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == FEATURE_DIM):
        raise ModelError(f"{source} has no head fc.weight of shape [K, {FEATURE_DIM}]; expected the "
                         f"layout of builtin:lenet-reference (a Model_dsprites state dict)")
    model = ReferenceLeNet(int(weight.shape[0]))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(f"{source} does not fit builtin:lenet-reference: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{source} does not fit builtin:lenet-reference ({describe(exc)})") from None
    return model.eval(), state
