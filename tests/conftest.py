"""Shared fixtures: tiny data, paths to ../shared (tests that need it skip cleanly without it)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CERTAUDIT_SHARED", REPO.parent / "shared"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def digits():
    from certaudit.data import load_dataset

    x_tr, y_tr = load_dataset("digits", "train")
    x_te, y_te = load_dataset("digits", "test")
    return x_tr, y_tr, x_te, y_te


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's data cache from tests."""
    monkeypatch.setenv("CERTAUDIT_DATA", str(tmp_path / "cache"))


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread for a test: tiny tensors run as fast, and one thread does not spin on a CPU
    shared with other jobs (OpenMP)."""
    with _threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread_module")``),
    module-scoped fixtures after it included."""
    with _threads(1):
        yield
