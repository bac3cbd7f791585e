"""Errors that reach the user as one clear line (exit code 2), never a traceback.

Every error raised for bad input is an :class:`AsboundError`: its message names what is
wrong and what is valid. The CLI prints ``asbound: error: <message>`` and exits with 2.
"""

from __future__ import annotations


class AsboundError(Exception):
    """Bad input or an unusable environment, explained in one line."""

    exit_code = 2


class SpecError(AsboundError):
    """A model or data spec that cannot be parsed or resolved."""


class DataError(AsboundError):
    """A data set that is missing, malformed, or has invalid values (NaN, out of [0, 1])."""


class ModelError(AsboundError):
    """A model that cannot be loaded or split into features and a linear head."""


class ConfigError(AsboundError):
    """An option outside its valid range (eps, steps, delta, ...)."""


class ResumeError(AsboundError):
    """An output directory whose earlier run does not match the current configuration."""


class RunLockedError(AsboundError):
    """An output directory that another process is writing."""


class RecordError(AsboundError):
    """A run's record (``summary.json``, ``final.json``, ``points.csv``, ...) that is damaged or
    not asbound's: the message names the file and what to do about it."""


def describe(exc: BaseException) -> str:
    """An exception from a library as one short line: its type and the first line of its text."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
