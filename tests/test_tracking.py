"""Experiment tracking (``train.log_to``): a real tiny training run writes TensorBoard event files and a
local MLflow store under the run directory, and what they hold is read back with each library's own reader
and compared to metrics.jsonl / metrics.json. A missing library is a one-line error before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3bsr.config import build_config
from m3bsr.engine import tracking
from m3bsr.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

SETS = ["data.max_len=6", "train.batch_size=16", "train.device=cpu", "model.hidden_size=16", "model.n_layers=1",
        "model.n_heads=1"]


def _train(dataset: Path, out: Path, log_to: str, epochs: int = 2) -> dict:
    from m3bsr.engine.train import train

    cfg = build_config({}, model="sasrec", overrides=[*SETS, f"train.max_epochs={epochs}", "train.patience=50",
                                                      f"train.log_to={log_to}"])
    return train(cfg, dataset, out, quiet=True)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_scalars_flatten_a_record():
    record = {"epoch": 3, "loss": {"main": 2.0, "total": 2.5}, "seconds": 1.5, "eval_seconds": 0.5,
              "targets_per_second": 10.0, "skipped_batches": 0, "improved": True,
              "valid": {"full": {"NDCG@10": 0.25}, "sampled": {"NDCG@10": 0.5}}}
    assert tracking.scalars(record) == {
        "loss/main": 2.0, "loss/total": 2.5, "valid/full/NDCG@10": 0.25, "valid/sampled/NDCG@10": 0.5,
        "time/seconds": 1.5, "time/eval_seconds": 0.5, "time/targets_per_second": 10.0,
        "train/skipped_batches": 0.0}
    assert tracking.flat_params({"seed": 1, "train": {"lr": 0.001, "log_to": ["mlflow"]}}) == {
        "seed": "1", "train.lr": "0.001", "train.log_to": "['mlflow']"}


def test_tensorboard_holds_every_epoch(tiny_prepared, tmp_path):
    pytest.importorskip("tensorboard", reason="tracking extra not installed (pip install 'm3bsr[tracking]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    summary = _train(tiny_prepared, run, "[tensorboard]")
    assert not (run / "mlruns").exists()
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    records = _records(run)
    for name in ("loss/total", "loss/main", "valid/full/NDCG@10", "valid/sampled/HR@5", "time/seconds"):
        events = acc.Scalars(name)
        assert [e.step for e in events] == [1, 2], name
        expected = [tracking.scalars(r)[name] for r in records]
        assert [e.value for e in events] == pytest.approx(expected, rel=1e-6), name
    test = acc.Scalars("test/full/NDCG@10")
    assert [e.step for e in test] == [summary["best_epoch"]]
    assert test[0].value == pytest.approx(summary["test"]["full"]["NDCG@10"], rel=1e-6)
    assert {"test/sampled/MRR", "valid/full/MRR"} <= tags


def test_mlflow_local_store_and_resume(tiny_prepared, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="tracking extra not installed (pip install 'm3bsr[tracking]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    from m3bsr.engine.train import resume

    run = tmp_path / "run"
    _train(tiny_prepared, run, "[mlflow]", epochs=2)
    resume(run, ["train.max_epochs=3"], quiet=True)  # the same MLflow run goes on
    summary = json.loads((run / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name(tracking.MLFLOW_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    info = runs[0]
    assert info.info.status == "FINISHED"
    assert info.data.tags[tracking.RUN_TAG] == str(run.resolve())
    assert info.data.params["model.name"] == "sasrec" and info.data.params["train.max_epochs"] == "2"
    history = client.get_metric_history(info.info.run_id, "valid/full/NDCG_at_10")
    records = _records(run)
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [r["valid"]["full"]["NDCG@10"] for r in records], rel=1e-6)
    # each finish logs the test metrics of its best epoch: the first run's, then the resumed run's
    test = sorted(client.get_metric_history(info.info.run_id, "test/full/NDCG_at_10"), key=lambda m: m.timestamp)
    assert len(test) == 2 and test[-1].step == summary["best_epoch"]
    assert test[-1].value == pytest.approx(summary["test"]["full"]["NDCG@10"], rel=1e-6)
    assert not (tmp_path / "mlruns").exists()  # nothing outside the run directory


def test_missing_library_is_one_line_before_any_work(tiny_prepared, tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(InputError, match=r"train.log_to=mlflow: the mlflow package is not installed.*"
                                         r"m3bsr\[tracking\]"):
        _train(tiny_prepared, tmp_path / "run", "[tensorboard, mlflow]")
    assert not (tmp_path / "run").exists()


def test_log_to_is_validated():
    with pytest.raises(InputError, match="train.log_to"):
        build_config({}, overrides=["train.log_to=[wandb]"])
    assert build_config({}).train.log_to == []


def test_compare_reuses_a_run_whatever_its_log_to(tiny_prepared, tmp_path):
    """train.log_to does not change a run: compare reuses a finished run trained without the key (before it
    existed) when asked with it, and the reverse; another key still makes it a different run."""
    import yaml

    from m3bsr import compare

    run_dir = tmp_path / "runs" / "sasrec-s0"
    run_dir.mkdir(parents=True)
    old = build_config({}, model="sasrec").to_dict()
    del old["train"]["log_to"]  # a config.yaml written before train.log_to existed
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"dataset": str(tiny_prepared.resolve()),
                                                         "dataset_fingerprint": None, **old}))
    summary = {"test": {"full": {"NDCG@10": 0.5}}}
    (run_dir / "metrics.json").write_text(json.dumps(summary))
    (run_dir / "test_ranks.parquet").write_bytes(b"")

    def never(*a, **k):
        raise AssertionError("retrained")

    cfg = build_config({}, model="sasrec", overrides=["train.log_to=[tensorboard]"])
    kw = dict(overwrite=False, quiet=True, train_fn=never, resume_fn=never, log=lambda m: None)
    assert compare.run_one(cfg, tiny_prepared, run_dir, **kw) == summary
    with pytest.raises(InputError, match="different config"):
        compare.run_one(build_config({}, model="sasrec", overrides=["train.lr=0.01"]), tiny_prepared, run_dir, **kw)
