"""AutoLoRa's automated learning-rate rule (``METHODS.md`` section 2.8.4, pitfall P-A5).

AutoLoRa (reference code ``GodXuxilie/RobustSSL_Benchmark``, ``Finetuning_Methods/AutoLoRa/
utils.py`` ``train``) replaces a hand-made schedule by a rule borrowed from Auto-PGD (Croce & Hein,
2020). After each epoch ``e`` (counted from 1) the validation robust accuracy is written to
``acc[e-1]``; the checkpoints ``W = [w_0 = 0, w_1, ...]`` are indices into ``acc``, so checkpoint
``w_j`` is reached after epoch ``w_j + 1``. There, with ``w0, w1 = W[j-1], W[j]``:

* **condition 1**: fewer than ``rho * (w1 - w0)`` of the steps ``acc[t] -> acc[t+1]``,
  ``t in [w0, w1)``, were strict increases (``acc[w1]`` is the epoch just seen);
* **condition 2** (only checked when condition 1 does not hold), in one of two variants:

  - ``"code"`` (default, the reference as shipped): ``eta_hist[j] == eta_hist[j-1] and
    best_hist[j] == best_hist[j-1]``. Because ``eta_hist[j]`` is copied from ``eta_hist[j-1]``
    when ``j`` advances and ``eta_hist[1]`` starts at 0, the learning-rate test is always true for
    ``j >= 2`` and always false at ``j == 1`` (P-A5). The rule therefore reads "``j >= 2`` and no
    new best validation accuracy since the previous checkpoint", and it fires again at the next
    checkpoint even when the learning rate was just halved;
  - ``"apgd"`` (the Auto-PGD rule it imitates): the learning rate was *not* reduced at the previous
    checkpoint (at ``j == 1`` the previous checkpoint is the start, with ``lr0``, so this holds) and
    the best accuracy did not improve since the previous checkpoint:
    ``max(acc[0..w_j]) == max(acc[0..w_{j-1}])``. At ``j == 1`` the best at ``w_0 = 0`` is
    ``acc[0]``, the first epoch's accuracy, just as Auto-PGD's best at ``w_0`` is the loss of the
    starting point.

When either condition holds, the learning rate is divided by ``divide`` and the caller reloads
the best-validation weights (``Decision.restore``); the optimiser's momentum is *not* reset by the
reference, which is the caller's business. A new best (strict ``>``, the initial best is -1, so
the first epoch always is one) must be saved by the caller *before* a restore of the same epoch
is applied. After the last checkpoint the learning rate stays fixed; a checkpoint ``w_j >=
epochs`` is never reached (the reference's AFF list ends at 50 for a 50-epoch run, so its last
checkpoint is never used).

:class:`AutoLR` is pure Python (no torch), stepped once per epoch with that epoch's validation
accuracy, and resumable exactly through :meth:`AutoLR.state_dict` (plain JSON types).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

from asbound.errors import ConfigError, ResumeError

CONDITIONS = ("code", "apgd")

_REFERENCE_W = (0, 16, 24, 28, 36, 40, 42, 44, 46, 48, 50)  # [A] AFF, 50 epochs
_STATE_VERSION = 1


def default_checkpoints(epochs: int) -> tuple[int, ...]:
    """Checkpoint epochs W for a run of `epochs` epochs: the reference's 50-epoch list
    [0,16,24,28,36,40,42,44,46,48,50] scaled by epochs/50, rounded to the nearest integer,
    duplicates removed, strictly increasing, starting at 0 (for epochs=50 it must equal the list exactly).

    Every reference entry is even, so ``w * epochs / 50`` is never exactly halfway between two
    integers and the rounding has no ties; it is done in integer arithmetic.
    """
    n = _as_int(epochs)
    if n is None or n < 1:
        raise ConfigError(f"epochs={epochs!r} is invalid: default_checkpoints needs a whole number >= 1")
    scaled = sorted({(2 * w * n + 50) // 100 for w in _REFERENCE_W})  # floor(w * n / 50 + 1/2)
    return tuple(scaled)


@dataclass(frozen=True)
class Decision:
    """What the caller must do after one epoch."""

    lr: float  # the learning rate for the next epoch
    new_best: bool  # this epoch's validation accuracy is a new best (caller saves 'best')
    checkpoint: bool  # this epoch was a checkpoint epoch (e-1 == W[j])
    halved: bool  # the learning rate was divided at this checkpoint
    restore: bool  # the caller must reload the best-validation weights (== halved)
    condition: int | None  # 1 or 2: which condition halved it; None if not halved


class AutoLR:
    """AutoLoRa's automated learning rate, stepped once per epoch (see the module docstring).

    ``checkpoints`` are the reference's ``W`` (indices into the per-epoch accuracy list, so
    ``W[j]`` is reached after epoch ``W[j] + 1``); ``epochs``, when given, is the number of
    epochs the run has, and stepping past it raises ``RuntimeError``.
    """

    def __init__(
        self,
        lr0: float,
        checkpoints: Sequence[int],
        *,
        rho: float = 0.75,
        divide: float = 2.0,
        condition2: str = "code",
        epochs: int | None = None,
    ) -> None:
        self._lr0 = _check_lr0(lr0)
        self._checkpoints = _check_checkpoints(checkpoints)
        self._rho = _check_rho(rho)
        self._divide = _check_divide(divide)
        self._condition2 = _check_condition2(condition2)
        self._epochs = _check_epochs(epochs)
        n = len(self._checkpoints)
        self._epoch = 0  # epochs seen
        self._eta = self._lr0
        self._best = -1.0
        self._j = 1
        self._acc: list[float] = []  # acc[e-1]: the accuracy after epoch e (the reference's zeros are never read)
        self._eta_hist = [0.0] * n  # the reference's bookkeeping (condition 2, "code")
        self._eta_hist[0] = self._lr0
        self._best_hist = [0.0] * n
        self._reduced_last = False  # "apgd": the learning rate was halved at the previous checkpoint

    @property
    def lr(self) -> float:
        """The learning rate for the next epoch."""
        return self._eta

    @property
    def epoch(self) -> int:
        """The number of epochs stepped so far."""
        return self._epoch

    @property
    def best(self) -> float:
        """The best validation accuracy so far (-1 before the first epoch)."""
        return self._best

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return self._checkpoints

    @property
    def condition2(self) -> str:
        return self._condition2

    def step(self, val_accuracy: float) -> Decision:
        """Call once after each epoch (epochs counted internally from 1) with that epoch's validation accuracy."""
        a_v = float(val_accuracy)
        if not math.isfinite(a_v):
            raise ValueError(f"val_accuracy={val_accuracy!r} is not a finite number")
        if self._epochs is not None and self._epoch >= self._epochs:
            raise RuntimeError(f"AutoLR.step called for epoch {self._epoch + 1} of a {self._epochs}-epoch run")
        self._epoch += 1
        e = self._epoch
        self._acc.append(a_v)  # acc[e-1]
        j = self._j
        new_best = a_v > self._best
        if new_best:
            self._best = a_v
            self._best_hist[j] = a_v
        W = self._checkpoints
        checkpoint = e - 1 == W[j]
        condition: int | None = None
        if checkpoint:
            w0, w1 = W[j - 1], W[j]
            acc = self._acc
            cnt = sum(1 for t in range(w0, w1) if acc[t + 1] > acc[t])
            if cnt < self._rho * (w1 - w0):
                condition = 1
            elif self._condition2_holds(j, w0):
                condition = 2
            if condition is not None:
                self._eta /= self._divide
                self._eta_hist[j] = self._eta
            self._reduced_last = condition is not None
            if j < len(W) - 1:
                self._j = j + 1
                self._best_hist[j + 1] = self._best_hist[j]
                self._eta_hist[j + 1] = self._eta_hist[j]
        halved = condition is not None
        return Decision(
            lr=self._eta, new_best=new_best, checkpoint=checkpoint, halved=halved, restore=halved, condition=condition
        )

    def _condition2_holds(self, j: int, w0: int) -> bool:
        if self._condition2 == "code":
            return self._eta_hist[j] == self._eta_hist[j - 1] and self._best_hist[j] == self._best_hist[j - 1]
        # "apgd": not halved at the previous checkpoint, and no improvement of the best since it
        return not self._reduced_last and self._best == max(self._acc[: w0 + 1])

    def _config(self) -> dict[str, Any]:
        return {
            "lr0": self._lr0,
            "checkpoints": list(self._checkpoints),
            "rho": self._rho,
            "divide": self._divide,
            "condition2": self._condition2,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as plain JSON types."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "epoch": self._epoch,
            "eta": self._eta,
            "best": self._best,
            "j": self._j,
            "acc": list(self._acc),
            "eta_hist": list(self._eta_hist),
            "best_hist": list(self._best_hist),
            "reduced_last": self._reduced_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the configuration (``epochs`` aside) must be the same."""
        try:
            if state["version"] != _STATE_VERSION:
                raise ResumeError(f"AutoLR state version {state['version']!r} is not {_STATE_VERSION}")
            config = state["config"]
            ours = self._config()
            for key, value in ours.items():
                theirs = list(config[key]) if key == "checkpoints" else config[key]
                if theirs != value:
                    raise ResumeError(f"AutoLR state has {key}={config[key]!r}, this run has {key}={value!r}")
            n = len(self._checkpoints)
            epoch = int(state["epoch"])
            j = int(state["j"])
            acc = [float(a) for a in state["acc"]]
            eta_hist = [float(x) for x in state["eta_hist"]]
            best_hist = [float(x) for x in state["best_hist"]]
            eta, best, reduced_last = float(state["eta"]), float(state["best"]), bool(state["reduced_last"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ResumeError(f"AutoLR state is malformed ({type(exc).__name__}: {exc})") from None
        if not (0 <= epoch == len(acc) and 1 <= j < n and len(eta_hist) == n == len(best_hist)):
            raise ResumeError(f"AutoLR state is inconsistent (epoch={epoch}, j={j}, {len(acc)} accuracies)")
        if self._epochs is not None and epoch > self._epochs:
            raise ResumeError(f"AutoLR state is at epoch {epoch}, past this run's {self._epochs} epochs")
        self._epoch, self._eta, self._best, self._j = epoch, eta, best, j
        self._acc, self._eta_hist, self._best_hist = acc, eta_hist, best_hist
        self._reduced_last = reduced_last


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_lr0(lr0: Any) -> float:
    x = _as_float(lr0)
    if x is None or not math.isfinite(x) or x <= 0:
        raise ConfigError(f"lr0={lr0!r} is invalid: the initial learning rate must be a finite number > 0")
    return x


def _check_checkpoints(checkpoints: Any) -> tuple[int, ...]:
    valid = "checkpoints must be at least 2 strictly increasing whole numbers starting at 0, e.g. [0, 16, 24, 28]"
    if isinstance(checkpoints, (str, bytes)):
        raise ConfigError(f"checkpoints={checkpoints!r} is invalid: {valid}")
    try:
        items = list(checkpoints)
    except TypeError:
        raise ConfigError(f"checkpoints={checkpoints!r} is invalid: {valid}") from None
    ints = [_as_int(w) for w in items]
    if (
        len(ints) < 2
        or any(w is None for w in ints)
        or ints[0] != 0
        or any(b <= a for a, b in zip(ints, ints[1:]))  # type: ignore[operator]
    ):
        raise ConfigError(f"checkpoints={items!r} is invalid: {valid}")
    return tuple(ints)  # type: ignore[arg-type]


def _check_rho(rho: Any) -> float:
    x = _as_float(rho)
    if x is None or not 0 < x <= 1:
        raise ConfigError(f"rho={rho!r} is invalid: the fraction of improving epochs must be in (0, 1]")
    return x


def _check_divide(divide: Any) -> float:
    x = _as_float(divide)
    if x is None or not math.isfinite(x) or x <= 1:
        raise ConfigError(f"divide={divide!r} is invalid: the learning-rate divisor must be a finite number > 1")
    return x


def _check_condition2(condition2: Any) -> str:
    if condition2 not in CONDITIONS:
        raise ConfigError(f"condition2={condition2!r} is invalid: choose one of {', '.join(CONDITIONS)}")
    return condition2


def _check_epochs(epochs: Any) -> int | None:
    if epochs is None:
        return None
    n = _as_int(epochs)
    if n is None or n < 1:
        raise ConfigError(f"epochs={epochs!r} is invalid: the number of epochs must be a whole number >= 1 (or None)")
    return n
