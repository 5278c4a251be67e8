"""Builders shared by the test files: a small prepared dataset on disk, and an in-memory catalogue,
batch and M3BSR model for model tests. Test files import them from here (``from factories import ...``),
never from one another; pytest fixtures that wrap them live in ``conftest.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from m3bsr.atomic import atomic_dir
from m3bsr.batch import PAD_TIME, Catalogue, SequenceBatch
from m3bsr.config import build_config
from m3bsr.data.prepared import EvalTargets, write_prepared
from m3bsr.models.m3bsr import M3BSR
from m3bsr.models.registry import build_model


def make_tiny_prepared(out: Path, n_users: int = 40, n_items: int = 60, seed: int = 0,
                       n_candidates: int = 20, dims: dict[str, int] | None = None) -> Path:
    """Write a random two-behavior prepared dataset to ``out`` (atomically) and return ``out``: users click
    and favor items of a preferred block of the catalogue; ``n_candidates`` sampled candidates per eval
    target; one feature matrix ``[n_items + 1, width]`` per entry of ``dims`` (~10% of items missing)."""
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


N_ITEMS = 30  # catalogue size of make_catalogue / make_batch (item ids 1..N_ITEMS, 0 is padding)


def make_catalogue(content: bool = True, seed: int = 0) -> Catalogue:
    """A click/cart/favor catalogue of ``N_ITEMS`` items with a ``brand`` side id and, when ``content``,
    ``image`` [N_ITEMS + 1, 6] and ``text`` [N_ITEMS + 1, 5] features (~20% of items missing each)."""
    g = torch.Generator().manual_seed(seed)
    cat = Catalogue(n_items=N_ITEMS, behavior_names=["click", "cart", "favor"], target_behavior=3)
    cat.side_ids = {"brand": torch.randint(0, 5, (N_ITEMS + 1,), generator=g)}
    cat.side_ids["brand"][0] = 0
    cat.side_sizes = {"brand": 5}
    if content:
        for m, dim in (("image", 6), ("text", 5)):
            has = torch.rand(N_ITEMS + 1, generator=g) > 0.2
            has[0] = False
            cat.features[m] = torch.randn(N_ITEMS + 1, dim, generator=g) * has.unsqueeze(1)
            cat.feature_masks[m] = has
    return cat


def make_batch(B: int = 5, L: int = 8, seed: int = 0, queries: str = "targets") -> SequenceBatch:
    """Random windows [B, L] (queries/labels [B, P]): interleaved auxiliary (click/cart) and target events, left-aligned, with
    edge cases: user 0 has no auxiliary events, user 1 clicks before any favor.
    ``queries="targets"``: every target is a query (training); ``"random"``: 3 queries at random times."""
    rng = np.random.default_rng(seed)
    P = L if queries == "targets" else 3
    out = {k: np.zeros((B, L), np.int64) for k in ("aux_items", "aux_behaviors", "tgt_items")}
    out["aux_times"] = np.full((B, L), PAD_TIME, np.int64)
    out["tgt_times"] = np.full((B, L), PAD_TIME, np.int64)
    out["query_times"] = np.full((B, P), PAD_TIME, np.int64)
    out["labels"] = np.zeros((B, P), np.int64)
    for b in range(B):
        n = int(rng.integers(4, 2 * L))
        is_tgt = rng.random(n) < 0.45
        if b == 0:
            is_tgt[:] = True
        if b == 1:
            is_tgt[:3] = False
        times = np.arange(n) + 3
        items = rng.integers(1, N_ITEMS + 1, n)
        a_t, t_t = times[~is_tgt][-L:], times[is_tgt][:L]
        out["aux_times"][b, :len(a_t)], out["aux_items"][b, :len(a_t)] = a_t, items[~is_tgt][-L:]
        out["aux_behaviors"][b, :len(a_t)] = rng.integers(1, 3, len(a_t))
        out["tgt_times"][b, :len(t_t)], out["tgt_items"][b, :len(t_t)] = t_t, items[is_tgt][:L]
        if queries == "targets":
            out["query_times"][b, :len(t_t)], out["labels"][b, :len(t_t)] = t_t, items[is_tgt][:L]
        else:
            q = np.sort(rng.choice(np.arange(1, n + 5), size=P, replace=False))
            out["query_times"][b], out["labels"][b] = q, rng.integers(1, N_ITEMS + 1, P)
    return SequenceBatch(users=torch.arange(1, B + 1), **{k: torch.from_numpy(v) for k, v in out.items()})


def make_model(*overrides: str, content: bool = True, d: int = 16) -> M3BSR:
    """An M3BSR of width ``d`` (2 heads, seed 0) on :func:`make_catalogue` with dotted ``overrides``."""
    torch.manual_seed(0)
    cfg = build_config(model="m3bsr", overrides=[f"model.hidden_size={d}", "model.n_heads=2", *overrides]).model
    return build_model(cfg, make_catalogue(content))


PAPER = "model.preset=paper"

# Model configs (override tuples) that the equivalence tests run: the default preset, its switches, the paper's.
CONFIGS = [
    (),
    ("model.content_gate=true", "model.repeat=false"),
    ("model.no_specific_experts=false",),
    ("model.no_specific_experts=false", "model.fusion=gate", "model.id_input=mlp16", "model.scorer=linear", "model.repeat=false"),
    ("model.no_specific_experts=false", "model.common_expert=cross", "model.item_content=false", "model.feature_norm=none"),
    ("model.no_specific_experts=false", "model.content_gate=true"),
    ("model.no_specific_experts=false", "model.no_shared_expert=true", "model.share_specific_experts=false"),
    (PAPER,),
    (PAPER, "model.denoise_output=reverse_chain", "model.T_m=4", "model.T_b=3"),
    (PAPER, "model.contrast=literal", "model.diffusion_loss=literal", "model.fusion=router"),
    (PAPER, "model.share_specific_experts=false", "model.scorer=tied"),
    (PAPER, "model.no_shared_expert=true"),
    (PAPER, "model.no_meie=true"),
    (PAPER, "model.denoise_output=none", "model.n_layers=1"),
]
