"""Shared pytest setup: one compute thread per process, the test helpers (``fabricate``) import
under every import mode, and no test sees the user's data, models or cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

#: One intra-op thread for torch and the OpenMP / BLAS pools, in this process and in every process
#: a test starts (``python -m asbound``, torchrun ranks), unless the caller set its own. The tests
#: run small models, where a pool gains little; on a loaded machine each process's pool of spinning
#: OpenMP workers competes for the same cores: with 2 cores and a load of 9, two tests took 344 s
#: and 275 s with torch's default threads and 11 s and 48 s with one.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_THREADS = os.environ.get("OMP_NUM_THREADS", "1")  # a caller's OMP_NUM_THREADS sizes every pool
for _name in THREAD_VARIABLES:  # (torch reads MKL_NUM_THREADS too: a "1" there would override it)
    os.environ.setdefault(_name, _THREADS)
if "torch" in sys.modules and os.environ["OMP_NUM_THREADS"].isdigit():  # imported before this file: sized already
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

_ISOLATED = {"ASBOUND_DATA_ROOT": "data-root", "ASBOUND_MODEL_DIR": "model-dir", "XDG_CACHE_HOME": "cache"}


def _isolate(mp: pytest.MonkeyPatch, base: Path) -> None:
    for name, folder in _ISOLATED.items():
        path = base / folder
        path.mkdir(parents=True, exist_ok=True)
        mp.setenv(name, str(path))  # in os.environ: subprocesses inherit it


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """Module- and session-scoped fixtures run before the per-test isolation: give them empty
    folders too, not ``$ASBOUND_DATA_ROOT``, ``$ASBOUND_MODEL_DIR`` or the user cache."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("isolated-session"))
        yield


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """Every test: ``$ASBOUND_DATA_ROOT`` and ``$ASBOUND_MODEL_DIR`` point at fresh empty folders,
    ``$XDG_CACHE_HOME`` (the user cache of platformdirs) at a fresh folder."""
    _isolate(monkeypatch, tmp_path_factory.mktemp("isolated"))


@pytest.fixture
def one_thread():
    """One intra-op thread (already the default under this conftest, unless $OMP_NUM_THREADS says
    otherwise): on a shared 2-core machine this is many times faster than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
