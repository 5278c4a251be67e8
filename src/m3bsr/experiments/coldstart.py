"""``coldstart`` (paper Table 3): every model's test metrics on cold users — at most ``max_train`` training
interactions (events of both streams, or target events with ``count=target``, before the user's valid
target) — beside all users, from the runs' stored per-user test ranks (test_ranks.parquet). With
``--set coldstart.runs=DIR`` the runs of an earlier ``m3bsr compare --out DIR`` are reused (nothing is
retrained when their config matches).

Claim checked: M3BSR is best on cold-start users (an M3BSR entry has the highest mean cold-user test
NDCG@10), per protocol.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from m3bsr import compare
from m3bsr.data.prepared import PreparedDataset
from m3bsr.engine.metrics import metrics_from_ranks
from m3bsr.experiments.base import Context, figure_bytes, jobs_for, md_table, pyplot, run_jobs, write_outputs

NAME = "coldstart"
METRICS = ("HR@10", "NDCG@10")


def training_interactions(dataset: Path, count: str = "all") -> pd.Series:
    """Per user: events before the valid target (both streams, or the target stream with ``count='target'``)."""
    ds = PreparedDataset.load(dataset)
    first = pd.Series(ds.valid.order, index=ds.valid.user)
    ev = ds.events if count == "all" else ds.events[ds.events["stream"] == 1]
    before = ev["order"].to_numpy() < first.reindex(ev["user"].to_numpy()).fillna(np.iinfo(np.int64).max).to_numpy()
    n = ev[before].groupby("user").size()
    return n.reindex(ds.users["user"].to_numpy(), fill_value=0)


def run(ctx: Context) -> pd.DataFrame:
    s = ctx.settings.coldstart
    entries = ctx.entries(s.models)
    runs = Path(s.runs) / "runs" if s.runs else ctx.out / "runs"
    jobs = jobs_for(ctx, entries, ctx.dataset, runs)
    run_jobs(ctx, jobs)
    n_train = training_interactions(ctx.dataset, s.count)
    cold_users = set(n_train[n_train <= s.max_train].index)
    ks = jobs[0].cfg.eval.ks
    rows = []
    for j in jobs:
        ranks = pd.read_parquet(j.run_dir / "test_ranks.parquet")
        cold = ranks["user"].isin(cold_users).to_numpy()
        for group, keep in (("cold", cold), ("all", np.ones(len(ranks), bool))):
            for protocol in compare.PROTOCOLS:
                m = metrics_from_ranks(ranks[f"rank_{protocol}"].to_numpy()[keep], ks)
                rows.append({"model": j.label, "seed": j.seed, "group": group, "users": int(keep.sum()),
                             "protocol": protocol, **m})
    table = pd.DataFrame(rows)
    labels = [e.label for e in entries]
    g = table.groupby(["protocol", "group", "model"])[list(METRICS)]
    mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
    n_cold = int(table.loc[table["group"] == "cold", "users"].max()) if len(table) else 0
    lines = []
    for protocol in compare.PROTOCOLS:
        for lab in labels:
            lines.append({"protocol": protocol, "model": lab, **{
                f"{metric} {group}": f"{mean.loc[(protocol, group, lab), metric]:.4f} ± "
                                     f"{std.loc[(protocol, group, lab), metric]:.4f}"
                for group in ("cold", "all") for metric in METRICS}})
    claims = []
    for protocol in compare.PROTOCOLS:
        col = mean.loc[(protocol, "cold"), "NDCG@10"].reindex(labels)
        best = str(col.idxmax())
        claims.append({"claim": f"M3BSR is best on cold-start users ({protocol})",
                       "held": None if n_cold == 0 else best.startswith("m3bsr"),
                       "evidence": "no cold user in this dataset" if n_cold == 0 else
                       f"best: {best} {col.max():.4f} test NDCG@10 on {n_cold} cold users"})
    what = "events" if s.count == "all" else "target events"
    section = (f"## Cold-start users (paper Table 3)\n\nTest metrics (mean ± std over seeds "
               f"{', '.join(map(str, ctx.seeds))}) of {n_cold} cold users (at most {s.max_train} training "
               f"{what}) and of all {int(table['users'].max()) if len(table) else 0} test users.\n\n"
               + md_table(pd.DataFrame(lines)) + "\n")
    write_outputs(ctx, NAME, table, plot(mean, std, labels), section, claims,
                  {"entries": labels, "cold_users": n_cold})
    return table


def plot(mean: pd.DataFrame, std: pd.DataFrame, labels: list[str]) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.9 * len(labels) + 3), 4.5))
    x = np.arange(len(labels))
    for ax, protocol in zip(axes, compare.PROTOCOLS):
        for i, group in enumerate(("cold", "all")):
            ax.bar(x + 0.4 * i, mean.loc[(protocol, group)].reindex(labels)["NDCG@10"], 0.4,
                   yerr=std.loc[(protocol, group)].reindex(labels)["NDCG@10"], capsize=3, label=f"{group} users")
        ax.set_xticks(x + 0.2, labels, rotation=30, ha="right")
        ax.set(title=f"test NDCG@10, {protocol} protocol", ylabel="mean over seeds (± std)")
        ax.legend(fontsize=8)
    return figure_bytes(fig)
