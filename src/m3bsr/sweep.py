"""``m3bsr sweep``: a grid search scored on validation only (test is never evaluated).

Each grid point is a normal training run (``<out>/runs/<k>-<slug>``) with ``train.eval_test=false``;
an interrupted sweep continues where it stopped: a finished point is reused, an unfinished one resumes
from its last.pt, and a point trained with another config or before its dataset was re-prepared is
refused (one rule for compare and sweep: :meth:`m3bsr.engine.runs.RunDir.reuse`). The table
(``sweep.csv``, ``sweep.md``) ranks points by the monitored validation metric, and
``--emit-best FILE`` writes the winning config as YAML, ready for ``m3bsr train --config FILE``.
Before each point one plain line ``sweep: [3/8] sasrec train.lr=1e-3 · ETA 5m20s
(40s per run): training`` says where the sweep is (under ``--quiet`` too; a reused point says so). Every point's
config is validated before the first trains, and before torch or pandas is imported.
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from m3bsr import atomic
from m3bsr.compare import engine_resume, engine_train, run_one
from m3bsr.config import Config, load_config, parse_override
from m3bsr.errors import input_error
from m3bsr.progress import RunProgress

if TYPE_CHECKING:
    import pandas as pd

METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR")


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
    """``"model.hidden_size=64,128 train.lr=1e-3,1e-4"`` → ``[("model.hidden_size", ["64", "128"]), ...]``."""
    axes = []
    for token in text.split():
        if "=" not in token or not token.split("=", 1)[1]:
            raise input_error(f"--grid {token!r}", "expected KEY=V1,V2,...", 'Write e.g. --grid "train.lr=1e-3,1e-4"')
        key, values = token.split("=", 1)
        parse_override(f"{key}=0")  # validates the key syntax
        axes.append((key, [v for v in values.split(",") if v != ""]))
    if not axes:
        raise input_error("--grid", "empty grid", 'Write e.g. --grid "model.hidden_size=64,128"')
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise input_error("--grid", "a key appears twice", "Give each key once with all its values")
    return axes


def grid_points(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Cartesian product of the axes as lists of ``KEY=VALUE`` overrides."""
    return [[f"{k}={v}" for (k, _), v in zip(axes, combo)] for combo in itertools.product(*(v for _, v in axes))]


def _slug(overrides: list[str]) -> str:
    """``["model.dropout=0.2", "train.lr=1e-3"]`` → ``"dropout=0.2-lr=1e-3"`` (last key part = value)."""
    short = [o.split("=", 1)[0].split(".")[-1] + "=" + o.split("=", 1)[1] for o in overrides]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(short))[:80]


def point_configs(grid: str, config: Path | None, model: str, overrides: list[str]
                  ) -> tuple[list[tuple[str, list[str]]], list[list[str]], Config, list[Config]]:
    """The grid's axes and points, the config without a point, and each point's run config: every key and
    value is validated here, before anything trains (an :class:`InputError` names the first bad one)."""
    axes = parse_grid(grid)
    points = grid_points(axes)
    base = load_config(config, model=model, overrides=list(overrides))  # the fixed keys, once
    cfgs = [load_config(config, model=model, overrides=[*overrides, *point, "train.eval_test=false"])
            for point in points]
    return axes, points, base, cfgs


def sweep(dataset: Path, model: str, grid: str, out: Path, *, config: Path | None = None,
          overrides: list[str] = (), emit_best: Path | None = None, quiet: bool = False,
          train_fn: Callable = engine_train, resume_fn: Callable = engine_resume,
          progress: Callable[[str], None] = print,
          clock: Callable[[], float] = time.monotonic) -> pd.DataFrame:
    """Train every grid point on ``dataset`` and rank them on validation. Returns the table.

    Before each point ``progress`` gets ``[k/N] POINT: training`` (or ``finished, reused``, ``unfinished,
    resuming from last.pt``: :func:`~m3bsr.compare.run_one`) and, once a point has trained, the ETA of
    the rest (:class:`~m3bsr.progress.RunProgress`, timed by ``clock``)."""
    axes, points, base, cfgs = point_configs(grid, config, model, list(overrides))
    import pandas as pd

    rows: list[dict[str, Any]] = []
    where = RunProgress(len(points), clock)
    for k, (point, cfg) in enumerate(zip(points, cfgs)):
        run_dir = out / "runs" / f"{k:03d}-{_slug(point)}"
        line = where.start(f"{base.model.name} {' '.join(point)}")
        metrics = run_one(cfg, dataset, run_dir, overwrite=False, quiet=quiet, train_fn=train_fn,
                          resume_fn=resume_fn, log=progress, done=where.finish, name=line)
        valid = metrics["valid"][base.train.monitor_protocol]
        row = {key: value for key, value in (p.split("=", 1) for p in point)}
        row.update({"run": run_dir.name, "best_epoch": metrics.get("best_epoch"),
                    "seconds_per_epoch": metrics.get("seconds_per_epoch")})
        row.update({f"valid_{m}": valid[m] for m in METRICS if m in valid})
        rows.append(row)
    progress(where.summary("grid points"))
    table = pd.DataFrame(rows).sort_values(f"valid_{base.train.monitor_metric}", ascending=False)
    atomic.write_text(out / "sweep.csv", table.to_csv(index=False))
    header = (f"# Sweep: {base.model.name} on {dataset}\n\nValidation only ({base.train.monitor_protocol} protocol), "
              f"ranked by {base.train.monitor_metric}. Test was not evaluated.\n\n")
    atomic.write_text(out / "sweep.md", header + _markdown(table) + "\n")
    if emit_best is not None:
        best = table.iloc[0]
        point = [f"{k}={best[k]}" for k, _ in axes]
        best_cfg: Config = load_config(config, model=model, overrides=[*overrides, *point])
        atomic.write_yaml(emit_best, best_cfg.to_dict())
    return table


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """CLI: ``m3bsr sweep --dataset DIR --model NAME --grid "..." --out DIR [--emit-best FILE]``."""
    point_configs(args.grid, args.config, args.model, args.sets)  # a bad key answers before --overwrite deletes
    if args.out.exists() and args.overwrite:
        import shutil

        shutil.rmtree(args.out)
    table = sweep(args.dataset, args.model, args.grid, args.out, config=args.config, overrides=args.sets,
                  emit_best=args.emit_best, quiet=args.quiet,
                  progress=lambda msg: print(f"sweep: {msg}", flush=True))  # under --quiet too
    print(_markdown(table))
    print(f"\nwrote {args.out / 'sweep.csv'} and {args.out / 'sweep.md'}"
          + (f"; best config → {args.emit_best}" if args.emit_best else ""))
    return 0
