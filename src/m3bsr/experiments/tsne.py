"""``tsne`` (paper Figure 5): item representations before and after CDMD-M, and after a plain MLP in
its place (``modality_denoiser=mlp``), coloured by an item category, with numbers beside the picture.

Each item is run as a window holding that item alone as a target event (position 0), so its
representation depends on the item only: *before* is the content token entering CDMD-M (the projected
feature, Eq. 5, plus the position row; every content modality, concatenated), *after* is CDMD-M's output
for it (Eq. 6-10, conditioned on the item's own id token) or the MLP's. Only items with a category and
every content feature count (an item without a feature reads the shared "missing" vector).

Numbers, in the ORIGINAL space (t-SNE only draws the picture): the silhouette score of the categories
(cosine) and the leave-one-out kNN category accuracy (cosine, ``k`` neighbours, majority vote), the
mean over seeds. Claims checked: CDMD-M's output clusters tighter than the MLP's (higher silhouette;
higher kNN accuracy), and than its own input.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from m3bsr.errors import input_error
from m3bsr.experiments.base import Context, Entry, figure_bytes, jobs_for, md_table, parse_entry, pyplot, \
    run_jobs, write_outputs

NAME = "tsne"
PANELS = (("diffusion", "before", "before CDMD-M"), ("diffusion", "after", "after CDMD-M"),
          ("mlp", "after", "after MLP"))
"""(denoiser, stage, title) of the figure's panels, left to right."""


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise input_error("m3bsr experiment tsne", "needs scikit-learn",
                          "pip install 'm3bsr[experiments]'") from None
    import sklearn.manifold
    import sklearn.metrics
    import sklearn.neighbors

    return sklearn


def entries(ctx: Context) -> list[Entry]:
    """The model with CDMD-M (``--models``' first entry, else ``tsne.base``) and the same with the MLP."""
    base = parse_entry(ctx.models[0] if ctx.models else ctx.settings.tsne.base)
    return [base, parse_entry(f"{base.label}+modality_denoiser=mlp")]


def cluster_scores(x: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, float]:
    """How well ``labels`` [N] cluster the vectors ``x`` [N, D], by cosine: ``silhouette`` (-1..1) and
    ``knn_accuracy`` (share of items whose ``k`` nearest other items' majority category is their own;
    ties go to the smallest category code)."""
    sk = _sklearn()
    codes = pd.factorize(np.asarray(labels))[0]
    n = len(codes)
    if not 2 <= codes.max() + 1 < n:
        raise ValueError(f"need 2 to {n - 1} categories for {n} items, got {codes.max() + 1}")
    sil = float(sk.metrics.silhouette_score(x, codes, metric="cosine"))
    k = min(k, n - 1)
    neighbours = sk.neighbors.NearestNeighbors(n_neighbors=k, metric="cosine").fit(x).kneighbors(
        return_distance=False)  # [N, k]; with no query, an item is never its own neighbour
    votes = np.zeros((n, codes.max() + 1))
    np.add.at(votes, (np.repeat(np.arange(n), k), codes[neighbours].ravel()), 1)
    return {"silhouette": sil, "knn_accuracy": float((votes.argmax(1) == codes).mean())}


def item_categories(dataset, s) -> pd.Series:
    """Category (text) per dense item id, from ``items.parquet``'s ``label_<s.category>``: the part before
    ``s.separator``; items without one are left out."""
    from m3bsr.data.prepared import PreparedDataset

    items = PreparedDataset.load(dataset).items
    col = f"label_{s.category}"
    if col not in items.columns:
        found = [c[len("label_"):] for c in items.columns if c.startswith("label_")]
        raise input_error(f"{dataset}/items.parquet", f"no item label {s.category!r} (labels: "
                          f"{', '.join(found) or 'none'})", "Prepare with --set items.labels=[COLUMN] and pass "
                          "--set tsne.category=COLUMN (synthetic: prepare again into a new --out; it stores "
                          "`category`)")
    first = items[col].astype("string").str.split(s.separator, regex=False).str[0].str.strip()
    keep = first.notna() & (first != "")
    return pd.Series(first[keep].to_numpy(dtype=object), index=items["item"].to_numpy()[keep.to_numpy()])


@torch.no_grad()
def item_representations(model, items: np.ndarray, modality: str | None = None) -> dict[str, np.ndarray]:
    """``before`` and ``after`` [I, M·d] of ``items`` [I] (dense ids) for a trained M3BSR with CDMD-M or
    the MLP in its place: each item alone as a target event at position 0 (module docstring)."""
    cdmd_m = getattr(model, "cdmd_m", None)
    if cdmd_m is None:
        raise input_error("m3bsr experiment tsne", "the model has no CDMD-M (it needs content features and the "
                          "specific experts)", "Use the paper preset (tsne.base=m3bsr@paper) on a dataset with "
                          "content features")
    mods = cdmd_m.modalities if modality is None else [modality]
    if not set(mods) <= set(cdmd_m.modalities):
        raise input_error(f"tsne.modality={modality}", "not a content modality of this dataset",
                          f"Choose from: {', '.join(cdmd_m.modalities)}")
    model.eval()
    ids = torch.as_tensor(np.asarray(items), dtype=torch.long)
    pos = model.pos_tgt.weight[0]
    tokens = {m: (x + pos).unsqueeze(1) for m, x in model.input(ids).items()}  # [I, 1, d]: one-event windows
    times = torch.zeros(len(ids), 1, dtype=torch.long)
    out = cdmd_m(tokens, tokens, times, times, need_loss=False)[1]  # the target-stream groups
    return {"before": torch.cat([tokens[m][:, 0] for m in mods], -1).float().numpy(),
            "after": torch.cat([out[m][:, 0] for m in mods], -1).float().numpy()}


def _items_with_content(model, items: np.ndarray) -> np.ndarray:
    """Items [I] that have every content feature of ``model``'s catalogue."""
    has = np.ones(len(items), bool)
    for m in model.input.content:
        has &= getattr(model.input, f"has_{m}").cpu().numpy()[items]
    return items[has]


def embed_2d(x: np.ndarray, perplexity: float) -> np.ndarray:
    """t-SNE of ``x`` [N, D] (cosine, PCA start, seed 0) → [N, 2]."""
    sk = _sklearn()
    return sk.manifold.TSNE(n_components=2, metric="cosine", init="pca", random_state=0,
                            perplexity=min(perplexity, (len(x) - 1) / 3)).fit_transform(x)


def claims(mean: pd.DataFrame) -> list[dict]:
    """From mean scores (index: (denoiser, stage); columns silhouette, knn_accuracy)."""
    out = []
    for metric, what in (("silhouette", "silhouette"), ("knn_accuracy", "kNN category accuracy")):
        d, m, b = (float(mean.loc[key, metric]) for key in (("diffusion", "after"), ("mlp", "after"),
                                                            ("diffusion", "before")))
        out.append({"claim": f"CDMD-M clusters tighter than the MLP ({what})", "held": d > m,
                    "evidence": f"after CDMD-M {d:.4f}, after MLP {m:.4f}"})
        out.append({"claim": f"CDMD-M clusters tighter than its input ({what})", "held": d > b,
                    "evidence": f"after CDMD-M {d:.4f}, before {b:.4f}"})
    return out


def plot(points: dict[str, np.ndarray], cats: np.ndarray, scores: dict[str, dict[str, float]]) -> bytes:
    """Three scatter panels (:data:`PANELS`), one colour per category (the 19 largest; the rest grey)."""
    plt = pyplot()
    order = pd.Series(cats).value_counts().index.tolist()
    shown = sorted(order[:19], key=lambda c: (not str(c).isdigit(), int(c) if str(c).isdigit() else 0, str(c)))
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.2 * len(PANELS), 5.2))
    for ax, (_, _, title) in zip(axes, PANELS):
        xy = points[title]
        rest = ~np.isin(cats, shown)
        if rest.any():
            ax.scatter(xy[rest, 0], xy[rest, 1], s=6, c="lightgrey", label="other")
        for i, c in enumerate(shown):
            sel = cats == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(i % 20), label=str(c))
        sc = scores[title]
        ax.set_title(f"{title}\nsilhouette {sc['silhouette']:.3f} · kNN acc. {sc['knn_accuracy']:.3f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure_bytes(fig)


def run(ctx: Context) -> pd.DataFrame:
    """Train (or reuse) both entries x seeds, score their item representations, draw the first seed's."""
    from m3bsr.engine.checkpoint import load_run_model

    s = ctx.settings.tsne
    _sklearn()  # fail before training when scikit-learn is missing
    cats = item_categories(ctx.dataset, s)  # fail before training when the labels are missing
    ents = entries(ctx)
    jobs = jobs_for(ctx, ents, ctx.dataset, ctx.out / "runs")
    run_jobs(ctx, jobs)
    denoiser = {ents[0].label: "diffusion", ents[1].label: "mlp"}
    label_of = {d: lab for lab, d in denoiser.items()}
    rows, first, items = [], {}, None
    for j in jobs:
        model, _, _ = load_run_model(j.run_dir, "best", dataset=ctx.dataset)
        if items is None:  # the same items for every run: labelled, with every content feature, sampled
            items = _items_with_content(model, np.sort(cats.index.to_numpy()))
            if len(items) > s.max_items:
                items = np.sort(np.random.default_rng(0).choice(items, s.max_items, replace=False))
            labels = cats.reindex(items).to_numpy()
            if not 2 <= len(set(labels)) < len(items):
                raise input_error(f"tsne.category={s.category}", f"{len(items)} items with a category and content "
                                  f"features, {len(set(labels))} categories", "Need 2 or more categories, fewer "
                                  "than the items")
        reps = item_representations(model, items, s.modality)
        for stage in ("before", "after"):
            sc = cluster_scores(reps[stage], labels, s.k)
            rows.append({"model": j.label, "denoiser": denoiser[j.label], "stage": stage, "seed": j.seed,
                         "items": len(items), "categories": len(set(labels)), **sc})
            if j.seed == ctx.seeds[0]:
                first[(denoiser[j.label], stage)] = (reps[stage], sc)
    table = pd.DataFrame(rows)
    table["chance"] = float(pd.Series(labels).value_counts(normalize=True).iloc[0])  # majority category share
    mean = table.groupby(["denoiser", "stage"])[["silhouette", "knn_accuracy"]].mean()
    std = table.groupby(["denoiser", "stage"])[["silhouette", "knn_accuracy"]].std(ddof=1).fillna(0.0)
    points = {title: embed_2d(first[(d, st)][0], s.perplexity) for d, st, title in PANELS}
    scores = {title: first[(d, st)][1] for d, st, title in PANELS}
    lines = []
    for d, st in (("diffusion", "before"), ("diffusion", "after"), ("mlp", "before"), ("mlp", "after")):
        title = {"diffusion": "CDMD-M", "mlp": "MLP"}[d]
        lines.append({"representation": f"{st} {title}", "model": label_of[d], **{
            metric: f"{mean.loc[(d, st), metric]:.4f} ± {std.loc[(d, st), metric]:.4f}"
            for metric in ("silhouette", "knn_accuracy")}})
    what = "all content modalities, concatenated" if s.modality is None else f"modality {s.modality}"
    section = (f"## Item representations (paper Figure 5)\n\n{len(items)} items in {len(set(labels))} categories "
               f"(`label_{s.category}`, the part before `{s.separator}`), {what}; each item alone as a target "
               f"event. Scores in the original space (cosine): silhouette and leave-one-out {s.k}-NN category "
               f"accuracy (chance, the largest category's share: {table['chance'].iloc[0]:.4f}), mean ± std over "
               f"seeds {', '.join(map(str, ctx.seeds))}. The t-SNE panels show seed {ctx.seeds[0]}; the "
               f"`before` panel is the CDMD-M model's input.\n\n" + md_table(pd.DataFrame(lines)) + "\n")
    write_outputs(ctx, NAME, table, plot(points, labels, scores), section, claims(mean),
                  {"entries": [e.label for e in ents], "items": int(len(items))})
    return table
