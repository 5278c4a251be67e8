"""Shared fixtures. ``tiny_prepared`` writes a small random prepared dataset directly through the
on-disk contract (:mod:`m3bsr.data.prepared`), so engine and model tests do not depend on ``prepare``;
its builder and the other shared builders are in ``factories.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from factories import make_tiny_prepared


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
    """The real data folder ``$M3BSR_DATA`` (``ml100k_mm/``, ``retail_rocket/``, ``tmall/``), or a clean
    skip when the variable is unset or names no folder (a user's clone has no real data)."""
    folder = os.environ.get("M3BSR_DATA")
    if not folder:
        pytest.skip("set M3BSR_DATA to the real data folder to run this test")
    if not Path(folder).is_dir():
        pytest.skip(f"real data folder {folder} (M3BSR_DATA) is absent")
    return Path(folder)
