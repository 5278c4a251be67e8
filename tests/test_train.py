"""The training loop: resume equivalence, determinism, checkpoints, run dir, CLI errors, learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Literal

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from m3bsr.batch import Catalogue, SequenceBatch
from m3bsr.cli import main as cli
from m3bsr.config import BaseModelConfig, build_config
from m3bsr.data.batches import WindowBuilder
from m3bsr.data.prepared import PreparedDataset
from m3bsr.engine import checkpoint as ckpt
from m3bsr.engine.evaluate import evaluate_run
from m3bsr.engine.metrics import metrics_from_ranks
from m3bsr.engine.train import NonFiniteLoss, resume, train
from m3bsr.errors import InputError
from m3bsr.models import registry
from m3bsr.models.base import SequentialRecommender


class TinyConfig(BaseModelConfig):
    name: Literal["tiny"] = "tiny"
    hidden_size: int = 16
    dropout: float = 0.3
    poison: bool = False  # makes the loss NaN (tests the non-finite guard)


class TinyRec(SequentialRecommender):
    """Causal mean of item embeddings of the target history (time < query) → dropout → linear scores."""

    config_class = TinyConfig

    def __init__(self, cfg: TinyConfig, catalogue: Catalogue):
        super().__init__(cfg, catalogue)
        self.emb = nn.Embedding(catalogue.n_items + 1, cfg.hidden_size, padding_idx=0)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, catalogue.n_items + 1)
        self.drop = nn.Dropout(cfg.dropout)

    def represent(self, batch: SequenceBatch) -> Tensor:
        e = self.emb(batch.tgt_items)  # [B, L, d]
        seen = (batch.tgt_times[:, None, :] < batch.query_times[:, :, None]) & (batch.tgt_items[:, None, :] != 0)
        w = seen.float() / seen.sum(-1, keepdim=True).clamp(min=1)  # [B, P, L]
        return self.drop(torch.tanh(self.proj(w @ e)))  # [B, P, d]

    def output_layer(self):
        return self.out.weight, self.out.bias

    def loss(self, batch):
        terms = super().loss(batch)
        if self.cfg.poison:
            terms["main"] = terms["main"] * float("nan")
        terms["l2"] = 1e-4 * self.emb.weight.pow(2).sum()
        return terms


@pytest.fixture(autouse=True)
def tiny_registered(monkeypatch):
    monkeypatch.setitem(registry._MODELS, "tiny", f"{__name__}:TinyRec")
    monkeypatch.setitem(registry._CONFIGS, "tiny", TinyConfig)


def cfg_for(model="tiny", **sets):
    base = {"train.device": "cpu", "train.batch_size": 8, "train.max_epochs": 4, "train.patience": 10,
            "train.lr": 0.01, "data.max_len": 10, "eval.item_chunk": 16}
    base.update(sets)
    return build_config({}, model=model, overrides=[f"{k}={v}" for k, v in base.items()])


def test_run_dir_contents_and_evaluate_run(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    m = train(cfg_for(), tiny_prepared, run, quiet=True)
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "best.pt", "last.pt", "curves.png",
                 "train.log", "test_ranks.parquet"):
        assert (run / name).is_file(), name
    assert set(m) >= {"valid", "test", "best_epoch", "epochs", "seconds_per_epoch", "seed"}
    assert m["epochs"] == 4 and 1 <= m["best_epoch"] <= 4
    for split in ("valid", "test"):
        assert set(m[split]) == {"sampled", "full"}
        assert list(m[split]["full"]) == ["HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert set(lines[0]["loss"]) == {"main", "l2", "total"} and lines[0]["targets_per_second"] > 0
    # best epoch = argmax of the monitored valid metric; metrics.json valid = that epoch's record
    values = [r["valid"]["full"]["NDCG@10"] for r in lines]
    assert m["best_epoch"] == int(np.argmax(values)) + 1
    assert m["valid"] == lines[m["best_epoch"] - 1]["valid"]
    assert json.loads((run / "metrics.json").read_text()) == m
    # test ranks: per-user, 1-based, consistent with the test metrics
    ranks = pd.read_parquet(run / "test_ranks.parquet")
    assert list(ranks.columns) == ["user", "rank_sampled", "rank_full"] and len(ranks) == 40
    assert ranks["rank_full"].min() >= 1
    assert m["test"]["full"]["HR@10"] == pytest.approx((ranks["rank_full"] <= 10).mean())
    # checkpoints load with weights_only and re-evaluation reproduces metrics.json exactly
    torch.load(run / "best.pt", weights_only=True)
    again = evaluate_run(run)
    assert again["valid"] == m["valid"] and again["test"] == m["test"]
    assert cli(["evaluate", str(run)]) == 0
    # the other protocol: masking every history item can only move the positive up the full ranking
    assert cli(["evaluate", str(run), "--exclude", "all", "--json", str(tmp_path / "all.json")]) == 0
    masked = json.loads((tmp_path / "all.json").read_text())
    assert masked["exclude"] == "all" and masked["test"]["sampled"] == m["test"]["sampled"]
    for k in ("HR@5", "HR@10", "HR@20"):
        assert masked["test"]["full"][k] >= m["test"]["full"][k]


def assert_same_weights(run_a, run_b) -> None:
    """best.pt and last.pt of two runs hold bit-identical weights (and the same epoch)."""
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(run / name, weights_only=True) for run in (run_a, run_b))
        assert a["epoch"] == b["epoch"], name
        assert a["model"].keys() == b["model"].keys(), name
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


def test_resume_equals_uninterrupted(tiny_prepared, tmp_path):
    straight = train(cfg_for(), tiny_prepared, tmp_path / "a", quiet=True)
    train(cfg_for(**{"train.max_epochs": 2}), tiny_prepared, tmp_path / "b", quiet=True)
    resumed = resume(tmp_path / "b", ["train.max_epochs=4"], quiet=True)
    for key in ("valid", "test", "best_epoch", "epochs"):
        assert resumed[key] == straight[key], key
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 4


def test_same_seed_identical_different_seed_differs(tiny_prepared, tmp_path):
    short = {"train.max_epochs": 2}
    one = train(cfg_for(**short), tiny_prepared, tmp_path / "a", quiet=True)
    two = train(cfg_for(**short), tiny_prepared, tmp_path / "b", quiet=True)
    other = train(cfg_for(seed=1, **short), tiny_prepared, tmp_path / "c", quiet=True)
    assert one["valid"] == two["valid"] and one["test"] == two["test"]
    assert one["valid"] != other["valid"]


def test_learning_beats_popularity(tiny_prepared, tmp_path):
    """Users of the tiny dataset favor one block of the catalogue; a learned model must exploit it."""
    pop = train(cfg_for("pop", **{"train.max_epochs": 1}), tiny_prepared, tmp_path / "pop", quiet=True)
    tiny = train(cfg_for(**{"train.max_epochs": 8, "train.lr": 0.05}), tiny_prepared, tmp_path / "t", quiet=True)
    assert tiny["valid"]["full"]["NDCG@10"] > pop["valid"]["full"]["NDCG@10"] + 0.05


def test_pop_is_fitted_once_without_epochs(tiny_prepared, tmp_path, capsys):
    m = train(cfg_for("pop", **{"train.max_epochs": 5}), tiny_prepared, tmp_path / "pop", quiet=False)
    assert m["epochs"] == 1 and m["best_epoch"] == 1 and m["stop_reason"] == "fitted"
    captured = capsys.readouterr()  # no progress bar (stderr), no fake loss
    assert "fitted in one pass" in captured.out and "loss" not in captured.out + captured.err
    assert "epoch 1" not in captured.err
    records = [json.loads(line) for line in (tmp_path / "pop" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["loss"] == {}
    counts = torch.load(tmp_path / "pop" / "best.pt", weights_only=True)["model"]["counts"].numpy()
    ds = PreparedDataset.load(tiny_prepared)
    labels = WindowBuilder(ds, 10).train_windows().labels
    np.testing.assert_array_equal(counts, np.bincount(labels[labels != 0], minlength=ds.n_items + 1))  # each once
    # the valid metrics are those of ranking the stored candidates by these counts (ties count against)
    cand = ds.valid.candidates
    ranks = 1 + (counts[cand[:, 1:]] >= counts[cand[:, :1]]).sum(1)
    assert 1 < np.median(ranks) < cand.shape[1]  # informative: neither all hits nor all last
    assert m["valid"]["sampled"] == metrics_from_ranks(ranks, [5, 10, 20])
    # the same metrics.json fields as a model trained by epochs
    assert set(m) == set(train(cfg_for(**{"train.max_epochs": 1}), tiny_prepared, tmp_path / "t", quiet=True))


def test_early_stopping_uses_patience(tiny_prepared, tmp_path):
    # lr 1e-12 leaves float32 weights unchanged → same ranking, no improvement in epochs 2, 3 → stop at 3
    m = train(cfg_for(**{"train.max_epochs": 50, "train.patience": 2, "train.lr": 1e-12, "model.dropout": 0.0}),
              tiny_prepared, tmp_path / "p", quiet=True)
    assert m["best_epoch"] == 1 and m["epochs"] == 3 and m["stop_reason"] == "patience"


def test_nonfinite_loss_stops_or_skips(tiny_prepared, tmp_path):
    with pytest.raises(NonFiniteLoss, match="non-finite loss.*train.nonfinite=skip"):
        train(cfg_for(**{"model.poison": True}), tiny_prepared, tmp_path / "stop", quiet=True)
    m = train(cfg_for(**{"model.poison": True, "train.nonfinite": "skip", "train.max_epochs": 1}),
              tiny_prepared, tmp_path / "skip", quiet=True)
    assert m["skipped_batches"] == 6  # 45 training windows (max_len 10) / batch 8


def test_corrupt_checkpoint_falls_back_to_previous(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(**{"train.max_epochs": 2}), tiny_prepared, run, quiet=True)
    good_prev = torch.load(run / "last.prev.pt", weights_only=True)
    assert good_prev["epoch"] == 1
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match="previous good checkpoint"):
        state = ckpt.load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1
    (run / "last.prev.pt").write_bytes(b"tampered")
    with pytest.raises(Exception, match="no usable checkpoint"):
        ckpt.load_checkpoint(run / "last.pt")


def test_resume_from_fallback_checkpoint_is_still_exact(tiny_prepared, tmp_path):
    straight = train(cfg_for(**{"train.max_epochs": 3}), tiny_prepared, tmp_path / "a", quiet=True)
    train(cfg_for(**{"train.max_epochs": 2}), tiny_prepared, tmp_path / "b", quiet=True)
    (tmp_path / "b" / "last.pt").write_bytes(b"garbage")  # resume must fall back to epoch 1
    with pytest.warns(UserWarning):
        resumed = resume(tmp_path / "b", ["train.max_epochs=3"], quiet=True)
    assert resumed["valid"] == straight["valid"] and resumed["test"] == straight["test"]
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_cli_errors_are_one_line_exit_2(tiny_prepared, tmp_path, capsys):
    args = ["train", "--dataset", str(tiny_prepared), "--model", "tiny", "--device", "cpu", "--quiet"]
    assert cli(args + ["--set", "train.lr_typo=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lr_typo" in err and "train.lr" in err
    (tmp_path / "exists").mkdir()
    assert cli(args + ["--out", str(tmp_path / "exists")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err
    assert cli(args + ["--out", str(tmp_path / "exists"), "--overwrite", "--set", "train.max_epochs=1"]) == 0
    assert "valid full" in capsys.readouterr().out
    assert cli(["train", "--resume", str(tmp_path / "exists"), "--seed", "3"]) == 2


def test_m3bsr_on_id_only_data_says_so_once(tmp_path, capsys):
    """M3BSR on a dataset without content features: one notice line that it runs id-only and names the
    prepare keys that add features; on a dataset with features, none."""
    from factories import make_tiny_prepared

    argv = ["train", "--model", "m3bsr", "--device", "cpu", "--quiet", "--set", "train.max_epochs=1",
            "--set", "model.hidden_size=8", "--set", "model.n_layers=1"]
    ds = make_tiny_prepared(tmp_path / "ids", n_users=12, dims={})
    assert cli(argv + ["--dataset", str(ds), "--out", str(tmp_path / "a")]) == 0
    notices = [line for line in capsys.readouterr().out.splitlines() if "notice" in line]
    assert len(notices) == 1, notices
    assert notices[0].startswith(f"notice: m3bsr: {ds} has no content features") and "id-only" in notices[0]
    assert "--set features.text=FILE" in notices[0] and "--set features.image=FILE" in notices[0]
    cfg = build_config({}, model="m3bsr").model
    with_features = PreparedDataset.load(make_tiny_prepared(tmp_path / "feats", n_users=12)).catalogue()
    assert registry.model_class("m3bsr").data_mode(cfg, with_features).notice is None


def test_cli_train_resume_and_config_roundtrip(tiny_prepared, tmp_path, capsys):
    run = tmp_path / "r"
    assert cli(["train", "--dataset", str(tiny_prepared), "--model", "tiny", "--device", "cpu", "--quiet",
                "--set", "train.max_epochs=1", "--out", str(run)]) == 0
    assert cli(["train", "--resume", str(run), "--set", "train.max_epochs=2", "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    # a run's config.yaml is a valid --config (its dataset: key is used when --dataset is absent)
    assert cli(["train", "--config", str(run / "config.yaml"), "--quiet", "--out", str(tmp_path / "r2")]) == 0
    # r2 trained 2 epochs straight from r's config: the resumed run must be the same run, weights included
    resumed, straight = (json.loads((r / "metrics.json").read_text()) for r in (run, tmp_path / "r2"))
    assert straight["epochs"] == 2
    assert (resumed["valid"], resumed["test"]) == (straight["valid"], straight["test"])
    assert_same_weights(run, tmp_path / "r2")


def test_model_names_are_case_insensitive(tiny_prepared, tmp_path):
    from m3bsr.compare import parse_models

    assert build_config({}, model="SASRec").model.name == "sasrec"
    assert build_config({"model": {"name": "M3BSR"}}).model.name == "m3bsr"
    assert parse_models("SASRec, POP") == ["sasrec", "pop"]
    assert cli(["train", "--dataset", str(tiny_prepared), "--model", "Pop", "--device", "cpu", "--quiet",
                "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["model"] == "pop"
    with pytest.raises(InputError, match="unknown model.*Choose one of"):
        build_config({}, model="SASRecX")


def test_progress_bars_and_log_lines(tiny_prepared, tmp_path, capsys):
    train(cfg_for(**{"train.max_epochs": 1}), tiny_prepared, tmp_path / "bars", quiet=False)
    captured = capsys.readouterr()
    assert "epoch 1" in captured.out and "test full" in captured.out
    # the run's identity (model, dataset, windows, targets, device) is on the console, not only in train.log
    head = f"model tiny on {tiny_prepared} (45 windows, "
    assert head in captured.out.splitlines()[0] and "device cpu" in captured.out.splitlines()[0]
    assert head in (tmp_path / "bars" / "train.log").read_text()
    train(cfg_for(**{"train.max_epochs": 1, "train.log_every": 2}), tiny_prepared, tmp_path / "q", quiet=True)
    out = capsys.readouterr().out
    assert "epoch 1 step 2/6 loss" in out and "targets/s" in out
    log = (tmp_path / "q" / "train.log").read_text()
    assert "epoch 1 step 4/6" in log and "done: best epoch 1 of 1" in log


def test_model_summary_command(tiny_prepared, capsys):
    assert cli(["model-summary", "--dataset", str(tiny_prepared), "--model", "m3bsr",
                "--set", "data.max_len=8", "--set", "model.hidden_size=16"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "GFLOP" in out


def test_bucketed_order_batches_windows_of_similar_length(tiny_prepared):
    """``bucketed_order``: every window once, seeded, the short batch last; one pool of all windows gives
    the least padding there is (each batch a run of the length-sorted windows), far less than a plain shuffle;
    a pool of one batch keeps the plain shuffle's batches (the same first draw)."""
    from m3bsr.data.batches import bucketed_order

    windows = WindowBuilder(PreparedDataset.load(tiny_prepared), 30).train_windows()  # 8-30 events a user
    n, bs = len(windows), 6
    assert n % bs  # the tiny data leaves a short batch
    order = bucketed_order(windows, bs, n, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, bucketed_order(windows, bs, n, torch.Generator().manual_seed(0)))
    assert not np.array_equal(order, bucketed_order(windows, bs, n, torch.Generator().manual_seed(1)))
    aux, tgt = windows.lengths()
    longest = np.maximum(aux, tgt)
    widths = lambda o: [int(longest[o[s: s + bs]].max()) for s in range(0, n, bs)]  # noqa: E731
    ideal = widths(np.lexsort((aux + tgt, longest)))
    assert sorted(widths(order)[:-1]) == sorted(ideal[:-1]) and widths(order)[-1] == ideal[-1]
    plain = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()
    assert sum(widths(order)) < 0.8 * sum(widths(plain))
    one = bucketed_order(windows, bs, 1, torch.Generator().manual_seed(0))
    blocks = lambda o: sorted(tuple(sorted(o[s: s + bs])) for s in range(0, n, bs))  # noqa: E731
    assert blocks(one) == blocks(plain)


def test_bucketed_training_is_seeded_and_resumes_exactly(tiny_prepared, tmp_path):
    """``train.bucket_by_length``: same seed → same metrics; 2 epochs + resume to 4 = 4 straight; other
    batches than plain shuffling, so other numbers."""
    sets = {"train.bucket_by_length": 2}
    straight = train(cfg_for(**sets), tiny_prepared, tmp_path / "a", quiet=True)
    again = train(cfg_for(**sets), tiny_prepared, tmp_path / "c", quiet=True)
    assert again["valid"] == straight["valid"] and again["test"] == straight["test"]
    train(cfg_for(**sets, **{"train.max_epochs": 2}), tiny_prepared, tmp_path / "b", quiet=True)
    resumed = resume(tmp_path / "b", ["train.max_epochs=4"], quiet=True)
    assert resumed["valid"] == straight["valid"] and resumed["test"] == straight["test"]
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert "pools of 2 batches, padding trimmed" in (tmp_path / "a" / "train.log").read_text()
    plain = train(cfg_for(), tiny_prepared, tmp_path / "p", quiet=True)
    assert plain["valid"] != straight["valid"]
    assert "padding trimmed" not in (tmp_path / "p" / "train.log").read_text()


def test_a_training_process_imports_neither_dynamo_nor_pandas(tiny_prepared, tmp_path):
    """In a fresh process (this one has imported both): train two epochs through the CLI, then resume
    for a third. ``torch._dynamo`` (~70 MB, imported by torch.optim's guards; m3bsr.engine.optim) and
    pandas (~40 MB, imported by pyarrow's NumPy conversions; m3bsr.arrow) must stay out."""
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        from m3bsr.cli import main
        for argv in (["train", "--model", "m3bsr", "--dataset", {str(tiny_prepared)!r}, "--out", {str(run)!r},
                      "--quiet", "--set", "train.max_epochs=2", "--set", "model.hidden_size=16",
                      "--set", "model.n_heads=1"],
                     ["train", "--resume", {str(run)!r}, "--quiet", "--set", "train.max_epochs=3"]):
            code = main(argv)
            assert not code, code
        print("imported:", sorted(m for m in ("torch._dynamo", "pandas") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "imported: []"
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3


def test_low_memory_changes_no_number(tiny_prepared, tmp_path):
    """``train.low_memory``: in a fresh process (the setting is process-wide), a run without it and then
    one with it give the same metrics to the last bit, and the second says in train.log that it applied."""
    script = textwrap.dedent(f"""
        from m3bsr.cli import main
        for name, low in (("plain", "false"), ("low", "true")):
            code = main(["train", "--model", "m3bsr", "--dataset", {str(tiny_prepared)!r},
                         "--out", {str(tmp_path)!r} + "/" + name, "--quiet", "--set", "train.max_epochs=2",
                         "--set", "model.hidden_size=16", "--set", "model.n_heads=1",
                         "--set", "train.low_memory=" + low])
            assert not code, code
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    plain, low = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("plain", "low"))
    assert low["valid"] == plain["valid"] and low["test"] == plain["test"]
    line = "memory: freed blocks of 256 KB or more go back to the system at once (train.low_memory)"
    assert line in (tmp_path / "low" / "train.log").read_text()
    assert "train.low_memory" not in (tmp_path / "plain" / "train.log").read_text()


def test_low_memory_without_glibc_says_it_does_nothing(tiny_prepared, tmp_path, monkeypatch, capsys):
    """Where the allocator cannot be set, the run goes on and says so once."""
    import m3bsr.engine.train as engine

    monkeypatch.setattr(engine, "release_freed_memory", lambda: False)
    train(cfg_for(**{"train.low_memory": True, "train.max_epochs": 1}), tiny_prepared, tmp_path / "r")
    notices = [line for line in capsys.readouterr().out.splitlines() if "train.low_memory" in line]
    assert notices == ["notice: train.low_memory has no effect here: it needs glibc's malloc (Linux); the run "
                       "goes on with the default allocator"]
