"""Transfer runners: methods as small objects over one training loop.

* :mod:`asbound.transfer.methods`: the methods (stages, scopes, per-batch objectives);
* :mod:`asbound.transfer.loop`: the training loop, validation, model selection, checkpoints;
* :mod:`asbound.transfer.optim`: optimisers and learning-rate schedules;
* :mod:`asbound.transfer.config`: ``TransferConfig`` and the seeds' defaults;
* :mod:`asbound.transfer.run`: ``transfer``, the run directories, the evaluation and the scores.
"""

from asbound.transfer.config import TransferConfig
from asbound.transfer.methods import METHODS, Method, Stage
from asbound.transfer.run import MethodResult, transfer

__all__ = ["METHODS", "Method", "MethodResult", "Stage", "TransferConfig", "transfer"]
