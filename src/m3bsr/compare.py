"""``m3bsr compare``: train every model x seed on one prepared split, then tabulate, plot and test.

Layout of ``OUT`` (every file written atomically)::

    OUT/runs/<model>-s<seed>/   one engine run directory each (finished ones are reused, so an
                                interrupted compare continues; an unfinished one resumes from last.pt;
                                one of another config, or trained before its dataset was re-prepared,
                                is refused: the rule is engine.runs.RunDir.reuse)
    OUT/results.csv             one row per model x seed x split x protocol: model, mode, seed, split,
                                protocol, HR@K/NDCG@K for each K, MRR, best_epoch, epochs, seconds_per_epoch
    OUT/results.md              what each model read of the dataset (its mode and any notice), mean ±
                                std over seeds per metric and protocol (best in bold), the relative
                                gain of the reference over the best baseline, significance
    OUT/results.png             grouped bars of the test metrics, both protocols
    OUT/significance.json       the paired tests (see :func:`significance`)

Fairness: every model gets the same split, ``train`` section (max epochs, early stopping, batch size),
``data.max_len`` and ``model.hidden_size``; other ``model.*`` keys (from ``--config`` or ``--set``)
go to the models whose config has them, and a config may add per-model keys under
``models: {<name>: {...}}``. For a table where each model runs at its own validation-tuned setting
(as papers tune every baseline), a per-model block may also set ``hidden_size`` and the optimiser keys
``train: {lr, weight_decay}``; the epoch budget, early stopping and batch size stay shared. Blocks
of models not in ``--models`` are ignored, so one tuned config serves several partial calls.
An entry ``MODEL@PRESET`` (e.g. ``m3bsr@paper``) is one more row: the model built from that
``model.preset``; its per-model block and run directories use the whole entry as its name.
The reference is ``m3bsr`` when listed, else the first model.

Modes: before any training, each model's ``data_mode`` (models/base.py) is read on the dataset; a
model that cannot run on it (e.g. ``m3bsr@paper`` on a single-behavior dataset) stops the compare
with one line naming the entry, so nothing is skipped silently, and the tables say what each ran on.

Progress: before each run one plain line ``compare: [4/6] sasrec seed 1 · ETA 2m10s (40s per run)``
(the ETA once a run has trained in this call), and a closing count, printed under ``--quiet`` too.

Importing this module imports neither torch nor pandas (they load where they are used), so every
run's config is validated, and a misspelt key answers, within a second.
"""

from __future__ import annotations

import argparse
import copy
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from m3bsr import atomic
from m3bsr.checks import prepared_dir
from m3bsr.config import Config, build_config, parse_override, read_yaml
from m3bsr.engine.metrics import metric_names
from m3bsr.errors import InputError, input_error
from m3bsr.models.registry import canonical_name, model_class, model_config_class, model_names
from m3bsr.progress import RunProgress

if TYPE_CHECKING:  # they import torch, pandas or pyarrow
    import pandas as pd

    from m3bsr.engine.runs import Reuse
    from m3bsr.models.base import DataMode

SPLITS = ("valid", "test")
PROTOCOLS = ("sampled", "full")
FORCED = ["train.eval_test=true"]  # compare needs the test metrics of every run


# --------------------------------------------------------------------------- flags and configs


def split_entry(entry: str) -> tuple[str, str | None]:
    """``"M3BSR@paper"`` → ``("m3bsr", "paper")``; ``"sasrec"`` → ``("sasrec", None)``."""
    base, _, preset = entry.partition("@")
    name = canonical_name(base.strip())
    if preset and "preset" not in model_config_class(name).model_fields:
        raise input_error(f"model entry {entry!r}", f"{name} has no presets",
                          f"Write {name} without '@{preset}'")
    return name, (preset.strip() or None) if "@" in entry else None


def entry_label(entry: str) -> str:
    name, preset = split_entry(entry)
    return name if preset is None else f"{name}@{preset}"


def parse_models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = model_names()
    by_lower = {k.lower(): k for k in known}
    bad = [n for n in names if n.partition("@")[0].strip().lower() not in by_lower]
    if not names or bad:
        raise input_error(f"--models {text!r}", f"unknown model {bad[0]!r}" if bad else "no model given",
                          f"Choose from: {', '.join(known)} (a preset as MODEL@PRESET, e.g. m3bsr@paper)")
    names = [entry_label(n) for n in names]  # any case: SASRec → sasrec
    if len(set(names)) != len(names):
        raise input_error(f"--models {text!r}", "a model is listed twice", "List each model once")
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise input_error(f"--seeds {text!r}", "seeds must be integers", "Write e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise input_error(f"--seeds {text!r}", "need distinct seeds", "Write e.g. --seeds 0,1,2")
    return seeds


def read_raw_config(path: Path | None) -> dict[str, Any]:
    """The ``--config`` file as a dict (``{}`` without one), not yet validated (:func:`model_configs` does)."""
    return {} if path is None else read_yaml(path)


PER_MODEL_TRAIN = ("lr", "weight_decay")  # the train keys a per-model block may tune


def model_configs(raw: dict[str, Any], models: list[str], seed: int, sets: list[str],
                  source: str = "config") -> dict[str, Config]:
    """One :class:`Config` per model for ``seed`` (see the module docstring for how keys are shared)."""
    raw = copy.deepcopy(raw)
    per_model = raw.pop("models", None) or {}
    shared_model = {k: v for k, v in (raw.pop("model", None) or {}).items() if k != "name"}
    fields = {m: set(model_config_class(split_entry(m)[0]).model_fields) for m in models}
    per_train: dict[str, dict[str, Any]] = {}
    for given in list(per_model):
        if given.partition("@")[0].strip().lower() not in {k.lower() for k in model_names()}:
            raise input_error(f"{source}: models.{given}", "unknown model",
                              f"Use one of: {', '.join(model_names())}")
        name = entry_label(given)
        per_model[name] = dict(per_model.pop(given) or {})
        per_train[name] = dict(per_model[name].pop("train", None) or {})
        for key in per_train[name]:
            if key not in PER_MODEL_TRAIN:
                raise input_error(f"{source}: models.{name}.train.{key}", "only the optimiser keys may differ "
                                  f"per model ({', '.join(PER_MODEL_TRAIN)})",
                                  f"Set train.{key} for every model at the top level")
    model_sets, other_sets, hidden = [], [], shared_model.get("hidden_size")
    for text in sets:
        path, value = parse_override(text)
        if path[0] == "seed":
            raise input_error(f"--set {text}", "compare sets the seed of each run", "Use --seeds")
        if path[0] == "model" and len(path) > 1:
            model_sets.append((path[1], text))
            hidden = value if path[1] == "hidden_size" else hidden
        else:
            other_sets.append(text)
    for key in list(shared_model) + [k for k, _ in model_sets]:
        if not any(key in f for f in fields.values()):
            raise input_error(f"{source} / --set: model.{key}", "no listed model has this key",
                              "Check the spelling (see `m3bsr train --help`)")
    ref = split_entry(reference_model(models))[0]
    hidden = hidden if hidden is not None else model_config_class(ref).model_fields["hidden_size"].default
    out = {}
    for m in models:
        base, preset = split_entry(m)
        model_raw = {k: v for k, v in shared_model.items() if k in fields[m]}
        model_raw.update(per_model.get(m) or {})
        if preset is not None:
            model_raw["preset"] = preset
        mine = [t for key, t in model_sets if key in fields[m] and key != "hidden_size"]
        mine += [f"train.{k}={v}" for k, v in per_train.get(m, {}).items()]
        own_hidden = model_raw.pop("hidden_size", hidden)
        overrides = other_sets + mine + [f"model.hidden_size={own_hidden}", f"seed={seed}"] + FORCED
        out[m] = build_config({**raw, "model": model_raw}, model=base, overrides=overrides, source=source)
    return out


def data_modes(dataset: Path, configs: dict[str, Config]) -> dict[str, DataMode]:
    """What each model reads of ``dataset`` (:meth:`SequentialRecommender.data_mode`); an
    :class:`InputError` naming the entry for a model that cannot run on it."""
    from m3bsr.data.prepared import PreparedDataset

    catalogue = PreparedDataset.load(dataset).catalogue()
    modes = {}
    for entry, cfg in configs.items():
        try:
            modes[entry] = model_class(cfg.model.name).data_mode(cfg.model, catalogue, where=str(dataset))
        except InputError as e:
            raise input_error(f"--models entry {entry!r}", str(e), "Or drop the entry from --models") from None
    return modes


def reference_model(models: list[str]) -> str:
    """The model whose gain over the best baseline is reported: m3bsr if listed, else the first."""
    return "m3bsr" if "m3bsr" in models else models[0]


# --------------------------------------------------------------------------- running


def run_path(out: Path, model: str, seed: int) -> Path:
    """``OUT/runs/<model>-s<seed>``: the run directory of one model x seed."""
    return Path(out) / "runs" / f"{model}-s{seed}"


def engine_train(cfg: Config, dataset: Path, out: Path, *, overwrite: bool, quiet: bool) -> dict:
    """Train one run with the engine (the default ``train_fn`` of compare, sweep and experiments); its summary."""
    from m3bsr.engine.train import train

    return train(cfg, dataset, out, overwrite=overwrite, quiet=quiet)


def engine_resume(run_dir: Path, *, quiet: bool) -> dict:
    """Resume one run from its last.pt with the engine (the default ``resume_fn``); its summary."""
    from m3bsr.engine.train import resume

    return resume(run_dir, quiet=quiet)


def run_one(cfg: Config, dataset: Path, run_dir: Path, *, overwrite: bool, quiet: bool,
            train_fn: Callable = engine_train, resume_fn: Callable = engine_resume,
            log: Callable[[str], None] = print, done: Callable[[Reuse], None] | None = None,
            name: str | None = None) -> dict:
    """Train one run, reuse it when finished, or resume it from last.pt; a run of another config or
    dataset is refused (the rule is :meth:`~m3bsr.engine.runs.RunDir.reuse`), ``overwrite`` retrains.
    ``log`` gets one line, ``NAME: training`` (or ``finished, reused``, ``unfinished, resuming from
    last.pt``), NAME being ``name`` or the run directory's. ``done`` gets what was done, ``train``,
    ``resume`` or ``reuse``, once the run's summary is there (:meth:`~m3bsr.progress.RunProgress.finish`).
    compare, sweep and the experiments all run through here."""
    from m3bsr.engine.runs import RunDir

    run = RunDir(run_dir)
    name = run_dir.name if name is None else name
    action = "train" if overwrite else run.reuse(cfg, dataset, fix="Pass --overwrite to retrain every run on "
                                                  "the current data, or choose another --out")
    if action == "reuse":
        log(f"{name}: finished, reused")
        summary = run.read_summary()
    elif action == "resume":
        log(f"{name}: unfinished, resuming from last.pt")
        summary = resume_fn(run_dir, quiet=quiet)
    else:
        log(f"{name}: training")
        summary = train_fn(cfg, dataset, run_dir, overwrite=True, quiet=quiet)
    if done is not None:
        done(action)
    return summary


def run_compare(dataset: Path, models: list[str], seeds: list[int], *, out: Path, raw: dict[str, Any] | None = None,
                sets: list[str] = (), overwrite: bool = False, quiet: bool = False, source: str = "config",
                train_fn: Callable = engine_train, resume_fn: Callable = engine_resume,
                log: Callable[[str], None] = print, progress: Callable[[str], None] | None = None,
                clock: Callable[[], float] = time.monotonic) -> pd.DataFrame:
    """Every model x seed, then the report files; returns the results table (see :func:`results_table`).

    Before each run ``progress`` (default: ``log``) gets ``[4/6] sasrec seed 1`` and, once a run has
    trained, the ETA of the rest (:class:`~m3bsr.progress.RunProgress`, timed by ``clock``)."""
    progress = log if progress is None else progress
    dataset, out = prepared_dir(dataset), Path(out)
    configs = {s: model_configs(raw or {}, models, s, list(sets), source) for s in seeds}  # validate all first
    modes = data_modes(dataset, configs[seeds[0]])  # the seed changes no mode
    for m, mode in modes.items():
        if mode.notice:
            log(f"{m}: notice: {mode.notice}")
    summaries = {}
    where = RunProgress(len(seeds) * len(models), clock)
    for s in seeds:
        for m in models:
            run_dir = run_path(out, m, s)
            progress(where.start(f"{m} seed {s}"))
            summaries[m, s] = run_one(configs[s][m], dataset, run_dir, overwrite=overwrite, quiet=quiet,
                                      train_fn=train_fn, resume_fn=resume_fn, log=log, done=where.finish)
    progress(where.summary())
    ks = configs[seeds[0]][models[0]].eval.ks
    table = results_table(summaries, ks, {m: mode.mode for m, mode in modes.items()})
    write_report(table, out, models, seeds, ks, modes)
    return table


# --------------------------------------------------------------------------- aggregation


def results_table(summaries: dict[tuple[str, int], dict], ks: list[int],
                  modes: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per (model, seed, split, protocol) with the model's mode (``modes``, else the run's
    metrics.json), every metric and the run's timing."""
    import pandas as pd

    names = metric_names(ks)
    rows = []
    for (model, seed), s in summaries.items():
        mode = (modes or {}).get(model) or s.get("mode", "")
        for split in SPLITS:
            for protocol in PROTOCOLS:
                metrics = (s.get(split) or {}).get(protocol) or {}
                rows.append({"model": model, "mode": mode, "seed": seed, "split": split, "protocol": protocol,
                             **{n: metrics.get(n, np.nan) for n in names},
                             "best_epoch": s.get("best_epoch"), "epochs": s.get("epochs"),
                             "seconds_per_epoch": s.get("seconds_per_epoch")})
    return pd.DataFrame(rows, columns=["model", "mode", "seed", "split", "protocol", *names, "best_epoch", "epochs",
                                       "seconds_per_epoch"])


def mean_std(table: pd.DataFrame, ks: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean and sample std (0 for one seed) over seeds, indexed by (split, protocol, model)."""
    g = table.groupby(["split", "protocol", "model"], sort=False)[metric_names(ks)]
    return g.mean().sort_index(), g.std(ddof=1).fillna(0.0).sort_index()


def user_ndcg(ranks: pd.DataFrame, protocol: str, k: int = 10) -> pd.Series:
    """Per-user NDCG@k from a test_ranks table (mean over a user's rows). Index: user."""
    import pandas as pd

    r = ranks[f"rank_{protocol}"].to_numpy(np.float64)
    gain = np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)
    return pd.Series(gain, index=ranks["user"].to_numpy()).groupby(level=0).mean()


def pooled_user_ndcg(out: Path, model: str, seeds: list[int], protocol: str) -> pd.Series:
    """Per-user test NDCG@10 averaged over seeds (users present in every seed)."""
    import pandas as pd

    from m3bsr.engine.runs import RunDir

    per_seed = [user_ndcg(pd.read_parquet(RunDir(run_path(out, model, s)).test_ranks), protocol) for s in seeds]
    return pd.concat(per_seed, axis=1, join="inner").mean(axis=1)


def significance(out: Path, reference: str, baseline: str, seeds: list[int], protocol: str) -> dict[str, Any]:
    """Paired two-sided tests of ``reference`` vs ``baseline`` on per-user test NDCG@10 pooled over seeds:
    Wilcoxon signed-rank (zero differences dropped) and paired t-test (scipy)."""
    from scipy import stats

    a = pooled_user_ndcg(out, reference, seeds, protocol)
    b = pooled_user_ndcg(out, baseline, seeds, protocol)
    a, b = a.align(b, join="inner")
    diff = (a - b).to_numpy()
    result = {"protocol": protocol, "metric": "NDCG@10", "reference": reference, "baseline": baseline,
              "users": int(len(diff)), "mean_reference": float(a.mean()), "mean_baseline": float(b.mean()),
              "mean_difference": float(diff.mean()) if len(diff) else float("nan"),
              "nonzero_differences": int((diff != 0).sum())}
    if (diff != 0).sum() == 0:  # identical per-user results: no evidence of a difference
        return {**result, "wilcoxon_p": 1.0, "ttest_p": 1.0}
    return {**result, "wilcoxon_p": float(stats.wilcoxon(a, b).pvalue),
            "ttest_p": float(stats.ttest_rel(a, b).pvalue) if len(diff) > 1 else float("nan")}


def format_p(p: float) -> str:
    """A p-value for a table: 3 significant digits; one that underflowed float64 reads ``< 1e-300``
    (on all of tmall, 30k paired users, both tests return exactly 0, which is not a probability)."""
    return "< 1e-300" if p == 0 else f"{p:.3g}"


def baselines(models: list[str], reference: str) -> list[str]:
    """The entries the reference is compared with: every other model, not its own presets
    (``m3bsr@paper`` is not a baseline of ``m3bsr``)."""
    own = split_entry(reference)[0]
    return [m for m in models if split_entry(m)[0] != own]


def best_baseline(mean: pd.DataFrame, reference: str, protocol: str, metric: str = "NDCG@10") -> str | None:
    """The baseline (:func:`baselines`) with the highest mean test ``metric`` under ``protocol``."""
    col = mean.loc[("test", protocol), metric]
    col = col[baselines([str(m) for m in col.index], reference)]
    return None if col.empty else str(col.idxmax())


# --------------------------------------------------------------------------- report files


def markdown(table: pd.DataFrame, sig: list[dict[str, Any]], models: list[str], seeds: list[int],
             ks: list[int], modes: dict[str, DataMode] | None = None) -> str:
    """results.md: what each model read (mode, notice), one table per split and protocol (mean ± std,
    best in bold), gains, significance."""
    mean, std = mean_std(table, ks)
    names = metric_names(ks)
    ref = reference_model(models)
    lines = [f"# Comparison: {', '.join(models)} (seeds {', '.join(map(str, seeds))})", "",
             "Mean ± sample std over seeds. **Bold** = best model per column. Reference model: "
             f"`{ref}`. `sampled` = positive + stored negatives; `full` = whole catalogue.", ""]
    if modes:
        lines += ["## What each model read", "", "| model | mode | notice |", "|---|---|---|"]
        lines += [f"| {m} | {modes[m].mode} | {(modes[m].notice or '').replace('|', '/')} |" for m in models]
        lines.append("")
    for split in ("test", "valid"):
        for protocol in PROTOCOLS:
            m, s = mean.loc[(split, protocol)], std.loc[(split, protocol)]
            lines += [f"## {split}, {protocol} protocol", "", "| model | " + " | ".join(names) + " |",
                      "|---|" + "---|" * len(names)]
            for model in models:
                cells = []
                for n in names:
                    cell = f"{m.loc[model, n]:.4f} ± {s.loc[model, n]:.4f}"
                    cells.append(f"**{cell}**" if m.loc[model, n] == m[n].max() else cell)
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
            others = baselines(models, ref)
            if split == "test" and others:
                gains = []
                for n in names:
                    best = m.loc[others, n].max()
                    gains.append(f"{100 * (m.loc[ref, n] - best) / best:+.1f} %" if best > 0 else "n/a")
                lines.append(f"| gain of {ref} over best baseline | " + " | ".join(gains) + " |")
            lines.append("")
    if sig:
        lines += ["## Significance (test, per-user NDCG@10, averaged over seeds per user)", "",
                  "| protocol | reference | best baseline | users | mean diff | Wilcoxon p | paired t p |",
                  "|---|---|---|---|---|---|---|"]
        for r in sig:
            lines.append(f"| {r['protocol']} | {r['reference']} | {r['baseline']} | {r['users']} | "
                         f"{r['mean_difference']:+.4f} | {format_p(r['wilcoxon_p'])} | {format_p(r['ttest_p'])} |")
        lines.append("")
    return "\n".join(lines)


def plot(table: pd.DataFrame, models: list[str], ks: list[int]) -> bytes:
    """results.png: test HR@K/NDCG@K per model (bars, std as error bars), one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = mean_std(table, ks)
    names = [n for n in metric_names(ks) if n != "MRR"]
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.2 * len(names) * len(models) + 2), 7), sharey=True)
    width = 0.8 / len(models)
    x = np.arange(len(names))
    for ax, protocol in zip(axes, PROTOCOLS):
        for i, model in enumerate(models):
            ax.bar(x + i * width, mean.loc[("test", protocol, model), names], width,
                   yerr=std.loc[("test", protocol, model), names], capsize=2, label=model)
        ax.set_xticks(x + 0.4 - width / 2, names, rotation=30)
        ax.set_title(f"test, {protocol}")
        ax.set_ylabel("mean over seeds (± std)")
    axes[0].legend(fontsize=8, ncol=min(len(models), 4))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(table: pd.DataFrame, out: Path, models: list[str], seeds: list[int], ks: list[int],
                 modes: dict[str, DataMode] | None = None) -> None:
    """results.csv, significance.json, results.md and results.png under ``out``."""
    mean, _ = mean_std(table, ks)
    ref = reference_model(models)
    sig = []
    for protocol in PROTOCOLS:
        base = best_baseline(mean, ref, protocol)
        if base is not None:
            sig.append(significance(out, ref, base, seeds, protocol))
    atomic.write_text(out / "results.csv", table.to_csv(index=False, float_format="%.6g"))
    atomic.write_json(out / "significance.json", sig)
    atomic.write_text(out / "results.md", markdown(table, sig, models, seeds, ks, modes))
    atomic.write_bytes(out / "results.png", plot(table, models, ks))


def main(args: argparse.Namespace) -> int:
    """The ``compare`` command: flags → :func:`run_compare`; prints the test tables."""
    models, seeds = parse_models(args.models), parse_seeds(args.seeds)
    raw = read_raw_config(Path(args.config) if args.config else None)
    def say(msg: str) -> None:
        print(f"compare: {msg}", flush=True)

    log = (lambda msg: None) if args.quiet else say
    run_compare(args.dataset, models, seeds, out=args.out, raw=raw, sets=args.sets, overwrite=args.overwrite,
                quiet=args.quiet, source=args.config or "config", log=log, progress=say)  # progress even if --quiet
    print(f"wrote {args.out / 'results.csv'}, results.md, results.png, significance.json")
    if not args.quiet:
        print((args.out / "results.md").read_text())
    return 0
