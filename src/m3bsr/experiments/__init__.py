"""``m3bsr experiment NAME``: each of the paper's experiments (and a noise-robustness lab) as one command.

One module per experiment, each with ``NAME`` and ``run(ctx) -> results table``; :mod:`.base` holds what
they share (run reuse through ``compare.run_one``, the output files), :mod:`.report` assembles the
sections of several output directories into one HTML page and one Markdown file. docs/experiments.md
says what each does.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

EXPERIMENTS = ("ablation", "sensitivity", "coldstart", "tsne", "cost", "noise")


def experiment_module(name: str):
    """The module of experiment ``name`` (an :class:`InputError` for an unknown one)."""
    from m3bsr.errors import input_error

    if name not in EXPERIMENTS:
        raise input_error(f"experiment {name!r}", "unknown experiment", f"Choose from: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"m3bsr.experiments.{name}")


def main(args: argparse.Namespace) -> int:
    """The ``experiment`` command: flags → :class:`~m3bsr.experiments.base.Context` → the module's ``run``."""
    from m3bsr import compare
    from m3bsr.experiments.base import Context
    from m3bsr.experiments.config import split_settings

    raw = compare.read_raw_config(Path(args.config) if args.config else None)
    sets = list(args.sets)
    if args.variants:
        sets.append(f"ablation.variants={[v for v in args.variants.split(',') if v.strip()]!r}")
    settings, runs_raw, run_sets = split_settings(raw, sets, args.config or "config")

    def say(msg: str) -> None:
        print(f"experiment {args.name}: {msg}", flush=True)

    ctx = Context(dataset=args.dataset, out=args.out, seeds=compare.parse_seeds(args.seeds),
                  models=[m for m in args.models.split(",") if m.strip()] if args.models else None,
                  raw=runs_raw, sets=run_sets, settings=settings, overwrite=args.overwrite, quiet=args.quiet,
                  source=args.config or "config", log=(lambda msg: None) if args.quiet else say, progress=say)
    ctx.check_configs(args.name)  # before the module imports torch and pandas: a bad key answers at once
    experiment_module(args.name).run(ctx)
    print(f"wrote {args.out / 'results.csv'}, {args.name}.md, {args.name}.png, experiment.json")
    if not args.quiet:
        print((args.out / f"{args.name}.md").read_text())
    return 0
