"""``m3bsr features text|image``: flags → encoder → feature file + provenance sidecar.

Inputs are checked (table columns, ids, image folder, output suffix) before a model is loaded, so
user errors fail in well under a second. Summary and missing-item lines go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from m3bsr import __version__
from m3bsr.data.bad_rows import BAD_ROWS_REPORTED, BadRows
from m3bsr.encoders import check_ids, output_format, package_versions, write_features, write_provenance
from m3bsr.errors import input_error

SHOW_IDS = 10  # ids listed on stderr; the sidecar lists all


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _batch_size(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise input_error("--batch-size", f"{args.batch_size} is not a positive integer", "Pass e.g. --batch-size 32")
    return int(args.batch_size)


def _say(line: str) -> None:
    print(f"m3bsr features: {line}", file=sys.stderr)


def _left_out(ids: list[str], what: str, total: int, sidecar: Path) -> None:
    if ids:
        shown = ", ".join(ids[:SHOW_IDS]) + (", ..." if len(ids) > SHOW_IDS else "")
        _say(f"{len(ids)} of {total} items {what} and are left out (masked downstream): {shown} "
             f"(all ids in {sidecar})")


def _finish(args: argparse.Namespace, ids: list[str], x: Any, record: dict[str, Any], t0: float) -> int:
    files = write_features(args.out, ids, x)
    record.update(output=str(args.out), format=output_format(args.out).lstrip("."),
                  files=[str(f) for f in files], width=int(x.shape[1]), items_encoded=len(ids),
                  seconds=round(time.perf_counter() - t0, 2))
    sidecar = write_provenance(args.out, record)
    if not args.quiet:
        _say(f"wrote {len(ids)} x {x.shape[1]} features to {args.out} in {record['seconds']} s "
             f"(provenance: {sidecar})")
    return 0


def _base_record(modality: str, encoder: str, packages: list[str], device: str, batch_size: int) -> dict[str, Any]:
    return {"modality": modality, "encoder": encoder,
            "versions": {"m3bsr": __version__, **package_versions(packages)},
            "device": device, "batch_size": batch_size,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _report(bad: BadRows) -> int:
    """``--on-bad-rows report``: the bad rows (up to BAD_ROWS_REPORTED) and their counts on stdout; no
    model is loaded and nothing is written. Exit code 1 when any row is bad."""
    if not len(bad):
        print(f"{bad.where}: no bad rows (nothing written)")
        return 0
    lines = bad.lines(BAD_ROWS_REPORTED)
    print("\n".join(lines))
    problems = sum(bad.counts().values())
    if problems > len(lines):
        print(f"... and {problems - len(lines):,} more")
    print(f"{bad.where}: {len(bad):,} bad rows (" + ", ".join(f"{n:,} {r}" for r, n in bad.counts().items())
          + "; data rows, header not counted); nothing written")
    return 1


def run_text(args: argparse.Namespace) -> int:
    """``features text ITEMS --columns a,b --id-column item --out FILE``."""
    from m3bsr.encoders import text

    t0 = time.perf_counter()
    batch_size = _batch_size(args)
    fmt = output_format(args.out)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    bad = BadRows(str(args.items))
    table = text.read_item_texts(args.items, columns, args.id_column, bad)
    if args.on_bad_rows == "report":
        return _report(bad)
    if args.on_bad_rows == "error":
        bad.raise_if_any()
    elif len(bad):
        _say(f"dropped {len(bad):,} bad rows of {args.items}: "
             + ", ".join(f"{n:,} {reason}" for reason, n in bad.counts().items()))
    check_ids(table.ids + table.missing, fmt, str(args.items))
    sidecar = Path(str(args.out) + ".json")
    if not table.ids:
        raise input_error(str(args.items), f"all {table.n_rows} items have empty text in columns "
                          f"{','.join(columns)}", "Pass --columns that hold the item text")
    device = _device()
    encoder = text.TextEncoder(device, progress=not args.quiet)
    x = text.encode_texts(encoder, table.texts, batch_size, progress=not args.quiet)
    record = _base_record("text", text.MODEL_NAME, text.PACKAGES, device, batch_size)
    record.update(input=str(args.items), columns=columns, id_column=args.id_column,
                  preprocessing=f"non-empty columns joined as sentences; max {text.MAX_TOKENS} tokens; "
                  "mean pooling over tokens; L2-normalised",
                  missing={"count": len(table.missing), "reason": "no text in any column", "ids": table.missing},
                  partial={"count": len(table.partial), "reason": "text in only some columns",
                           "ids": table.partial},
                  bad_rows_dropped={"rows": len(bad), "reasons": bad.counts()})
    _left_out(table.missing, f"have no text in {','.join(columns)}", table.n_rows, sidecar)
    return _finish(args, table.ids, x, record, t0)


def run_image(args: argparse.Namespace) -> int:
    """``features image DIR --out FILE``."""
    from m3bsr.encoders import image

    t0 = time.perf_counter()
    batch_size = _batch_size(args)
    fmt = output_format(args.out)
    paths, ignored = image.list_images(args.images)
    check_ids([p.stem for p in paths], fmt, str(args.images))
    sidecar = Path(str(args.out) + ".json")
    if ignored:
        _say(f"ignored {len(ignored)} files without an image suffix: {', '.join(ignored[:SHOW_IDS])}"
             + (", ..." if len(ignored) > SHOW_IDS else ""))
    undecodable: dict[str, str] = {}
    for path in paths:  # fail on a folder of non-images before the model (and its optional packages) loads
        try:
            image.load_pixels(path)
            break
        except image.UnreadableImage as e:
            undecodable[path.stem] = str(e)
    else:
        if undecodable:
            image.check_any_decoded(args.images, [], undecodable)
    device = _device()
    encoder = image.ImageEncoder(device)
    ids, x, missing = image.encode_images(encoder, paths, batch_size, progress=not args.quiet)
    image.check_any_decoded(args.images, ids, missing)
    record = _base_record("image", image.MODEL_NAME, image.PACKAGES, device, batch_size)
    record.update(input=str(args.images),
                  preprocessing=f"Pillow decode, RGB, resize {image.SIZE}x{image.SIZE} bicubic (no crop), "
                  "(x - 127) / 128, channels_last; mean of extract_features over H, W",
                  missing={"count": len(missing), "reason": "image file could not be decoded",
                           "ids": list(missing), "errors": missing},
                  ignored_files=ignored)
    _left_out(list(missing), "have an unreadable image", len(paths), sidecar)
    return _finish(args, ids, x, record, t0)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``m3bsr features``; returns the exit code."""
    if args.modality == "text":
        return run_text(args)
    if args.modality == "image":
        return run_image(args)
    raise AssertionError(args.modality)
