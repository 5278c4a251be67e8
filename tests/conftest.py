"""Shared fixtures. ``tiny_prepared`` writes a small random prepared dataset directly through the
on-disk contract (:mod:`m3bsr.data.prepared`), so engine and model tests do not depend on ``prepare``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from m3bsr.atomic import atomic_dir
from m3bsr.data.prepared import EvalTargets, write_prepared

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_tiny_prepared(out: Path, n_users: int = 40, n_items: int = 60, seed: int = 0,
                       n_candidates: int = 20, dims: dict[str, int] | None = None) -> Path:
    """A random two-behavior dataset: users click and favor items of a preferred block of the catalogue."""
    rng = np.random.default_rng(seed)
    dims = {"image": 8, "text": 6} if dims is None else dims
    rows = []
    for u in range(1, n_users + 1):
        n = int(rng.integers(8, 30))
        block = int(rng.integers(0, 4))
        lo = 1 + block * (n_items // 4)
        items = rng.integers(lo, lo + n_items // 4, size=n)
        stream = (rng.random(n) < 0.4).astype(np.int8)
        stream[-3:] = 1  # at least three targets: train, valid, test
        for k in range(n):
            rows.append((u, int(items[k]), int(stream[k]), int(stream[k]), 1000 + k, k))
    events = pd.DataFrame(rows, columns=["user", "item", "stream", "behavior", "timestamp", "order"])
    valid, test = [], []
    for u, g in events[events.stream == 1].groupby("user"):
        seen = set(events.loc[events.user == u, "item"])
        pool = np.array([i for i in range(1, n_items + 1) if i not in seen])
        for split, row in ((valid, g.iloc[-2]), (test, g.iloc[-1])):
            neg = rng.choice(pool, size=min(n_candidates - 1, len(pool)), replace=False)
            split.append((u, int(row["item"]), int(row["order"]), np.concatenate([[row["item"]], neg])))

    def targets(rows):
        return EvalTargets(user=np.array([r[0] for r in rows]), item=np.array([r[1] for r in rows]),
                           order=np.array([r[2] for r in rows]), candidates=np.stack([r[3] for r in rows]))

    features, masks = {}, {}
    for m, d in dims.items():
        x = rng.normal(size=(n_items + 1, d)).astype(np.float32)
        mask = rng.random(n_items + 1) > 0.1
        mask[0] = False
        x[~mask] = 0
        features[m], masks[m] = x, mask
    users = pd.DataFrame({"user": np.arange(1, n_users + 1, dtype=np.int32),
                          "original": [f"u{i}" for i in range(1, n_users + 1)]})
    items = pd.DataFrame({"item": np.arange(1, n_items + 1, dtype=np.int32),
                          "original": [f"i{i}" for i in range(1, n_items + 1)]})
    manifest = {"behaviors": {"names": ["click", "favor"], "target": "favor", "auxiliary": ["click"]},
                "source": {"name": "tiny-random"}, "config": {}, "statistics": {}}
    with atomic_dir(out) as tmp:
        write_prepared(tmp, manifest=manifest, events=events, users=users, items=items,
                       valid=targets(valid), test=targets(test), features=features, feature_masks=masks)
    return out


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
