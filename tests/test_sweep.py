"""``m3bsr sweep``: grid parsing, validation-only runs, the ranked table and the emitted best config."""

from __future__ import annotations

import json

import pytest
import yaml

from m3bsr.cli import main
from m3bsr.config import load_config
from m3bsr.errors import InputError
from m3bsr.sweep import _slug, grid_points, parse_grid


def test_parse_grid_and_cartesian_points():
    axes = parse_grid("model.hidden_size=8,16 train.lr=1e-3,1e-2,0.1")
    assert axes == [("model.hidden_size", ["8", "16"]), ("train.lr", ["1e-3", "1e-2", "0.1"])]
    points = grid_points(axes)
    assert len(points) == 6
    assert points[0] == ["model.hidden_size=8", "train.lr=1e-3"]
    assert points[-1] == ["model.hidden_size=16", "train.lr=0.1"]
    # run folder names keep decimal values whole (a dotted value is not a dotted key)
    assert _slug(["model.dropout=0.2", "train.lr=1e-3"]) == "dropout=0.2-lr=1e-3"


@pytest.mark.parametrize("grid, message", [("", "empty grid"), ("train.lr", "expected KEY=V1,V2"),
                                           ("train.lr=1 train.lr=2", "a key appears twice")])
def test_bad_grids_are_one_line_errors(grid, message):
    with pytest.raises(InputError, match=message):
        parse_grid(grid)


def test_sweep_ranks_on_validation_never_evaluates_test(tiny_prepared, tmp_path, capsys):
    out = tmp_path / "sweep"
    best = tmp_path / "best.yaml"
    argv = ["sweep", "--dataset", str(tiny_prepared), "--model", "sasrec", "--grid", "train.lr=1e-4,1e-2",
            "--set", "train.max_epochs=2", "--set", "model.hidden_size=8", "--set", "model.n_layers=1",
            "--set", "data.max_len=10", "--set", "train.device=cpu", "--out", str(out),
            "--emit-best", str(best), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out  # --quiet: the progress lines still say where the sweep is
    assert "sweep: [1/2] sasrec train.lr=1e-4: training\n" in printed
    assert "sweep: [2/2] sasrec train.lr=1e-2 · ETA " in printed
    rows = (out / "sweep.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("train.lr,run,")
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2
    valid = []
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["test"] is None or metrics["test"] == {}  # test never evaluated
        assert not (run / "test_ranks.parquet").exists()
        valid.append((metrics["valid"]["full"]["NDCG@10"], run.name))
    # the table is ranked by the monitored valid metric, and the emitted config is the winner's
    winner = max(valid)[1]
    assert rows[1].split(",")[1] == winner
    cfg = load_config(best)
    assert cfg.train.eval_test is True and cfg.model.hidden_size == 8
    assert cfg.train.lr == float(rows[1].split(",")[0])
    # a second call reuses the finished runs (no retraining): same table
    before = (out / "sweep.csv").read_text()
    assert main(argv) == 0
    assert (out / "sweep.csv").read_text() == before
    assert yaml.safe_load(best.read_text())["model"]["name"] == "sasrec"


def write_fake_run(cfg, dataset, out):
    """Write config.yaml and metrics.json like the engine (valid NDCG@10 = train.lr); returns the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = json.loads((dataset / "manifest.json").read_text()).get("fingerprint")
    (out / "config.yaml").write_text(yaml.safe_dump({"dataset": str(dataset.resolve()),
                                                     "dataset_fingerprint": fingerprint, **cfg.to_dict()}))
    metrics = {"valid": {"full": {"NDCG@10": cfg.train.lr, "HR@10": 0.5}}, "best_epoch": 1, "seconds_per_epoch": 1.0}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_sweep_progress_lines_and_eta(tiny_prepared, tmp_path):
    """`[k/N] model point` before each grid point, the ETA from the points trained so far, reuse said."""
    from m3bsr.sweep import sweep

    now, lines = [0.0], []

    def fake_train(cfg, dataset, out, *, overwrite, quiet):
        now[0] += 20 if cfg.model.hidden_size == 8 else 40
        return write_fake_run(cfg, dataset, out)

    def run():
        lines.clear()
        return sweep(tiny_prepared, "sasrec", "model.hidden_size=8,16 train.lr=0.1,0.2", tmp_path / "sw",
                     train_fn=fake_train, progress=lines.append, clock=lambda: now[0])

    table = run()
    assert lines == ["[1/4] sasrec model.hidden_size=8 train.lr=0.1: training",
                     "[2/4] sasrec model.hidden_size=8 train.lr=0.2 · ETA 1m00s (20s per run): training",
                     "[3/4] sasrec model.hidden_size=16 train.lr=0.1 · ETA 40s (20s per run): training",
                     # (20+20+40)/3
                     "[4/4] sasrec model.hidden_size=16 train.lr=0.2 · ETA 27s (27s per run): training",
                     "4 grid points done in 2m00s (4 trained, 0 reused)"]
    assert table["valid_NDCG@10"].tolist() == [0.2, 0.2, 0.1, 0.1]
    (tmp_path / "sw" / "runs" / "003-hidden_size=16-lr=0.2" / "metrics.json").unlink()
    run()
    assert lines[0] == "[1/4] sasrec model.hidden_size=8 train.lr=0.1: finished, reused"
    assert lines[3:] == ["[4/4] sasrec model.hidden_size=16 train.lr=0.2: training",
                         "4 grid points done in 40s (1 trained, 3 reused)"]


def test_sweep_reuses_resumes_and_refuses_like_compare(tiny_prepared, tmp_path):
    """The one rule (RunDir.reuse): a finished point is reused (also one written before train keys were added,
    which keep their defaults), an unfinished one with last.pt is resumed, not retrained; another config
    or a re-prepared dataset is refused in one line naming the first differing key / the fingerprints."""
    from m3bsr.engine.runs import RunDir
    from m3bsr.sweep import sweep

    out, trained, resumed, lines = tmp_path / "sw", [], [], []

    def fake_train(cfg, dataset, run_dir, *, overwrite, quiet):
        trained.append(run_dir.name)
        return write_fake_run(cfg, dataset, run_dir)

    def fake_resume(run_dir, *, quiet):
        resumed.append(run_dir.name)
        return write_fake_run(*RunDir(run_dir).read_config(), run_dir)

    def run(*sets):
        lines.clear()
        return sweep(tiny_prepared, "sasrec", "train.lr=0.1,0.2", out, overrides=list(sets), train_fn=fake_train,
                     resume_fn=fake_resume, progress=lines.append)

    run()
    assert trained == ["000-lr=0.1", "001-lr=0.2"]
    for run_dir in (out / "runs").iterdir():
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
        for key in ("loss", "loss_negatives", "loss_replacement", "loss_alpha"):
            del raw["train"][key]
        (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    unfinished = out / "runs" / "001-lr=0.2"
    (unfinished / "metrics.json").unlink()
    (unfinished / "last.pt").write_bytes(b"stands in for a checkpoint")
    table = run()
    assert len(trained) == 2 and resumed == ["001-lr=0.2"]
    assert lines[:2] == ["[1/2] sasrec train.lr=0.1: finished, reused",
                         "[2/2] sasrec train.lr=0.2: unfinished, resuming from last.pt"]
    assert table["valid_NDCG@10"].tolist() == [0.2, 0.1]
    with pytest.raises(InputError, match=r"runs/000-lr=0\.1: was trained with a different config or dataset "
                                         r"\(train\.max_epochs: stored 200, asked 3\)\. Pass --overwrite to retrain"):
        run("train.max_epochs=3")
    manifest = tiny_prepared / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "fingerprint": "f" * 64}))
    with pytest.raises(InputError, match="fingerprint none, but .* now has fingerprint ffffffffffff"):
        run()
    assert len(trained) == 2 and len(resumed) == 1
