"""Single-behavior datasets (a log of one behavior, no auxiliary stream): every model trains and
evaluates on one, says what it reads, and the M3BSR configs that need an auxiliary stream are
one-line errors naming the key to set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from factories import make_tiny_prepared
from m3bsr.cli import main as cli_main
from m3bsr.config import build_config
from m3bsr.data.batches import WindowBuilder
from m3bsr.data.prepared import PreparedDataset
from m3bsr.engine.train import train
from m3bsr.errors import InputError
from m3bsr.models.base import SINGLE_BEHAVIOR_MODE
from m3bsr.models.registry import build_model, model_class, model_names

pytestmark = pytest.mark.usefixtures("one_thread")

N_USERS, BLOCK, N_BLOCKS = 48, 12, 4
ALL_MODELS = ["pop", "gru4rec", "sasrec", "bert4rec", "mbstr", "mmsasrec", "m3bsr"]


def plays_log(seed: int = 0) -> pd.DataFrame:
    """``user,item,timestamp`` plays with a strong sequential pattern: each user walks around one
    block of the catalogue, usually to the next item of the block, so order carries signal and
    popularity (uniform by construction) does not."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(N_USERS):
        block = u % N_BLOCKS
        item = int(rng.integers(0, BLOCK))
        for k in range(int(rng.integers(10, 20))):
            rows.append((f"u{u}", f"i{block * BLOCK + item}", 1_000 + 10 * k))
            item = (item + 1) % BLOCK if rng.random() < 0.85 else int(rng.integers(0, BLOCK))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


@pytest.fixture(scope="module")
def plays(tmp_path_factory):
    """The log prepared by the CLI with one key, as a user would."""
    root = tmp_path_factory.mktemp("single")
    plays_log().to_csv(root / "plays.csv", index=False)
    assert cli_main(["prepare", str(root / "plays.csv"), "--set", "events.behavior=play",
                     "--set", "n_negatives=20", "--out", str(root / "data"), "--quiet"]) == 0
    return root / "data"


def run_cfg(model: str, *sets: str, epochs: int = 2):
    return build_config({}, model=model, overrides=[
        "train.device=cpu", f"train.max_epochs={epochs}", "train.batch_size=16", "model.hidden_size=16",
        "data.max_len=10", "eval.item_chunk=32", *sets])


def test_the_prepared_dataset_has_no_auxiliary_stream(plays):
    ds = PreparedDataset.load(plays)
    assert ds.behavior_names == ["play"] and ds.catalogue().single_behavior
    assert (ds.events.stream == 1).all() and len(ds.users) == N_USERS
    assert ds.test.candidates.shape == (N_USERS, 21)


def test_the_model_list_is_complete():
    assert sorted(ALL_MODELS) == sorted(model_names())


@pytest.mark.parametrize("model", ALL_MODELS)
def test_every_model_trains_and_evaluates(plays, tmp_path, capsys, model):
    """Through the engine: the run records its mode, ranks every test user within the candidate list
    and the catalogue, and prints one notice exactly for the models whose behavior parts are inert."""
    metrics = train(run_cfg(model), plays, tmp_path / "run", quiet=True)
    out = capsys.readouterr().out
    assert metrics["mode"] == SINGLE_BEHAVIOR_MODE
    assert f"reads {SINGLE_BEHAVIOR_MODE}" in out
    notices = [line for line in out.splitlines() if line.startswith("notice: ")]
    assert len(notices) == (1 if model in ("mbstr", "m3bsr") else 0), notices
    ranks = pd.read_parquet(tmp_path / "run" / "test_ranks.parquet")
    n_items = PreparedDataset.load(plays).n_items
    assert len(ranks) == N_USERS and sorted(ranks.user) == list(range(1, N_USERS + 1))
    assert ranks.rank_sampled.between(1, 21).all() and ranks.rank_full.between(1, n_items).all()
    for split in ("valid", "test"):
        for protocol in ("sampled", "full"):
            assert 0.0 <= metrics[split][protocol]["NDCG@10"] <= 1.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["mode"] == SINGLE_BEHAVIOR_MODE


@pytest.mark.parametrize("model", ["sasrec", "m3bsr"])
def test_learning_beats_popularity(plays, tmp_path, model):
    """The order of the plays is the signal: a sequential model trained a few epochs beats
    popularity by a wide margin on test NDCG@10 (full ranking)."""
    pop = train(run_cfg("pop"), plays, tmp_path / "pop", quiet=True)["test"]["full"]["NDCG@10"]
    got = train(run_cfg(model, "train.lr=0.01", "train.patience=20", epochs=12), plays, tmp_path / model,
                quiet=True)["test"]["full"]["NDCG@10"]
    assert got > pop + 0.4, (got, pop)  # measured: ~0.9 against ~0.13


@pytest.mark.parametrize("model", ["gru4rec", "sasrec", "bert4rec", "mmsasrec"])
def test_merged_input_is_the_target_stream(plays, model):
    """With no auxiliary stream, ``model.input=merged`` and ``target`` are the same model."""
    ds = PreparedDataset.load(plays)
    batch = WindowBuilder(ds, 10).eval_windows("test").batch(np.arange(12))
    scores = []
    for mode in ("merged", "target"):
        torch.manual_seed(0)
        model_ = build_model(build_config({}, model=model, overrides=["model.hidden_size=16",
                                                                       f"model.input={mode}"]).model, ds.catalogue())
        with torch.no_grad():
            scores.append(model_.eval().full_scores(batch))
    torch.testing.assert_close(scores[0], scores[1])


@pytest.mark.parametrize("sets,key,fix", [
    (["model.preset=paper"], "model.preset=paper", "Use the default preset"),
    (["model.common_expert=cross", "model.no_specific_experts=false"], "model.common_expert=cross",
     "Set model.preset=default"),
    (["model.no_specific_experts=false"], "model.no_specific_experts=false", "Set model.no_specific_experts=true"),
])
def test_m3bsr_parts_that_need_an_auxiliary_stream_are_one_line_errors(plays, tmp_path, capsys, sets, key, fix):
    argv = ["train", "--dataset", str(plays), "--model", "m3bsr", "--out", str(tmp_path / "run"), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    assert cli_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"m3bsr: error: {key}: "), lines
    assert "has no auxiliary behavior" in lines[0] and fix in lines[0] and str(plays) in lines[0]
    assert not (tmp_path / "run").exists()
    cfg = build_config({}, model="m3bsr", overrides=sets)
    with pytest.raises(InputError, match=key):
        build_model(cfg.model, PreparedDataset.load(plays).catalogue())  # every path that builds the model


def test_modes_on_a_multi_behavior_dataset(tmp_path):
    """On a dataset with an auxiliary stream nothing is refused, and the mode says what each model reads."""
    cat = PreparedDataset.load(make_tiny_prepared(tmp_path / "tiny", n_users=8)).catalogue()

    def mode(model, *sets):
        cfg = build_config({}, model=model, overrides=list(sets)).model
        return model_class(model).data_mode(cfg, cat)

    assert mode("sasrec").mode == "merged: auxiliary + target"
    assert mode("gru4rec", "model.input=target").mode == "target only"
    assert mode("pop").mode == "target only"
    assert mode("mbstr").mode == "multi-behavior: behavior-aware, merged"
    assert mode("m3bsr").mode == "multi-behavior: merged backbone"
    assert mode("m3bsr", "model.preset=paper").mode == "multi-behavior: paper experts"
    assert all(mode(m).notice is None for m in ALL_MODELS)
