"""Data sets as pixels in [0, 1]: torchvision sets, scikit-learn's digits, image folders, tensors
files, dSprites.

``load_data(spec, ...)`` is the one entry point (see :mod:`asbound.data.loaders`); it returns a
lazy :class:`DataSet` read batch by batch (``batch``, ``loader``).
"""

from asbound.data.augment import AUGMENTS, resolve_augment
from asbound.data.base import DataSet
from asbound.data.dsprites import (
    DSPRITES_SIZE,
    LATENT_NAMES,
    LATENT_SIZES,
    SHAPE_NAMES,
    dsprites_index,
    dsprites_latents,
    render_dsprites,
)
from asbound.data.loaders import (
    SPLITS,
    default_data_root,
    load_data,
    select_indices,
    validation_split,
)
from asbound.data.sources import DIGITS_SIZE

__all__ = [
    "AUGMENTS",
    "DIGITS_SIZE",
    "DSPRITES_SIZE",
    "DataSet",
    "LATENT_NAMES",
    "LATENT_SIZES",
    "SHAPE_NAMES",
    "SPLITS",
    "default_data_root",
    "dsprites_index",
    "dsprites_latents",
    "load_data",
    "render_dsprites",
    "resolve_augment",
    "select_indices",
    "validation_split",
]
