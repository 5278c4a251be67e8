"""Where full-ranking evaluation spends its time: the user encoder vs the two rankings.

    python benchmarks/eval_stages.py --dataset /tmp/bench/work/tmall_like --model m3bsr
    python benchmarks/eval_stages.py ... --set model.length_buckets=1      # any config override

Runs the first ``--users`` test windows through the same length-sorted, trimmed batches as
``engine.evaluate`` (random weights, d = 64 unless overridden), twice, and prints the second pass:
seconds in ``represent``, in ranking (both protocols, as ``engine.evaluate`` runs them) and in
batching, and users/s.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a prepared dataset (e.g. bench_data.tmall_like output)")
    p.add_argument("--model", default="m3bsr")
    p.add_argument("--users", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_config(model=args.model, overrides=["model.hidden_size=64", *args.sets])
    ds = PreparedDataset.load(args.dataset)
    torch.manual_seed(0)
    model = build_model(cfg.model, ds.catalogue()).eval()
    w = _subset(WindowBuilder(ds, cfg.data.max_len).eval_windows("test", cfg.eval.exclude), args.users)
    with torch.no_grad():
        table = linear_table(model)
        for _ in range(2):  # the first pass warms up
            stages = dict(represent=0.0, ranking=0.0)
            t0 = time.perf_counter()
            for b in iterate_batches(w, args.batch, order=w.length_order(), trim=True, max_tokens=cfg.eval.max_tokens):
                t = time.perf_counter()
                reps = model.represent(b)
                t1 = time.perf_counter()
                sampled_ranks(model, reps, b)
                full_ranks(model, reps, b, cfg.eval.item_chunk, table)
                stages["represent"] += t1 - t
                stages["ranking"] += time.perf_counter() - t1
            total = time.perf_counter() - t0
    print(f"{'model':<10}{'users':>7}{'total s':>9}{'represent':>11}{'ranking':>9}{'batching':>10}{'users/s':>9}")
    print(f"{args.model:<10}{len(w):>7}{total:>9.3f}{stages['represent']:>11.3f}{stages['ranking']:>9.3f}"
          f"{total - sum(stages.values()):>10.3f}{len(w) / total:>9.0f}")


if __name__ == "__main__":
    main()
