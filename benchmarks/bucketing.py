"""Length bucketing (``train.bucket_by_length``): one training epoch with and without, side by side.

    python benchmarks/bucketing.py --dataset /path/to/prepared/tmall
    python benchmarks/bucketing.py --dataset D --models m3bsr --losses sampled --pool 100 --set model.hidden_size=128

For every model x loss it trains one epoch with plain shuffled batches (pool 0) and one with
``train.bucket_by_length=POOL``, one after the other in this process, and prints the training seconds
of the epoch (validation excluded), the share of computed stream slots that are events, and the
speed-up over the first row of the model (plain batches, the first loss). Absolute times are noisy on a
shared machine; read the ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from m3bsr.config import build_config
from m3bsr.data.batches import WindowBuilder, bucketed_order
from m3bsr.data.prepared import PreparedDataset
from m3bsr.engine.train import train


def event_share(windows, batch_size: int, pool: int, seed: int = 0) -> float:
    """Events / slots of the batches a training epoch computes (each stream as wide as its longest
    window in the batch; plain batches are as wide as the windows: ``max_len``)."""
    aux, tgt = windows.lengths()
    gen = torch.Generator().manual_seed(seed)
    order = bucketed_order(windows, batch_size, pool, gen) if pool else np.arange(len(windows))
    slots = 0
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        width = (aux[idx].max() + tgt[idx].max()) if pool else 2 * windows.aux_items.shape[1]
        slots += len(idx) * width
    return float((aux.sum() + tgt.sum()) / slots)


def one_epoch(dataset: Path, model: str, loss: str, pool: int, args, work: Path) -> float:
    cfg = build_config(model=model, overrides=[
        f"model.hidden_size={args.d}", f"train.batch_size={args.batch}", f"data.max_len={args.L}",
        "train.device=cpu", "train.max_epochs=1", "train.eval_test=false", f"train.loss={loss}",
        f"train.bucket_by_length={pool}", f"seed={args.seed}", *args.sets])
    out = work / f"{model}-{loss}-{pool}"
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own summary table
        train(cfg, dataset, out, quiet=True)
    return float(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a prepared dataset directory")
    p.add_argument("--models", default="m3bsr,sasrec", help="comma-separated (default: m3bsr,sasrec)")
    p.add_argument("--losses", default="full,sampled", help="comma-separated train.loss values")
    p.add_argument("--pool", type=int, default=100, help="train.bucket_by_length of the bucketed rows (default 100)")
    p.add_argument("--d", type=int, default=64, help="model.hidden_size (default 64)")
    p.add_argument("--batch", type=int, default=256, help="train.batch_size (default 256)")
    p.add_argument("--L", type=int, default=50, help="data.max_len (default 50)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dataset = Path(args.dataset)
    windows = WindowBuilder(PreparedDataset.load(dataset), args.L).train_windows()
    share = {pool: event_share(windows, args.batch, pool, args.seed) for pool in (0, args.pool)}
    print(f"{dataset.name}: {len(windows)} training windows, d={args.d}, batch {args.batch}, "
          f"{args.threads} thread(s), one epoch per row")
    print(f"{'model':10s} {'train.loss':10s} {'bucket':>6s} {'s/epoch':>8s} {'events/slots':>12s} {'speed-up':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            base = None
            for loss in args.losses.split(","):
                for pool in (0, args.pool):
                    sec = one_epoch(dataset, model, loss, pool, args, Path(tmp))
                    base = base or sec
                    print(f"{model:10s} {loss:10s} {pool:6d} {sec:8.1f} {share[pool]:12.1%} {base / sec:7.2f}x",
                          flush=True)


if __name__ == "__main__":
    main()
