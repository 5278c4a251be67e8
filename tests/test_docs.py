"""The Markdown docs render: every table row has as many cells as its header (a bare `|` inside a
cell, e.g. ``int | None``, splits it; write ``\\|``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
CELL_SPLIT = re.compile(r"(?<!\\)\|")


def table_rows_with_wrong_width(text: str) -> list[tuple[int, int, int]]:
    """``(line, cells, header cells)`` of every table row whose cell count differs from its header's."""
    bad, width, fenced = [], None, False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced, width = not fenced, None
            continue
        if fenced or not line.lstrip().startswith("|"):
            width = None
            continue
        cells = len(CELL_SPLIT.split(line.strip().strip("|"))) if line.strip() != "|" else 0
        if width is None:
            width = cells
        elif cells != width:
            bad.append((number, cells, width))
    return bad


def test_checker_catches_an_unescaped_pipe():
    table = "| key | type |\n|---|---|\n| `a` | int | None |\n| `b` | int \\| None |\n"
    assert table_rows_with_wrong_width(table) == [(3, 3, 2)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_tables_are_well_formed(doc):
    assert table_rows_with_wrong_width(doc.read_text()) == [], f"{doc.name}: escape '|' inside cells as '\\|'"
