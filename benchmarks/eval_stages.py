"""Where full-ranking evaluation spends its time: the user encoder vs the two rankings.

    python benchmarks/eval_stages.py --dataset /tmp/bench/work/tmall_like --model m3bsr,sasrec
    python benchmarks/eval_stages.py ... --set model.length_buckets=1      # any config override

Runs the first ``--users`` test windows through the same length-sorted, trimmed batches as
``engine.evaluate`` (random weights, d = 64 unless overridden) on one thread, as each of
``engine.evaluate``'s CPU workers runs a batch; for each model (comma-separated, interleaved),
``--rounds`` passes after a warm-up one, and prints the fastest: CPU seconds in ``represent``, in
ranking (both protocols, as ``engine.evaluate`` runs them) and in batching, wall seconds, and users
per CPU-second (CPU time is what a shared machine distorts least; with T free cores, T workers
give up to T times that in users/s).
"""

from __future__ import annotations

import argparse
import time

import torch

from m3bsr.config import build_config
from m3bsr.data.batches import WindowBuilder, iterate_batches
from m3bsr.data.prepared import PreparedDataset
from m3bsr.engine.evaluate import full_ranks, linear_table, sampled_ranks
from m3bsr.models.registry import build_model

from bench_worker import _subset  # the first n windows (same helper as the benchmark's eval)


def one_pass(model, cfg, windows, batch: int) -> dict[str, float]:
    """CPU seconds per stage (and wall seconds) of one evaluation pass."""
    stages = dict(represent=0.0, ranking=0.0)
    t0, c0 = time.perf_counter(), time.thread_time()
    table = linear_table(model)
    for b in iterate_batches(windows, batch, order=windows.length_order(), trim=True, max_tokens=cfg.eval.max_tokens):
        t = time.thread_time()
        reps = model.represent(b).float()
        t1 = time.thread_time()
        sampled_ranks(model, reps, b, table)
        full_ranks(model, reps, b, cfg.eval.item_chunk, table)
        stages["represent"] += t1 - t
        stages["ranking"] += time.thread_time() - t1
    return {**stages, "cpu": time.thread_time() - c0, "wall": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a prepared dataset (e.g. bench_data.tmall_like output)")
    p.add_argument("--model", default="m3bsr", help="one model or several, comma-separated")
    p.add_argument("--users", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3, help="timed passes per model (the fastest is printed)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(1)
    ds = PreparedDataset.load(args.dataset)
    runs = {}
    for name in args.model.split(","):
        cfg = build_config(model=name, overrides=["model.hidden_size=64", *args.sets])
        torch.manual_seed(0)
        model = build_model(cfg.model, ds.catalogue()).eval()
        runs[name] = (cfg, model, _subset(WindowBuilder(ds, cfg.data.max_len).eval_windows("test", cfg.eval.exclude),
                                          args.users), [])
    with torch.inference_mode():
        for r in range(args.rounds + 1):  # the first pass warms up
            for cfg, model, w, passes in runs.values():
                out = one_pass(model, cfg, w, args.batch)
                if r:
                    passes.append(out)
    print(f"{'model':<10}{'users':>7}{'cpu s':>8}{'represent':>11}{'ranking':>9}{'batching':>10}{'wall s':>8}"
          f"{'users/cpu-s':>13}")
    for name, (_, _, w, passes) in runs.items():
        best = min(passes, key=lambda s: s["cpu"])
        print(f"{name:<10}{len(w):>7}{best['cpu']:>8.3f}{best['represent']:>11.3f}{best['ranking']:>9.3f}"
              f"{best['cpu'] - best['represent'] - best['ranking']:>10.3f}{best['wall']:>8.3f}{len(w) / best['cpu']:>13.0f}")


if __name__ == "__main__":
    main()
