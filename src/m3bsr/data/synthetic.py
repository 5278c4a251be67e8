"""The embedded default dataset: a seeded click/favor log with image and text vectors (no download).

Generative story (every draw from ``numpy_rng(seed, "synthetic")``):

* Items have a latent category (C categories) and a popularity weight (log-normal). A share
  ``sticker_rate`` of items carries the nuisance "cheap price sticker" (the paper's example of
  modality noise): it shows in both vectors and attracts accidental clicks, never favors.
* Modality vectors, for m in {image, text}:  ``x_m[i] = mu_m[cat(i)] + noise_m * eps + sticker(i) * u_m``
  with ``mu_m ~ N(0, I)`` per category, ``eps ~ N(0, I)`` and ``u_m`` a fixed direction of norm
  ``sticker_strength``.
* Users have a taste over 1-3 categories; the current category starts from the taste and, before
  each event, moves to another taste draw with probability ``drift`` (so recent events matter).
* Each event is a favor with probability ``favor_rate``, otherwise a click. A click is accidental
  with probability ``accidental_click_rate`` (any item, weighted by popularity x
  ``sticker_click_boost`` for stickered items), else an item of the current category by
  popularity. A favor is, with probability 0.6, an item of the current category clicked within the
  last 5 events, else an item of the current category by popularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from m3bsr.data.config import SyntheticConfig
from m3bsr.seeding import numpy_rng

RECENT_CLICKS = 5
FAVOR_FROM_CLICK = 0.6
START_TIME = 1_600_000_000


@dataclass
class SyntheticData:
    """The generated log and item side, keyed by original (string) ids.

    ``events``: user, item, behavior (click/favor), timestamp, in input (per-user time) order.
    ``items``: item, category, sticker (the hidden truth, for tests and sanity checks).
    ``features``: modality → (original ids [I], float32 [I, dim]).
    """

    events: pd.DataFrame
    items: pd.DataFrame
    features: dict[str, tuple[list[str], np.ndarray]]


def _draw(cum: np.ndarray, pool: np.ndarray, u: float) -> int:
    """Item of ``pool`` drawn with cumulative weights ``cum`` (last entry = total) at uniform ``u``."""
    return int(pool[min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(pool) - 1)])


def generate(cfg: SyntheticConfig, seed: int) -> SyntheticData:
    """Generate the synthetic dataset of ``cfg`` from ``seed`` (deterministic)."""
    rng = numpy_rng(seed, "synthetic")
    n_items, n_cat = cfg.items, cfg.categories
    cat = np.concatenate([np.arange(n_cat), rng.integers(0, n_cat, n_items - n_cat)])  # no empty category
    rng.shuffle(cat)
    pop = np.exp(0.8 * rng.normal(size=n_items))
    sticker = rng.random(n_items) < cfg.sticker_rate
    item_ids = np.array([f"i{k + 1}" for k in range(n_items)], dtype=object)

    features = {}
    for m, noise in (("image", cfg.image_noise), ("text", cfg.text_noise)):
        mu = rng.normal(size=(n_cat, cfg.dim))
        u = rng.normal(size=cfg.dim)
        u *= cfg.sticker_strength / np.linalg.norm(u)
        x = mu[cat] + noise * rng.normal(size=(n_items, cfg.dim)) + sticker[:, None] * u
        features[m] = (list(item_ids), x.astype(np.float32))

    pools = [np.flatnonzero(cat == c) for c in range(n_cat)]
    cums = [np.cumsum(pop[p]) for p in pools]
    acc_w = pop * np.where(sticker, cfg.sticker_click_boost, 1.0)
    acc_cum, all_items = np.cumsum(acc_w), np.arange(n_items)

    users, items, behaviors, times = [], [], [], []
    for uid in range(1, cfg.users + 1):
        k = int(rng.integers(1, 4))
        tastes = rng.choice(n_cat, size=k, replace=False)
        weights = rng.dirichlet(np.ones(k))
        n = int(rng.integers(cfg.events_min, cfg.events_max + 1))
        r = rng.random((n, 5))  # drift?, new taste, favor?, accidental?/from-click?, item draw
        t = START_TIME + int(rng.integers(0, 30 * 86400)) + np.cumsum(1 + rng.exponential(600.0, n).astype(np.int64))
        current = int(tastes[np.searchsorted(np.cumsum(weights), rng.random() * weights.sum())
                             .clip(0, k - 1)])
        recent: list[tuple[int, int]] = []  # (event index, item) of clicks
        for j in range(n):
            if r[j, 0] < cfg.drift:
                current = int(tastes[min(int(np.searchsorted(np.cumsum(weights), r[j, 1])), k - 1)])
            if r[j, 2] < cfg.favor_rate:
                fresh = [it for (jj, it) in recent if j - jj <= RECENT_CLICKS and cat[it] == current]
                if fresh and r[j, 3] < FAVOR_FROM_CLICK:
                    item = fresh[min(int(r[j, 4] * len(fresh)), len(fresh) - 1)]
                else:
                    item = _draw(cums[current], pools[current], r[j, 4])
                beh = "favor"
            else:
                if r[j, 3] < cfg.accidental_click_rate:
                    item = _draw(acc_cum, all_items, r[j, 4])
                else:
                    item = _draw(cums[current], pools[current], r[j, 4])
                recent.append((j, item))
                beh = "click"
            users.append(uid)
            items.append(item)
            behaviors.append(beh)
        times.append(t)
    events = pd.DataFrame({
        "user": np.array([f"u{u}" for u in users], dtype=object),
        "item": item_ids[np.asarray(items, dtype=np.int64)],
        "behavior": np.array(behaviors, dtype=object),
        "timestamp": np.concatenate(times).astype(np.int64),
    })
    table = pd.DataFrame({"item": item_ids, "category": cat.astype(np.int64), "sticker": sticker})
    return SyntheticData(events=events, items=table, features=features)
