"""m3bsr.arrow: numeric NumPy <-> Arrow conversions that leave pandas out (see its docstring)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from m3bsr.arrow import from_numpy, to_numpy


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.float32])
def test_round_trip_keeps_values_and_type(dtype):
    x = np.array([3, -1, 0, 7, 2], dtype=dtype)
    arr = from_numpy(x)
    assert arr.type == pa.from_numpy_dtype(np.dtype(dtype))
    assert arr.to_pylist() == x.tolist()
    back = to_numpy(pa.chunked_array([arr.slice(0, 2), arr.slice(2)]))  # several chunks, one with an offset
    assert back.dtype == dtype and np.array_equal(back, x)
    assert not back.flags.writeable  # a view of Arrow memory: consumers copy before writing


def test_from_numpy_takes_a_strided_view_and_an_empty_array():
    x = np.arange(10, dtype=np.int64)[::3]
    assert from_numpy(x).to_pylist() == [0, 3, 6, 9]
    assert len(from_numpy(np.zeros(0, np.int32))) == 0
    assert to_numpy(pa.chunked_array([], type=pa.int32())).shape == (0,)


def test_refusals_name_the_problem():
    with pytest.raises(TypeError, match="1-d numeric"):
        from_numpy(np.zeros((2, 2), np.int32))
    with pytest.raises(TypeError, match="1-d numeric"):
        from_numpy(np.array(["a"]))
    with pytest.raises(ValueError, match="int32 column with 1 nulls"):
        to_numpy(pa.array([1, None], pa.int32()))
    with pytest.raises(TypeError, match="numeric column, not string"):
        to_numpy(pa.array(["a"]))


def test_neither_direction_imports_pandas():
    script = ("import sys, numpy as np, pyarrow as pa\n"
              "from m3bsr.arrow import from_numpy, to_numpy\n"
              "t = pa.table({'a': from_numpy(np.arange(4))})\n"
              "assert to_numpy(t.column('a')).sum() == 6\n"
              "print('pandas' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
