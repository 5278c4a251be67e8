"""DDP: the distributed sampler, and 2 CPU processes (torchrun, gloo) against a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from m3bsr.config import build_config
from m3bsr.data.batches import WindowBuilder, bucketed_order, iterate_batches
from m3bsr.data.prepared import PreparedDataset
from m3bsr.engine.checkpoint import load_run_model
from m3bsr.engine.distributed import context_from_env, shard_batches, subset
from m3bsr.engine.train import resume, train
from m3bsr.errors import InputError

# dropout 0 and sasrec's deterministic "ce" loss: the only difference left between 1 and 2 processes
# is float summation order (per-rank partial sums + all-reduce vs one batched sum), ~1e-7 relative
# per step, which Adam over 2 epochs of 6 steps amplifies to ~1e-5 in weights and losses.
SETS = {"train.device": "cpu", "train.batch_size": 8, "train.max_epochs": 2, "train.patience": 10,
        "train.lr": 0.01, "data.max_len": 10, "eval.item_chunk": 16, "model.hidden_size": 16,
        "model.n_layers": 1, "model.dropout": 0.0}
POP_SETS = {k: v for k, v in SETS.items() if not k.startswith("model.")}


def _cfg(model: str, sets: dict):
    return build_config({}, model=model, overrides=[f"{k}={v}" for k, v in sets.items()])


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "m3bsr", "train", *args, "--quiet"]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _sets_args(sets: dict) -> list[str]:
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _close(a, b, tol):
    """Recursive comparison of metric dicts with absolute tolerance ``tol``."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k], tol)
    else:
        assert a == pytest.approx(b, abs=tol)


def assert_same_function(run_a: Path, run_b: Path) -> None:
    """The last weights of two runs give the same scores on the valid windows (to float noise).

    Not raw weights: the key half of attn.kv.bias has an exactly-zero true gradient (softmax ignores a
    per-query constant), so Adam turns float noise there into lr-sized, run-specific steps that change
    no output.
    """
    scores = []
    for run in (run_a, run_b):
        model, cfg, ds = load_run_model(run, "last")
        batch = WindowBuilder(ds, cfg.data.max_len).eval_windows("valid").batch(slice(None))
        with torch.no_grad():
            scores.append(model.score(model.represent(batch)))
    assert float((scores[0] - scores[1]).abs().max()) < 1e-4 * float(scores[1].abs().max())


# --------------------------------------------------------------------------- sampler (no processes)


@pytest.mark.parametrize("pool", [0, 2], ids=["shuffled", "bucketed"])
@pytest.mark.parametrize("n,batch_size,world", [(45, 8, 2), (10, 4, 3), (5, 2, 4)])
def test_shards_partition_every_global_batch(tiny_prepared, n, batch_size, world, pool):
    """Step k of all ranks together = the single-process batch k; same step count on every rank
    (also with ``train.bucket_by_length`` = ``pool``)."""
    windows = WindowBuilder(PreparedDataset.load(tiny_prepared), 10).train_windows()
    windows = subset(windows, np.arange(n))
    gen = torch.Generator().manual_seed(3)
    order = bucketed_order(windows, batch_size, pool, gen) if pool else None
    single = [b.users.tolist() for b in iterate_batches(windows, batch_size, shuffle=True, order=order,
                                                        trim=bool(pool), generator=gen)]
    per_rank = [list(shard_batches(windows, batch_size, generator=torch.Generator().manual_seed(3), rank=r,
                                   world_size=world, pool=pool)) for r in range(world)]
    assert all(len(steps) == len(single) == -(-n // batch_size) for steps in per_rank)
    pads = 0
    for k, users in enumerate(single):
        shares = [per_rank[r][k] for r in range(world)]
        real = [b.users.tolist() for b, is_real in shares if is_real]
        pads += sum(not is_real for _, is_real in shares)
        assert sorted(sum(real, [])) == sorted(users)  # nothing lost, nothing repeated
        assert max(map(len, real)) - min(map(len, real)) <= 1
        assert all(len(b.users) == 1 for b, is_real in shares if not is_real)  # pad: one window, weight 0
    assert pads == sum(max(0, world - len(users)) for users in single)  # a rank pads only an empty share


def test_context_from_env():
    assert context_from_env({}).world_size == 1 and not context_from_env({}).active
    ctx = context_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.active) == (1, 2, 1, True)
    with pytest.raises(InputError, match="rank outside the world"):
        context_from_env({"RANK": "2", "WORLD_SIZE": "2"})


# --------------------------------------------------------------------------- 2 processes


def test_two_processes_match_one(tiny_prepared, tmp_path):
    """torchrun 2 x gloo: completes, rank 0 alone writes, metrics/losses/scores = one process."""
    work = tmp_path / "cwd"
    work.mkdir()
    t0 = time.perf_counter()
    out = _torchrun(["--dataset", str(tiny_prepared), "--model", "sasrec", *_sets_args(SETS),
                     "--out", str(tmp_path / "ddp")], work)
    ddp_seconds = time.perf_counter() - t0
    one = train(_cfg("sasrec", SETS), tiny_prepared, tmp_path / "one", quiet=True)

    # rank 0 alone wrote: the same file set as a single-process run, nothing in the working dir,
    # each log line and the final table once.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert list(work.iterdir()) == []
    log = (tmp_path / "ddp" / "train.log").read_text().splitlines()
    assert sum("epoch 1 loss" in line for line in log) == 1 and sum("done:" in line for line in log) == 1
    assert out.stdout.count("valid sampled") == 1

    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["epochs"] == one["epochs"] == 2 and ddp["best_epoch"] == one["best_epoch"]
    _close(ddp["valid"], one["valid"], 1e-9)  # ranks are integers: equal unless a score tie flips
    _close(ddp["test"], one["test"], 1e-9)
    # the gathered per-user test ranks are reassembled in window order (user ↔ rank alignment)
    ranks = [pd.read_parquet(tmp_path / run / "test_ranks.parquet") for run in ("ddp", "one")]
    assert ranks[0].equals(ranks[1])
    rec = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    rec1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rec, rec1):
        assert a["loss"]["total"] == pytest.approx(b["loss"]["total"], rel=1e-5)
    assert_same_function(tmp_path / "ddp", tmp_path / "one")
    print(f"2-process sasrec run: {ddp_seconds:.1f} s wall (incl. 2 interpreter starts)")


def test_two_processes_sampled_loss_match_one(tiny_prepared, tmp_path):
    """train.loss=sampled under DDP: every rank draws the same shared negatives (one seeded generator),
    so 2 processes optimise the global batch's sampled loss as one process does: same losses and
    metrics up to summation order. (Per-rank negatives would give other losses and weights.)"""
    sets = {**SETS, "train.loss": "sampled", "train.loss_negatives": 16}
    _torchrun(["--dataset", str(tiny_prepared), "--model", "sasrec", *_sets_args(sets),
               "--out", str(tmp_path / "ddp")], tmp_path)
    one = train(_cfg("sasrec", sets), tiny_prepared, tmp_path / "one", quiet=True)
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    _close(ddp["valid"], one["valid"], 1e-9)
    rec = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    rec1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == len(rec1) == 2
    for a, b in zip(rec, rec1):
        assert a["loss"]["total"] == pytest.approx(b["loss"]["total"], rel=1e-5)


@pytest.mark.slow  # two more torchrun launches: ~45 s on the shared 2-core machine
def test_two_processes_pop_and_resume(tiny_prepared, tmp_path):
    """Pop exact under 2 processes; a 1-process run resumed by 2 processes = an uninterrupted 1-process run."""
    work = tmp_path / "cwd"
    work.mkdir()
    # pop: no gradient, counts summed over ranks → exactly the single-process counts and metrics
    _torchrun(["--dataset", str(tiny_prepared), "--model", "pop", *_sets_args(POP_SETS),
               "--out", str(tmp_path / "pop-ddp")], work)
    pop1 = train(_cfg("pop", POP_SETS), tiny_prepared, tmp_path / "pop-one", quiet=True)
    pop2 = json.loads((tmp_path / "pop-ddp" / "metrics.json").read_text())
    assert pop2["valid"] == pop1["valid"] and pop2["test"] == pop1["test"]
    c1 = torch.load(tmp_path / "pop-one" / "last.pt", weights_only=True)["model"]["counts"]
    c2 = torch.load(tmp_path / "pop-ddp" / "last.pt", weights_only=True)["model"]["counts"]
    assert torch.equal(c1, c2) and float(c1.sum()) > 0

    # resume: a 1-epoch single-process run continued to 2 epochs by 2 processes (every rank loads last.pt)
    train(_cfg("sasrec", {**SETS, "train.max_epochs": 1}), tiny_prepared, tmp_path / "half", quiet=True)
    _torchrun(["--resume", str(tmp_path / "half"), "--set", "train.max_epochs=2"], work)
    resumed = json.loads((tmp_path / "half" / "metrics.json").read_text())
    assert resumed["epochs"] == 2 and len((tmp_path / "half" / "metrics.jsonl").read_text().splitlines()) == 2
    one = train(_cfg("sasrec", SETS), tiny_prepared, tmp_path / "one", quiet=True)
    _close(resumed["valid"], one["valid"], 1e-9)
    _close(resumed["test"], one["test"], 1e-9)
    assert_same_function(tmp_path / "half", tmp_path / "one")  # the resumed weights, not only the metrics


def test_single_process_never_opens_a_process_group(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train(_cfg("pop", {**POP_SETS, "train.max_epochs": 1}), tiny_prepared, tmp_path / "r", quiet=True)
    assert not torch.distributed.is_initialized()
    with pytest.raises(InputError, match="already exists"):
        train(_cfg("pop", POP_SETS), tiny_prepared, tmp_path / "r", quiet=True)
    assert resume(tmp_path / "r", ["train.max_epochs=2"], quiet=True)["epochs"] == 1  # pop: fitted once
    assert np.isfinite(json.loads((tmp_path / "r" / "metrics.json").read_text())["valid"]["full"]["MRR"])


@pytest.mark.slow  # three torchrun launches
def test_two_process_resume_is_exact_with_dropout(tiny_prepared, tmp_path):
    """Dropout 0.2: ranks reseed per (seed, epoch, rank), so a 2-process run stopped after epoch 1 and
    resumed by 2 processes ends bit-identical to an uninterrupted 2-process run."""
    sets = {**SETS, "model.dropout": 0.2}
    common = ["--dataset", str(tiny_prepared), "--model", "sasrec", *_sets_args(sets)]
    _torchrun([*common, "--out", str(tmp_path / "a")], tmp_path)
    _torchrun([*common, "--set", "train.max_epochs=1", "--out", str(tmp_path / "b")], tmp_path)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["epochs"] == 1
    _torchrun(["--resume", str(tmp_path / "b"), "--set", "train.max_epochs=2"], tmp_path)
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("a", "b"))
    assert a["valid"] == b["valid"] and a["test"] == b["test"]
    wa, wb = (torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
