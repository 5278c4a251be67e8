"""data/noise.py: each noise kind changes a prepared dataset by exactly the asked share and nothing else."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_tiny_prepared
from m3bsr.data.noise import NoiseSpec, inject_noise
from m3bsr.data.prepared import PreparedDataset
from m3bsr.errors import InputError


@pytest.fixture
def clean(tmp_path):
    return make_tiny_prepared(tmp_path / "clean", n_users=30, n_items=50)


def target_events(ds, split):
    """(user, item, timestamp, stream) of each target's event, found through its ``order``."""
    t = getattr(ds, split)
    ev = ds.events.set_index(["user", "order"])
    rows = ev.loc[list(zip(t.user, t.order))]
    return rows[["item", "timestamp", "stream"]].to_numpy(), t.item, t.candidates


@pytest.mark.parametrize("level", [0.1, 0.5, 1.0])
def test_clicks_add_exactly_the_share_of_auxiliary_events_and_keep_the_targets(clean, tmp_path, level):
    before = PreparedDataset.load(clean)
    manifest = inject_noise(clean, tmp_path / "noisy", NoiseSpec("clicks", level, seed=3))
    after = PreparedDataset.load(tmp_path / "noisy")
    n_aux = int((before.events["stream"] == 0).sum())
    added = len(after.events) - len(before.events)
    assert added == round(level * n_aux) == manifest["noise"]["changed"]
    assert int((after.events["stream"] == 0).sum()) == n_aux + added  # every new event is auxiliary
    # the original events are all still there, and the new ones lie within each user's span
    key = ["user", "item", "stream", "behavior", "timestamp"]
    old = before.events[key].value_counts()
    new = after.events[key].value_counts()
    assert (new.reindex(old.index) >= old).all()
    span = before.events.groupby("user")["timestamp"].agg(["min", "max"])
    t = after.events.join(span, on="user")
    assert ((t["timestamp"] >= t["min"]) & (t["timestamp"] <= t["max"])).all()
    # order is a fresh 0..n-1 rank per user, sorted by time
    ev = after.events
    assert (ev.groupby("user")["order"].transform(lambda o: (o.to_numpy() == np.arange(len(o))).all())).all()
    assert (ev.groupby("user")["timestamp"].diff().fillna(0) >= 0).all()
    for split in ("valid", "test"):  # the targets are the same events, items and candidates
        a, item_a, cand_a = target_events(before, split)
        b, item_b, cand_b = target_events(after, split)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(item_a, item_b)
        np.testing.assert_array_equal(cand_a, cand_b)
    for m in before.features:  # content untouched
        np.testing.assert_array_equal(before.features[m], after.features[m])


def test_feature_noise_has_the_asked_relative_scale_and_touches_only_featured_rows(clean, tmp_path):
    before = PreparedDataset.load(clean)
    inject_noise(clean, tmp_path / "noisy", NoiseSpec("features", 0.5, seed=1))
    after = PreparedDataset.load(tmp_path / "noisy")
    for m, x in before.features.items():
        has = before.feature_masks[m]
        diff = after.features[m] - x
        assert (diff[~has] == 0).all() and (diff[has] != 0).all()
        ratio = diff[has].std(axis=0) / x[has].std(axis=0)
        assert abs(ratio.mean() - 0.5) < 0.06  # sigma = 0.5 of each column's std
        np.testing.assert_array_equal(after.feature_masks[m], has)
    assert before.events.equals(after.events)


@pytest.mark.parametrize("level", [0.2, 0.5])
def test_swap_moves_exactly_the_share_of_items_to_other_items_rows(clean, tmp_path, level):
    before = PreparedDataset.load(clean)
    manifest = inject_noise(clean, tmp_path / "noisy", NoiseSpec("swap", level, seed=2))
    after = PreparedDataset.load(tmp_path / "noisy")
    has_all = np.logical_and(*[before.feature_masks[m] for m in sorted(before.features)])
    moved = np.zeros(before.n_items + 1, bool)
    for m in before.features:
        moved |= (after.features[m] != before.features[m]).any(axis=1)
    assert moved.sum() == round(level * has_all.sum()) == manifest["noise"]["changed"]
    assert not moved[~has_all].any()
    # each moved item now carries another item's rows (the same multiset of rows)
    x0, x1 = before.features["image"], after.features["image"]
    assert sorted(map(tuple, x1[moved])) == sorted(map(tuple, x0[moved]))
    assert before.events.equals(after.events)


def test_noisy_manifest_records_the_noise_and_a_new_fingerprint(clean, tmp_path):
    m1 = inject_noise(clean, tmp_path / "a", NoiseSpec("clicks", 0.25, seed=0))
    assert m1["noise"]["kind"] == "clicks" and m1["noise"]["level"] == 0.25
    src_manifest = json.loads((clean / "manifest.json").read_text())
    assert m1["fingerprint"] != src_manifest.get("fingerprint")
    again = inject_noise(clean, tmp_path / "a", NoiseSpec("clicks", 0.25, seed=0))
    assert again.get("up_to_date") and again["fingerprint"] == m1["fingerprint"]
    other = inject_noise(clean, tmp_path / "b", NoiseSpec("clicks", 0.25, seed=1))
    assert other["fingerprint"] != m1["fingerprint"]
    a, b = PreparedDataset.load(tmp_path / "a"), PreparedDataset.load(tmp_path / "b")
    assert not a.events.equals(b.events)  # another seed, other clicks
    with pytest.raises(InputError, match="exists and holds other data"):
        inject_noise(clean, tmp_path / "a", NoiseSpec("clicks", 0.5, seed=0))
    with pytest.raises(InputError, match="has no content features"):
        inject_noise(make_tiny_prepared(tmp_path / "idonly", dims={}), tmp_path / "c", NoiseSpec("swap", 0.1))
