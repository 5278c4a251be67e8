"""What dominates a training step: torch.profiler's top operations by self CPU time.

    python benchmarks/profile_train.py --dataset /tmp/bench/work/tmall_like --model m3bsr
    python benchmarks/profile_train.py ... --set model.hidden_size=128       # any config override

Runs the engine's own ``train_step`` (as ``m3bsr train`` and ``benchmarks/run.py`` do) on shuffled
batches: ``--warmup`` steps, then ``--steps`` profiled steps; prints the share of self time of the
top operations, then the input shapes of the heaviest calls of the top two.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from m3bsr.config import build_config
from m3bsr.data.batches import iterate_batches
from m3bsr.engine.train import TrainState, open_session, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a prepared dataset (e.g. bench_data.tmall_like output)")
    p.add_argument("--model", default="m3bsr")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_config(model=args.model, overrides=["model.hidden_size=64", f"train.batch_size={args.batch}",
                                                    "train.device=cpu", *args.sets])
    s = open_session(cfg, Path(args.dataset), quiet=True)
    batches = iter(iterate_batches(s.train_windows, args.batch, shuffle=True,
                                   generator=torch.Generator().manual_seed(0)))
    state = TrainState()
    for _ in range(args.warmup):
        train_step(s, next(batches), state)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            train_step(s, next(batches), state)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.model}: {total / 1e6 / args.steps:.3f} s self CPU per step ({args.steps} steps, "
          f"{args.threads} thread(s), batch {args.batch})")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    for e in top:
        print(f"  {e.key:<48}{100 * e.self_cpu_time_total / total:6.1f} %  {e.count:>6} calls")
    by_shape = prof.key_averages(group_by_input_shape=True)
    for e in top[:2]:
        heavy = sorted((x for x in by_shape if x.key == e.key), key=lambda x: -x.self_cpu_time_total)[:3]
        for x in heavy:
            print(f"  {e.key} {100 * x.self_cpu_time_total / total:5.1f} % of all: {str(x.input_shapes)[:90]}")


if __name__ == "__main__":
    main()
