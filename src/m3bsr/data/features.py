"""Item feature matrices keyed by ORIGINAL item id → aligned ``[n_items + 1, D]`` float32 plus a mask.

Accepted files (any width D):

* Parquet with columns ``item`` (id) and ``embedding`` (list / fixed-size list of float);
* safetensors with tensors ``ids`` (int64 [N]) and ``features`` (float32 [N, D]);
* ``.npy`` float32 [N, D] plus a sidecar ``<same path>.ids`` text file, one original id per line.

Items of the catalogue without a row are masked (``mask[i] = False``, row zero), never silently
zero-but-valid. Rows for items outside the catalogue are ignored (counted). NaN/inf values,
ragged widths, ids/rows count mismatches and duplicate ids are one-line :class:`InputError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from m3bsr.errors import input_error


def _from_parquet(path: Path) -> tuple[list[str], np.ndarray]:
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
    if emb.null_count:
        row = int(np.flatnonzero(emb.is_null().to_numpy(zero_copy_only=False))[0])
        raise input_error(f"{path} row {row + 1}", "empty embedding", "Drop the row; a missing item is masked")
    lengths = (np.full(len(emb), emb.type.list_size) if pa.types.is_fixed_size_list(emb.type)
               else np.diff(emb.offsets.to_numpy()))
    if len(lengths) and (lengths != lengths[0]).any():
        row = int(np.flatnonzero(lengths != lengths[0])[0])
        raise input_error(f"{path} row {row + 1}", f"embedding width {lengths[row]}, row 1 has {lengths[0]}",
                          "All embeddings of a modality need the same width")
    width = int(lengths[0]) if len(lengths) else 0
    flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    ids = [str(x) for x in t.column("item").to_pylist()]
    return ids, flat.reshape(len(ids), width)


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


def read_feature_file(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Original ids [N] (str) and float32 features [N, D]; validates finiteness and duplicates."""
    path = Path(path)
    if not path.is_file():
        raise input_error(str(path), "feature file not found", "Check features.<modality>=PATH")
    name = path.name.lower()
    if name.endswith(".parquet"):
        ids, x = _from_parquet(path)
    elif name.endswith(".safetensors"):
        ids, x = _from_safetensors(path)
    elif name.endswith(".npy"):
        ids, x = _from_npy(path)
    else:
        raise input_error(str(path), "unknown feature file type", "Use .parquet, .safetensors or .npy + .ids")
    if len(ids) == 0 or x.shape[1] == 0:
        raise input_error(str(path), "no feature rows or zero width", "Write at least one [D > 0] row")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise input_error(f"{path} row {row + 1}", f"NaN/inf in the features of item {ids[row]!r}",
                          "Fix the encoder output or drop the row (the item is then masked)")
    s = pd.Series(ids)
    dup = s.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        first = int(np.flatnonzero((s == ids[row]).to_numpy())[0])
        raise input_error(f"{path} row {row + 1}", f"duplicate item id {ids[row]!r} (also row {first + 1})",
                          "Keep one row per item")
    return ids, x


def align_features(path: str | Path, item_original: list[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load ``path`` and place row ``k`` at the dense id of its original id.

    ``item_original[j]`` is the original id of dense item ``j + 1``. Returns ``features``
    [n_items + 1, D] float32 (row 0 and missing rows zero), ``mask`` [n_items + 1] bool and counts.
    """
    ids, x = read_feature_file(path)
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
