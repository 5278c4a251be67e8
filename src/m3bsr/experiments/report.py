"""``m3bsr report DIR... --out FILE``: the sections of experiment output directories as one self-contained
HTML page (figures embedded as base64 PNG) and one Markdown file (figures linked relative to it).

A directory is read through its ``experiment.json`` (written by every experiment): the section
``<name>.md``, the figures it links, the dataset (named in the section's heading) and the claim
verdicts (counted in the contents list at the top).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from m3bsr import atomic
from m3bsr.errors import input_error

IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}"
         "img{max-width:100%}")


@dataclass(frozen=True)
class Section:
    """One experiment output directory as the report shows it."""

    name: str  # the experiment, e.g. "ablation"
    dataset: str  # the prepared dataset's folder name ("" when experiment.json has none)
    text: str  # its Markdown section, heading first
    held: int  # claims that held
    claims: int  # claims with a verdict (n/a not counted)

    @property
    def title(self) -> str:
        """The section's first heading, with the dataset: ``Ablation (paper Figure 3): synthetic``."""
        first = self.text.lstrip().splitlines()[0] if self.text.strip() else ""
        head = first[3:].strip() if first.startswith("## ") else self.name
        return f"{head}: {self.dataset}" if self.dataset else head


def read_section(directory: Path) -> Section:
    """The :class:`Section` of one output directory (its ``experiment.json`` and ``<name>.md``)."""
    meta = Path(directory) / "experiment.json"
    if not meta.is_file():
        raise input_error(str(directory), "not an experiment output directory (no experiment.json)",
                          "Pass the --out directory of `m3bsr experiment`")
    try:
        info = json.loads(meta.read_text())
        name = info["name"]
        verdicts = [c["held"] for c in info.get("claims", []) if c.get("held") is not None]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise input_error(str(meta), "invalid experiment.json", "Re-run the experiment") from None
    section = Path(directory) / f"{name}.md"
    if not section.is_file():
        raise input_error(str(section), "section file missing", "Re-run the experiment")
    dataset = Path(str(info.get("dataset") or "")).name
    return Section(name, dataset, section.read_text(), sum(map(bool, verdicts)), len(verdicts))


def anchors(sections: list[Section]) -> list[str]:
    """One distinct HTML id per section: ``<name>-<dataset>``, then ``-2``, ``-3`` for repeats."""
    seen: dict[str, int] = {}
    out = []
    for sec in sections:
        base = re.sub(r"[^a-z0-9]+", "-", f"{sec.name} {sec.dataset}".lower()).strip("-")
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def build_report(dirs: list[Path], out: Path, title: str = "M3BSR experiments") -> tuple[str, str]:
    """(Markdown, HTML) of the sections of ``dirs``, after a contents list that names each section's
    dataset and how many of its claims held; each heading names its dataset too. The Markdown links
    figures relative to ``out``'s folder, the HTML embeds them."""
    from markdown_it import MarkdownIt

    render = MarkdownIt("commonmark").enable("table").render
    sections = [read_section(Path(d)) for d in dirs]
    ids = anchors(sections)
    counts = Counter(sec.title for sec in sections)
    # two sections of one experiment on one dataset: their folders tell them apart
    titles = [sec.title + (f" ({Path(d).resolve().name})" if counts[sec.title] > 1 else "")
              for d, sec in zip(dirs, sections)]
    contents = ["Contents (claims held / claims with a verdict):", ""]
    contents += [f"{i}. [{t}](#{a})" + (f" ({sec.held} of {sec.claims} held)" if sec.claims else "")
                 for i, (sec, t, a) in enumerate(zip(sections, titles, ids), 1)]
    md_parts, html_parts = [f"# {title}", "", *contents, ""], [render("\n".join(contents))]
    for d, sec, t, a in zip(map(Path, dirs), sections, titles, ids):
        lines = sec.text.lstrip().splitlines()
        if lines and lines[0].startswith("## "):
            lines[0] = f"## {t}"
        text = "\n".join(lines) + f"\n\n*Source: `{os.path.relpath(d.resolve(), Path(out).resolve().parent)}`*\n"

        def relink(m: re.Match) -> str:
            path = d / m.group(2)
            return f"![{m.group(1)}]({os.path.relpath(path.resolve(), Path(out).resolve().parent)})"

        def embed(m: re.Match) -> str:
            path = d / m.group(2)
            if not path.is_file():
                raise input_error(str(path), "figure missing", "Re-run the experiment")
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return f"![{m.group(1)}](data:image/png;base64,{data})"

        md_parts += [f'<a id="{a}"></a>', "", IMAGE.sub(relink, text), ""]
        html_parts.append(f'<section id="{a}">{render(IMAGE.sub(embed, text))}</section>')
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(html_parts)
            + "</body></html>\n")
    return "\n".join(md_parts), page


def main(args: argparse.Namespace) -> int:
    """The ``report`` command: writes FILE (.html) and FILE with .md."""
    out = Path(args.out)
    md, page = build_report(args.dirs, out)
    html_path, md_path = out.with_suffix(".html"), out.with_suffix(".md")
    atomic.write_text(html_path, page)
    atomic.write_text(md_path, md)
    print(f"wrote {html_path} and {md_path} ({len(args.dirs)} sections)")
    return 0
