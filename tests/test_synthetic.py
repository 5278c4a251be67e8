"""The embedded synthetic dataset: deterministic, knobs do what they say, and order carries signal."""

from __future__ import annotations

import numpy as np
import pytest

from m3bsr.cli import main as cli_main
from m3bsr.data.config import SyntheticConfig, load_prepare_config
from m3bsr.data.prepare import prepare
from m3bsr.data.prepared import PreparedDataset
from m3bsr.data.synthetic import generate

QUIET = dict(log=lambda m: None)
SMALL = dict(users=150, items=120)


def _cfg(**kw) -> SyntheticConfig:
    return SyntheticConfig(**{**SMALL, **kw})


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_identical_files_other_seed_differs(tmp_path):
    for name in ("a", "b"):
        assert cli_main(["prepare", "synthetic", "--out", str(tmp_path / name), "--quiet",
                         "--set", "synthetic.users=60", "--set", "synthetic.items=200"]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and "features/image.npy" in a
    assert all(a[k] == b[k] for k in a)
    assert cli_main(["prepare", "synthetic", "--out", str(tmp_path / "c"), "--quiet", "--set", "seed=1",
                     "--set", "synthetic.users=60", "--set", "synthetic.items=200"]) == 0
    assert _files(tmp_path / "c")["events.parquet"] != a["events.parquet"]


def test_prepared_items_carry_the_generators_category(tmp_path):
    cfg = load_prepare_config("synthetic", None, ["synthetic.users=60", "synthetic.items=50", "n_negatives=10"])
    prepare("synthetic", cfg, tmp_path / "d", **QUIET)
    items = PreparedDataset.load(tmp_path / "d").items
    truth = generate(cfg.synthetic, cfg.seed).items.set_index("item")["category"]
    assert items["label_category"].tolist() == truth.reindex(items["original"]).astype(str).tolist()
    assert items["label_category"].nunique() == cfg.synthetic.categories
    assert "label_category" not in PreparedDataset.load(tmp_path / "d").catalogue().side_ids


def _category_r2(x: np.ndarray, cat: np.ndarray) -> float:
    """Share of feature variance explained by the category means."""
    means = np.stack([x[cat == c].mean(0) for c in np.unique(cat)])
    return float(((means[cat] - x.mean(0)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_noise_knobs_change_only_their_modality():
    base, noisy = generate(_cfg(), 0), generate(_cfg(image_noise=4.0), 0)
    cat = base.items["category"].to_numpy()
    assert _category_r2(noisy.features["image"][1], cat) < 0.5 * _category_r2(base.features["image"][1], cat)
    np.testing.assert_array_equal(noisy.features["text"][1], base.features["text"][1])
    assert _category_r2(generate(_cfg(text_noise=4.0), 0).features["text"][1], cat) < \
        0.5 * _category_r2(base.features["text"][1], cat)


def test_sticker_drives_clicks_not_favors():
    d = generate(_cfg(accidental_click_rate=0.6, sticker_click_boost=8.0), 0)
    sticker = dict(zip(d.items["item"], d.items["sticker"]))
    ev = d.events.assign(sticker=d.events["item"].map(sticker))
    share = ev.groupby("behavior")["sticker"].mean()
    assert share["click"] > share["favor"] + 0.1
    calm = generate(_cfg(accidental_click_rate=0.0), 0)
    calm_share = calm.events.assign(s=calm.events["item"].map(sticker)).groupby("behavior")["s"].mean()
    assert share["click"] > calm_share["click"] + 0.1


@pytest.mark.parametrize("rate", [0.15, 0.5])
def test_favor_rate_and_sizes(rate):
    d = generate(_cfg(favor_rate=rate, events_min=10, events_max=12), 0)
    assert d.events["user"].nunique() == SMALL["users"] and len(d.items) == SMALL["items"]
    assert abs((d.events["behavior"] == "favor").mean() - rate) < 0.05
    assert d.events.groupby("user").size().between(10, 12).all()
    assert d.features["image"][1].shape == (SMALL["items"], 32)


def _same_category_rate(d) -> float:
    cat = dict(zip(d.items["item"], d.items["category"]))
    fav = d.events[d.events["behavior"] == "favor"]
    c = fav["item"].map(cat).to_numpy()
    same_user = fav["user"].to_numpy()[1:] == fav["user"].to_numpy()[:-1]
    return float((c[1:] == c[:-1])[same_user].mean())


def test_drift_makes_the_next_favor_less_predictable():
    assert _same_category_rate(generate(_cfg(drift=0.0), 0)) > _same_category_rate(generate(_cfg(drift=0.5), 0)) + 0.1


def test_default_dataset_order_beats_popularity(tmp_path):
    """Non-neural sanity check on the default preset: 'same category as the last favor, then popularity'
    beats popularity on the stored test candidates (HR@10), so a sequential model has signal to learn."""
    cfg = load_prepare_config("synthetic")
    prepare("synthetic", cfg, tmp_path / "syn", **QUIET)
    ds = PreparedDataset.load(tmp_path / "syn")
    truth = generate(cfg.synthetic, cfg.seed).items
    cat = np.zeros(ds.n_items + 1, np.int64)
    cat[ds.items["item"].to_numpy()] = truth.set_index("item").loc[ds.items["original"], "category"].to_numpy()
    ev, t = ds.events, ds.test
    first_eval = np.zeros(ds.n_users + 1, np.int64)
    first_eval[ds.valid.user] = ds.valid.order
    train = ev[ev["order"].to_numpy() < first_eval[ev["user"].to_numpy()]]
    pop = np.bincount(train.loc[train.stream == 1, "item"], minlength=ds.n_items + 1).astype(float)
    tg = ev[ev.stream == 1]
    last_fav = tg.groupby("user")["item"].nth(-2).to_numpy()  # the favor just before the test target
    jitter = np.random.default_rng(0).random(t.candidates.shape) * 1e-6

    def hr10(scores):
        return float(((scores[:, 1:] >= scores[:, :1]).sum(1) < 10).mean())

    pop_hr = hr10(pop[t.candidates] + jitter)
    seq_hr = hr10((cat[t.candidates] == cat[last_fav][:, None]) * 1e3 + pop[t.candidates] + jitter)
    print(f"\nsynthetic test HR@10: popularity {pop_hr:.3f}, last-favor category + popularity {seq_hr:.3f}")
    assert ds.n_users >= 700 and 300 <= ds.n_items <= 500
    assert seq_hr > pop_hr + 0.3


def test_python_api_with_preset_name(tmp_path):
    m = prepare("synthetic", "synthetic", tmp_path / "s", overrides=["synthetic.users=40", "n_negatives=20"], **QUIET)
    assert m["n_users"] == 40 and m["config"]["synthetic"]["users"] == 40 and m["config"]["n_negatives"] == 20
    assert m["behaviors"] == {"names": ["click", "favor"], "target": "favor", "auxiliary": ["click"]}
    assert prepare("synthetic", "synthetic", tmp_path / "s", overrides=["synthetic.users=40", "n_negatives=20"],
                   **QUIET)["up_to_date"]
