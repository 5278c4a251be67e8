"""The estimator API (``m3bsr.Estimator``): fit on a small synthetic events DataFrame through the real
prepare and engine, then recommend (original ids, unseen items), evaluate (reproduces metrics.json),
save, move and load; single-behavior frames and bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

import m3bsr
from m3bsr.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

PREPARE = {"behaviors": {"target": "buy", "auxiliary": ["click"]}, "n_negatives": 20}
SMALL = dict(data__max_len=8, train__max_epochs=2, train__batch_size=32, train__device="cpu",
             model__hidden_size=16, model__n_layers=1, model__n_heads=1)


def events_frame(n_users: int = 40, n_items: int = 60, seed: int = 0) -> pd.DataFrame:
    """Users click and buy items of a preferred quarter of the catalogue; string ids, unix seconds."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        lo = int(rng.integers(0, 4)) * (n_items // 4)
        n = int(rng.integers(10, 25))
        for t, item in enumerate(rng.integers(lo, lo + n_items // 4, size=n)):
            behavior = "buy" if t >= n - 3 or rng.random() < 0.4 else "click"
            rows.append((f"user{u}", f"item{item}", behavior, 1_700_000_000 + 60 * t))
    return pd.DataFrame(rows, columns=["user", "item", "behavior", "timestamp"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    events = events_frame()
    work = tmp_path_factory.mktemp("api") / "work"
    est = m3bsr.Estimator("sasrec", prepare=PREPARE, **SMALL).fit(events, workdir=work)
    return est, events, work


def test_fit_trains_through_the_engine(fitted):
    est, _, work = fitted
    assert est.config.model.name == "sasrec" and est.config.train.max_epochs == 2
    assert (work / "run" / "best.pt").is_file() and (work / "data" / "manifest.json").is_file()
    assert est.metrics_["epochs"] == 2 and set(est.metrics_["test"]) == {"sampled", "full"}


def test_recommend_original_unseen_ids(fitted):
    est, events, _ = fitted
    catalogue = set(events["item"])
    for user in ("user0", "user7", "user31"):
        recs = est.recommend(user, k=10, exclude_seen=True)
        assert len(recs) == 10 and len({r.item for r in recs}) == 10
        assert {r.item for r in recs} <= catalogue  # original ids, not dense ones
        assert not {r.item for r in recs} & set(events.loc[events.user == user, "item"])
        assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    seen = set(events.loc[events.user == "user0", "item"])
    assert {r.item for r in est.recommend("user0", k=60)} & seen  # without the mask, history items rank too
    table = est.recommend_many(["user0", "user7"], k=3, exclude_seen=True)
    assert list(table.columns) == ["user", "rank", "item", "score"]
    assert list(table["user"]) == ["user0"] * 3 + ["user7"] * 3 and list(table["rank"]) == [1, 2, 3] * 2
    assert list(table["item"][:3]) == [r.item for r in est.recommend("user0", k=3, exclude_seen=True)]
    with pytest.raises(InputError, match="unknown user"):
        est.recommend("nobody")


def test_evaluate_reproduces_the_run_metrics(fitted):
    est, _, _ = fitted
    result = est.evaluate()
    for split in ("valid", "test"):
        for protocol in ("sampled", "full"):
            assert result[split][protocol] == pytest.approx(est.metrics_[split][protocol], abs=1e-9)


def test_save_move_load(fitted, tmp_path):
    est, _, _ = fitted
    saved = est.save(tmp_path / "saved")
    with pytest.raises(InputError, match="already exists"):
        est.save(saved)
    moved = tmp_path / "elsewhere"
    shutil.move(saved, moved)  # config.yaml still names the old path: load uses moved/data
    loaded = m3bsr.Estimator.load(moved)
    assert loaded.config == est.config and loaded.metrics_ == est.metrics_
    assert loaded.recommend("user7", k=5, exclude_seen=True) == est.recommend("user7", k=5, exclude_seen=True)


def test_single_behavior_frame_and_temporary_workdir():
    events = events_frame(n_users=20, seed=1).drop(columns="behavior")
    est = m3bsr.Estimator("pop", prepare={"n_negatives": 10}, train__device="cpu").fit(events)
    work = est.run_dir_.parent
    assert est.recommender.dataset.target_behavior == "interaction"
    top = est.recommend("user3", k=5, exclude_seen=True)
    assert len(top) == 5 and not {r.item for r in top} & set(events.loc[events.user == "user3", "item"])
    del est
    import gc

    gc.collect()
    assert not work.exists()  # the temporary directory goes with the estimator


def test_bad_input_is_one_line():
    with pytest.raises(InputError, match="unknown config key 'train.lrr'"):
        m3bsr.Estimator("sasrec", train__lrr=1.0)
    with pytest.raises(InputError, match="unknown model"):
        m3bsr.Estimator("nope")
    with pytest.raises(InputError, match="not fitted"):
        m3bsr.Estimator("pop").recommend("u1")
    est = m3bsr.Estimator("pop")
    with pytest.raises(InputError, match="no target behavior is named.*'target': 'click'"):
        est.fit(events_frame(n_users=3))
    with pytest.raises(InputError, match="column\\(s\\) timestamp"):
        est.fit(events_frame(n_users=3).drop(columns="timestamp"), workdir=None)
