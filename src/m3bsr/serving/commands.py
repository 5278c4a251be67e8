"""CLI entry points ``m3bsr recommend`` and ``m3bsr serve`` (flags → :class:`Recommender` / app)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

from m3bsr import atomic
from m3bsr.errors import input_error

COLUMNS = ["user", "rank", "item", "score"]
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}  # --out suffix → format
DEFAULT_THREADS = max(1, min(4, (os.cpu_count() or 1) // 2))
"""torch intra-op threads of the service: half the cores (at most 4), so the event loop, the HTTP
parsing and co-located clients keep cores; oversubscribed OpenMP threads spin and slow every
forward pass by an order of magnitude on a busy machine."""


def read_user_file(path: Path) -> list[str]:
    """User ids, one per line (blank lines and ``#`` comments skipped)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise input_error(str(path), "file not found", "Check the --users path") from None
    except UnicodeDecodeError:
        raise input_error(str(path), "not a UTF-8 text file", "Write one user id per line") from None
    users = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not users:
        raise input_error(str(path), "no user ids", "Write one user id per line")
    return users


def format_rows(rows: list[dict], fmt: str) -> str | bytes:
    """Rows of :data:`COLUMNS` as CSV (with header), JSON lines, or Parquet bytes (ids as strings)."""
    if fmt == "parquet":
        import pandas as pd

        buf = io.BytesIO()
        table = pd.DataFrame(rows, columns=COLUMNS).astype({"user": str, "rank": "int64", "item": str,
                                                             "score": "float64"})
        table.to_parquet(buf, index=False)
        return buf.getvalue()
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _recommend(args: argparse.Namespace) -> int:
    from m3bsr.serving.recommend import Recommender

    if (args.user is None) == (args.users is None):
        raise input_error("recommend", "give exactly one of --user ID or --users FILE",
                          "e.g. m3bsr recommend RUN_DIR --user 42")
    if args.k < 1:
        raise input_error(f"--k {args.k}", "k must be at least 1", "Pass a positive --k")
    fmt = "csv"
    if args.out is not None:
        fmt = FORMATS.get(args.out.suffix.lower(), "")
        if not fmt:
            raise input_error(f"--out {args.out}", "unknown output format",
                              "Use a .csv, .jsonl or .parquet file name")
    users = [args.user] if args.user is not None else read_user_file(args.users)
    rec = Recommender.from_run(args.run_dir)
    for line, u in enumerate(users, start=1):
        if not rec.has_user(u):
            where = f"--user {u!r}" if args.user is not None else f"{args.users} line {line}: user {u!r}"
            raise input_error(where, "unknown user (not in the run's prepared dataset)",
                              "Use an original user id from the training data")
    results = rec.recommend_users(users, args.k, args.exclude_seen)
    rows = [{"user": u, "rank": r, "item": x.item, "score": x.score}
            for u, recs in zip(users, results) for r, x in enumerate(recs, start=1)]
    data = format_rows(rows, fmt)
    if args.out is None:
        sys.stdout.write(data)
    else:
        (atomic.write_bytes if isinstance(data, bytes) else atomic.write_text)(args.out, data)
        if not args.quiet:
            print(f"wrote {len(rows)} rows for {len(users)} users to {args.out}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn
    from pydantic import ValidationError

    from m3bsr.serving.app import MAX_BODY_BYTES, BatchingConfig, create_app
    from m3bsr.serving.recommend import Recommender

    if not 0 <= args.port <= 65535:
        raise input_error(f"--port {args.port}", "not a TCP port", "Use 1-65535 (0 picks a free one)")
    threads = DEFAULT_THREADS if args.threads is None else args.threads
    if threads < 1:
        raise input_error(f"--threads {threads}", "must be at least 1", "Pass a positive thread count")
    knobs = {k: v for k, v in (("max_batch", args.max_batch), ("max_wait_ms", args.max_wait_ms)) if v is not None}
    try:
        batching = BatchingConfig(**knobs)
    except ValidationError as e:
        first = e.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-")
        raise input_error(f"{flag} {first['input']}", first["msg"], "See m3bsr serve --help") from None
    max_body_bytes = MAX_BODY_BYTES if args.max_body_kb is None else args.max_body_kb * 1024
    if max_body_bytes < 1024:
        raise input_error(f"--max-body-kb {args.max_body_kb}", "must be at least 1", "Pass a positive size in KiB")
    torch.set_num_threads(threads)
    app = create_app(Recommender.from_run(args.run_dir, compile=args.compile), batching, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                access_log=not args.quiet)
    return 0


def main(args: argparse.Namespace) -> int:
    """Dispatch ``recommend`` / ``serve``."""
    if args.command == "recommend":
        return _recommend(args)
    if args.command == "serve":
        return _serve(args)
    raise AssertionError(args.command)
