"""``m3bsr export``: a trained run's item vectors, user vectors or every user's top-k, as one Parquet file.

Ids are original ids, as in ``recommend`` and ``serve``. What is written, per ``--what``:

* ``items``: ``item`` (string), ``vector`` (fixed-size list of float32, d), ``bias`` (float32; 0 when the
  model has none): the model's output table (Eq. 23), so ``score(u, i) = user_vector(u) . vector(i) +
  bias(i)`` for every model of the registry. M3BSR's repeat head adds a bonus to the items of the
  user's own history on top of that (docs/model.md); unseen items score exactly so.
* ``users``: ``user`` (string), ``vector`` (fixed-size list of float32, d): each user's representation at
  the latest position, just after their last event (the query ``recommend`` scores). A model whose user
  representation is the same constant for everyone (``pop``) has none: a one-line error.
* ``topk``: ``user``, ``rank``, ``item``, ``score``, as ``recommend --out FILE.parquet`` writes them, for
  every user of the prepared dataset (``exclude_seen`` masks every item the user interacted with).

Rows are produced in batches of users or items and streamed through one ``pyarrow.parquet.ParquetWriter``
(one row group per batch), so memory stays flat whatever the catalogue or user count; the file is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from m3bsr import atomic
from m3bsr.data.batches import latest_windows, user_history
from m3bsr.errors import input_error
from m3bsr.serving.recommend import Recommender

WHAT = ("items", "users", "topk")
DEFAULT_K = 10
DEFAULT_BATCH = 1024
TOPK_SCHEMA = pa.schema([("user", pa.string()), ("rank", pa.int64()), ("item", pa.string()),
                         ("score", pa.float64())])


def vector_schema(id_name: str, d: int, bias: bool = False) -> pa.Schema:
    """``id_name`` (string), ``vector`` (fixed-size list of ``d`` float32) and, for items, ``bias`` (float32)."""
    fields = [(id_name, pa.string()), ("vector", pa.list_(pa.float32(), d))]
    return pa.schema(fields + ([("bias", pa.float32())] if bias else []))


def _vectors(x: np.ndarray) -> pa.FixedSizeListArray:
    """[n, d] float32 → a fixed-size list array of n rows."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def _original_users(rec: Recommender) -> tuple[np.ndarray, np.ndarray]:
    """``(dense [U], original [U] as str)`` of every user, in dense-id order."""
    users = rec.dataset.users.sort_values("user")
    return users["user"].to_numpy().astype(np.int64), users["original"].astype(str).to_numpy()


def item_batches(rec: Recommender, batch_size: int = DEFAULT_BATCH) -> Iterator[pa.Table]:
    """Item vectors and biases as scored (items 1..n, original ids), ``batch_size`` items per table."""
    model = rec.model
    with torch.inference_mode():
        d = model.output_rows(torch.ones(1, dtype=torch.long, device=rec.device))[0].shape[-1]
        schema = vector_schema("item", d, bias=True)
        for lo in range(1, rec.n_items + 1, batch_size):
            ids = torch.arange(lo, min(rec.n_items + 1, lo + batch_size), device=rec.device)
            weight, bias = model.output_rows(ids)
            weight = weight.float().cpu().numpy()
            bias = np.zeros(len(ids), np.float32) if bias is None else bias.float().cpu().numpy()
            names = rec._item_original[ids.cpu().numpy()]
            yield pa.Table.from_arrays([pa.array(names, pa.string()), _vectors(weight), pa.array(bias, pa.float32())],
                                       schema=schema)


def user_batches(rec: Recommender, batch_size: int = DEFAULT_BATCH, where: str = "--what users") -> Iterator[pa.Table]:
    """Every user's vector at the latest position (original ids), ``batch_size`` users per table."""
    model = rec.model
    if not type(model).user_vectors:
        raise input_error(f"{where}", f"model {rec.cfg.model.name!r} has no user vectors (every user gets the "
                          "same ranking)", "Export --what items or --what topk instead")
    dense, original = _original_users(rec)
    schema = None
    for lo in range(0, len(dense), batch_size):
        users = dense[lo:lo + batch_size]
        windows = latest_windows([user_history(rec.builder, int(u)) for u in users], rec.max_len, users=users)
        batch = windows.batch(slice(None), trim=True).to(rec.device)
        with torch.inference_mode():
            reps = rec._represent(batch)[:, 0, :].float().cpu().numpy()  # [B, d]
        schema = schema or vector_schema("user", reps.shape[1])
        yield pa.Table.from_arrays([pa.array(original[lo:lo + batch_size], pa.string()), _vectors(reps)],
                                   schema=schema)


def topk_batches(rec: Recommender, k: int = DEFAULT_K, exclude_seen: bool = False,
                 batch_size: int = DEFAULT_BATCH) -> Iterator[pa.Table]:
    """Every user's top-``k`` (``user``, ``rank``, ``item``, ``score``), ``batch_size`` users per table."""
    dense, original = _original_users(rec)
    for lo in range(0, len(dense), batch_size):
        users = dense[lo:lo + batch_size]
        results = rec.top_k([user_history(rec.builder, int(u)) for u in users], k, exclude_seen, users=users)
        cols: dict[str, list] = {"user": [], "rank": [], "item": [], "score": []}
        for name, recs in zip(original[lo:lo + batch_size], results):
            for rank, r in enumerate(recs, start=1):
                cols["user"].append(name)
                cols["rank"].append(rank)
                cols["item"].append(r.item)
                cols["score"].append(r.score)
        yield pa.Table.from_pydict(cols, schema=TOPK_SCHEMA)


def export(rec: Recommender, what: str, out: str | Path, *, k: int = DEFAULT_K, exclude_seen: bool = False,
           batch_size: int = DEFAULT_BATCH) -> int:
    """Write ``what`` (``items``, ``users`` or ``topk``) of ``rec`` to the Parquet file ``out``, batch by batch,
    atomically. Returns the number of rows written."""
    if what not in WHAT:
        raise input_error(f"--what {what}", "unknown export", f"Choose one of: {', '.join(WHAT)}")
    if batch_size < 1:
        raise input_error(f"--batch-size {batch_size}", "must be at least 1", "Pass a positive batch size")
    if k < 1:
        raise input_error(f"--k {k}", "k must be at least 1", "Pass a positive --k")
    tables = {"items": lambda: item_batches(rec, batch_size), "users": lambda: user_batches(rec, batch_size),
              "topk": lambda: topk_batches(rec, k, exclude_seen, batch_size)}[what]()
    first = next(tables, None)  # a refusal (pop's users) comes before any file is created
    rows = 0
    with atomic.atomic_file(out) as tmp:
        schema = first.schema if first is not None else TOPK_SCHEMA
        with pq.ParquetWriter(tmp, schema) as writer:
            for table in ([first] if first is not None else []):
                writer.write_table(table)
                rows += table.num_rows
            for table in tables:
                writer.write_table(table)
                rows += table.num_rows
    return rows


def main(args: argparse.Namespace) -> int:
    """``m3bsr export RUN_DIR --what items|users|topk [--k K] [--exclude-seen] --out FILE.parquet``."""
    if args.out.suffix.lower() != ".parquet":
        raise input_error(f"--out {args.out}", "export writes Parquet", "Use a .parquet file name")
    if args.what != "topk" and (args.k is not None or args.exclude_seen):
        flag = "--k" if args.k is not None else "--exclude-seen"
        raise input_error(f"{flag} with --what {args.what}", "applies to --what topk only", f"Drop {flag}")
    rec = Recommender.from_run(args.run_dir)
    rows = export(rec, args.what, args.out, k=DEFAULT_K if args.k is None else args.k,
                  exclude_seen=args.exclude_seen, batch_size=args.batch_size)
    if not args.quiet:
        print(f"wrote {rows} rows ({args.what}) to {args.out}", file=sys.stderr)
    return 0
