"""CLI entry points of the engine: ``train``, ``evaluate``, ``demo``, ``model-summary``.

Each maps flags to a config and calls the API (:mod:`train`, :mod:`evaluate`, :mod:`demo`); no
training logic lives here.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from m3bsr import atomic
from m3bsr.config import Config, build_config, load_config, read_yaml
from m3bsr.errors import input_error

SUMMARY_BATCH = 32  # windows in the batch model-summary measures (its figures are per window)


def run_config(config: str | Path | None, model: str | None, overrides: list[str]) -> tuple[Config, Path | None]:
    """``--config`` (+ ``--model``, ``--set``) → Config, and the ``dataset:`` a run's config.yaml records.

    A run's ``config.yaml`` is accepted as ``--config``: its ``dataset`` key is split off (and
    used when ``--dataset`` is not given), its ``dataset_fingerprint`` dropped; every other key is
    validated as usual.
    """
    if config is None or "dataset" not in read_yaml(config):
        return load_config(config, model=model, overrides=overrides), None
    from m3bsr.engine.runs import split_run_config  # here: numpy/pyarrow only when needed

    raw, dataset = split_run_config(read_yaml(config))  # a new run records the dataset's fingerprint afresh
    return build_config(raw, model=model, overrides=overrides, source=str(config)), Path(dataset)


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """``--seed`` and ``--device`` are shorthands for ``--set seed=`` / ``--set train.device=``."""
    extra = []
    if getattr(args, "seed", None) is not None:
        extra.append(f"seed={args.seed}")
    if getattr(args, "device", None) is not None:
        extra.append(f"train.device={args.device}")
    return list(args.sets) + extra


def cmd_train(args: argparse.Namespace) -> int:
    """Flags and the config first, then the engine (torch): a bad flag or file answers at once."""
    if args.resume is not None:
        for flag in ("dataset", "model", "config", "out", "seed"):
            if getattr(args, flag) is not None:
                raise input_error(f"--resume with --{flag}", "a resumed run keeps its dataset, model, config, "
                                  "directory and seed", "Drop the flag (use --set for e.g. train.max_epochs)")
        from m3bsr.engine.runs import RunDir

        RunDir(args.resume).read_config(_flag_overrides(args))  # a bad --set answers before torch is imported
        from m3bsr.engine.train import resume

        resume(args.resume, _flag_overrides(args), quiet=args.quiet)
        return 0
    cfg, recorded = run_config(args.config, args.model, _flag_overrides(args))
    dataset = args.dataset or recorded
    if dataset is None:
        raise input_error("train", "no --dataset given", "Add --dataset DIR (a directory written by `m3bsr prepare`)")
    from m3bsr.engine.train import train

    train(cfg, Path(dataset), args.out, overwrite=args.overwrite, quiet=args.quiet)
    return 0


def _same(a, b, tol: float = 1e-9) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    return math.isclose(a, b, rel_tol=0, abs_tol=tol)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Re-evaluate a checkpoint (``--checkpoint``, ``--split``, ``--set eval.*``) and print the table; when
    the evaluation is the one metrics.json records (best.pt, the run's eval.ks and eval.exclude) say
    whether it reproduces it (exit 1 if not)."""
    from m3bsr.engine.runs import RunDir, evaluation_overrides, format_table

    overrides = evaluation_overrides(list(args.sets)) + ([f"eval.exclude={args.exclude}"] if args.exclude else [])
    run = RunDir(args.run_dir)
    recorded_cfg, _ = run.read_config()
    ev = run.read_config(overrides)[0].eval  # unknown keys and wrong types fail here, before torch is imported
    from m3bsr.engine.evaluate import PROTOCOLS, SPLITS, evaluate_run
    from m3bsr.engine.metrics import metric_names

    splits = (args.split,) if args.split else SPLITS
    result = evaluate_run(args.run_dir, overrides=overrides, checkpoint=args.checkpoint, splits=splits)
    rows = {f"{split} {p}": result[split][p] for split in splits for p in PROTOCOLS}
    title = f"{args.run_dir} ({args.checkpoint}.pt, exclude={ev.exclude})"
    print(format_table(metric_names(ev.ks), rows, title=title))
    if args.json is not None:
        atomic.write_text(args.json, json.dumps({"run": str(args.run_dir), "checkpoint": args.checkpoint,
                                                 "exclude": ev.exclude, "ks": ev.ks, **result}, indent=1))
    if args.checkpoint != "best":
        print(f"metrics.json: records best.pt; {args.checkpoint}.pt not compared")
        return 0
    changed = [f"{key}={getattr(recorded_cfg.eval, key)}" for key in ("exclude", "ks")
               if getattr(ev, key) != getattr(recorded_cfg.eval, key)]
    if changed:
        print(f"metrics.json: recorded with {', '.join(changed)}; not compared")
        return 0
    if not run.metrics_json.is_file():
        print("metrics.json: absent (run unfinished); nothing to compare")
        return 0
    recorded = run.read_summary()
    checks = [(split, _same(result[split], recorded[split])) for split in splits
              if recorded.get(split) is not None]
    bad = [split for split, ok in checks if not ok]
    if not checks:
        print(f"metrics.json: records no {' or '.join(splits)} metrics; nothing to compare")
        return 0
    if bad:
        print(f"metrics.json: NOT reproduced for {', '.join(bad)} (different machine/device or modified files?)")
        return 1
    print(f"metrics.json: reproduced ({', '.join(s for s, _ in checks)})")
    return 0


def cmd_model_summary(args: argparse.Namespace) -> int:
    """Build the model for a dataset and print ``models.summary.summarize(model, batch)`` on a real training batch."""
    cfg, _ = run_config(args.config, args.model, list(args.sets))  # before torch: a bad key answers at once
    from m3bsr.data.batches import WindowBuilder
    from m3bsr.data.prepared import PreparedDataset
    from m3bsr.models.registry import build_model
    from m3bsr.models.summary import summarize
    from m3bsr.seeding import seed_everything

    ds = PreparedDataset.load(args.dataset)
    windows = WindowBuilder(ds, cfg.data.max_len).train_windows()
    if len(windows) == 0:
        raise input_error(str(args.dataset), "has no training windows", "Prepare a dataset with more target events")
    seed_everything(cfg.seed)
    model = build_model(cfg.model, ds.catalogue())
    batch = windows.batch(slice(0, min(cfg.train.batch_size, SUMMARY_BATCH, len(windows))))
    print(summarize(model, batch))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from m3bsr.engine.demo import run_demo

    run_demo(args.out, config=args.config, overrides=list(args.sets), quiet=args.quiet)
    return 0


def main(args: argparse.Namespace) -> int:
    """Dispatch one engine command (``args.command``)."""
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "demo": cmd_demo, "model-summary": cmd_model_summary}
    return commands[args.command](args)
