"""``sensitivity`` (paper Figure 4): 2-D grids of model keys scored on validation, one heat map per grid
with the value in every cell (and, with several seeds, their std below it). Default: T_b x lambda_b,
T_m x lambda_m, tau x lambda_c, 3 x 3 each around the defaults; another grid:
``--set "sensitivity.grids={NAME: model.KEY=V1,V2 model.KEY=V1,V2}"``.
A cell whose values equal the base model's is the base run itself, shared by every grid. A grid over two
keys that the base model does not read (its ``inert_keys``) is left out with one line.

Claim checked: the metric varies by at most ``spread`` (paper: 1.6 %) across each grid:
(max - min) / max of the cell means. With two or more seeds the evidence also states the seed noise
(:func:`seed_noise`), since noise alone widens the spread of a few seeds' means: the within-cell seed
std, and an ANOVA p-value, seeds as blocks, for "the cells differ by more than seed noise".
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from m3bsr.config import Config, parse_override
from m3bsr.errors import input_error
from m3bsr.experiments.base import Context, Entry, entry_configs, figure_bytes, has_content, jobs_for, \
    parse_entry, pyplot, run_jobs, write_outputs

NAME = "sensitivity"


def parse_axes(text: str, grid: str) -> list[tuple[str, list]]:
    """``"T_b=5,10 model.lambda_b=0.01,0.02"`` → ``[("model.T_b", [5, 10]), ("model.lambda_b", [0.01, 0.02])]``."""
    from m3bsr.sweep import parse_grid

    axes = [(k if "." in k else f"model.{k}", vs) for k, vs in parse_grid(text)]
    if len(axes) != 2:
        raise input_error(f"sensitivity.grids.{grid}: {text!r}", f"{len(axes)} axes",
                          'Give exactly two, e.g. "model.T_b=5,10,15 model.lambda_b=0.01,0.02,0.04"')
    return [(k, [parse_override(f"{k}={v}")[1] for v in vs]) for k, vs in axes]


def seed_noise(values: list[list[float]]) -> tuple[float, float, float] | None:
    """Seed noise of one grid. ``values``: per cell, the metric of each seed, the seeds in the same order
    in every cell (c cells x n seeds).

    A seed fixes the initialisation and the batch order of every cell alike, so cells are compared
    within a seed: a two-way ANOVA without interaction (cells x seeds, seeds as blocks). Returns
    ``(std, residual_std, p)``: the root mean square of the cells' sample seed std (ddof 1), the
    residual std once each seed's shift shared by all cells is removed, both as shares of the grid's
    mean, and the p-value of F = MS_cells / MS_residual on (c - 1, (c - 1)(n - 1)) degrees of freedom
    (small: the setting matters beyond seed noise). None with fewer than two seeds or two cells."""
    from scipy import stats

    y = np.asarray(values, dtype=float)
    if y.ndim != 2 or min(y.shape) < 2:
        return None
    c, n = y.shape
    mean = y.mean()
    ss_cells = n * ((y.mean(axis=1) - mean) ** 2).sum()
    ss_seeds = c * ((y.mean(axis=0) - mean) ** 2).sum()
    ss_resid = max(((y - mean) ** 2).sum() - ss_cells - ss_seeds, 0.0)
    df_cells, df_resid = c - 1, (c - 1) * (n - 1)
    std = float(np.sqrt(y.var(axis=1, ddof=1).mean()) / mean)
    if ss_resid > 0:
        p = float(stats.f.sf((ss_cells / df_cells) / (ss_resid / df_resid), df_cells, df_resid))
    else:  # the cells and seeds explain every value: any difference between cells is exact
        p = 0.0 if ss_cells > 0 else float("nan")
    return std, float(np.sqrt(ss_resid / df_resid) / mean), p


def grid_entries(ctx: Context) -> tuple[Entry, dict[str, tuple[tuple[str, list], tuple[str, list], dict]]]:
    """The base entry, and per grid: its two axes and {(i, j): entry}; overrides equal to the base's value
    are dropped, so the default cell is the base entry. A grid whose two keys are both inert for the base
    model (:func:`inert_keys`: T_m x lambda_m on data without content, every paper grid for the default
    preset, which builds no specific experts) would train the base model in every cell: it is left out
    with one line."""
    s = ctx.settings.sensitivity
    base = parse_entry(ctx.models[0] if ctx.models else s.model)
    cfg = entry_configs([base], ctx.seeds[0], ctx.raw, ctx.sets, ctx.source)[base.label]
    base_cfg = cfg.to_dict()
    inert = inert_keys(cfg, ctx.dataset)
    grids = {}
    for name, axes in s.grids.items():
        a, b = parse_axes(axes, name)
        if a[0] in inert and b[0] in inert:
            keys = " and ".join(k.removeprefix("model.") for k in (a[0], b[0]))
            (ctx.progress or ctx.log)(f"grid {name} left out: {keys} change nothing in {base.label} on "
                                      f"{ctx.dataset} ({inert[a[0]]}), so every cell would train it again")
            continue
        cells = {}
        for (i, va), (j, vb) in itertools.product(enumerate(a[1]), enumerate(b[1])):
            parts = []
            for key, v in ((a[0], va), (b[0], vb)):
                node = base_cfg
                for p in key.split("."):
                    node = node.get(p) if isinstance(node, dict) else None
                if node != v:
                    parts.append(f"{key}={v}")
            cells[i, j] = parse_entry("+".join([base.label, *parts]))
        grids[name] = (a, b, cells)
    if not grids:
        raise input_error(f"sensitivity.grids for {base.label} on {ctx.dataset}", "every grid varies keys that "
                          "change nothing in this model", "Give a grid over other keys with --set "
                          "'sensitivity.grids={NAME: model.KEY=V1,V2 model.KEY=V1,V2}', or another model with "
                          "--models (the paper's grids need m3bsr@paper)")
    return base, grids


def inert_keys(cfg: Config, dataset: Path) -> dict[str, str]:
    """``model.KEY`` → why it changes nothing for the model of ``cfg`` on ``dataset``
    (:meth:`~m3bsr.models.configs.M3BSRConfig.inert_keys`; empty for a model without that method)."""
    keys = getattr(cfg.model, "inert_keys", None)
    return {} if keys is None else {f"model.{k}": why for k, why in keys(has_content(dataset)).items()}


def run(ctx: Context) -> pd.DataFrame:
    s = ctx.settings.sensitivity
    base, grids = grid_entries(ctx)
    entries = list({e.label: e for _, _, cells in grids.values() for e in cells.values()}.values())
    jobs = jobs_for(ctx, entries, ctx.dataset, ctx.out / "runs")
    summaries = run_jobs(ctx, jobs)
    by_label = {}
    for j in jobs:
        by_label.setdefault(j.label, []).append(summaries[j.key]["valid"][s.protocol][s.metric])
    rows = []
    for name, (a, b, cells) in grids.items():
        for (i, k), e in cells.items():
            for seed, value in zip(ctx.seeds, by_label[e.label]):
                rows.append({"grid": name, "x_key": a[0], "x": a[1][i], "y_key": b[0], "y": b[1][k],
                             "entry": e.label, "seed": seed, "split": "valid", "protocol": s.protocol,
                             s.metric: value})
    table = pd.DataFrame(rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(4.8 * len(grids), 4.2), squeeze=False)
    claims, lines = [], []
    for ax, (name, (a, b, cells)) in zip(axes[0], grids.items()):
        # (y values, x values, seeds): every cell's per-seed metric, read once for the map, its text and the noise
        y = np.array([[by_label[cells[i, k].label] for i in range(len(a[1]))] for k in range(len(b[1]))])
        m = y.mean(axis=-1)
        im = ax.imshow(m, cmap="viridis", origin="lower")
        for k in range(m.shape[0]):
            for i in range(m.shape[1]):
                bright = m[k, i] > (m.max() + m.min()) / 2  # viridis: dark text on the bright half
                text = f"{m[k, i]:.4f}" + (f"\n± {y[k, i].std(ddof=1):.4f}" if y.shape[-1] > 1 else "")
                ax.text(i, k, text, ha="center", va="center", color="k" if bright else "w", fontsize=8)
        ax.set_xticks(range(len(a[1])), [str(v) for v in a[1]])
        ax.set_yticks(range(len(b[1])), [str(v) for v in b[1]])
        ax.set(xlabel=a[0].removeprefix("model."), ylabel=b[0].removeprefix("model."), title=name)
        fig.colorbar(im, ax=ax, shrink=0.8)
        spread = float((m.max() - m.min()) / m.max()) if m.max() > 0 else float("nan")
        noise = seed_noise(y.reshape(-1, y.shape[-1]).tolist())
        said = "" if noise is None else (f"; seed std within a cell {100 * noise[0]:.1f} % of the mean "
                                         f"({100 * noise[1]:.1f} % once each seed's shared shift is removed), "
                                         f"ANOVA over cells with seeds as blocks p = {noise[2]:.2g}")
        claims.append({"claim": f"{name}: {s.metric} varies by at most {100 * s.spread:.1f} % across the grid",
                       "held": bool(spread <= s.spread),
                       "evidence": f"(max - min) / max = {100 * spread:.1f} %, from {m.min():.4f} to {m.max():.4f}"
                                   + said})
        lines.append(f"* {name}: {len(a[1])} x {len(b[1])} cells, best {m.max():.4f} at "
                     f"{a[0].removeprefix('model.')}={a[1][int(np.argmax(m) % m.shape[1])]}, "
                     f"{b[0].removeprefix('model.')}={b[1][int(np.argmax(m) // m.shape[1])]}" + said)
    section = (f"## Sensitivity (paper Figure 4)\n\nValidation {s.metric} ({s.protocol} protocol) of `{base.label}`, "
               f"mean over seeds {', '.join(map(str, ctx.seeds))}, per grid cell.\n\n" + "\n".join(lines) + "\n")
    write_outputs(ctx, NAME, table, figure_bytes(fig), section, claims, {"base": base.label})
    return table
