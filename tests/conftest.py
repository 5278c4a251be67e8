"""Shared fixtures. ``tiny_prepared`` writes a small random prepared dataset directly through the
on-disk contract (:mod:`m3bsr.data.prepared`), so engine and model tests do not depend on ``prepare``;
its builder and the other shared builders are in ``factories.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from factories import make_tiny_prepared

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def tiny_prepared(tmp_path) -> Path:
    """Path of a small random prepared dataset (40 users, 60 items, image + text features)."""
    return make_tiny_prepared(tmp_path / "tiny")


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module: the test machine is shared, and oversubscribed
    threads stall small kernels. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` or a clean skip when it is absent (a user's clone does not have it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA
