"""Bad rows of an input file, collected by every check so that one run reports them all.

``prepare`` (and ``m3bsr features text``, for its item table) handles them by ``on_bad_rows``:
``error`` fails listing the first :data:`BAD_ROWS_SHOWN`, ``report`` lists up to
:data:`BAD_ROWS_REPORTED` and writes nothing, ``drop`` drops them and counts them per reason. Row
numbers are 1-based data rows in messages (the header is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from m3bsr.errors import InputError, input_error


BAD_ROWS_SHOWN = 20
"""Bad rows a failing ``prepare`` lists in its one-line error (the rest are counted)."""
BAD_ROWS_REPORTED = 1000
"""Bad rows ``--on-bad-rows report`` lists (the rest are counted)."""
DROP_HINT = "or pass --on-bad-rows drop to drop and count them (--on-bad-rows report lists them all)"


@dataclass
class _BadGroup:
    rows: np.ndarray  # 0-based data rows [N]
    column: str
    reason: str
    template: str
    values: np.ndarray | None
    fix: str


class BadRows:
    """Every bad row of one input file: each check adds the rows it rejects, so nothing fails before
    the whole file has been checked.

    Rows are 0-based **data** rows (the header is not counted, nor are blank CSV lines); messages show
    them 1-based. A row can be bad for several reasons: each reason counts it, ``rows()`` once.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self._groups: list[_BadGroup] = []

    def add(self, rows: np.ndarray, column: str, reason: str, fix: str, template: str | None = None,
            values: Any = None) -> None:
        """Record ``rows`` [N] (0-based data rows) as bad in ``column`` for ``reason`` (a short fixed text,
        counted); ``template.format(value)`` with ``values`` [N] words each row (default: the reason)."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return
        order = np.argsort(rows, kind="stable")
        vals = None if values is None else np.asarray(values, dtype=object)[order]
        self._groups.append(_BadGroup(rows[order], column, reason, template or reason, vals, fix))

    def rows(self) -> np.ndarray:
        """Sorted unique bad data rows (0-based) [N]."""
        if not self._groups:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate([g.rows for g in self._groups]))

    def __len__(self) -> int:
        return len(self.rows())

    def counts(self) -> dict[str, int]:
        """``{reason: rows}`` in the order the checks ran."""
        out: dict[str, int] = {}
        for g in self._groups:
            out[g.reason] = out.get(g.reason, 0) + len(g.rows)
        return out

    def _first(self, limit: int) -> list[tuple[int, _BadGroup, int]]:
        """Up to ``limit`` (row, group, position in group), by row then check order."""
        picked = [(int(r), k, j) for k, g in enumerate(self._groups) for j, r in enumerate(g.rows[:limit])]
        picked.sort()
        return [(r, self._groups[k], j) for r, k, j in picked[:limit]]

    @staticmethod
    def _detail(g: _BadGroup, j: int) -> str:
        return g.template.format(g.values[j]) if g.values is not None else g.template

    def lines(self, limit: int) -> list[str]:
        """``'<file> row N (column 'c'): <what is wrong>'`` for the first ``limit`` bad rows."""
        return [f"{self.where} row {r + 1}" + (f" (column {g.column!r})" if g.column else "")
                + f": {self._detail(g, j)}" for r, g, j in self._first(limit)]

    def error(self) -> InputError:
        """One line: the only bad row with its fix, or the first :data:`BAD_ROWS_SHOWN` and how many more."""
        first = self._first(BAD_ROWS_SHOWN)
        if len(self._groups) == 1 and len(first) == 1 and len(self._groups[0].rows) == 1:
            r, g, j = first[0]
            return input_error(f"{self.where} row {r + 1}", self._detail(g, j), g.fix)
        n = sum(len(g.rows) for g in self._groups)  # problems; a row may have several
        listed = "; ".join(f"row {r + 1}" + (f" ({g.column})" if g.column else "") + f": {self._detail(g, j)}"
                           for r, g, j in first)
        more = f"; and {n - len(first):,} more" if n > len(first) else ""
        counts = ", ".join(f"{c:,} {reason}" for reason, c in self.counts().items())
        fixes = "; ".join(dict.fromkeys(g.fix.rstrip(".") for g in self._groups))
        return input_error(self.where, f"{len(self):,} bad rows ({counts}; data rows, header not counted): "
                           f"{listed}{more}", f"{fixes}; {DROP_HINT}")

    def raise_if_any(self) -> None:
        """Raise :meth:`error` when any row is bad."""
        if self._groups:
            raise self.error()
