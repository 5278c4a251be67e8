"""The Markdown docs render: every table row has as many cells as its header (a bare `|` inside a
cell, e.g. ``int | None``, splits it; write ``\\|``). docs/model.md's equation map points at lines
that cite their equation."""

from __future__ import annotations

import ast
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


MODEL_DOC = ROOT / "docs" / "model.md"
SRC = ROOT / "src" / "m3bsr"
LINE_REF = re.compile(r"`(models/\w+\.py):(\d+)` \(`([\w.]+)`\)")
EQ_CITE = re.compile(r"Eq\. ?(\d+(?:\s*(?:-|/|,|and)\s*\d+)*)")


def _equations(text: str) -> set[int]:
    """``"6-10"`` → {6..10}; ``"10 / 13"``, ``"10, 13"``, ``"10 and 13"`` → {10, 13}."""
    out: set[int] = set()
    for part in re.split(r"\s*(?:/|,|and)\s*", text.strip()):
        lo, _, hi = part.partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def _spans(source: str) -> dict[str, tuple[int, int]]:
    """Qualified name of every class and function → (first line, last line)."""
    spans: dict[str, tuple[int, int]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef)):
                spans[prefix + child.name] = (child.lineno, child.end_lineno)
                visit(child, prefix + child.name + ".")

    visit(ast.parse(source), "")
    return spans


def equation_map_errors(doc: str, src: Path) -> list[str]:
    """What is wrong with the "Equation → line" table of ``doc``: a line that cites none of its row's
    equations or lies outside the named function, a row without a line, an equation 3-25 missing."""
    section = doc.split("## Equation → line", 1)[1].split("\n## ", 1)[0]
    errors, covered = [], set()
    for row in section.splitlines():
        if not row.startswith("| ") or row.startswith("| Eq."):
            continue
        equations = _equations(row.split("|")[1])
        covered |= equations
        refs = LINE_REF.findall(row)
        if not refs:
            errors.append(f"row Eq. {sorted(equations)} names no line")
        for file, number, function in refs:
            source = (src / file).read_text()
            lines, n = source.splitlines(), int(number)
            text = lines[n - 1] if 0 < n <= len(lines) else ""
            cited = set().union(*(_equations(m) for m in EQ_CITE.findall(text)))
            if not equations & cited:
                errors.append(f"{file}:{n} does not cite Eq. {sorted(equations)}: {text.strip()!r}")
            first, last = _spans(source).get(function, (0, -1))
            if not first <= n <= last:
                errors.append(f"{file}:{n} is not in {function} (lines {first}-{last})")
    if missing := set(range(3, 26)) - covered:
        errors.append(f"equations without a row: {sorted(missing)}")
    return errors


def test_equation_map_points_at_the_lines_that_cite_each_equation():
    assert equation_map_errors(MODEL_DOC.read_text(), SRC) == []


def test_equation_map_checker_catches_a_moved_line():
    doc = MODEL_DOC.read_text()
    row = next(r for r in doc.splitlines() if r.startswith("| 24 |"))
    file, number, function = LINE_REF.search(row).groups()
    moved = doc.replace(row, row.replace(f"{file}:{number}", f"{file}:{int(number) - 3}"))
    errors = equation_map_errors(moved, SRC)
    assert len(errors) == 2 and "does not cite Eq. [24]" in errors[0] and f"not in {function}" in errors[1]
    dropped = doc.replace(row + "\n", "")
    assert equation_map_errors(dropped, SRC) == ["equations without a row: [24]"]
