"""``noise`` (beyond the paper): every model's test NDCG@10 against the amount of injected noise.

For each kind (accidental ``clicks``, Gaussian ``features`` noise, feature ``swap``; data/noise.py) and
level, a noisy copy of the dataset is written to ``OUT/data/<kind>-<level>`` (reused when it is already
there), and every model entry x seed trains on it (``OUT/runs/<kind>-<level>/``); level 0 is the clean
dataset, trained once (``OUT/runs/clean/``) and shared by every kind. One panel per kind and protocol,
one curve per model (mean ± std over seeds).

Claim checked (the paper's central argument, never measured there): M3BSR's curve falls slowest — per
kind, an M3BSR entry without ablation switches has the smallest relative drop from level 0 to the
highest level, among it and the other models (ablated M3BSR entries are shown, not competitors).
"""

from __future__ import annotations

import pandas as pd

from m3bsr import compare
from m3bsr.data.noise import NoiseSpec, inject_noise
from m3bsr.experiments.base import Context, Job, figure_bytes, jobs_for, md_table, pyplot, run_jobs, \
    without_content_switches, write_outputs

NAME = "noise"
METRIC = "NDCG@10"


def datasets(ctx: Context) -> list[tuple[str, float, str]]:
    """(kind, level, slug of the dataset/run folder) for every point; level 0 → ``clean``."""
    s = ctx.settings.noise
    points = []
    for kind in s.kinds:
        for level in getattr(s, kind):
            points.append((kind, float(level), "clean" if level == 0 else NoiseSpec(kind, float(level)).slug))
    return points


def relative_drop(mean: pd.DataFrame, kind: str, protocol: str) -> pd.Series:
    """Per entry: (value at level 0 - value at the highest level) / value at level 0."""
    m = mean.loc[(kind, protocol)]  # index: level, columns: entries
    lo, hi = m.index.min(), m.index.max()
    return (m.loc[lo] - m.loc[hi]) / m.loc[lo]


def claims(mean: pd.DataFrame, labels: list[str]) -> list[dict]:
    ref = [lab for lab in labels if lab.startswith("m3bsr") and "+" not in lab]
    rivals = [lab for lab in labels if not lab.startswith("m3bsr")]
    out = []
    if not ref or not rivals:
        return out
    for kind in mean.index.get_level_values(0).unique():
        for protocol in compare.PROTOCOLS:
            if (kind, protocol) not in mean.index or mean.loc[(kind, protocol)].index.nunique() < 2:
                continue
            drop = relative_drop(mean, kind, protocol)
            best = min(ref + rivals, key=lambda e: drop[e])
            out.append({"claim": f"M3BSR falls slowest under {kind} noise ({protocol})", "held": best in ref,
                        "evidence": "relative drop " + ", ".join(f"{e} {100 * drop[e]:.1f} %" for e in ref + rivals)})
    return out


def plot(mean: pd.DataFrame, std: pd.DataFrame, kinds: list[str], labels: list[str]) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.5 * len(kinds), 7), squeeze=False)
    for col, kind in enumerate(kinds):
        for row, protocol in enumerate(compare.PROTOCOLS):
            ax = axes[row, col]
            m, s = mean.loc[(kind, protocol)], std.loc[(kind, protocol)]
            for lab in labels:
                ax.errorbar(m.index, m[lab], yerr=s[lab], marker="o", capsize=3, label=lab)
            ax.set(xlabel=f"{kind} noise level", ylabel=f"test {METRIC}", title=f"{kind}, {protocol} protocol")
    axes[0, 0].legend(fontsize=7)
    return figure_bytes(fig)


def run(ctx: Context) -> pd.DataFrame:
    """Write the noisy datasets, train (or reuse) every entry x seed x level, then the outputs."""
    entries = without_content_switches(ctx.entries(ctx.settings.noise.models), ctx.dataset,
                                       ctx.progress or ctx.log)
    points = datasets(ctx)
    jobs: list[Job] = []
    for slug in dict.fromkeys(p[2] for p in points):
        kind, level = next((k, lv) for k, lv, sl in points if sl == slug)
        data = ctx.dataset
        if slug != "clean":
            data = ctx.out / "data" / slug
            manifest = inject_noise(ctx.dataset, data, NoiseSpec(kind, level, ctx.settings.noise.seed),
                                    overwrite=ctx.overwrite)
            ctx.log(f"{slug}: {'reused' if manifest.get('up_to_date') else 'wrote'} {data} "
                    f"({manifest['noise']['changed']} changed)")
        jobs += jobs_for(ctx, entries, data, ctx.out / "runs" / slug, key=(slug,))
    summaries = run_jobs(ctx, jobs)
    ks = jobs[0].cfg.eval.ks
    parts = []
    for kind, level, slug in points:
        mine = {(j.label, j.seed): summaries[j.key] for j in jobs if j.key[0] == slug}
        parts.append(compare.results_table(mine, ks).assign(kind=kind, level=level))
    table = pd.concat(parts, ignore_index=True)
    table = table[["kind", "level", *[c for c in table.columns if c not in ("kind", "level")]]]
    test = table[table["split"] == "test"]
    labels = [e.label for e in entries]
    g = test.groupby(["kind", "protocol", "level", "model"])[METRIC]
    mean = g.mean().unstack("model")[labels]
    std = g.std(ddof=1).fillna(0.0).unstack("model")[labels]
    kinds = list(dict.fromkeys(p[0] for p in points))
    rows = []
    for (kind, protocol, level), r in mean.iterrows():
        rows.append({"kind": kind, "protocol": protocol, "level": f"{level:g}",
                     **{lab: f"{r[lab]:.4f} ± {std.loc[(kind, protocol, level), lab]:.4f}" for lab in labels}})
    section = (f"## Noise robustness\n\nTest {METRIC} (mean ± std over seeds {', '.join(map(str, ctx.seeds))}) "
               "against the noise level: `clicks` = accidental clicks added, as a share of the auxiliary events; "
               "`features` = Gaussian noise, in units of each feature column's std; `swap` = share of items "
               "carrying another item's features.\n\n" + md_table(pd.DataFrame(rows)) + "\n")
    write_outputs(ctx, NAME, table, plot(mean, std, kinds, labels), section, claims(mean, labels),
                  {"entries": labels, "points": [list(p) for p in points]})
    return table
