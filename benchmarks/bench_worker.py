"""One benchmark measurement per process (so peak resident memory is that measurement's own).

``python benchmarks/bench_worker.py '<json spec>'`` prints one JSON line. Kinds:

* ``train``: the engine's own session and ``train_step`` (autocast, compile, clipping, Adam) on
  ``steps`` shuffled batches after ``warmup`` batches; seconds/step, targets/s, seconds/epoch
  extrapolated from the mean step (``steps_per_epoch`` steps), data-loading share, GFLOP/s.
* ``eval``: :func:`m3bsr.engine.evaluate` (both protocols, full ranking chunked) on ``users`` test windows;
  users/s and users per CPU-second (process time of every thread).
* ``latency``: single-user top-10 with :class:`m3bsr.serving.recommend.Recommender`, p50/p99.
* ``matmul``: the machine's fp32 matmul GFLOP/s (n x n x n, best of several).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: torch.device) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _config(spec: dict):
    from m3bsr.config import build_config

    sets = [f"model.hidden_size={spec['d']}", f"data.max_len={spec['L']}",
            f"train.batch_size={spec.get('batch', 256)}", f"train.device={spec['device']}",
            f"train.compile={str(spec.get('compile', False)).lower()}", "train.amp=true"]
    if "item_chunk" in spec:
        sets.append(f"eval.item_chunk={spec['item_chunk']}")
    if spec["model"] in ("m3bsr", "sasrec"):
        sets.append(f"model.max_positions={max(200, 2 * spec['L'])}")
    return build_config(model=spec["model"], overrides=sets + list(spec.get("set", [])))


def train(spec: dict) -> dict:
    from m3bsr.data.batches import iterate_batches
    from m3bsr.engine.train import TrainState, open_session, train_step
    from m3bsr.models.summary import measure_flops

    cfg = _config(spec)
    s = open_session(cfg, Path(spec["dataset"]), quiet=True)
    setup_rss = _peak_mb(s.device)["peak_rss_mb"]
    torch.manual_seed(spec.get("seed", 0))
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    batches = iterate_batches(s.train_windows, cfg.train.batch_size, shuffle=True, generator=gen,
                              pin_memory=s.cuda)
    state, step_s, data_s, targets = TrainState(), [], 0.0, 0
    s.model.train()
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # a small dataset: start a new epoch
            batches = iterate_batches(s.train_windows, cfg.train.batch_size, shuffle=True, generator=gen)
            batch = next(batches)
        batch = batch.to(s.device, non_blocking=s.cuda)
        t1 = time.perf_counter()
        train_step(s, batch, state)
        _sync(s.device)
        t2 = time.perf_counter()
        if i >= spec["warmup"]:
            step_s.append(t2 - t0)
            data_s += t1 - t0
            targets += int(batch.n_queries)
    steps_per_epoch = math.ceil(len(s.train_windows) / cfg.train.batch_size)
    mean = float(np.mean(step_s))
    peak = _peak_mb(s.device)  # before the FLOP count, which keeps its own copies
    flop = measure_flops(s.model, batch)["train_loss_forward"] * batch.users.shape[0] * 1e9 * 3  # fwd + ~2x bwd
    return {"step_s": mean, "step_s_min": float(np.min(step_s)), "targets_per_s": targets / sum(step_s),
            "steps_per_epoch": steps_per_epoch, "seconds_per_epoch": mean * steps_per_epoch,
            "data_share": data_s / sum(step_s), "train_windows": len(s.train_windows),
            "gflop_per_step": flop / 1e9, "gflops": flop / 1e9 / mean,
            "params": sum(p.numel() for p in s.model.parameters()), "setup_rss_mb": setup_rss, **peak}


def _subset(windows, n: int):
    return type(windows)(**{f.name: (getattr(windows, f.name)[:n] if getattr(windows, f.name) is not None else None)
                            for f in fields(windows)})


def evaluate(spec: dict) -> dict:
    from m3bsr.data.batches import WindowBuilder
    from m3bsr.data.prepared import PreparedDataset
    from m3bsr.engine.evaluate import evaluate as run_eval
    from m3bsr.models.registry import build_model

    cfg = _config(spec)
    device = torch.device(spec["device"])
    ds = PreparedDataset.load(spec["dataset"])
    torch.manual_seed(0)
    model = build_model(cfg.model, ds.catalogue()).to(device)
    windows = _subset(WindowBuilder(ds, cfg.data.max_len).eval_windows("test", cfg.eval.exclude), spec["users"])
    bs = min(cfg.train.eval_batch_size, len(windows))
    run_eval(model, _subset(windows, min(bs, 64)), cfg.eval, bs, device, amp=True)  # warm-up
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    run_eval(model, windows, cfg.eval, bs, device, amp=True)
    _sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds of the whole process (every thread): on a shared machine the wall time depends on
    # the share of the cores this process gets, the CPU time much less.
    return {"users": len(windows), "seconds": seconds, "users_per_s": len(windows) / seconds,
            "cpu_s": cpu, "users_per_cpu_s": len(windows) / cpu, "items": ds.n_items, **_peak_mb(device)}


def latency(spec: dict) -> dict:
    from m3bsr.data.batches import user_history
    from m3bsr.data.prepared import PreparedDataset
    from m3bsr.models.registry import build_model
    from m3bsr.serving.recommend import Recommender

    cfg = _config(spec)
    ds = PreparedDataset.load(spec["dataset"])
    torch.manual_seed(0)
    rec = Recommender(build_model(cfg.model, ds.catalogue()), cfg, ds, device=spec["device"],
                      compile=spec.get("compile", False))
    rng = np.random.default_rng(0)
    users = rng.integers(1, ds.n_users + 1, spec["calls"] + 10)
    histories = [user_history(rec.builder, int(u)) for u in users]
    times = []
    for i, h in enumerate(histories):
        t0 = time.perf_counter()
        rec.top_k([h], 10)
        if i >= 10:  # warm-up calls
            times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "calls": len(ms), **_peak_mb(torch.device(spec["device"]))}


def matmul(spec: dict) -> dict:
    device = torch.device(spec["device"])
    n = spec.get("n", 2048 if device.type == "cpu" else 8192)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(spec.get("repeats", 5)):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "gflops": 2 * n**3 / best / 1e9}


KINDS = {"train": train, "eval": evaluate, "latency": latency, "matmul": matmul}


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(int(spec.get("threads", 1)))
    if spec["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # GPU peak and training both at TF32 matmul
    print(json.dumps({"spec": spec, **KINDS[spec["kind"]](spec)}), flush=True)


if __name__ == "__main__":
    main()
