"""``m3bsr report DIR... --out FILE``: the sections of experiment output directories as one self-contained
HTML page (figures embedded as base64 PNG) and one Markdown file (figures linked relative to it).

A directory is read through its ``experiment.json`` (written by every experiment): the section
``<name>.md`` and the figures it links.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
from pathlib import Path

from m3bsr import atomic
from m3bsr.errors import input_error

IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}"
         "img{max-width:100%}")


def read_section(directory: Path) -> tuple[str, str]:
    """(experiment name, its Markdown section) of one output directory."""
    meta = Path(directory) / "experiment.json"
    if not meta.is_file():
        raise input_error(str(directory), "not an experiment output directory (no experiment.json)",
                          "Pass the --out directory of `m3bsr experiment`")
    try:
        name = json.loads(meta.read_text())["name"]
    except (ValueError, KeyError, TypeError):
        raise input_error(str(meta), "invalid experiment.json", "Re-run the experiment") from None
    section = Path(directory) / f"{name}.md"
    if not section.is_file():
        raise input_error(str(section), "section file missing", "Re-run the experiment")
    return name, section.read_text()


def build_report(dirs: list[Path], out: Path, title: str = "M3BSR experiments") -> tuple[str, str]:
    """(Markdown, HTML) of the sections of ``dirs``; the Markdown links figures relative to ``out``'s folder,
    the HTML embeds them."""
    md_parts, html_parts = [f"# {title}", ""], []
    from markdown_it import MarkdownIt

    render = MarkdownIt("commonmark").enable("table").render
    for d in dirs:
        d = Path(d)
        name, text = read_section(d)
        text += f"\n\n*Source: `{os.path.relpath(Path(d).resolve(), Path(out).resolve().parent)}`*\n"

        def relink(m: re.Match) -> str:
            path = d / m.group(2)
            return f"![{m.group(1)}]({os.path.relpath(path.resolve(), Path(out).resolve().parent)})"

        def embed(m: re.Match) -> str:
            path = d / m.group(2)
            if not path.is_file():
                raise input_error(str(path), "figure missing", "Re-run the experiment")
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return f"![{m.group(1)}](data:image/png;base64,{data})"

        md_parts += [IMAGE.sub(relink, text), ""]
        html_parts.append(f'<section id="{html.escape(name)}">{render(IMAGE.sub(embed, text))}</section>')
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
