"""``m3bsr export``: item vectors, user vectors and every user's top-k as Parquet, for every registered
model (each trained one epoch on a tiny dataset). Checked against the model itself: user . item + bias is
the score ``recommend`` reports, ids are original, the top-k is ``recommend``'s, batches stream into
row groups, and a failed export leaves the previous file as it was."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import make_tiny_prepared
from m3bsr.cli import main as cli_main
from m3bsr.config import build_config
from m3bsr.errors import InputError
from m3bsr.models.registry import model_names
from m3bsr.serving import export as ex
from m3bsr.serving.recommend import Recommender

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.hidden_size=16", "model.n_layers=1", "model.n_heads=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every registered model trained one epoch on one tiny prepared dataset."""
    from m3bsr.engine.train import train

    root = tmp_path_factory.mktemp("export")
    dataset = make_tiny_prepared(root / "tiny", n_users=24, n_items=40)
    out = {}
    for name in model_names():
        cfg = build_config({}, model=name, overrides=["data.max_len=6", "train.max_epochs=1", "train.batch_size=32",
                                                      "train.device=cpu", *([] if name == "pop" else SMALL)])
        train(cfg, dataset, root / name, quiet=True)
        out[name] = root / name
    return out


def _seen(rec: Recommender, user: str) -> set[str]:
    h = rec.user_history(user)
    names = dict(zip(rec.dataset.items["item"], rec.dataset.items["original"].astype(str)))
    return {names[int(i)] for i in h.items()}


@pytest.mark.parametrize("name", model_names())
def test_vectors_are_as_scored_and_topk_is_recommends(runs, tmp_path, name):
    rec = Recommender.from_run(runs[name])
    k = 5
    assert ex.export(rec, "items", tmp_path / "items.parquet") == rec.n_items
    assert ex.export(rec, "topk", tmp_path / "topk.parquet", k=k, exclude_seen=True) == rec.n_users * k
    items = pd.read_parquet(tmp_path / "items.parquet")
    topk = pd.read_parquet(tmp_path / "topk.parquet")
    assert list(items["item"]) == list(rec.dataset.items.sort_values("item")["original"].astype(str))
    assert sorted(topk["user"].unique()) == sorted(rec.dataset.users["original"].astype(str))
    assert (topk.groupby("user")["rank"].apply(list) == pd.Series([list(range(1, k + 1))] * rec.n_users,
                                                                  index=sorted(topk["user"].unique()))).all()
    some = list(rec.dataset.users["original"].astype(str)[:6])
    for user, recs in zip(some, rec.recommend_users(some, k, exclude_seen=True)):
        rows = topk[topk.user == user]
        assert list(rows["item"]) == [r.item for r in recs]
        assert list(rows["score"]) == pytest.approx([r.score for r in recs], rel=1e-6)
        assert not set(rows["item"]) & _seen(rec, user)  # unseen: no history bonus either
    vec = dict(zip(items["item"], np.stack(items["vector"].to_numpy())))
    bias = dict(zip(items["item"], items["bias"]))
    if name == "pop":
        with pytest.raises(InputError, match="model 'pop' has no user vectors"):
            ex.export(rec, "users", tmp_path / "users.parquet")
        assert not (tmp_path / "users.parquet").exists()
        user_vec = {u: np.ones(1, np.float32) for u in topk["user"].unique()}  # pop's constant representation
    else:
        assert ex.export(rec, "users", tmp_path / "users.parquet") == rec.n_users
        users = pd.read_parquet(tmp_path / "users.parquet")
        assert users["user"].is_unique and set(users["user"]) == set(topk["user"])
        user_vec = dict(zip(users["user"], np.stack(users["vector"].to_numpy())))
        assert len(next(iter(user_vec.values()))) == len(next(iter(vec.values())))
    rebuilt = [float(user_vec[u] @ vec[i] + bias[i]) for u, i in zip(topk["user"], topk["item"])]
    assert rebuilt == pytest.approx(list(topk["score"]), rel=1e-4, abs=1e-4)


def test_batches_stream_into_row_groups(runs, tmp_path):
    rec = Recommender.from_run(runs["sasrec"])
    for what in ("items", "users", "topk"):
        ex.export(rec, what, tmp_path / f"{what}-7.parquet", k=3, batch_size=7)
        ex.export(rec, what, tmp_path / f"{what}.parquet", k=3)
        n = rec.n_items if what == "items" else rec.n_users
        assert pq.ParquetFile(tmp_path / f"{what}-7.parquet").num_row_groups == math.ceil(n / 7)
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{what}-7.parquet"),
                                      pd.read_parquet(tmp_path / f"{what}.parquet"))
    schema = pq.read_schema(tmp_path / "items.parquet")
    assert str(schema.field("vector").type) == "fixed_size_list<element: float>[16]"
    assert [str(t) for t in pq.read_schema(tmp_path / "topk.parquet").types] == ["string", "int64", "string", "double"]


def test_a_failed_export_leaves_the_old_file(runs, tmp_path, monkeypatch):
    rec = Recommender.from_run(runs["sasrec"])
    out = tmp_path / "topk.parquet"
    out.write_bytes(b"old")
    real = ex.topk_batches

    def broken(*a, **kw):
        batches = real(*a, **kw)
        yield next(batches)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ex, "topk_batches", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ex.export(rec, "topk", out, batch_size=5)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["topk.parquet"]  # no temporary file left


def test_cli(runs, tmp_path, capsys):
    out = tmp_path / "top.parquet"
    assert cli_main(["export", str(runs["gru4rec"]), "--what", "topk", "--k", "2", "--exclude-seen",
                     "--out", str(out)]) == 0
    assert "wrote 48 rows (topk)" in capsys.readouterr().err
    assert len(pd.read_parquet(out)) == 48
    for argv, message in [
        (["--what", "users", "--out", str(tmp_path / "u.parquet")], "model 'pop' has no user vectors"),
        (["--what", "items", "--k", "3", "--out", str(tmp_path / "i.parquet")], "--k with --what items"),
        (["--what", "items", "--out", str(tmp_path / "i.csv")], "export writes Parquet"),
        (["--what", "topk", "--k", "0", "--out", str(tmp_path / "t.parquet")], "k must be at least 1"),
    ]:
        assert cli_main(["export", str(runs["pop"]), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["top.parquet"]
