"""A run is tied to the prepared data it was trained on: config.yaml records the manifest's fingerprint,
and every command that opens the run (evaluate, recommend, serve, resume, compare/sweep reuse) refuses
a dataset directory re-prepared since, in one line naming both fingerprints and the fix."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from m3bsr.cli import main as cli_main
from m3bsr.errors import InputError

PREPARE_CFG = {"name": "t", "events": {"path": "events.csv", "integer_ids": True},
               "behaviors": {"target": "buy", "auxiliary": ["view"]}, "min_user_events": 2, "n_negatives": 3}


def _prepare(root: Path, out: Path, *sets: str, overwrite: bool = False) -> str:
    """Prepare the fixed little CSV under ``root`` into ``out``; returns the manifest's fingerprint."""
    src = root / "src"
    if not src.is_dir():
        src.mkdir()
        rows = [f"{u},{(u * 7 + k * 3) % 30 + 1},{'buy' if k % 3 == 2 else 'view'},{100 * u + k}"
                for u in range(1, 9) for k in range(9)]
        (src / "events.csv").write_text("user,item,behavior,timestamp\n" + "\n".join(rows) + "\n")
        (root / "prep.yaml").write_text(yaml.safe_dump(PREPARE_CFG))
    argv = ["prepare", str(src), "--config", str(root / "prep.yaml"), "--out", str(out), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    assert cli_main(argv + (["--overwrite"] if overwrite else [])) == 0
    return json.loads((out / "manifest.json").read_text())["fingerprint"]


def _train(ds: Path, out: Path, *extra: str) -> None:
    assert cli_main(["train", "--dataset", str(ds), "--model", "pop", "--out", str(out), "--quiet",
                     "--device", "cpu", *extra]) == 0


@pytest.fixture
def trained(tmp_path, capsys):
    """A prepared dataset (its fingerprint) and a finished pop run on it."""
    ds, run = tmp_path / "ds", tmp_path / "run"
    fp = _prepare(tmp_path, ds)
    _train(ds, run)
    capsys.readouterr()
    return ds, run, fp


def _one_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_run_records_the_fingerprint(trained):
    ds, run, fp = trained
    assert len(fp) == 64
    assert yaml.safe_load((run / "config.yaml").read_text())["dataset_fingerprint"] == fp
    assert json.loads((run / "metrics.json").read_text())["dataset_fingerprint"] == fp


def test_reprepared_dataset_is_refused_by_every_command_that_opens_the_run(trained, tmp_path, capsys, monkeypatch):
    ds, run, old = trained
    new = _prepare(tmp_path, ds, "n_negatives=4", overwrite=True)  # the user re-prepares with another setting
    assert new != old
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    import uvicorn  # serve must refuse before it listens: a call to uvicorn.run is a failure, not a hang

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("serve started on re-prepared data"))
    for argv in (["evaluate", str(run)], ["recommend", str(run), "--user", "1"], ["serve", str(run), "--port", "0"],
                 ["train", "--resume", str(run)]):
        assert cli_main(argv + ["--quiet"]) == 2, argv
        line = _one_line(capsys)
        assert line == (f"m3bsr: error: {run / 'config.yaml'}: the run was trained on prepared data with fingerprint "
                        f"{old[:12]}, but {ds / 'manifest.json'} now has fingerprint {new[:12]} (re-prepared "
                        f"since?). Re-train on the current data (m3bsr train --config {run / 'config.yaml'} --out "
                        f"NEW_RUN_DIR), or set dataset: in {run / 'config.yaml'} to a directory prepared from the "
                        f"original sources and settings (fingerprint {old[:12]})"), (argv, line)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing was touched
    from m3bsr.serving.app import create_app

    with pytest.raises(InputError, match="fingerprint"):
        create_app(run)


def test_both_fixes_in_the_message_work(trained, tmp_path, capsys):
    ds, run, old = trained
    _prepare(tmp_path, ds, "n_negatives=4", overwrite=True)
    # 1. The original sources and settings, prepared into another directory, give the same fingerprint back.
    assert _prepare(tmp_path, tmp_path / "original") == old
    raw = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**raw, "dataset": str(tmp_path / "original")}, sort_keys=False))
    assert cli_main(["evaluate", str(run), "--quiet"]) == 0
    assert "metrics.json: reproduced (valid, test)" in capsys.readouterr().out
    # 2. Re-training from the run's config.yaml on the current data records the new fingerprint.
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli_main(["train", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "again"),
                     "--quiet"]) == 0
    again = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert again["dataset_fingerprint"] == json.loads((ds / "manifest.json").read_text())["fingerprint"] != old
    assert cli_main(["recommend", str(tmp_path / "again"), "--user", "1", "--k", "2"]) == 0


def test_old_run_without_a_fingerprint_warns_once_and_resume_records_it(trained, capsys):
    """Runs trained before the fingerprint was recorded: used as they are, with one warning; a resume
    (which writes config.yaml anyway) records the current fingerprint from then on."""
    ds, run, fp = trained
    raw = yaml.safe_load((run / "config.yaml").read_text())
    del raw["dataset_fingerprint"]
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.warns(UserWarning, match="no dataset_fingerprint recorded") as caught:
        assert cli_main(["evaluate", str(run), "--quiet"]) == 0
    assert len([w for w in caught if "dataset_fingerprint" in str(w.message)]) == 1
    from m3bsr.serving.recommend import Recommender

    with pytest.warns(UserWarning, match="cannot be checked"):
        assert Recommender.from_run(run).n_items > 0
    with pytest.warns(UserWarning, match="no dataset_fingerprint recorded"):
        assert cli_main(["train", "--resume", str(run), "--quiet"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["dataset_fingerprint"] == fp
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recorded now: no warning any more
        assert cli_main(["evaluate", str(run), "--quiet"]) == 0


def test_sweep_and_compare_refuse_to_reuse_runs_of_the_old_data(tmp_path, capsys):
    from m3bsr.compare import run_compare
    from m3bsr.sweep import sweep

    ds = tmp_path / "ds"
    old = _prepare(tmp_path, ds)
    grid = "train.lr=0.001"
    sweep(ds, "pop", grid, tmp_path / "sw", quiet=True)
    run_compare(ds, ["pop"], [0], out=tmp_path / "cmp", quiet=True, log=lambda m: None)
    run_compare(ds, ["pop"], [0], out=tmp_path / "cmp", quiet=True, log=lambda m: None)  # reused: same data
    new = _prepare(tmp_path, ds, "n_negatives=4", overwrite=True)
    with pytest.raises(InputError) as e:
        sweep(ds, "pop", grid, tmp_path / "sw", quiet=True)
    assert f"fingerprint {old[:12]}" in str(e.value) and f"fingerprint {new[:12]}" in str(e.value)
    assert "Pass --overwrite to retrain every run on the current data" in str(e.value)
    with pytest.raises(InputError) as e:
        run_compare(ds, ["pop"], [0], out=tmp_path / "cmp", quiet=True, log=lambda m: None)
    assert f"fingerprint {old[:12]}" in str(e.value) and f"fingerprint {new[:12]}" in str(e.value)
    assert "Pass --overwrite to retrain every run on the current data" in str(e.value)
    run_compare(ds, ["pop"], [0], out=tmp_path / "cmp", quiet=True, log=lambda m: None, overwrite=True)
    assert yaml.safe_load((tmp_path / "cmp" / "runs" / "pop-s0" / "config.yaml").read_text())[
        "dataset_fingerprint"] == new
