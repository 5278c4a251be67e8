"""Dataset statistics (the paper's Table 1 and more) and their plain-text table for ``--inspect``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

PERCENTILES = (50, 90, 99)


def _lengths(counts: np.ndarray) -> dict[str, float]:
    if len(counts) == 0:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}, "max": 0}
    return {"mean": round(float(counts.mean()), 2),
            **{f"p{p}": float(np.percentile(counts, p)) for p in PERCENTILES},
            "max": int(counts.max())}


TIE_ORDER = "timestamp, then input row: of tied events, the later row counts as later"
"""How prepare orders events of one user that share a timestamp (prepare.py sorts by user, timestamp,
then the row of the input log), so among tied target events the later row is the test target."""


def tie_statistics(events: pd.DataFrame) -> dict[str, Any]:
    """Timestamp ties among kept events (columns user, timestamp, stream, order; any row order).

    ``tied_events``: events that share their timestamp with another event of the same user (any
    stream); ``users_valid_test_tied``: users whose valid and test targets (their last two target
    events by ``order``) have the same timestamp; shares of all events / of all users."""
    n_events = int(len(events))
    same = events.groupby(["user", "timestamp"], sort=False)["timestamp"].transform("size").to_numpy()
    tied = int((same > 1).sum())
    tgt = events.loc[events["stream"].to_numpy() == 1, ["user", "order", "timestamp"]]
    tgt = tgt.sort_values(["user", "order"], kind="stable")
    u, t = tgt["user"].to_numpy(), tgt["timestamp"].to_numpy()
    test = np.flatnonzero(np.r_[u[1:] != u[:-1], True]) if len(u) else np.zeros(0, np.int64)
    valid = test - 1
    pair = valid >= 0
    pair[pair] = u[valid[pair]] == u[test[pair]]  # the user has a second-to-last target
    vt = int((t[valid[pair]] == t[test[pair]]).sum())
    n_users = int(events["user"].nunique())
    return {"tied_events": tied, "tied_events_share": tied / n_events if n_events else 0.0,
            "users_valid_test_tied": vt, "users_valid_test_tied_share": vt / n_users if n_users else 0.0,
            "order": TIE_ORDER}


def compute_statistics(events: pd.DataFrame, behavior_names: list[str], n_users: int, n_items: int,
                       filtering: dict[str, Any]) -> dict[str, Any]:
    """Statistics of the kept events (dense ids; ``stream`` 0/1; ``behavior`` indexes ``behavior_names``)."""
    beh = events["behavior"].to_numpy()
    per_behavior = {name: int((beh == k).sum()) for k, name in enumerate(behavior_names)}
    streams = {}
    for stream, label in ((0, "auxiliary"), (1, "target")):
        sel = events["stream"].to_numpy() == stream
        counts = np.bincount(events["user"].to_numpy()[sel], minlength=n_users + 1)[1:]
        streams[label] = {"events": int(sel.sum()), "items": int(events.loc[sel, "item"].nunique()),
                          "length": _lengths(counts)}
    total = int(len(events))
    return {
        "users": int(n_users), "items": int(n_items), "events": total,
        "events_per_behavior": per_behavior,
        "streams": streams,
        "events_per_user": _lengths(np.bincount(events["user"].to_numpy(), minlength=n_users + 1)[1:]),
        "density": float(total / max(1, n_users * n_items)),
        "time_span": [int(events["timestamp"].min()), int(events["timestamp"].max())] if total else [0, 0],
        "ties": tie_statistics(events),
        "filtering": filtering,
    }


def _sample_row(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """``sample: 500 of 1,234 raw users (seed 0), before any filter or cut``; nothing when not sampled."""
    config = manifest.get("config", {})
    if config.get("sample_users") is None:
        return []
    f = manifest["statistics"].get("filtering", {})
    raw = f.get("input_users")
    of = f" of {raw:,} raw users" if isinstance(raw, int) else " users"
    return [("sample", f"{min(config['sample_users'], raw or config['sample_users']):,}{of} (seed "
             f"{config.get('seed', 0)}), drawn before any filter or cut")]


def format_statistics(manifest: dict[str, Any]) -> str:
    """A plain-text table of ``manifest["statistics"]`` (like the paper's Table 1)."""
    s = manifest["statistics"]
    b = manifest["behaviors"]
    rows = [("dataset", str(manifest.get("source", {}).get("name", "?"))),
            ("cut", str(manifest.get("config", {}).get("cut", "")) or "-"),
            ("behaviors", f"target={b['target']}  auxiliary="
             f"{'+'.join(b['auxiliary']) or 'none (single-behavior dataset)'}"),
            *_sample_row(manifest),
            ("users", f"{s['users']:,}"), ("items", f"{s['items']:,}"), ("events", f"{s['events']:,}")]
    for name, n in s["events_per_behavior"].items():
        rows.append((f"  {name}", f"{n:,}"))
    for label, st in s["streams"].items():
        ln = st["length"]
        rows.append((f"{label} stream", f"{st['events']:,} events, {st['items']:,} items; length/user "
                     f"mean {ln['mean']} p50 {ln['p50']:g} p90 {ln['p90']:g} p99 {ln['p99']:g} max {ln['max']}"))
    ln = s["events_per_user"]
    rows.append(("events/user", f"mean {ln['mean']} p50 {ln['p50']:g} p90 {ln['p90']:g} p99 {ln['p99']:g} "
                 f"max {ln['max']}"))
    rows.append(("density", f"{s['density']:.4%}"))
    if "ties" in s:
        t = s["ties"]
        rows += [("tied events", f"{t['tied_events']:,} of {s['events']:,} ({t['tied_events_share']:.1%}) share a "
                  "timestamp with another event of their user"),
                 ("tied valid/test", f"{t['users_valid_test_tied']:,} of {s['users']:,} users "
                  f"({t['users_valid_test_tied_share']:.1%}) have valid and test targets at one timestamp"),
                 ("tie order", t["order"])]
    for m, f in manifest.get("features", {}).items():
        rows.append((f"feature {m}", f"dim {f['dim']}, {f['missing']:,} items missing (masked)"))
    for k, v in s.get("filtering", {}).items():
        rows.append((f"filter: {k}", f"{v:,}" if isinstance(v, int) else str(v)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
