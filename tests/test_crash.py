"""Crash safety: SIGKILL mid-epoch + ``--resume`` reproduces an uninterrupted run exactly; checkpoints
are verified (sha256 sidecar) and a truncated one falls back to the previous good one with a warning;
a NaN/inf loss stops the run keeping the last good checkpoint, or (``train.nonfinite=skip``) is counted."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories import make_tiny_prepared

from m3bsr.cli import main as cli_main
from m3bsr.engine.checkpoint import load_checkpoint, save_checkpoint
from m3bsr.errors import InputError

SLOW_SETS = ["train.max_epochs=2", "train.patience=10", "train.batch_size=1", "model.hidden_size=16",
             "model.n_layers=1"]


def _train_argv(ds: Path, out: Path, sets: list[str], model: str = "sasrec") -> list[str]:
    argv = ["train", "--dataset", str(ds), "--model", model, "--out", str(out), "--quiet", "--device", "cpu"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _comparable(run: Path) -> dict:
    summary = json.loads((run / "metrics.json").read_text())
    return {k: summary[k] for k in ("valid", "test", "best_epoch", "epochs", "skipped_batches", "stop_reason")}


def _assert_same_weights(run_a: Path, run_b: Path) -> None:
    """best.pt and last.pt of two runs: same epoch, bit-identical weights."""
    for name in ("best.pt", "last.pt"):
        a, b = load_checkpoint(run_a / name), load_checkpoint(run_b / name)
        assert a["epoch"] == b["epoch"], name
        assert a["model"].keys() == b["model"].keys(), name
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


# --------------------------------------------------------------------------- SIGKILL mid-epoch + resume


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    ds = make_tiny_prepared(tmp_path / "ds", n_users=160, n_items=60)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # same threads in every process
    cmd = [sys.executable, "-m", "m3bsr"]
    ref, crashed = tmp_path / "reference", tmp_path / "crashed"
    reference = subprocess.Popen(cmd + _train_argv(ds, ref, SLOW_SETS), env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(cmd + _train_argv(ds, crashed, SLOW_SETS), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_records(crashed)) < 1:  # epoch 1 is recorded (last.pt was written just before)
            assert victim.poll() is None, "training ended before epoch 1 was recorded"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        epoch_seconds = _records(crashed)[0]["seconds"]
        time.sleep(0.4 * epoch_seconds)  # well inside epoch 2's training pass
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    # Killed mid-epoch 2: one epoch on record, last.pt at epoch 1, no summary, no temp files left behind
    # other than at most one torn ``.name.*.tmp`` (harmless: never read).
    assert [r["epoch"] for r in _records(crashed)] == [1]
    assert load_checkpoint(crashed / "last.pt")["epoch"] == 1
    assert not (crashed / "metrics.json").exists()

    rc = subprocess.run(cmd + ["train", "--resume", str(crashed), "--quiet"], env=env, capture_output=True,
                        text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    assert _comparable(crashed) == _comparable(ref)  # valid/test metrics, best_epoch, epochs: exact
    assert [r["epoch"] for r in _records(crashed)] == [1, 2]
    assert [r["loss"] for r in _records(crashed)] == [r["loss"] for r in _records(ref)]
    _assert_same_weights(crashed, ref)


# --------------------------------------------------------------------------- Ctrl-C, then the suggested command


@pytest.fixture
def ctrl_c_on_step(monkeypatch):
    """``arm(n)``: the n-th training step from now raises KeyboardInterrupt (as Ctrl-C would)."""
    from m3bsr.engine import train as engine

    real, calls, at = engine.train_step, [0], [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", step)

    def arm(n: int) -> None:
        calls[0], at[0] = 0, n
    return arm


def _suggested(err: str) -> list[str]:
    """The argv of the command the interruption message tells the user to run (after ``with: ``)."""
    line = [ln for ln in err.splitlines() if ln.strip()][-1]
    words = shlex.split(line.split(" with: ", 1)[1])
    assert words[:3] == ["m3bsr", "train", "--resume"], line
    return words[1:]


@pytest.mark.parametrize("step, saved", [(2, []), (7, [1])])  # epoch 1 step 2; epoch 2 step 2 (5 steps/epoch)
def test_ctrl_c_says_the_command_that_continues_and_it_matches_uninterrupted(tmp_path, capsys, ctrl_c_on_step,
                                                                             step, saved):
    ds = make_tiny_prepared(tmp_path / "ds")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli_main(_train_argv(ds, ref, GUARD_SETS)) == 0
    capsys.readouterr()
    ctrl_c_on_step(step)
    assert cli_main(_train_argv(ds, run, GUARD_SETS)) == 130
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"m3bsr: interrupted: {run}: training interrupted (Ctrl-C) "
                                                   f"in epoch {1 + len(saved)}, "), err
    if saved:
        assert "after epoch 1 was saved. Continue it from epoch 1 with: m3bsr train --resume" in lines[0]
        assert load_checkpoint(run / "last.pt")["epoch"] == 1
    else:
        assert "before any epoch was saved. Start it over with: m3bsr train --resume" in lines[0]
        assert not (run / "last.pt").exists()
    assert [r["epoch"] for r in _records(run)] == saved and not (run / "metrics.json").exists()
    log = (run / "train.log").read_text()
    assert f"interrupted (Ctrl-C) in epoch {1 + len(saved)}" in log and "m3bsr train --resume" in log
    # Re-running the train command is refused, naming the same way out.
    ctrl_c_on_step(0)
    assert cli_main(_train_argv(ds, run, GUARD_SETS)) == 2
    again = capsys.readouterr().err
    assert "unfinished run (interrupted?)" in again and f"m3bsr train --resume {run}" in again
    # The suggested command, exactly as printed, finishes the run as if it had never stopped.
    assert cli_main(_suggested(err)) == 0
    log = (run / "train.log").read_text()
    assert ("resumed from last.pt at epoch 1" if saved else "starting over from epoch 1") in log
    assert _comparable(run) == _comparable(ref)
    assert [r["epoch"] for r in _records(run)] == [1, 2, 3]
    assert [r["loss"] for r in _records(run)] == [r["loss"] for r in _records(ref)]
    _assert_same_weights(run, ref)


def test_resume_without_checkpoint_but_with_recorded_epochs_is_still_an_error(tmp_path, capsys):
    """Starting over is only for a run with no recorded epoch: otherwise its epochs would vanish silently."""
    ds = make_tiny_prepared(tmp_path / "ds", n_users=20, n_items=30)
    run = tmp_path / "run"
    assert cli_main(_train_argv(ds, run, ["train.max_epochs=1", "model.hidden_size=8", "model.n_layers=1"])) == 0
    for p in run.glob("last*"):
        p.unlink()
    assert cli_main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "last.pt: no usable checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- verified checkpoints


def _state(value: float) -> dict:
    return {"epoch": int(value), "model": {"w": torch.full((3,), value)}}


def test_checkpoint_is_atomic_with_sidecar_and_prev(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.prev.pt", "last.prev.pt.sha256", "last.pt", "last.pt.sha256"]  # no .tmp left
    assert load_checkpoint(path)["epoch"] == 2
    assert load_checkpoint(tmp_path / "last.prev.pt")["epoch"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete", "delete_sidecar"])
def test_damaged_checkpoint_falls_back_with_warning(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    data = path.read_bytes()
    if damage == "truncate":  # e.g. a crash mid-write on a filesystem without atomic rename
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "delete":  # the crash point between rotating to .prev and writing the new file
        path.unlink()
    else:  # the crash point between writing the new bytes and their sidecar
        (tmp_path / "last.pt.sha256").unlink()
    with pytest.warns(UserWarning, match="using the previous good checkpoint last.prev.pt"):
        state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.full((3,), 1.0))


def test_no_usable_checkpoint_is_one_line_input_error(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, _state(1))
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and "best.pt: no usable checkpoint" in msg and "sha256 mismatch" in msg
    assert "best.prev.pt: file is missing" in msg and "Re-train the run, or restore the file" in msg


def test_resume_from_truncated_last_uses_previous(tmp_path, capsys):
    ds = make_tiny_prepared(tmp_path / "ds", n_users=20, n_items=30)
    run = tmp_path / "run"
    sets = ["train.max_epochs=2", "model.hidden_size=8", "model.n_layers=1", "train.batch_size=8"]
    assert cli_main(_train_argv(ds, run, sets)) == 0
    full = _comparable(run)
    shutil.copytree(run, tmp_path / "full")
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[:-50])
    with pytest.warns(UserWarning, match="sha256 mismatch.*last.prev.pt"):
        assert cli_main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "resumed from last.pt at epoch 1" in (run / "train.log").read_text()
    assert _comparable(run) == full  # epoch 2 re-done from the epoch-1 state: same result
    _assert_same_weights(run, tmp_path / "full")  # ... and the same weights


# --------------------------------------------------------------------------- non-finite loss guard


class Fault(dict):
    """call number (1-based, counted since :meth:`arm`) → factor (nan/inf) applied to the loss."""

    calls = 0

    def arm(self, faults: dict[int, float]) -> None:
        self.clear()
        self.update(faults)
        self.calls = 0


@pytest.fixture
def nan_on_calls(monkeypatch) -> Fault:
    """Make SASRec's loss non-finite on chosen training steps (the model is monkeypatched only here)."""
    from m3bsr.models.sasrec import SASRec

    fault = Fault()
    original = SASRec.loss

    def loss(self, batch):
        terms = original(self, batch)
        fault.calls += 1
        if fault.calls in fault:
            terms = {**terms, "main": terms["main"] * fault[fault.calls]}
        return terms

    monkeypatch.setattr(SASRec, "loss", loss)
    return fault


GUARD_SETS = ["train.max_epochs=3", "train.patience=10", "train.batch_size=8", "model.hidden_size=8",
              "model.n_layers=1"]  # 40 windows / 8 = 5 steps per epoch


def test_nonfinite_loss_stops_keeping_last_good_checkpoint(tmp_path, nan_on_calls, capsys):
    ds = make_tiny_prepared(tmp_path / "ds")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli_main(_train_argv(ds, ref, GUARD_SETS)) == 0
    capsys.readouterr()
    nan_on_calls.arm({7: math.nan})  # epoch 2, step 2
    rc = cli_main(_train_argv(ds, run, GUARD_SETS))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"m3bsr: error: epoch 2: non-finite loss {{'main': nan, 'total': nan}}; training stopped, "
                      f"last good checkpoint {run / 'last.pt'} (epoch 1). Lower train.lr, set train.grad_clip, "
                      "or pass --set train.nonfinite=skip")
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not (run / "metrics.json").exists()
    assert [r["epoch"] for r in _records(run)] == [1]
    # The kept checkpoint is good: with the fault gone, --resume finishes exactly like the clean run.
    nan_on_calls.arm({})
    assert cli_main(["train", "--resume", str(run), "--quiet"]) == 0
    assert _comparable(run) == _comparable(ref)
    _assert_same_weights(run, ref)


def test_nonfinite_skip_counts_and_reports(tmp_path, nan_on_calls, capsys):
    ds = make_tiny_prepared(tmp_path / "ds")
    run = tmp_path / "run"
    nan_on_calls.arm({2: math.nan, 8: math.inf})  # epoch 1 step 2, epoch 2 step 3
    assert cli_main(_train_argv(ds, run, GUARD_SETS + ["train.nonfinite=skip"])) == 0
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["skipped_batches"] == 2 and summary["epochs"] == 3
    assert [r["skipped_batches"] for r in _records(run)] == [1, 1, 0]
    assert all(math.isfinite(r["loss"]["total"]) for r in _records(run))
    log = (run / "train.log").read_text()
    assert "epoch 1: non-finite loss" in log and "batch skipped" in log and "2 batches skipped" in log


def test_disk_full_mid_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    """ENOSPC while writing a checkpoint: a one-line InputError, no temp file, the old pair still loads."""
    import errno

    from m3bsr import atomic

    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1))

    real_fsync = os.fsync

    def full(fd):  # the disk fills up on the checkpoint bytes (not on the small sidecars or folders)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size > 200:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(InputError) as e:
        save_checkpoint(path, _state(2))
    monkeypatch.undo()
    assert str(e.value).startswith(f"{tmp_path}") and "No space left on device" in str(e.value)
    assert "\n" not in str(e.value) and "Free disk space" in str(e.value)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # last.pt was rotated to last.prev.pt before the failed write: the fallback finds it
    with pytest.warns(UserWarning, match="using the previous good checkpoint last.prev.pt"):
        assert load_checkpoint(path)["epoch"] == 1
