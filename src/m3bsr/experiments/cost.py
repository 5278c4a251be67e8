"""``cost`` (paper Table 4): per model, seconds per training epoch (the runs' metrics.json), the peak
memory of ``steps`` training steps and the milliseconds of one top-10 prediction for one known user
(``Recommender.recommend_users``, median of ``predictions`` calls after one warm-up call), measured on
the best checkpoint of each seed's run.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set (``ru_maxrss``)
of a fresh process per run after loading the run and its data and training ``steps`` steps, so the
interpreter, torch and the dataset (the same for every model) are included. With ``--set cost.runs=DIR`` the runs of ``m3bsr compare --out DIR`` are reused.

Claim checked (paper: M3BSR 35.2 s/epoch vs 25.3 s for a SASRec-family model, 1.39x): M3BSR costs at most
1.5x SASRec's seconds per epoch (when both are listed).
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from m3bsr.experiments.base import Context, figure_bytes, jobs_for, md_table, pyplot, run_jobs, write_outputs

NAME = "cost"
PAPER_RATIO = 35.2 / 25.3


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure(run_dir: str, steps: int, predictions: int, device: str = "cpu") -> dict[str, float]:
    """Peak training memory (MiB) and ms per top-10 prediction of one run (see the module docstring)."""
    import torch

    from m3bsr.data.batches import WindowBuilder, iterate_batches
    from m3bsr.engine.optim import EagerAdam
    from m3bsr.serving.recommend import Recommender

    rec = Recommender.from_run(run_dir, device=device)
    model, cfg = rec.model, rec.cfg
    params = [p for p in model.parameters() if p.requires_grad]
    peak = float("nan")
    if params:
        windows = WindowBuilder(rec.dataset, cfg.data.max_len).train_windows()
        opt = EagerAdam(params, lr=cfg.train.lr)  # the optimizer training uses
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model.train()
        for k, batch in enumerate(iterate_batches(windows, cfg.train.batch_size)):
            if k == steps:
                break
            loss = sum(model.loss(batch.to(device)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    users = rec.dataset.users["original"].to_numpy()
    times = []
    for k in range(predictions + 1):
        t0 = time.perf_counter()
        rec.recommend_users([users[k % len(users)]], 10)
        times.append(time.perf_counter() - t0)
    return {"peak_memory_mb": float(peak), "ms_per_prediction": 1000 * statistics.median(times[1:])}


def _measure_fresh(run_dir: Path, steps: int, predictions: int) -> dict[str, float]:
    """:func:`measure` in a fresh (spawned) process: its own peak resident set."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (str(run_dir), steps, predictions))


def run(ctx: Context) -> pd.DataFrame:
    s = ctx.settings.cost
    entries = ctx.entries(s.models)
    runs = Path(s.runs) / "runs" if s.runs else ctx.out / "runs"
    jobs = jobs_for(ctx, entries, ctx.dataset, runs)
    summaries = run_jobs(ctx, jobs)
    rows = []
    for j in jobs:
        ctx.log(f"measuring {j.run_dir.name}")
        m = _measure_fresh(j.run_dir, s.steps, s.predictions)
        rows.append({"model": j.label, "seed": j.seed, "seconds_per_epoch": summaries[j.key].get("seconds_per_epoch"),
                     "epochs": summaries[j.key].get("epochs"), **m})
    table = pd.DataFrame(rows)
    labels = [e.label for e in entries]
    cols = ["seconds_per_epoch", "peak_memory_mb", "ms_per_prediction"]
    mean = table.groupby("model")[cols].mean().reindex(labels)
    std = table.groupby("model")[cols].std(ddof=1).fillna(0.0).reindex(labels)
    lines = pd.DataFrame({"model": labels, **{c: [f"{mean.loc[m, c]:.3g} ± {std.loc[m, c]:.2g}" for m in labels]
                                             for c in cols}})
    claims = []
    if "m3bsr" in labels and "sasrec" in labels:
        ratio = mean.loc["m3bsr", "seconds_per_epoch"] / mean.loc["sasrec", "seconds_per_epoch"]
        claims.append({"claim": "M3BSR trains at most 1.5x slower per epoch than SASRec (paper: 1.39x)",
                       "held": bool(ratio <= 1.5), "evidence": f"{ratio:.2f}x"})
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(max(10.0, 1.2 * len(labels) + 6), 4))
    for ax, c in zip(axes, cols):
        ax.bar(np.arange(len(labels)), mean[c], yerr=std[c], capsize=3)
        ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right")
        ax.set_title(c.replace("_", " "))
    section = (f"## Cost (paper Table 4)\n\nMean ± std over seeds {', '.join(map(str, ctx.seeds))}: seconds per "
               f"training epoch, peak memory of a fresh process that loads the run and trains {s.steps} steps (MiB, "
               "interpreter and data included; CUDA: peak allocated), "
               f"median ms of one single-user top-10 prediction.\n\n" + md_table(lines) + "\n")
    write_outputs(ctx, NAME, table, figure_bytes(fig), section, claims, {"entries": labels})
    return table
