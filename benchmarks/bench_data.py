"""Benchmark datasets written straight as prepared directories (vectorised, seconds not minutes).

``tmall_like`` mimics the shape of the Tmall log (the raw log: 31,882 users,
30,985 items, 357,412 events, id only, ``fav``/``cart`` auxiliary, ``buy`` target): per-user
event counts are heavy-tailed (at least 5), items follow a Zipf-like popularity around a
per-user "home" region of the catalogue, and every user has at least two buys (the last two
are the valid and test targets, each with 99 sampled negatives).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from m3bsr.atomic import atomic_dir
from m3bsr.data.prepared import EvalTargets, write_prepared


def tmall_like(out: Path, *, users: int = 31_000, items: int = 31_000, events: int = 360_000,
               buy_rate: float = 0.35, seed: int = 0, n_negatives: int = 99) -> Path:
    """Write (or reuse) a tmall-shaped id-only prepared dataset at ``out``."""
    out = Path(out)
    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(seed)
    mean_extra = max(events / users - 5.0, 0.1)
    counts = 5 + rng.geometric(1.0 / (1.0 + mean_extra), users) - 1  # >= 5, mean ~ events/users
    counts = np.minimum(counts, 400)
    user = np.repeat(np.arange(1, users + 1), counts)
    n = len(user)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = np.arange(n) - np.repeat(starts, counts)  # per-user rank 0..count-1
    home = rng.integers(0, items, users)[user - 1]
    offset = (rng.zipf(1.6, n) - 1) * rng.choice([-1, 1], n)  # popular items near the user's home
    item = (home + offset) % items + 1
    buy = rng.random(n) < buy_rate
    last_two = order >= np.repeat(counts, counts) - 2  # every user has >= 2 buys: its last two events
    buy |= last_two
    behavior = np.where(buy, 2, rng.integers(0, 2, n))  # 0 fav, 1 cart, 2 buy
    ev = pd.DataFrame({"user": user, "item": item, "stream": buy.astype(np.int8), "behavior": behavior,
                       "timestamp": 1_511_481_600 + order * 60 + np.repeat(np.arange(users), counts) % 60,
                       "order": order})
    ends = np.cumsum(counts)
    test_idx, valid_idx = ends - 1, ends - 2

    def targets(idx: np.ndarray) -> EvalTargets:
        pos = item[idx]
        neg = rng.integers(1, items, (len(idx), n_negatives))
        neg = np.where(neg >= pos[:, None], neg + 1, neg)  # never the positive
        return EvalTargets(user=user[idx], item=pos, order=order[idx],
                           candidates=np.concatenate([pos[:, None], neg], 1))

    manifest = {"source": {"name": "tmall_like", "path": "benchmarks/bench_data.py", "files": {}},
                "behaviors": {"names": ["fav", "cart", "buy"], "target": "buy", "auxiliary": ["fav", "cart"]},
                "statistics": {}, "config": {"seed": seed}}
    users_df = pd.DataFrame({"user": np.arange(1, users + 1, dtype=np.int32),
                             "original": [str(u) for u in range(users)]})
    items_df = pd.DataFrame({"item": np.arange(1, items + 1, dtype=np.int32),
                             "original": [str(i) for i in range(items)]})
    with atomic_dir(out, overwrite=True) as tmp:
        write_prepared(tmp, manifest=manifest, events=ev, users=users_df, items=items_df,
                       valid=targets(valid_idx), test=targets(test_idx))
    return out
