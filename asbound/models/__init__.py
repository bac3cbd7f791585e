"""Models: loading from a spec, and the split ``f(x) = W g(x) + b`` into features and head."""

from asbound.models.loaders import LoadedModel, Normalize, default_model_dir, load_head, load_model
from asbound.models.split import LayerOutput, SplitModel, frozen, split_model

__all__ = [
    "LayerOutput",
    "LoadedModel",
    "Normalize",
    "SplitModel",
    "default_model_dir",
    "load_head",
    "frozen",
    "load_model",
    "split_model",
]
