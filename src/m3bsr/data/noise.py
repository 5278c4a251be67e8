"""Controlled noise on a prepared dataset: a NEW prepared directory, the source left untouched.

Kinds (``level`` is the share or scale; every draw from ``numpy_rng(seed, "noise-<kind>")``):

* ``clicks`` — accidental clicks: ``round(level x A)`` new auxiliary events, A = the number of auxiliary
  events of the whole dataset. Each new event's user is the user of an auxiliary event drawn uniformly
  (so a user gets ``level`` times their own auxiliary events in expectation; users without auxiliary
  events get none), its item is uniform over the catalogue, its time uniform (integer) within the
  user's span (first to last event), its behavior the first auxiliary behavior. At an equal timestamp a
  new event sorts after the original ones. ``order`` is recomputed per user; the valid/test targets keep
  their user, item and candidates, with ``order`` pointing at the same event as before.
* ``features`` — modality noise: every item with a feature gets ``x + level x std_col x N(0, 1)`` per
  modality, ``std_col`` the column's std over the items that have the feature. Rows without a feature
  stay zero.
* ``swap`` — mismatched content: ``round(level x N)`` of the N items that have every modality's feature
  are drawn; their feature rows (all modalities, with their masks) move one step along the drawn
  cycle, so each drawn item carries another drawn item's features.

The new manifest is the source's plus ``noise: {kind, level, seed, source, source_fingerprint, changed}``
and a new ``fingerprint`` (sha256 of the source's fingerprint and the noise), so runs trained on one
are never taken for runs on the other. Data code: no model import.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from m3bsr.atomic import atomic_dir
from m3bsr.data.prepare import up_to_date
from m3bsr.data.prepared import EvalTargets, PreparedDataset, write_prepared
from m3bsr.errors import input_error
from m3bsr.seeding import numpy_rng

KINDS = ("clicks", "features", "swap")


@dataclass(frozen=True)
class NoiseSpec:
    """One noise kind at one level, drawn from ``seed``."""

    kind: Literal["clicks", "features", "swap"]
    level: float
    seed: int = 0

    @property
    def slug(self) -> str:
        """Directory-safe name, e.g. ``clicks-0.25``."""
        return f"{self.kind}-{self.level:g}"


def _fingerprint(ds: PreparedDataset, spec: NoiseSpec) -> str:
    parent = ds.manifest.get("fingerprint") or hashlib.sha256(
        json.dumps(ds.manifest, sort_keys=True, default=str).encode()).hexdigest()
    blob = json.dumps({"parent": parent, "kind": spec.kind, "level": spec.level, "seed": spec.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def add_clicks(ds: PreparedDataset, level: float, rng: np.random.Generator
               ) -> tuple[pd.DataFrame, EvalTargets, EvalTargets, int]:
    """(events, valid, test, number of clicks added) with accidental clicks (module docstring)."""
    aux_names = ds.manifest["behaviors"].get("auxiliary") or []
    if not aux_names:
        raise input_error(str(ds.root), "has no auxiliary behavior, so accidental clicks cannot be added",
                          "Use the features or swap noise on a single-behavior dataset")
    ev = ds.events
    aux_rows = np.flatnonzero(ev["stream"].to_numpy() == 0)
    n_new = int(round(level * len(aux_rows)))
    if n_new == 0:
        return ev.copy(), ds.valid, ds.test, 0
    users = ev["user"].to_numpy()[rng.choice(aux_rows, size=n_new, replace=True)]
    span = ev.groupby("user")["timestamp"].agg(["min", "max"])
    lo, hi = span.loc[users, "min"].to_numpy(), span.loc[users, "max"].to_numpy()
    times = lo + np.floor(rng.random(n_new) * (hi - lo + 1)).astype(np.int64)
    new = pd.DataFrame({"user": users, "item": rng.integers(1, ds.n_items + 1, n_new), "stream": 0,
                        "behavior": ds.behavior_names.index(aux_names[0]), "timestamp": times, "order": -1})
    old = ev.assign(_new=0, _old=ev["order"].to_numpy())
    merged = pd.concat([old, new.assign(_new=1, _old=np.arange(n_new))], ignore_index=True)
    merged = merged.sort_values(["user", "timestamp", "_new", "_old"], kind="stable").reset_index(drop=True)
    merged["order"] = merged.groupby("user").cumcount().astype(np.int64)
    # The targets point at the same events: map (user, old order) → new order.
    was = merged[merged["_new"] == 0]
    remap = pd.Series(was["order"].to_numpy(), index=pd.MultiIndex.from_arrays([was["user"], was["_old"]]))

    def moved(t: EvalTargets) -> EvalTargets:
        order = remap.loc[list(zip(t.user, t.order))].to_numpy() if len(t) else t.order
        return EvalTargets(user=t.user, item=t.item, order=order.astype(np.int64), candidates=t.candidates)

    return merged.drop(columns=["_new", "_old"]), moved(ds.valid), moved(ds.test), n_new


def feature_noise(features: dict[str, np.ndarray], masks: dict[str, np.ndarray], level: float,
                  rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
    """Gaussian noise of ``level`` x each column's std on the rows that have a feature; (features, rows changed)."""
    out, changed = {}, 0
    for m in sorted(features):
        x, has = features[m].astype(np.float32, copy=True), masks[m]
        if level > 0 and has.any():
            std = x[has].std(axis=0, dtype=np.float64)
            x[has] += (level * std * rng.standard_normal((int(has.sum()), x.shape[1]))).astype(np.float32)
            changed = max(changed, int(has.sum()))
        out[m] = x
    return out, changed


def swap_features(features: dict[str, np.ndarray], masks: dict[str, np.ndarray], level: float,
                  rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Rotate the feature rows of ``round(level x N)`` drawn items along a cycle; (features, masks, items moved)."""
    if not features:
        return {}, {}, 0
    has_all = np.logical_and.reduce([masks[m] for m in features])
    pool = np.flatnonzero(has_all)
    k = int(round(level * len(pool)))
    if k == 1:
        k = 2 if len(pool) >= 2 else 0  # one item cannot swap with itself
    chosen = rng.choice(pool, size=k, replace=False) if k else np.zeros(0, np.int64)
    src = np.roll(chosen, 1)
    feats, msk = {}, {}
    for m in features:
        x, has = features[m].copy(), masks[m].copy()
        x[chosen], has[chosen] = features[m][src], masks[m][src]
        feats[m], msk[m] = x, has
    return feats, msk, k


def inject_noise(source: str | Path, out: str | Path, spec: NoiseSpec, *, overwrite: bool = False) -> dict[str, Any]:
    """Write ``out``: the prepared dataset ``source`` with ``spec``'s noise; returns the new manifest.

    An ``out`` that already holds this noise on this source is left as it is (``up_to_date: True``);
    another one needs ``overwrite``."""
    if spec.kind not in KINDS:
        raise input_error(f"noise kind {spec.kind!r}", "unknown", f"Choose from: {', '.join(KINDS)}")
    if spec.level < 0 or (spec.kind != "features" and spec.level > (10 if spec.kind == "clicks" else 1)):
        raise input_error(f"noise {spec.kind} level {spec.level}", "out of range",
                          "Use a share >= 0 (at most 1 for swap)")
    ds = PreparedDataset.load(source)
    out = Path(out)
    fp = _fingerprint(ds, spec)
    if (current := up_to_date(out, fp)) is not None:
        return current
    if (out / "manifest.json").is_file() and not overwrite:
        raise input_error(str(out), "exists and holds other data", "Pass overwrite, or choose another directory")
    rng = numpy_rng(spec.seed, f"noise-{spec.kind}")
    events, valid, test = ds.events, ds.valid, ds.test
    features, masks = ds.features, ds.feature_masks
    if spec.kind == "clicks":
        events, valid, test, changed = add_clicks(ds, spec.level, rng)
    elif not features:
        raise input_error(str(ds.root), "has no content features to add noise to",
                          "Use the clicks noise, or prepare the dataset with features")
    elif spec.kind == "features":
        features, changed = feature_noise(features, masks, spec.level, rng)
    else:
        features, masks, changed = swap_features(features, masks, spec.level, rng)
    manifest = copy.deepcopy({k: v for k, v in ds.manifest.items()
                              if k not in ("schema_version", "n_users", "n_items", "features")})
    manifest["fingerprint"] = fp
    manifest["noise"] = {"kind": spec.kind, "level": spec.level, "seed": spec.seed,
                         "source": str(Path(source).resolve()), "source_fingerprint": ds.manifest.get("fingerprint"),
                         "changed": changed}
    with atomic_dir(out, overwrite=True) as tmp:
        write_prepared(tmp, manifest=manifest, events=events, users=ds.users, items=ds.items, valid=valid, test=test,
                       features=features, feature_masks=masks)
    return json.loads((out / "manifest.json").read_text())
