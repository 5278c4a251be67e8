"""NumPy <-> Arrow for numeric columns, without importing pandas.

Why: pyarrow's own conversions (``Array.to_numpy``, ``pa.array(ndarray)``, ``pa.table({...: ndarray})``)
import pandas, when it is installed, to set up their pandas types, even for plain integers. A training
process reads and writes only numeric columns without nulls, and pandas costs it about 40 MB of
resident memory (docs/training.md). These two go through DLPack and raw buffers instead.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric Arrow column without nulls as a read-only NumPy array [rows] (zero-copy for one chunk).

    Raises ``TypeError`` for a non-numeric column, ``ValueError`` for one with nulls."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise TypeError(f"to_numpy takes a numeric column, not {column.type}")
    if column.null_count:
        raise ValueError(f"a {column.type} column with {column.null_count} nulls has no NumPy form without them")
    return np.from_dlpack(column)


def from_numpy(values: np.ndarray) -> pa.Array:
    """A 1-d numeric NumPy array [rows] as an Arrow array of the same type (it keeps ``values`` alive)."""
    values = np.ascontiguousarray(values)
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise TypeError(f"from_numpy takes a 1-d numeric array, not {values.ndim}-d {values.dtype}")
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])
