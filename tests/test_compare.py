"""``m3bsr compare``: config sharing, run reuse/resume, the aggregated report (on fake runs with
hand-known metrics) and one end-to-end run through the real engine on a tiny dataset."""

from __future__ import annotations

import json
import shutil
import zlib

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from factories import make_tiny_prepared
from m3bsr import compare
from m3bsr.cli import main as cli_main
from m3bsr.engine.metrics import metric_names, metrics_from_ranks
from m3bsr.errors import InputError

KS = [5, 10, 20]
N_USERS = 30


def fake_ranks(model: str, seed: int) -> np.ndarray:
    """Deterministic per-user test ranks: 'm3bsr' ranks most users higher than the others."""
    rng = np.random.default_rng(zlib.crc32(f"{model}-{seed}".encode()))
    base = {"m3bsr": 2, "sasrec": 6, "pop": 30}[model]
    return np.maximum(1, base + rng.integers(-1, 4, N_USERS))


class FakeEngine:
    """Stands in for ``engine.train``: writes config.yaml, metrics.json and test_ranks.parquet like it."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, cfg, dataset, out, *, overwrite, quiet):
        self.calls.append(out.name)
        out.mkdir(parents=True, exist_ok=True)
        fingerprint = json.loads((dataset / "manifest.json").read_text()).get("fingerprint")
        (out / "config.yaml").write_text(yaml.safe_dump({"dataset": str(dataset.resolve()),
                                                         "dataset_fingerprint": fingerprint, **cfg.to_dict()}))
        ranks = fake_ranks(cfg.model.name, cfg.seed)
        test = {"sampled": metrics_from_ranks(ranks, KS), "full": metrics_from_ranks(ranks + 3, KS)}
        summary = {"valid": test, "test": test, "best_epoch": 1, "epochs": 2, "seconds_per_epoch": 0.5,
                   "seed": cfg.seed}
        pd.DataFrame({"user": np.arange(1, N_USERS + 1), "rank_sampled": ranks, "rank_full": ranks + 3}).to_parquet(
            out / "test_ranks.parquet")
        (out / "metrics.json").write_text(json.dumps(summary))
        return summary


@pytest.fixture
def fake_run(tmp_path):
    data = make_tiny_prepared(tmp_path / "data", n_users=12)
    engine = FakeEngine()

    def run(**kw):
        kw = {"models": ["sasrec", "m3bsr", "pop"], "seeds": [0, 1], "out": tmp_path / "cmp", "train_fn": engine,
              "log": lambda m: None, **kw}
        return compare.run_compare(data, **kw)
    return run, engine, tmp_path / "cmp"


def test_report_files_and_numbers(fake_run):
    run, engine, out = fake_run
    table = run()
    assert len(engine.calls) == 6
    csv = pd.read_csv(out / "results.csv")
    assert list(csv.columns) == ["model", "mode", "seed", "split", "protocol", *metric_names(KS), "best_epoch",
                                 "epochs", "seconds_per_epoch"]
    assert csv.groupby("model")["mode"].first().to_dict() == {
        "sasrec": "merged: auxiliary + target", "m3bsr": "multi-behavior: merged backbone", "pop": "target only"}
    assert len(csv) == 3 * 2 * 2 * 2  # models x seeds x splits x protocols
    assert csv.groupby(["model", "split", "protocol"]).size().eq(2).all()
    # Mean ± std of a cell, computed by hand from the ranks.
    vals = [metrics_from_ranks(fake_ranks("sasrec", s) + 3, KS)["NDCG@10"] for s in (0, 1)]
    md = (out / "results.md").read_text()
    assert f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}" in md
    # m3bsr is best on test/full NDCG@10 → bold; its gain over the best baseline (sasrec) is stated.
    m3 = [metrics_from_ranks(fake_ranks("m3bsr", s) + 3, KS)["NDCG@10"] for s in (0, 1)]
    assert f"**{np.mean(m3):.4f} ± {np.std(m3, ddof=1):.4f}**" in md
    sampled = {m: np.mean([metrics_from_ranks(fake_ranks(m, s), KS)["NDCG@10"] for s in (0, 1)])
               for m in ("m3bsr", "sasrec", "pop")}
    assert sampled["sasrec"] > sampled["pop"] and sampled["sasrec"] > 0
    assert f"{100 * (sampled['m3bsr'] - sampled['sasrec']) / sampled['sasrec']:+.1f} %" in md
    assert "gain of m3bsr over best baseline" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table.shape[0] == 24


def test_significance_matches_scipy(fake_run):
    run, _, out = fake_run
    run()
    sig = json.loads((out / "significance.json").read_text())
    assert [s["protocol"] for s in sig] == ["sampled", "full"]
    assert all(s["reference"] == "m3bsr" and s["baseline"] == "sasrec" for s in sig)

    def ndcg(model):  # per user, averaged over the two seeds
        r = np.stack([fake_ranks(model, s) for s in (0, 1)]).astype(float)
        return np.where(r <= 10, 1 / np.log2(r + 1), 0).mean(0)
    a, b = ndcg("m3bsr"), ndcg("sasrec")
    assert sig[0]["users"] == N_USERS
    assert sig[0]["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert sig[0]["ttest_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert sig[0]["mean_difference"] == pytest.approx((a - b).mean())
    assert sig[0]["wilcoxon_p"] < 0.01  # m3bsr's fake ranks are clearly better


def test_p_values_that_underflow_are_not_printed_as_zero():
    from m3bsr.compare import format_p
    assert format_p(0.0) == "< 1e-300"  # 30k paired users on tmall: scipy returns exactly 0
    assert format_p(5e-324) == "4.94e-324"
    assert format_p(0.08964) == "0.0896"
    assert format_p(1.0) == "1"
    assert format_p(float("nan")) == "nan"


def test_finished_runs_are_reused_and_config_changes_refused(fake_run):
    run, engine, out = fake_run
    run()
    run()
    assert len(engine.calls) == 6  # nothing retrained
    with pytest.raises(InputError, match=r"runs/sasrec-s0: was trained with a different config or dataset "
                                         r"\(train\.lr: stored 0\.001, asked 0\.01\)\. Pass --overwrite to retrain"):
        run(sets=["train.lr=0.01"])
    (out / "runs" / "pop-s1" / "metrics.json").unlink()  # an interrupted run without last.pt is retrained
    run()
    assert engine.calls[-1] == "pop-s1" and len(engine.calls) == 7
    manifest = out.parent / "data" / "manifest.json"  # the dataset re-prepared: its runs are not reused
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "fingerprint": "f" * 64}))
    with pytest.raises(InputError, match="fingerprint none, but .* now has fingerprint ffffffffffff"):
        run()
    assert len(engine.calls) == 7
    run(overwrite=True)
    assert len(engine.calls) == 13


def test_unfinished_run_resumes(fake_run):
    run, engine, out = fake_run
    run(models=["pop"], seeds=[0])
    (out / "runs" / "pop-s0" / "metrics.json").unlink()
    (out / "runs" / "pop-s0" / "last.pt").write_bytes(b"x")
    resumed = []
    with pytest.raises(RuntimeError, match="resumed"):
        compare.run_compare(out.parent / "data", ["pop"], [0], out=out, train_fn=engine, log=lambda m: None,
                            resume_fn=lambda d, quiet: resumed.append(d) or (_ for _ in ()).throw(RuntimeError("resumed")))
    assert resumed == [out / "runs" / "pop-s0"]


LATER_KEYS = ("loss", "loss_negatives", "loss_replacement", "loss_alpha")  # train keys added after runs existed


def write_as_older_version(run_dir, train_keys=LATER_KEYS):
    """Rewrite a run's config.yaml as an m3bsr before ``train_keys`` existed wrote it: without them."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key in train_keys:
        del raw["train"][key]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_stored_config_is_compared_through_the_typed_config(fake_run):
    """A run written before keys were added matches while they keep their defaults; a real difference,
    or another dataset directory, is refused naming the first differing key."""
    run, engine, out = fake_run
    run(models=["pop", "sasrec"], seeds=[0])
    for run_dir in (out / "runs").iterdir():
        write_as_older_version(run_dir)
        assert "loss_alpha" not in (run_dir / "config.yaml").read_text()
    run(models=["pop", "sasrec"], seeds=[0])
    assert engine.calls == ["pop-s0", "sasrec-s0"]  # reused, not refused or retrained
    with pytest.raises(InputError, match=r"runs/pop-s0: was trained with a different config or dataset "
                                         r"\(train\.loss: stored 'full', asked 'sampled'\)"):
        run(models=["pop"], seeds=[0], sets=["train.loss=sampled"])  # absent in the file: read back as "full"
    with pytest.raises(InputError, match=r"\(model\.n_layers: stored 2, asked 1\)"):
        run(models=["sasrec"], seeds=[0], sets=["model.n_layers=1"])
    moved = out.parent / "data-copy"
    shutil.copytree(out.parent / "data", moved)  # the same prepared data under another directory
    with pytest.raises(InputError, match=r"\(dataset: stored '.*/data', asked '.*/data-copy'\)"):
        compare.run_compare(moved, ["pop"], [0], out=out, train_fn=engine, log=lambda m: None)
    assert len(engine.calls) == 2


def test_config_sharing():
    cfgs = compare.model_configs({"model": {"dropout": 0.3, "hidden_size": 32}, "train": {"max_epochs": 7},
                                  "models": {"bert4rec": {"mask_prob": 0.4}}},
                                 ["sasrec", "bert4rec", "pop"], 3, ["model.n_heads=4", "train.patience=2"])
    assert {c.model.hidden_size for c in cfgs.values()} == {32}
    assert all(c.seed == 3 and c.train.max_epochs == 7 and c.train.patience == 2 and c.train.eval_test
               for c in cfgs.values())
    assert cfgs["bert4rec"].model.mask_prob == 0.4 and cfgs["sasrec"].model.n_heads == 4
    assert cfgs["sasrec"].model.dropout == 0.3
    default = compare.model_configs({}, ["sasrec", "gru4rec"], 0, ["model.hidden_size=48"])
    assert {c.model.hidden_size for c in default.values()} == {48}
    with pytest.raises(InputError, match="no listed model has this key"):
        compare.model_configs({}, ["sasrec"], 0, ["model.mask_prob=0.3"])
    with pytest.raises(InputError, match="--seeds"):
        compare.model_configs({}, ["sasrec"], 0, ["seed=4"])
    tuned = compare.model_configs({"models": {"sasrec": {"hidden_size": 8, "train": {"lr": 0.003}}}},
                                  ["sasrec", "gru4rec"], 0, ["model.hidden_size=48", "train.lr=0.001"])
    assert (tuned["sasrec"].model.hidden_size, tuned["sasrec"].train.lr) == (8, 0.003)
    assert (tuned["gru4rec"].model.hidden_size, tuned["gru4rec"].train.lr) == (48, 0.001)
    only_gru = compare.model_configs({"models": {"sasrec": {"hidden_size": 8}}}, ["gru4rec"], 0, [])
    assert only_gru["gru4rec"].model.hidden_size == 64  # a block of an unlisted model is ignored
    with pytest.raises(InputError, match="models.nope: unknown model"):
        compare.model_configs({"models": {"nope": {}}}, ["sasrec"], 0, [])
    with pytest.raises(InputError, match="only the optimiser keys"):
        compare.model_configs({"models": {"sasrec": {"train": {"max_epochs": 9}}}}, ["sasrec"], 0, [])
    with pytest.raises(InputError, match="unknown model 'nope'"):
        compare.parse_models("sasrec,nope")
    with pytest.raises(InputError, match="integers"):
        compare.parse_seeds("0,a")


def test_preset_entries_are_rows_of_their_own():
    models = compare.parse_models("M3BSR,m3bsr@paper,sasrec")
    assert models == ["m3bsr", "m3bsr@paper", "sasrec"]
    cfgs = compare.model_configs({"models": {"m3bsr@paper": {"dropout": 0.5, "train": {"lr": 0.003}}}},
                                 models, 0, [])
    paper, default = cfgs["m3bsr@paper"].model, cfgs["m3bsr"].model
    assert (paper.preset, paper.id_input, paper.common_expert, paper.dropout) == ("paper", "mlp16", "cross", 0.5)
    assert (default.preset, default.id_input, default.common_expert) == ("default", "full", "merged")
    assert cfgs["m3bsr@paper"].train.lr == 0.003 and cfgs["m3bsr"].train.lr == 0.001
    assert compare.reference_model(models) == "m3bsr"
    assert compare.baselines(models, "m3bsr") == ["sasrec"]  # its own presets are not baselines
    mean = pd.DataFrame({"NDCG@10": [0.5, 0.9, 0.4]}, index=pd.MultiIndex.from_tuples(
        [("test", "full", m) for m in models], names=["split", "protocol", "model"]))
    assert compare.best_baseline(mean, "m3bsr", "full") == "sasrec"
    with pytest.raises(InputError, match="listed twice"):
        compare.parse_models("m3bsr@paper,M3BSR@paper")
    with pytest.raises(InputError, match="sasrec has no presets"):
        compare.parse_models("sasrec@paper")


def test_compare_end_to_end_with_engine(tmp_path, capsys):
    """The CLI through the real engine: three models, one seed, two epochs on a tiny dataset."""
    data = make_tiny_prepared(tmp_path / "data", n_users=24)
    out = tmp_path / "cmp"
    args = ["compare", "--dataset", str(data), "--models", "sasrec,gru4rec,pop", "--seeds", "0", "--out", str(out),
            "--set", "train.max_epochs=2", "--set", "train.device=cpu", "--set", "model.hidden_size=16",
            "--set", "data.max_len=8", "--quiet"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out.splitlines()  # --quiet: no bars, but the progress lines
    assert [line.split(" · ")[0] for line in printed if line.startswith("compare: [")] == [
        "compare: [1/3] sasrec seed 0", "compare: [2/3] gru4rec seed 0", "compare: [3/3] pop seed 0"]
    assert "ETA" in printed[[i for i, line in enumerate(printed) if "[3/3]" in line][0]]
    assert any(line.startswith("compare: 3 runs done in ") for line in printed)
    csv = pd.read_csv(out / "results.csv")
    test_full = csv[(csv.split == "test") & (csv.protocol == "full")]
    assert sorted(test_full.model) == ["gru4rec", "pop", "sasrec"]  # one row per model
    assert test_full[metric_names(KS)].notna().all().all()
    assert (out / "results.png").is_file() and "sasrec" in (out / "results.md").read_text()
    for m in ("sasrec", "gru4rec", "pop"):
        metrics = json.loads((out / "runs" / f"{m}-s0" / "metrics.json").read_text())
        assert metrics["epochs"] == (1 if m == "pop" else 2)  # pop is fitted in one pass
        row = test_full[test_full.model == m].iloc[0]
        assert row["NDCG@10"] == pytest.approx(metrics["test"]["full"]["NDCG@10"], abs=1e-6)
    sig = json.loads((out / "significance.json").read_text())
    assert sig[0]["reference"] == "sasrec" and sig[0]["users"] == 24
    assert cli_main(args + ["--set", "train.lr=0.5"]) == 2  # same --out, different config: one-line error
    assert "different config" in capsys.readouterr().err


def single_behavior_dataset(root):
    """The tiny dataset with its clicks dropped, prepared from a user,item,timestamp file."""
    from m3bsr.data.prepared import PreparedDataset

    ds = PreparedDataset.load(make_tiny_prepared(root / "multi", n_users=12))
    ev = ds.events[ds.events.stream == 1]
    (root / "plays.csv").write_text("user,item,timestamp\n" + "".join(
        f"u{u},i{i},{t}\n" for u, i, t in zip(ev.user, ev.item, ev.timestamp)))
    assert cli_main(["prepare", str(root / "plays.csv"), "--set", "events.behavior=play", "--set", "n_negatives=10",
                     "--out", str(root / "plays"), "--quiet"]) == 0
    return root / "plays"


def test_single_behavior_modes_and_refusals(tmp_path):
    """The report says what each model read; a model that cannot run stops compare before any run."""
    data, engine, out, logged = single_behavior_dataset(tmp_path), FakeEngine(), tmp_path / "cmp", []
    compare.run_compare(data, ["sasrec", "m3bsr", "pop"], [0], out=out, train_fn=engine, log=logged.append)
    csv = pd.read_csv(out / "results.csv")
    assert set(csv["mode"]) == {"target (single-behavior data)"}
    md = (out / "results.md").read_text()
    assert "## What each model read" in md and "| sasrec | target (single-behavior data) |  |" in md
    assert "| m3bsr | target (single-behavior data) | m3bsr: " in md
    assert [line for line in logged if "notice" in line] == [next(x for x in logged if x.startswith("m3bsr: notice"))]
    with pytest.raises(InputError, match=r"--models entry 'm3bsr@paper': model.preset=paper: .*no auxiliary "
                                         r"behavior.*drop the entry from --models"):
        compare.run_compare(data, ["sasrec", "m3bsr@paper"], [0], out=tmp_path / "cmp2", train_fn=engine,
                            log=lambda m: None)
    assert engine.calls == ["sasrec-s0", "m3bsr-s0", "pop-s0"]  # nothing ran for the refused compare
    assert not (tmp_path / "cmp2").exists()


def test_progress_lines_and_eta(fake_run):
    """`[k/N] model seed s` before every run; the ETA is the mean of the runs trained so far x the runs left."""
    run, engine, out = fake_run
    now, took = [0.0], {"sasrec": 10.0, "m3bsr": 30.0, "pop": 2.0}

    def timed(cfg, dataset, out, **kw):
        now[0] += took[cfg.model.name]
        return engine(cfg, dataset, out, **kw)

    lines = []
    run(train_fn=timed, progress=lines.append, clock=lambda: now[0])
    assert lines == ["[1/6] sasrec seed 0",
                     "[2/6] m3bsr seed 0 · ETA 50s (10s per run)",    # 10 s x 5 left
                     "[3/6] pop seed 0 · ETA 1m20s (20s per run)",    # (10 + 30) / 2 x 4
                     "[4/6] sasrec seed 1 · ETA 42s (14s per run)",   # (10 + 30 + 2) / 3 x 3
                     "[5/6] m3bsr seed 1 · ETA 26s (13s per run)",    # 52 / 4 x 2
                     "[6/6] pop seed 1 · ETA 16s (16s per run)",      # 82 / 5 x 1
                     "6 runs done in 1m24s (6 trained, 0 reused)"]
    lines.clear()
    run(train_fn=timed, progress=lines.append, clock=lambda: now[0])  # all reused: no time, no ETA
    assert lines[0] == "[1/6] sasrec seed 0" and lines[-2] == "[6/6] pop seed 1"
    assert lines[-1] == "6 runs done in 0s (0 trained, 6 reused)"
    (out / "runs" / "m3bsr-s0" / "metrics.json").unlink()
    lines.clear()
    run(train_fn=timed, progress=lines.append, clock=lambda: now[0])  # one retrained: the ETA is its time
    assert lines[2:4] == ["[3/6] pop seed 0 · ETA 2m00s (30s per run)",
                          "[4/6] sasrec seed 1 · ETA 1m30s (30s per run)"]
    assert lines[-1] == "6 runs done in 30s (1 trained, 5 reused)"
    assert len(engine.calls) == 7
    # A resumed run trains only the epochs it had left: its 1 s must not make the ETA of full runs.
    summary = json.loads((out / "runs" / "sasrec-s0" / "metrics.json").read_text())
    (out / "runs" / "sasrec-s0" / "metrics.json").unlink()
    (out / "runs" / "sasrec-s0" / "last.pt").write_bytes(b"x")
    (out / "runs" / "pop-s0" / "metrics.json").unlink()

    def resume(run_dir, quiet):
        now[0] += 1.0
        return summary

    lines.clear()
    run(train_fn=timed, resume_fn=resume, progress=lines.append, clock=lambda: now[0])
    assert lines[:3] == ["[1/6] sasrec seed 0", "[2/6] m3bsr seed 0", "[3/6] pop seed 0"]  # no ETA from 1 s
    assert lines[3] == "[4/6] sasrec seed 1 · ETA 6s (2s per run)"  # pop trained from the start: 2 s x 3
    assert lines[-1] == "6 runs done in 3s (1 trained, 1 resumed, 4 reused)"


def test_a_run_saved_before_a_model_key_existed_reads_as_it_was(tmp_path):
    """ADDED_KEYS: an m3bsr run whose config.yaml predates ``aux_targets`` was trained without that term;
    it must read back with 0 (so compare refuses it as today's default), not with the preset's 0.5."""
    from m3bsr.config import build_config
    from m3bsr.engine.commands import run_config
    from m3bsr.engine.runs import RunDir
    raw = {"dataset": str(tmp_path / "data"), **build_config({}, model="m3bsr").to_dict()}
    assert raw["model"]["aux_targets"] == 0.5  # today's default
    del raw["model"]["aux_targets"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    stored, _ = RunDir(tmp_path).read_config()
    assert stored.model.aux_targets == 0.0
    assert run_config(tmp_path / "config.yaml", None, [])[0].model.aux_targets == 0.0  # --config RUN/config.yaml
    assert run_config(tmp_path / "config.yaml", None, ["model.aux_targets=0.5"])[0].model.aux_targets == 0.5
    (tmp_path / "user.yaml").write_text(yaml.safe_dump({"model": {"name": "m3bsr"}}))  # a user config: preset
    assert run_config(tmp_path / "user.yaml", None, [])[0].model.aux_targets == 0.5
