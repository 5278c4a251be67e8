"""What every experiment shares: model entries, running them through ``compare``'s run reuse, and
writing the section files.

Layout of ``OUT`` (every file written atomically)::

    OUT/runs/<entry>-s<seed>/    engine run directories (``compare.run_one``: a finished run with the same
                                 config is reused, an unfinished one resumes from last.pt, one trained on
                                 re-prepared data is refused), so an interrupted experiment continues
    OUT/results.csv              the experiment's numbers, one row per run (or cell) and protocol
    OUT/<NAME>.png               the figure
    OUT/<NAME>.md                a Markdown section: what was run, the table, the figure, the claim line
    OUT/experiment.json          name, dataset, seeds, entries, the settings used, the claim verdicts
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from m3bsr import atomic, compare
from m3bsr.checks import prepared_dir
from m3bsr.config import Config, build_config, parse_override
from m3bsr.errors import input_error
from m3bsr.experiments.config import STARTS, ExperimentSettings
from m3bsr.models.configs import CDMD_M_KEYS
from m3bsr.progress import RunProgress

if TYPE_CHECKING:  # annotations only: `m3bsr experiment` checks its configs before pandas loads
    import pandas as pd


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """A model to run: a compare entry (``base``, e.g. ``m3bsr@paper``) plus dotted ``overrides``."""

    label: str
    base: str
    overrides: tuple[str, ...] = ()


def parse_entry(text: str) -> Entry:
    """``"M3BSR@paper+no_meie=true"`` → ``Entry("m3bsr@paper+no_meie=true", "m3bsr@paper", ("model.no_meie=true",))``."""
    head, *extra = [p.strip() for p in str(text).split("+")]
    base = compare.parse_models(head)[0]
    overrides = []
    for part in extra:
        if "=" not in part:
            raise input_error(f"model entry {text!r}", f"{part!r} is not KEY=VALUE",
                              "Write e.g. m3bsr@paper+no_cdmd_m=true")
        key, value = part.split("=", 1)
        key = key.strip() if "." in key else f"model.{key.strip()}"
        parse_override(f"{key}={value}")
        overrides.append(f"{key}={value.strip()}")
    short = [o[len("model."):] if o.startswith("model.") else o for o in overrides]
    return Entry("+".join([base, *short]), base, tuple(overrides))


def parse_entries(items: list[str] | str) -> list[Entry]:
    """Entries from a list or a comma-separated text; labels must be distinct."""
    if isinstance(items, str):
        items = [t for t in items.split(",") if t.strip()]
    entries = [parse_entry(t) for t in items]
    labels = [e.label for e in entries]
    if not entries or len(set(labels)) != len(labels):
        raise input_error(f"models {', '.join(labels) or '(none)'}", "need distinct model entries",
                          "List each entry once")
    return entries


# keys that change only how a model reads item content: without content features they change nothing
CONTENT_ONLY_KEYS = tuple(f"model.{k}" for k in CDMD_M_KEYS)


def has_content(dataset: Path) -> bool:
    """Whether the prepared ``dataset`` has content features (read from its manifest alone)."""
    from m3bsr.data.prepared import PreparedDataset

    return bool(PreparedDataset.read_manifest(dataset).get("features"))


def without_content_switches(entries: list[Entry], dataset: Path, log: Callable[[str], None]) -> list[Entry]:
    """``entries`` less those that would train an earlier entry's model again on ``dataset``.

    Without content features a model never builds CDMD-M, so an entry that differs from an earlier one
    only in :data:`CONTENT_ONLY_KEYS` (``m3bsr@paper+no_cdmd_m=true`` beside ``m3bsr@paper``) is the same
    model: it is left out with one line rather than trained and drawn as if it were an ablation.
    """
    if has_content(dataset):
        return entries
    kept: dict[tuple, Entry] = {}
    for e in entries:
        key = (e.base, tuple(o for o in e.overrides if o.split("=", 1)[0] not in CONTENT_ONLY_KEYS))
        if key in kept:
            log(f"{e.label} left out: {dataset} has no content features, so it trains the same model as "
                f"{kept[key].label}")
        else:
            kept[key] = e
    return list(kept.values())


def entry_configs(entries: list[Entry], seed: int, raw: dict[str, Any], sets: list[str],
                  source: str = "config") -> dict[str, Config]:
    """One run :class:`Config` per entry label: the base entry's config as ``compare`` builds it (shared
    train budget and hidden size, per-model blocks), then the entry's overrides."""
    bases = list(dict.fromkeys(e.base for e in entries))
    base_cfgs = compare.model_configs(raw, bases, seed, sets, source)
    out = {}
    for e in entries:
        cfg = base_cfgs[e.base]
        if e.overrides:
            cfg = build_config(cfg.to_dict(), overrides=list(e.overrides), source=f"model entry {e.label!r}")
        out[e.label] = cfg
    return out


# --------------------------------------------------------------------------- running


@dataclass
class Context:
    """One ``m3bsr experiment`` call: where, which models and seeds, the runs' config and the settings."""

    dataset: Path
    out: Path
    seeds: list[int]
    models: list[str] | None = None  # None: the experiment's default entries
    raw: dict[str, Any] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    settings: ExperimentSettings = field(default_factory=ExperimentSettings)
    overwrite: bool = False
    quiet: bool = True
    source: str = "config"
    log: Callable[[str], None] = print
    progress: Callable[[str], None] | None = None

    def entries(self, default: list[str]) -> list[Entry]:
        return parse_entries(self.models if self.models is not None else default)

    def check_configs(self, name: str) -> None:
        """Build every seed's run config of the entries experiment ``name`` starts from (``--models``, else
        the setting :data:`~m3bsr.experiments.config.STARTS` names): a bad ``--set`` or ``--config`` key of the
        runs is one :class:`InputError` before the experiment's module (torch, pandas) is imported."""
        own = getattr(getattr(self.settings, name), STARTS[name])
        if isinstance(own, str):  # one base entry: --models' first replaces it
            starts = [self.models[0] if self.models else own]
        else:
            starts = list(self.models) if self.models is not None else list(own)
        entries = parse_entries(starts)
        for seed in self.seeds:
            entry_configs(entries, seed, self.raw, self.sets, self.source)


@dataclass
class Job:
    """One run: ``key`` identifies it in the returned summaries."""

    key: tuple
    label: str
    seed: int
    cfg: Config
    dataset: Path
    run_dir: Path


def jobs_for(ctx: Context, entries: list[Entry], dataset: Path, runs: Path, key: tuple = ()) -> list[Job]:
    """Every entry x seed on ``dataset``, run directories ``runs/<label>-s<seed>``; the data modes are
    checked first (a model that cannot run on the dataset stops everything with one line)."""
    prepared_dir(dataset)
    jobs = []
    for s in ctx.seeds:
        cfgs = entry_configs(entries, s, ctx.raw, ctx.sets, ctx.source)
        if s == ctx.seeds[0]:
            compare.data_modes(dataset, cfgs)
        jobs += [Job((*key, label, s), label, s, cfg, dataset, runs / f"{label}-s{s}") for label, cfg in cfgs.items()]
    return jobs


def run_jobs(ctx: Context, jobs: list[Job]) -> dict[tuple, dict]:
    """Run every job through :func:`m3bsr.compare.run_one` (reuse / resume / refuse); their summaries by key."""
    progress = ctx.progress or ctx.log
    where = RunProgress(len(jobs))
    summaries = {}
    for job in jobs:
        progress(where.start(f"{job.label} seed {job.seed}" + (f" ({job.key[0]})" if len(job.key) > 2 else "")))
        summaries[job.key] = compare.run_one(job.cfg, job.dataset, job.run_dir, overwrite=ctx.overwrite,
                                             quiet=ctx.quiet, log=ctx.log, done=where.finish)
    progress(where.summary())
    return summaries


# --------------------------------------------------------------------------- output


def figure_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def verdict(held: bool | None) -> str:
    return "n/a" if held is None else ("held" if held else "did not hold")


def md_table(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A pandas frame as a Markdown table (index dropped; floats formatted)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(ctx: Context, name: str, table: pd.DataFrame, png: bytes | None, section: str,
                  claims: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """results.csv, NAME.png, NAME.md and experiment.json under ``ctx.out``. ``section`` is the Markdown
    body; the claim lines (``{"claim", "held", "evidence"}``) are appended to it."""
    out = Path(ctx.out)
    atomic.write_text(out / "results.csv", table.to_csv(index=False, float_format="%.6g"))
    if png is not None:
        atomic.write_bytes(out / f"{name}.png", png)
    lines = [section.rstrip(), ""]
    if png is not None:
        lines += [f"![{name}]({name}.png)", ""]
    if claims:
        lines += ["**Claims**", ""]
        lines += [f"* {c['claim']} → **{verdict(c['held'])}** ({c['evidence']})" for c in claims]
        lines.append("")
    atomic.write_text(out / f"{name}.md", "\n".join(lines))
    atomic.write_json(out / "experiment.json", {
        "name": name, "dataset": str(Path(ctx.dataset).resolve()), "seeds": ctx.seeds,
        "models": ctx.models, "settings": getattr(ctx.settings, name).model_dump(mode="json"),
        "claims": claims, **(extra or {})})
