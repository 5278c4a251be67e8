"""``ablation`` (paper Figure 3): the full model and one run per ablation switch, every seed, on test,
both protocols; bars of HR@10 and NDCG@10 with the std over seeds as error bars.

Claims checked (paper section 5.4): every removal hurts (each ablation's mean test NDCG@10 below the
full model's) and removing MEIE hurts most (the largest drop is ``no_meie``); per protocol.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from m3bsr import compare
from m3bsr.experiments.base import Context, Entry, figure_bytes, jobs_for, md_table, parse_entry, pyplot, \
    run_jobs, without_content_switches, write_outputs

NAME = "ablation"
METRICS = ("HR@10", "NDCG@10")


def entries(ctx: Context) -> list[Entry]:
    """The base (``--models``' first entry, else the settings' ``base``), one entry per switch and variant
    (less a content switch on data without content: :func:`~m3bsr.experiments.base.without_content_switches`)."""
    s = ctx.settings.ablation
    base = parse_entry(ctx.models[0] if ctx.models else s.base)
    out = [base]
    extra = [f"{sw}=true" for sw in s.switches] + list(s.variants)
    for text in extra:
        out.append(parse_entry(f"{base.label}+{text}"))
    return without_content_switches(out, ctx.dataset, ctx.progress or ctx.log)


def claims(mean: pd.DataFrame, full: str, switched: list[str]) -> list[dict]:
    """The paper's two statements, per protocol, from mean test NDCG@10 (index: protocol, entry)."""
    out = []
    for protocol in compare.PROTOCOLS:
        m = mean.loc[protocol, "NDCG@10"]
        drops = {e: float(m[full] - m[e]) for e in switched if e in m.index}
        if not drops:
            continue
        hurt = [e for e, d in drops.items() if d > 0]
        out.append({"claim": f"every removal hurts ({protocol})", "held": len(hurt) == len(drops),
                    "evidence": f"{len(hurt)} of {len(drops)} ablations below the full model's "
                                f"{m[full]:.4f} test NDCG@10"})
        meie = [e for e in drops if e.endswith("+no_meie=true")]
        if meie:
            worst = max(drops, key=drops.get)
            out.append({"claim": f"removing MEIE hurts most ({protocol})", "held": worst == meie[0],
                        "evidence": f"largest drop: {worst.split('+', 1)[-1]} ({-drops[worst]:+.4f}); "
                                    f"no_meie {-drops[meie[0]]:+.4f}"})
    return out


def plot(mean: pd.DataFrame, std: pd.DataFrame, labels: list[str]) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.1 * len(labels) + 3), 4.5))
    x = np.arange(len(labels))
    width = 0.8 / len(METRICS)
    for ax, protocol in zip(axes, compare.PROTOCOLS):
        for i, metric in enumerate(METRICS):
            ax.bar(x + i * width, mean.loc[protocol].loc[labels, metric], width,
                   yerr=std.loc[protocol].loc[labels, metric], capsize=3, label=metric)
        ax.set_xticks(x + width / 2, ["full" if k == 0 else lab.split("+", 1)[-1] for k, lab in enumerate(labels)],
                      rotation=30, ha="right")
        ax.set_title(f"test, {protocol} protocol")
        ax.set_ylabel("mean over seeds (± std)")
        ax.legend(fontsize=8)
    return figure_bytes(fig)


def run(ctx: Context) -> pd.DataFrame:
    """Train (or reuse) every entry x seed, then write the outputs; returns results.csv's table."""
    ents = entries(ctx)
    jobs = jobs_for(ctx, ents, ctx.dataset, ctx.out / "runs")
    summaries = run_jobs(ctx, jobs)
    ks = jobs[0].cfg.eval.ks
    table = compare.results_table({(j.label, j.seed): summaries[j.key] for j in jobs}, ks)
    test = table[table["split"] == "test"]
    g = test.groupby(["protocol", "model"])[list(METRICS)]
    mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
    labels = [e.label for e in ents]
    full = labels[0]
    rows = []
    for protocol in compare.PROTOCOLS:
        for lab in labels:
            row = {"protocol": protocol, "entry": lab}
            for metric in METRICS:
                row[metric] = f"{mean.loc[(protocol, lab), metric]:.4f} ± {std.loc[(protocol, lab), metric]:.4f}"
            row["Δ NDCG@10 vs full"] = (f"{mean.loc[(protocol, lab), 'NDCG@10'] - mean.loc[(protocol, full), 'NDCG@10']:+.4f}"
                                        if lab != full else "")
            rows.append(row)
    section = (f"## Ablation (paper Figure 3)\n\nFull model `{full}` and {len(labels) - 1} ablations, seeds "
               f"{', '.join(map(str, ctx.seeds))}, test split; mean ± sample std over seeds.\n\n"
               + md_table(pd.DataFrame(rows)) + "\n")
    write_outputs(ctx, NAME, table, plot(mean, std, labels), section, claims(mean, full, labels[1:]),
                  {"entries": labels})
    return table
