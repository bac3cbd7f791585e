"""Data sets as pixels in [0, 1]: torchvision sets, image folders, tensors files, dSprites.

``load_data(spec, ...)`` is the one entry point; see :mod:`asbound.data.loaders`.
"""

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
from asbound.data.loaders import SPLITS, default_data_root, load_data, select_indices

__all__ = [
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
    "select_indices",
]
