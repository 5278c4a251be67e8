"""The full loss in chunks (``train.loss_chunk_scores``): seconds per training step, interleaved.

    python benchmarks/loss_chunks.py --dataset /path/to/prepared/tmall
    python benchmarks/loss_chunks.py --dataset D --scores none,16777216,4194304,1048576 --pool 100

For each value of ``train.loss_chunk_scores`` (``none`` = one pass over all queries) it opens one training
session of the same model and seed, then times the same ``--steps`` batches of one epoch's order in turn:
batch 1 under every setting, then batch 2 under every setting (in a rotating order), and so on, so
that load on a shared machine falls on every setting alike. Each session trains its own copy of the
weights. It prints the mean seconds per step, the mean target + auxiliary queries per step, and the
speed-up over the first setting.
Peak memory needs a process per setting: time the one-epoch ``m3bsr train`` command instead
(docs/performance.md, "The full loss in chunks").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from m3bsr.config import build_config
from m3bsr.data.batches import iterate_batches, training_order
from m3bsr.engine.train import TrainState, open_session, train_step


def session(dataset: Path, scores: str, args):
    chunk = "null" if scores == "none" else scores
    cfg = build_config(model=args.model, overrides=[
        f"model.hidden_size={args.d}", f"train.batch_size={args.batch}", f"data.max_len={args.L}",
        "train.device=cpu", f"train.bucket_by_length={args.pool}", f"train.loss_chunk_scores={chunk}",
        f"seed={args.seed}", *args.sets])
    return open_session(cfg, dataset, quiet=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, type=Path, help="a prepared dataset directory")
    p.add_argument("--model", default="m3bsr", help="model name (default: m3bsr)")
    p.add_argument("--scores", default="none,16777216,4194304,1048576",
                   help="comma-separated train.loss_chunk_scores values; none = one pass (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed batches per setting (default: %(default)s)")
    p.add_argument("--d", type=int, default=64, help="model.hidden_size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=256, help="train.batch_size (default: %(default)s)")
    p.add_argument("--L", type=int, default=50, help="data.max_len (default: %(default)s)")
    p.add_argument("--pool", type=int, default=0, help="train.bucket_by_length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the batch order (default: 0)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="more config overrides KEY=VALUE")
    args = p.parse_args()

    settings = args.scores.split(",")
    sessions = [session(args.dataset, s, args) for s in settings]
    first = sessions[0]
    order = training_order(first.train_windows, args.batch, args.pool, first.shuffle_gen)
    batches = iterate_batches(first.train_windows, args.batch, order=order, trim=bool(args.pool))
    seconds = np.zeros(len(settings))
    queries, steps = 0, 0
    for i, batch in enumerate(batches):
        if i > args.steps:
            break
        if i > 0:  # batch 0 warms up every session
            queries += int(batch.query_mask.sum() + (batch.aux_items != 0).sum())
            steps += 1
        for k in range(len(sessions)):  # the order rotates each step: no setting always goes first
            j = (i + k) % len(sessions)
            t0 = time.perf_counter()
            train_step(sessions[j], batch, TrainState())
            if i > 0:
                seconds[j] += time.perf_counter() - t0
    n_items = first.model.n_items
    print(f"{args.model} on {args.dataset} ({n_items} items), d {args.d}, batch {args.batch}, L {args.L}, "
          f"bucket_by_length {args.pool}; {steps} steps after one warm-up, ~{queries / max(steps, 1):.0f} "
          "target + auxiliary queries per step")
    print(f"{'loss_chunk_scores':>18} {'queries/chunk':>14} {'s/step':>8} {'speed-up':>9}")
    for j, s in enumerate(settings):
        chunk = sessions[j].model.loss_chunk or "all"
        print(f"{s:>18} {chunk!s:>14} {seconds[j] / steps:8.3f} {seconds[0] / seconds[j]:8.2f}x")


if __name__ == "__main__":
    main()
