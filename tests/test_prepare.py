"""prepare: filters, order, leave-one-out split, candidates, item table, features, cache, real data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from m3bsr.batch import PAD_TIME
from m3bsr.data.batches import WindowBuilder
from m3bsr.data.config import PrepareConfig, load_prepare_config
from m3bsr.data.prepare import prepare, sample_candidates
from m3bsr.data.prepared import PreparedDataset
from m3bsr.data.stats import format_statistics
from m3bsr.errors import InputError

QUIET = dict(log=lambda m: None)


def _cfg(**kw) -> PrepareConfig:
    raw = {"name": "t", "events": {"path": "events.csv"},
           "behaviors": {"target": "buy", "auxiliary": ["view"], "ignore": ["cart"]},
           "min_user_events": 3, "keep_last": 50, "min_target_events": 2, "n_negatives": 5}
    for k, v in kw.items():
        raw[k] = v
    return PrepareConfig.model_validate(raw)


def _write(tmp_path, rows) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    pd.DataFrame(rows, columns=["user", "item", "behavior", "timestamp"]).to_csv(src / "events.csv", index=False)
    return src


def test_hand_computed_small_log(tmp_path):
    rows = [  # input order matters for the tie at t=20
        ("a", "x", "view", 10), ("a", "z", "view", 20), ("a", "y", "buy", 20), ("a", "x", "buy", 30),
        ("a", "w", "cart", 35), ("a", "z", "buy", 40),
        ("b", "x", "view", 1), ("b", "y", "buy", 2),                       # 2 events < min_user_events
        ("c", "x", "view", 1), ("c", "y", "view", 2), ("c", "z", "buy", 3),  # 1 buy < min_target_events
        ("d", "q", "buy", 5), ("d", "x", "view", 6), ("d", "y", "buy", 7), ("d", "x", "view", 8),
    ]
    m = prepare(_write(tmp_path, rows), _cfg(n_negatives=1), tmp_path / "out", **QUIET)
    ds = PreparedDataset.load(tmp_path / "out")
    assert m["statistics"]["filtering"]["users_dropped_min_user_events"] == 1
    assert m["statistics"]["filtering"]["users_dropped_min_target_events"] == 1
    assert m["statistics"]["filtering"]["events_other_behaviors_dropped"] == 1
    assert ds.users["original"].tolist() == ["a", "d"]
    assert ds.items["original"].tolist() == ["q", "x", "y", "z"]
    item = dict(zip(ds.items["original"], ds.items["item"]))
    a = ds.events[ds.events.user == 1]
    assert a["order"].tolist() == [0, 1, 2, 3, 4]
    assert [ds.items["original"][i - 1] for i in a["item"]] == ["x", "z", "y", "x", "z"]  # tie: input order
    assert a["stream"].tolist() == [0, 0, 1, 1, 1]
    assert ds.behavior_names == ["view", "buy"]
    assert a["behavior"].tolist() == [0, 0, 1, 1, 1]
    # leave-one-out: a's buys y(2) x(3) z(4); d's buys q(0) y(2)
    assert ds.test.item.tolist() == [item["z"], item["y"]] and ds.test.order.tolist() == [4, 2]
    assert ds.valid.item.tolist() == [item["x"], item["q"]] and ds.valid.order.tolist() == [3, 0]
    # a touched w (cart, dropped), x, y, z: of the catalogue q,x,y,z only q is unseen; d never touched z
    assert ds.test.candidates.tolist() == [[item["z"], item["q"]], [item["y"], item["z"]]]
    assert ds.valid.candidates.tolist() == [[item["x"], item["q"]], [item["q"], item["z"]]]


def test_tied_timestamps_reported_with_their_order(tmp_path, capsys):
    from m3bsr.cli import main

    rows = [
        ("a", "x", "view", 10), ("a", "z", "view", 20), ("a", "y", "buy", 20), ("a", "x", "buy", 30),
        ("a", "z", "buy", 30),                                   # a: 4 tied events; valid x, test z both at 30
        ("d", "q", "buy", 5), ("d", "x", "view", 6), ("d", "y", "buy", 7), ("d", "x", "view", 8),
        ("d", "w", "view", 9),                                   # d: no tie (t=5 also in e: another user)
        ("e", "q", "buy", 1), ("e", "y", "buy", 2), ("e", "x", "buy", 2), ("e", "z", "view", 5),
    ]                                                            # e: y, x tied at 2; x is the later row
    logged = []
    m = prepare(_write(tmp_path, rows), _cfg(n_negatives=1), tmp_path / "out", log=logged.append)
    ties = m["statistics"]["ties"]
    assert (ties["tied_events"], ties["users_valid_test_tied"]) == (6, 2)  # of 14 events, of 3 users
    assert ties["tied_events_share"] == pytest.approx(6 / 14) and ties["users_valid_test_tied_share"] == 2 / 3
    ds = PreparedDataset.load(tmp_path / "out")
    item = dict(zip(ds.items["item"], ds.items["original"]))
    # the order the report states: of tied events the later input row counts as later (e: x is test)
    assert [item[i] for i in ds.test.item] == ["z", "y", "x"] and [item[i] for i in ds.valid.item] == ["x", "q", "y"]
    assert any("warning: 66.7% of users have their valid and test targets at the same timestamp" in x
               for x in logged)
    assert main(["prepare", "--inspect", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "6 of 14 (42.9%) share a timestamp with another event of their user" in table
    assert "2 of 3 users (66.7%) have valid and test targets at one timestamp" in table
    assert "tie order" in table and "the later row counts as later" in table
    # a directory prepared before ties were recorded: --inspect computes them from events.parquet
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del manifest["statistics"]["ties"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["prepare", "--inspect", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == table


def test_too_few_unseen_items_is_an_error(tmp_path):
    rows = [("a", "x", "view", 1), ("a", "y", "buy", 2), ("a", "z", "buy", 3),
            ("b", "q", "buy", 1), ("b", "r", "buy", 2), ("b", "s", "view", 3)]
    with pytest.raises(InputError, match=r"user 'a'.*only 3 of the 6 catalogue items are unseen; n_negatives=5"):
        prepare(_write(tmp_path, rows), _cfg(n_negatives=5), tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def _random_log(n_users=40, n_items=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(3, 40))
        t = np.sort(rng.integers(0, 50, n))  # many ties
        beh = rng.choice(["view", "buy", "cart"], size=n, p=[0.6, 0.3, 0.1])
        for k in range(n):
            rows.append((f"u{u}", f"i{rng.integers(0, n_items)}", beh[k], int(t[k])))
    rows = [rows[i] for i in rng.permutation(len(rows))]  # input order != time order
    return rows


def test_split_never_leaks_and_candidates_exclude_the_whole_log(tmp_path):
    rows = _random_log()
    out = tmp_path / "out"
    prepare(_write(tmp_path, rows), _cfg(keep_last=6, n_negatives=20), out, **QUIET)
    ds = PreparedDataset.load(out)
    log = pd.DataFrame(rows, columns=["user", "item", "behavior", "timestamp"])
    touched = log.groupby("user")["item"].apply(set).to_dict()  # any behavior, before any cut
    orig_user = dict(zip(ds.users["user"], ds.users["original"]))
    orig_item = np.concatenate([[""], ds.items["original"].to_numpy()])
    ev = ds.events
    assert (ev.groupby("user")["order"].apply(lambda o: (o.to_numpy() == np.arange(len(o))).all())).all()
    assert (ev.groupby(["user", "stream"]).size() <= 6).all()
    for split in ("valid", "test"):
        t = getattr(ds, split)
        assert len(t) == ds.n_users
        for r in range(len(t)):
            u, q = t.user[r], t.order[r]
            mine = ev[ev.user == u]
            tgt = mine[mine.stream == 1]
            assert q == tgt["order"].iloc[-1 if split == "test" else -2]
            assert mine.loc[mine.order == q, "item"].item() == t.item[r]
            before = mine[mine.order < q]
            assert (before["timestamp"] <= mine.loc[mine.order == q, "timestamp"].item()).all()
            c = t.candidates[r]
            assert c[0] == t.item[r] and (c == t.item[r]).sum() == 1 and len(set(c)) == len(c) == 21
            assert not set(orig_item[c[1:]]) & touched[orig_user[u]]
        w = WindowBuilder(ds, max_len=4).eval_windows(split)
        q = w.query_times[:, 0]
        for times in (w.aux_times, w.tgt_times):
            real = times < 2**62
            assert (np.where(real, times, -1) < q[:, None]).all()
        assert (w.candidates[:, 0, 0] == w.labels[:, 0]).all()



@pytest.mark.parametrize("max_len", [3, 50])
def test_training_windows_never_hold_held_out_events(tmp_path, max_len):
    """Training windows hold every target event before the user's valid target exactly once, and no
    event at or after it: not the valid or test target, nor a click after them; a window's clicks
    come before its last target. With max_len 3 a user's targets span several windows."""
    prepare(_write(tmp_path, _random_log()), _cfg(keep_last=30, n_negatives=20), tmp_path / "out", **QUIET)
    ds = PreparedDataset.load(tmp_path / "out")
    held = {int(u): min(v, t) for u, v, t in zip(ds.valid.user, ds.valid.order, ds.test.order)}
    ev = ds.events
    first = ev["user"].map(held)
    assert ((ev.stream == 0) & (ev.order > first)).any()  # clicks after a held-out target exist
    before = ev[(ev.stream == 1) & (ev.order < first)]
    expected = sorted(zip(before.user.tolist(), before.order.tolist()))
    w = WindowBuilder(ds, max_len).train_windows()
    seen = []
    for row in range(len(w)):
        u, real = int(w.users[row]), w.labels[row] != 0
        q = w.query_times[row][real]
        np.testing.assert_array_equal(q, w.tgt_times[row][real])  # every target is a query
        assert (w.tgt_times[row][~real] == PAD_TIME).all()
        aux = w.aux_times[row][w.aux_times[row] < PAD_TIME]
        assert real.any() and (q < held[u]).all() and (aux < q.max()).all(), (u, q, aux, held[u])
        seen += [(u, int(t)) for t in q]
    assert sorted(seen) == expected
    assert max_len > 3 or len(w) > ds.n_users  # some user's targets did span several windows

def test_candidates_are_uniform_over_unseen_items():
    rng = np.random.default_rng(0)
    n_items, n_neg, reps = 50, 10, 3000
    seen_u = np.array([1] * 10 + [2] * 39)
    seen_i = np.concatenate([np.arange(1, 11), np.arange(1, 40)])  # user 2 is dense (exact-pool path)
    users = np.array([1] * reps + [2] * 300)
    pos = np.where(users == 1, 1, 2)
    c = sample_candidates(users, pos, seen_u, seen_i, n_items, n_neg, rng, np.array(["a", "b"]))
    assert (c[:, 0] == pos).all()
    neg1, neg2 = c[:reps, 1:], c[reps:, 1:]
    assert all(len(set(r)) == n_neg for r in neg1)
    counts = np.bincount(neg1.ravel(), minlength=n_items + 1)
    assert counts[:11].sum() == 0
    expected = reps * n_neg / 40
    assert np.abs(counts[11:] - expected).max() < 0.15 * expected
    assert set(np.unique(neg2)) == set(range(40, 51)) and all(len(set(r)) == n_neg for r in neg2)
    again = sample_candidates(users, pos, seen_u, seen_i, n_items, n_neg, np.random.default_rng(0),
                              np.array(["a", "b"]))
    assert (again == c).all()


def test_cache_up_to_date_and_config_change(tmp_path):
    src = _write(tmp_path, _random_log())
    out = tmp_path / "out"
    prepare(src, _cfg(n_negatives=20), out, **QUIET)
    stamp = (out / "events.parquet").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = prepare(src, _cfg(n_negatives=20), out, **QUIET)
    assert again.get("up_to_date") and time.perf_counter() - t0 < 1.0
    assert (out / "events.parquet").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="exists and was prepared from other sources or another config"):
        prepare(src, _cfg(n_negatives=10), out, **QUIET)
    prepare(src, _cfg(n_negatives=10), out, overwrite=True, **QUIET)
    assert PreparedDataset.load(out).test.candidates.shape[1] == 11
    (src / "events.csv").write_text((src / "events.csv").read_text() + "u0,i1,view,49\n")  # source changed
    with pytest.raises(InputError, match="exists"):
        prepare(src, _cfg(n_negatives=10), out, **QUIET)


def test_unset_single_behavior_key_keeps_earlier_caches_up_to_date():
    """events.behavior came later: left unset, a preset's fingerprint is the one computed before it
    existed (pinned), so prepared directories of earlier runs stay up to date, not "another config"."""
    from m3bsr.data.prepare import _fingerprint

    files = [{"role": "events", "sha256": "0" * 64}]
    assert _fingerprint(load_prepare_config("ml100k_mm"), files) == \
        "887f15084634eaaa05b13799e790034f30b8395de244824b0da3be4068403c00"
    assert _fingerprint(load_prepare_config("ml100k_mm", overrides=["behaviors.auxiliary=[]",
                                                                    "behaviors.ignore=[click]"]), files) != \
        _fingerprint(load_prepare_config("ml100k_mm"), files)
    # sample_users came later too: unset it leaves the pinned fingerprint alone, set it is part of it
    assert _fingerprint(load_prepare_config("ml100k_mm", overrides=["sample_users=100"]), files) != \
        _fingerprint(load_prepare_config("ml100k_mm"), files)


def _users_events(ds: PreparedDataset) -> dict[str, list[tuple]]:
    """Original user → [(original item, behavior name, timestamp), ...] in order."""
    user = dict(zip(ds.users["user"], ds.users["original"]))
    item = dict(zip(ds.items["item"], ds.items["original"]))
    out: dict[str, list[tuple]] = {}
    for u, i, b, t in zip(ds.events.user, ds.events.item, ds.events.behavior, ds.events.timestamp):
        out.setdefault(user[u], []).append((item[i], ds.behavior_names[b], int(t)))
    return out


def test_sample_users_before_the_cut_deterministic(tmp_path):
    # 40 users, each with >= 2 buys; even ones have 6 events, odd ones 4 (some timestamps tied)
    rows = [(f"u{u}", f"i{(u * 7 + k) % 50}", "buy" if k % 2 else "view", 10 * u + k // 2)
            for u in range(40) for k in range(6 if u % 2 == 0 else 4)]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    src = _write(tmp_path, rows)
    cfg = dict(min_user_events=1, keep_last=2, n_negatives=3)
    prepare(src, _cfg(**cfg), tmp_path / "full", **QUIET)
    every = _users_events(PreparedDataset.load(tmp_path / "full"))
    assert len(every) == 40

    def sampled(name, n, seed, source=src, **kw):
        m = prepare(source, _cfg(**{**cfg, **kw}, sample_users=n, seed=seed), tmp_path / name, **QUIET)
        return m, _users_events(PreparedDataset.load(tmp_path / name))

    m, a = sampled("a", 12, 0)
    f = m["statistics"]["filtering"]
    assert len(a) == 12 and (m["config"]["sample_users"], m["config"]["seed"]) == (12, 0)
    assert f["input_users"] == 40 and f["users_not_sampled"] == 28
    assert f["events_not_sampled"] == sum(r[0] not in a for r in rows)
    assert all(a[u] == every[u] for u in a)  # a sampled user's events: exactly as without sampling (cut included)
    assert sampled("a2", 12, 0)[1] == a  # the same seed: the same users
    (tmp_path / "shuffled").mkdir()
    shuffled = _write(tmp_path / "shuffled", [rows[i] for i in np.random.default_rng(1).permutation(len(rows))])
    assert set(sampled("a3", 12, 0, shuffled)[1]) == set(a)  # the draw does not depend on the row order
    assert set(sampled("b", 12, 1)[1]) != set(a)  # another seed: other users
    # the filters run after the draw: the same 12 users are drawn, then those with 4 events go
    assert set(sampled("d", 12, 0, min_user_events=5)[1]) == {u for u in a if int(u[1:]) % 2 == 0} != set(a)
    m, c = sampled("c", 100, 0)  # more than the log has: every user
    assert c == every and m["statistics"]["filtering"]["users_not_sampled"] == 0
    table = format_statistics(json.loads((tmp_path / "a" / "manifest.json").read_text()))
    assert "12 of 40 raw users (seed 0), drawn before any filter or cut" in table


def test_sample_users_and_seed_flags(tmp_path, capsys):
    from m3bsr.cli import main

    src = _write(tmp_path, _random_log(n_users=30))
    cfg = tmp_path / "p.yaml"
    cfg.write_text("events: {path: events.csv}\nbehaviors: {target: buy, auxiliary: [view], ignore: [cart]}\n"
                   "min_user_events: 1\nn_negatives: 3\n")
    argv = ["prepare", str(src), "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv + ["--sample-users", "10", "--seed", "3"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (m["config"]["sample_users"], m["config"]["seed"]) == (10, 3)
    assert m["statistics"]["users"] <= 10 and m["statistics"]["filtering"]["users_not_sampled"] == 20
    assert main(argv + ["--sample-users", "10", "--seed", "3"]) == 0 and "up to date" in capsys.readouterr().out
    assert main(argv + ["--sample-users", "0"]) == 2
    assert "sample_users" in capsys.readouterr().err


def test_item_table_and_features(tmp_path):
    from safetensors.numpy import save_file

    rows = [(f"{u}", f"{i}", "buy" if (u + i) % 2 else "view", 10 * u + i) for u in range(1, 6) for i in range(1, 9)
            if i != u]  # user u never touches item u
    src = _write(tmp_path, rows)
    pd.DataFrame({"item": [1, 2, 3, 4, 5, 6, 7, 8, 99], "brand": ["b", "a", "", "a", "c", "c", "b", "a", "z"],
                  "title": ["T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8", "T99"],
                  "plot": ["p1", "", "p3", "p4", "p5", "p6", "p7", "p8", "p99"]}).to_csv(src / "items.csv", index=False)
    (src / "img").mkdir()
    (src / "img" / "3.jpg").write_bytes(b"x")
    # text: parquet without item 2, with an unknown item 77; image: safetensors; side: npy + ids
    pd.DataFrame({"item": [1, 3, 4, 5, 6, 7, 8, 77],
                  "embedding": [[float(i), -float(i)] for i in (1, 3, 4, 5, 6, 7, 8, 77)]}).to_parquet(
        src / "text.parquet")
    save_file({"ids": np.array([8, 1], np.int64), "features": np.array([[8, 8, 8], [1, 1, 1]], np.float32)},
              str(src / "image.safetensors"))
    np.save(src / "extra.npy", np.arange(8, dtype=np.float32).reshape(8, 1) + 1)
    (src / "extra.npy.ids").write_text("\n".join(str(i) for i in range(8, 0, -1)) + "\n")
    cfg = _cfg(min_user_events=1, n_negatives=1, events={"path": "events.csv", "integer_ids": True},
               items={"path": "items.csv", "side": ["brand"], "text": ["title", "plot"], "image": "img/{item}.jpg",
                      "labels": ["plot"]},
               features={"text": "text.parquet", "image": "image.safetensors", "extra": "extra.npy"})
    m = prepare(src, cfg, tmp_path / "out", **QUIET)
    ds = PreparedDataset.load(tmp_path / "out")
    it = ds.items.set_index("original")
    assert it.index.tolist() == [str(i) for i in range(1, 9)]
    assert it["side_brand"].tolist() == [2, 1, 0, 1, 3, 3, 2, 1]  # a=1 b=2 c=3, empty = 0
    assert it.loc["2", "text"] == "T2" and it.loc["1", "text"] == "T1. p1"
    assert it.loc["3", "image"].endswith("img/3.jpg") and pd.isna(it.loc["1", "image"])
    assert it["label_plot"].tolist()[2:] == ["p3", "p4", "p5", "p6", "p7", "p8"] and pd.isna(it.loc["2", "label_plot"])
    assert set(ds.catalogue().side_ids) == {"brand"}  # a label is no model input
    x, mask = ds.features["text"], ds.feature_masks["text"]
    assert x.shape == (9, 2) and x.dtype == np.float32
    assert mask.tolist() == [False, True, False, True, True, True, True, True, True]
    assert (x[2] == 0).all() and x[4].tolist() == [4.0, -4.0]
    assert m["feature_files"]["text"]["unused_rows"] == 1 and m["features"]["text"]["missing"] == 1
    assert ds.feature_masks["image"].sum() == 2 and ds.features["image"][8].tolist() == [8, 8, 8]
    assert ds.features["extra"][1:, 0].tolist() == [8, 7, 6, 5, 4, 3, 2, 1]
    assert ds.catalogue().side_sizes["brand"] == 4


def test_shared_retail_rocket_statistics(shared_data, tmp_path):
    cfg = load_prepare_config("retail_rocket")
    t0 = time.perf_counter()
    m = prepare(shared_data / "retail_rocket", cfg, tmp_path / "rr", **QUIET)
    seconds = time.perf_counter() - t0
    print(f"\nprepare retail_rocket: {seconds:.1f} s\n" + format_statistics(m))
    ds = PreparedDataset.load(tmp_path / "rr")
    assert ds.behavior_names == ["view", "cart", "buy"] and ds.n_users == len(ds.test) == len(ds.valid)
    assert ds.test.candidates.shape == (ds.n_users, 100)
    assert (ds.events.groupby(["user", "stream"]).size() <= 50).all()
    assert json.loads((tmp_path / "rr" / "manifest.json").read_text())["source"]["files"][0]["sha256"]
    # The statistics (Table 1) against the paper cut redone here from the raw log, step by step.
    raw = pd.read_csv(shared_data / "retail_rocket" / "events.csv.gz")
    expected = {"input_events": len(raw), "input_users": raw.user.nunique(), "input_items": raw.item.nunique()}
    raw["row"] = np.arange(len(raw))
    kept = raw[raw.behavior.isin(["view", "cart", "buy"])]
    expected["events_other_behaviors_dropped"] = len(raw) - len(kept)
    small = kept.groupby("user").item.transform("size") < 5
    expected["users_dropped_min_user_events"] = kept[small].user.nunique()
    kept = kept[~small].sort_values(["user", "timestamp", "row"], kind="stable")
    kept = kept.assign(stream=(kept.behavior == "buy").astype(int))
    from_end = kept.groupby(["user", "stream"]).cumcount(ascending=False)
    expected["events_dropped_keep_last"] = int((from_end >= 50).sum())
    kept = kept[from_end < 50]
    few = kept.groupby("user").stream.transform("sum") < 2
    expected["users_dropped_min_target_events"] = kept[few].user.nunique()
    kept = kept[~few]
    s = m["statistics"]
    assert {k: s["filtering"][k] for k in expected} == expected
    assert min(expected.values()) >= 0 and expected["events_dropped_keep_last"] > 0
    assert (s["users"], s["items"], s["events"]) == (kept.user.nunique(), kept.item.nunique(), len(kept))
    assert (s["users"], s["items"], s["events"]) == (ds.n_users, ds.n_items, len(ds.events))
    assert s["events_per_behavior"] == {b: int((kept.behavior == b).sum()) for b in ("view", "cart", "buy")}
    for label, stream in (("auxiliary", 0), ("target", 1)):
        part = kept[kept.stream == stream]
        per_user = part.groupby("user").size().reindex(kept.user.unique(), fill_value=0)
        assert s["streams"][label]["events"] == len(part) and s["streams"][label]["items"] == part.item.nunique()
        assert s["streams"][label]["length"]["max"] == per_user.max()
        assert s["streams"][label]["length"]["mean"] == pytest.approx(per_user.mean(), abs=0.005)
        assert s["streams"][label]["length"]["p50"] == per_user.median()
    assert s["density"] == pytest.approx(len(kept) / (kept.user.nunique() * kept.item.nunique()))
    assert s["time_span"] == [int(kept.timestamp.min()), int(kept.timestamp.max())]


def test_inspect_prints_table_one(tmp_path, capsys):
    from m3bsr.cli import main as cli_main

    prepare(_write(tmp_path, _random_log()), _cfg(n_negatives=20), tmp_path / "out", **QUIET)
    assert cli_main(["prepare", "--inspect", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    ds = PreparedDataset.load(tmp_path / "out")
    for row in ("users", "items", "events", "view", "buy", "target stream", "density",
                "filter: users_dropped_min_user_events"):
        assert row in text, row
    n_view = int((ds.events.behavior == 0).sum())
    assert any(line.split() == ["view", f"{n_view:,}"] for line in text.splitlines())


def test_fixed_size_list_parquet_features(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from m3bsr.data.features import align_features

    x = np.arange(6, dtype=np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x), 3)
    pq.write_table(pa.table({"item": pa.array(["b", "a"]), "embedding": emb}), tmp_path / "f.parquet")
    out, mask, info = align_features(tmp_path / "f.parquet", np.array(["a", "b", "c"], dtype=object))
    assert out.tolist() == [[0, 0, 0], [3, 4, 5], [0, 1, 2], [0, 0, 0]]
    assert mask.tolist() == [False, True, True, False] and info["missing_items"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("folder,preset,sets", [("ml100k_mm", "ml100k_mm", []), ("tmall", "tmall", []),
                                                ("otto_fixture", "otto", ["n_negatives=20"])])
def test_shared_datasets_prepare(shared_data, tmp_path, folder, preset, sets):
    t0 = time.perf_counter()
    m = prepare(shared_data / folder, preset, tmp_path / folder, overrides=sets, **QUIET)
    print(f"\nprepare {folder}: {time.perf_counter() - t0:.1f} s\n" + format_statistics(m))
    ds = PreparedDataset.load(tmp_path / folder)
    assert len(ds.test) == len(ds.valid) == ds.n_users > 0
    assert (ds.test.candidates[:, 0] == ds.test.item).all()


# --------------------------------------------------------------------------- single-behavior logs


def _write_plays(tmp_path, rows, name="plays.csv") -> Path:
    """``rows`` of (user, item, timestamp) as a CSV with no behavior column."""
    path = tmp_path / name
    pd.DataFrame(rows, columns=["user", "item", "timestamp"]).to_csv(path, index=False)
    return path


def test_single_behavior_log_without_behavior_column(tmp_path):
    rows = [("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("a", "x", 4),
            ("b", "y", 1), ("b", "w", 2),                      # 2 events < min_user_events
            ("c", "w", 5), ("c", "v", 6), ("c", "x", 7)]
    cfg = load_prepare_config(None, None, ["events.behavior=play", "min_user_events=3", "n_negatives=1"])
    assert cfg.behaviors.target == "play" and cfg.behaviors.auxiliary == []  # one key names the behavior
    m = prepare(_write_plays(tmp_path, rows), cfg, tmp_path / "out", **QUIET)
    ds = PreparedDataset.load(tmp_path / "out")
    assert m["behaviors"] == {"names": ["play"], "target": "play", "auxiliary": []}
    s = m["statistics"]
    assert s["streams"]["auxiliary"]["events"] == 0 and s["streams"]["target"]["events"] == 7
    assert s["events_per_behavior"] == {"play": 7} and s["filtering"]["users_dropped_min_user_events"] == 1
    assert "auxiliary=none (single-behavior dataset)" in format_statistics(m)
    assert (ds.events["stream"] == 1).all() and (ds.events["behavior"] == 0).all()
    assert ds.users["original"].tolist() == ["a", "c"]
    item = dict(zip(ds.items["original"], ds.items["item"]))
    assert ds.test.item.tolist() == [item["x"], item["x"]] and ds.test.order.tolist() == [3, 2]
    assert ds.valid.item.tolist() == [item["z"], item["v"]] and ds.valid.order.tolist() == [2, 1]
    # a touched x, y, z: only v and w are unseen; c touched w, v, x: only y and z
    assert {int(c) for c in ds.test.candidates[:, 1]} <= {item["v"], item["w"], item["y"], item["z"]}
    assert ds.test.candidates[0, 1] in (item["v"], item["w"]) and ds.test.candidates[1, 1] in (item["y"], item["z"])
    cat = ds.catalogue()
    assert cat.behavior_names == ["play"] and cat.target_behavior == 1 and cat.single_behavior
    w = WindowBuilder(ds, max_len=4)
    train, test = w.train_windows(), w.eval_windows("test")
    assert (train.aux_items == 0).all() and (test.aux_items == 0).all()  # the auxiliary stream is empty
    assert train.n_targets == 7 - 4  # every target before the valid/test ones
    assert test.tgt_items.shape == (2, 4) and test.candidates.shape == (2, 1, 2)


def _multi_log(n_users=50, n_items=80, seed=1):
    """A click/favor log in input order that is not time order, with ties."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(2, 30))
        t = np.sort(rng.integers(0, 40, n))
        beh = rng.choice(["click", "favor"], size=n, p=[0.6, 0.4])
        rows += [(f"u{u}", f"i{rng.integers(0, n_items)}", beh[k], int(t[k])) for k in range(n)]
    return [rows[i] for i in rng.permutation(len(rows))]


def _targets_by_original(ds: PreparedDataset) -> dict:
    """Per original user: target-stream items (original ids) in order, and the valid / test items."""
    user = dict(zip(ds.users["user"], ds.users["original"]))
    item = np.concatenate([[""], ds.items["original"].to_numpy()])
    tgt = ds.events[ds.events.stream == 1]
    seq = {user[u]: item[g["item"].to_numpy()].tolist() for u, g in tgt.groupby("user")}
    return {u: (seq[u], item[ds.valid.item[k]], item[ds.test.item[k]])
            for k, u in enumerate(user[x] for x in ds.valid.user)}


def test_single_behavior_split_equals_multi_behavior_without_auxiliary(tmp_path):
    """The same favors give the same split whether the clicks are an auxiliary stream, ignored, or absent."""
    rows = _multi_log()
    log = pd.DataFrame(rows, columns=["user", "item", "behavior", "timestamp"])
    src = tmp_path / "src"
    src.mkdir()
    log.to_csv(src / "events.csv", index=False)
    favors = _write_plays(tmp_path, log.loc[log.behavior == "favor", ["user", "item", "timestamp"]].values.tolist())
    base = {"name": "t", "events": {"path": "events.csv"}, "min_user_events": 2, "keep_last": 8,
            "min_target_events": 2, "n_negatives": 10}
    multi = PrepareConfig.model_validate({**base, "behaviors": {"target": "favor", "auxiliary": ["click"]}})
    ignored = PrepareConfig.model_validate({**base, "behaviors": {"target": "favor", "ignore": ["click"]}})
    single = PrepareConfig.model_validate({**base, "events": {"behavior": "favor"}})
    for cfg, source, name in ((multi, src, "multi"), (ignored, src, "ignored"), (single, favors, "single")):
        prepare(source, cfg, tmp_path / name, **QUIET)
    ds = {n: PreparedDataset.load(tmp_path / n) for n in ("multi", "ignored", "single")}
    assert (ds["multi"].events.stream == 0).any()
    assert len(ds["single"].users) > 20
    # the target sequences (after the per-stream cut) and the leave-one-out targets are the same
    assert _targets_by_original(ds["single"]) == _targets_by_original(ds["multi"]) \
        == _targets_by_original(ds["ignored"])
    # dropping the clicks in the config or in the file gives the same prepared events and split...
    a, b = ds["ignored"], ds["single"]
    pd.testing.assert_frame_equal(a.events, b.events)
    pd.testing.assert_frame_equal(a.items, b.items)
    for split in ("valid", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert (x.user == y.user).all() and (x.item == y.item).all() and (x.order == y.order).all()
        assert (x.candidates[:, 0] == y.candidates[:, 0]).all()
    # ...but negatives exclude what the user touched in the whole input file: clicks too when present
    clicked = log[log.behavior == "click"].groupby("user")["item"].apply(set).to_dict()
    item = np.concatenate([[""], a.items["original"].to_numpy()])
    user = dict(zip(a.users["user"], a.users["original"]))
    for k, u in enumerate(a.test.user):
        assert not set(item[a.test.candidates[k, 1:]]) & clicked.get(user[u], set())


def test_list_and_show_presets(tmp_path, capsys):
    from m3bsr.cli import main
    from m3bsr.data.config import PRESET_DIR, preset_names

    assert main(["prepare", "--list-presets"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[1:1 + len(preset_names())]] == preset_names()
    assert any(line.split()[:4] == ["tmall", "buy", "<-", "fav+cart"] for line in listed)
    assert main(["prepare", "--show-preset", "tmall"]) == 0
    shown = capsys.readouterr().out
    assert shown == (PRESET_DIR / "tmall.yaml").read_text()
    (tmp_path / "t.yaml").write_text(shown)  # the printed preset is a --config template
    assert load_prepare_config(None, tmp_path / "t.yaml") == load_prepare_config("tmall")
    assert main(["prepare", "--show-preset", "tmal"]) == 2
    assert capsys.readouterr().err.strip() == "m3bsr: error: --show-preset tmal: unknown preset. Did you mean tmall?"


def test_docs_list_every_prepare_key_with_its_default():
    """docs/data.md "Every key": one row per prepare key, with the default the code has."""
    import re

    from m3bsr.config import _known_keys

    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    section = doc[doc.index("### Every key"):doc.index("## 1. The event log")]
    rows = {}
    for line in section.splitlines()[4:]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            rows[cells[0].strip("`")] = cells[1].strip("`")

    def default(key):
        cls = PrepareConfig
        *sections, leaf = key.split(".")
        for part in sections:
            cls = cls.model_fields[part].annotation
        field = cls.model_fields[leaf]
        if field.is_required():
            return "required"
        value = field.get_default(call_default_factory=True)
        if value is None or isinstance(value, (bool, list, dict)):
            return json.dumps(value)  # null, true/false, [], {}
        return str(value) if value != "" else '""'

    keys = _known_keys(PrepareConfig)
    assert sorted(rows) == sorted(keys)
    assert {k: rows[k] for k in keys} == {k: default(k) for k in keys}


def test_dataframe_source_equals_the_same_rows_from_csv(tmp_path):
    rows = _random_log(n_users=30, n_items=60, seed=3)
    df = pd.DataFrame(rows, columns=["user", "item", "behavior", "timestamp"])
    df["item"] = df["item"].str[1:].astype(np.int64)  # integer ids in the frame, text in the CSV
    df.index = np.arange(len(df))[::-1] + 100  # the index is ignored: row order is the input order
    src = tmp_path / "src"
    src.mkdir()
    df.to_csv(src / "events.csv", index=False)
    cfg = _cfg(n_negatives=3)
    m_csv = prepare(src, cfg, tmp_path / "csv", **QUIET)
    m_df = prepare(df, cfg, tmp_path / "df", **QUIET)
    for name in ("events.parquet", "users.parquet", "items.parquet", "valid.parquet", "test.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "df" / name), pd.read_parquet(tmp_path / "csv" / name))
    assert m_df["statistics"] == m_csv["statistics"]
    assert m_df["source"]["path"] == "DataFrame" and m_df["source"]["files"][0]["path"] == "DataFrame"
    assert prepare(df.copy(), cfg, tmp_path / "df", **QUIET)["up_to_date"]  # same content, same fingerprint
    changed = df.copy()
    changed.iloc[0, 3] += 1
    with pytest.raises(InputError, match="exists and was prepared from other sources"):
        prepare(changed, cfg, tmp_path / "df", **QUIET)


def test_dataframe_source_bad_rows_name_their_position(tmp_path):
    df = pd.DataFrame({"user": ["a", "a", "", "a"], "item": ["x", "y", "z", "w"],
                       "behavior": ["buy", "buy", "buy", "cartt"], "timestamp": [1, 2, 3, 4]})
    with pytest.raises(InputError, match=r"^DataFrame: 2 bad rows .*row 3 \(user\): empty user id; row 4 "
                       r"\(behavior\): unknown behavior 'cartt'"):
        prepare(df, _cfg(n_negatives=1, min_user_events=1), tmp_path / "out", **QUIET)
    report = prepare(df, _cfg(on_bad_rows="report"), tmp_path / "out", **QUIET)
    assert report["bad_rows"]["rows"] == 2 and not (tmp_path / "out").exists()
    assert report["bad_rows"]["listed"] == ["DataFrame row 3 (column 'user'): empty user id",
                                            "DataFrame row 4 (column 'behavior'): unknown behavior 'cartt'"]
