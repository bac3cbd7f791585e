"""Shared pytest setup: the test helpers (``fabricate``) import under every import mode, and no
test sees the user's data, models or cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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
    """One intra-op thread: on a shared 2-core machine this is many times faster than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
