"""Item feature matrices keyed by ORIGINAL item id → aligned ``[n_items + 1, D]`` float32 plus a mask.

Accepted files (any width D):

* Parquet with columns ``item`` (id) and ``embedding`` (list / fixed-size list of float);
* safetensors with tensors ``ids`` (int64 [N]) and ``features`` (float32 [N, D]);
* ``.npy`` float32 [N, D] plus a sidecar ``<same path>.ids`` text file, one original id per line.

Items of the catalogue without a row are masked (``mask[i] = False``, row zero), never silently
zero-but-valid. Rows for items outside the catalogue are ignored (counted). Ragged widths and
ids/rows count mismatches are one-line :class:`InputError`; rows with NaN/inf values, an empty
embedding or a repeated id are bad rows (:class:`~m3bsr.data.bad_rows.BadRows`): an error listing
them, or left out (their item is then masked; a repeated id keeps its first row).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from m3bsr.data.bad_rows import BadRows
from m3bsr.errors import input_error


def _from_parquet(path: Path, bad: BadRows) -> tuple[list[str], np.ndarray]:
    try:
        t = pq.read_table(path)
    except Exception as e:  # corrupt Parquet raises several pyarrow types
        raise input_error(str(path), f"not a readable Parquet file ({type(e).__name__})", "Re-export it") from None
    for col in ("item", "embedding"):
        if col not in t.column_names:
            raise input_error(str(path), f"missing column {col!r} (found: {', '.join(t.column_names)})",
                              "Feature Parquet files need columns `item` and `embedding`")
    emb = t.column("embedding").combine_chunks()
    if not (pa.types.is_list(emb.type) or pa.types.is_fixed_size_list(emb.type)
            or pa.types.is_large_list(emb.type)):
        raise input_error(f"{path} column 'embedding'", f"type {emb.type} is not a list of floats",
                          "Store one list<float32> per item")
    null = emb.is_null().to_numpy(zero_copy_only=False)
    bad.add(np.flatnonzero(null), "embedding", "empty embeddings", "Drop the row; a missing item is masked",
            template="empty embedding")
    lengths = (np.full(len(emb), emb.type.list_size) if pa.types.is_fixed_size_list(emb.type)
               else np.diff(emb.offsets.to_numpy()))
    good = np.flatnonzero(~null)
    if len(good) and (lengths[good] != lengths[good[0]]).any():
        row = int(good[lengths[good] != lengths[good[0]]][0])
        raise input_error(f"{path} row {row + 1}", f"embedding width {lengths[row]}, row {good[0] + 1} has "
                          f"{lengths[good[0]]}", "All embeddings of a modality need the same width")
    width = int(lengths[good[0]]) if len(good) else 0
    x = np.full((len(emb), width), np.nan, np.float32)  # empty rows stay NaN; they are already bad
    x[good] = emb.filter(pa.array(~null)).flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(
        len(good), width)
    ids = [str(x) for x in t.column("item").to_pylist()]
    return ids, x


def _from_safetensors(path: Path) -> tuple[list[str], np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise input_error(str(path), f"not a readable safetensors file ({e})", "Re-export it") from None
    for key in ("ids", "features"):
        if key not in tensors:
            raise input_error(str(path), f"missing tensor {key!r} (found: {', '.join(tensors)})",
                              "Store tensors `ids` int64 [N] and `features` float32 [N, D]")
    ids, x = tensors["ids"], tensors["features"]
    if ids.ndim != 1 or x.ndim != 2:
        raise input_error(str(path), f"shapes ids {list(ids.shape)}, features {list(x.shape)}",
                          "Need ids [N] and features [N, D]")
    if ids.dtype.kind not in "iu":
        raise input_error(str(path), f"ids dtype {ids.dtype} is not an integer type", "Store ids as int64")
    if len(ids) != len(x):
        raise input_error(str(path), f"{len(ids)} ids but {len(x)} feature rows", "One id per row")
    return [str(int(i)) for i in ids], x.astype(np.float32)


def _from_npy(path: Path) -> tuple[list[str], np.ndarray]:
    sidecar = Path(str(path) + ".ids")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise input_error(str(path), f"not a readable .npy array ({e})", "Save it with numpy.save") from None
    if x.ndim != 2:
        raise input_error(str(path), f"array shape {list(x.shape)} is not [N, D]", "Save a 2-d float32 array")
    if not sidecar.is_file():
        raise input_error(str(path), f"no sidecar id file {sidecar.name}", "Write one original item id per line "
                          "into <file>.ids")
    ids = [line.strip() for line in sidecar.read_text().splitlines()]
    while ids and ids[-1] == "":
        ids.pop()
    if "" in ids:
        raise input_error(f"{sidecar} line {ids.index('') + 1}", "empty item id", "One id per line")
    if len(ids) != len(x):
        raise input_error(str(sidecar), f"{len(ids)} ids but {len(x)} rows in {path.name}", "One id per row")
    return ids, x.astype(np.float32)


def read_feature_file(path: str | Path, bad: BadRows | None = None) -> tuple[list[str], np.ndarray]:
    """Original ids [N] (str) and float32 features [N, D] of the good rows; rows with NaN/inf, an empty
    embedding or a repeated id go to ``bad`` (rows = 0-based rows of the file) and are left out, or
    without ``bad`` are an error listing them."""
    path = Path(path)
    own = bad is None
    bad = BadRows(str(path)) if bad is None else bad
    if not path.is_file():
        raise input_error(str(path), "feature file not found", "Check features.<modality>=PATH")
    name = path.name.lower()
    if name.endswith(".parquet"):
        ids, x = _from_parquet(path, bad)
    elif name.endswith(".safetensors"):
        ids, x = _from_safetensors(path)
    elif name.endswith(".npy"):
        ids, x = _from_npy(path)
    else:
        raise input_error(str(path), "unknown feature file type", "Use .parquet, .safetensors or .npy + .ids")
    if len(ids) == 0 or x.shape[1] == 0:
        raise input_error(str(path), "no feature rows or zero width", "Write at least one [D > 0] row")
    column = {".parquet": "embedding", ".safetensors": "features"}.get(path.suffix.lower(), "")
    done = np.zeros(len(ids), bool)
    done[bad.rows()] = True
    nonfinite = ~np.isfinite(x).all(axis=1) & ~done
    bad.add(np.flatnonzero(nonfinite), column, "non-finite features", "Fix the encoder output or drop the row "
            "(the item is then masked)", template="NaN/inf in the features of item {!r}",
            values=np.asarray(ids, dtype=object)[nonfinite])
    done |= nonfinite
    s = pd.Series(ids)
    first = pd.Series(np.arange(len(ids))).groupby(s.to_numpy(), sort=False).transform("min").to_numpy()
    dup = np.zeros(len(ids), bool)
    dup[~done] = s[~done].duplicated().to_numpy()  # the first good row of an id stays
    bad.add(np.flatnonzero(dup), {"embedding": "item", "features": "ids"}.get(column, ""), "duplicate item ids",
            "Keep one row per item", template="{}", values=[f"duplicate item id {ids[k]!r} (also row {first[k] + 1})"
                                                            for k in np.flatnonzero(dup)])
    if own:
        bad.raise_if_any()
    keep = ~(done | dup)
    return [i for i, k in zip(ids, keep) if k], x[keep]


def align_features(path: str | Path, item_original: list[str] | np.ndarray, bad: BadRows | None = None
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load ``path`` and place row ``k`` at the dense id of its original id.

    ``item_original[j]`` is the original id of dense item ``j + 1``. Returns ``features``
    [n_items + 1, D] float32 (row 0 and missing rows zero), ``mask`` [n_items + 1] bool and counts.
    Bad rows are left out and added to ``bad`` (see :func:`read_feature_file`).
    """
    ids, x = read_feature_file(path, bad)
    out, mask = features_from_array(ids, x, item_original)
    used = int(mask.sum())
    counts = {"file": str(path), "dim": int(x.shape[1]), "rows": int(len(ids)),
              "unused_rows": int(len(ids) - used), "missing_items": int(len(item_original) - used)}
    return out, mask, counts


def features_from_array(ids: list[str], x: np.ndarray, item_original: list[str] | np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Same alignment for in-memory features (the synthetic generator)."""
    dense = pd.Series(np.arange(1, len(item_original) + 1), index=pd.Index([str(o) for o in item_original]))
    pos = dense.reindex([str(i) for i in ids]).to_numpy()
    hit = ~np.isnan(pos)
    rows = pos[hit].astype(np.int64)
    out = np.zeros((len(item_original) + 1, x.shape[1]), np.float32)
    mask = np.zeros(len(item_original) + 1, bool)
    out[rows] = x[hit]
    mask[rows] = True
    return out, mask
