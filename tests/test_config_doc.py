"""docs/config.md lists every config key with its default: its tables are checked against the config
classes (run sections in ``m3bsr.config``, one class per model in the registry), so the reference cannot
drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from m3bsr.config import Config, build_config
from m3bsr.models.registry import model_config_class, model_names

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
CELL_SPLIT = re.compile(r"(?<!\\)\|")
PROSE_ONLY = {"pop"}  # no keys of its own: a paragraph instead of a table


def doc_table(heading: str) -> dict[str, str] | None:
    """``{key: default}`` of the table right under ``heading`` (cells without backticks); None if no table."""
    lines = DOC.read_text().splitlines()
    if heading not in lines:
        return None
    table = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table or line.startswith("#"):
            break  # the table ended, or the section had none
    rows = {}
    for line in table[2:]:  # after the header and the |---| rule
        cells = [c.strip().strip("`") for c in CELL_SPLIT.split(line.strip().strip("|"))]
        rows[cells[0]] = cells[2]
    return rows or None


def render(default: object) -> str:
    """A default as the doc writes it: ``True``, ``0.001``, ``None``, ``[5, 10, 20]``, strings bare."""
    return str(default)


def field_defaults(cls: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """``{dotted key: rendered default}`` of every field of ``cls``, sections flattened."""
    out = {}
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= field_defaults(field.annotation, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = render(field.get_default(call_default_factory=True))
    return out


def mismatches(doc: dict[str, str], code: dict[str, str]) -> list[str]:
    missing = sorted(code.keys() - doc.keys())
    extra = sorted(doc.keys() - code.keys())
    wrong = [f"{k} (doc {doc[k]!r}, code {code[k]!r})" for k in sorted(doc.keys() & code.keys()) if doc[k] != code[k]]
    return [f"{what}: {', '.join(keys)}" for what, keys in
            [("missing from the doc", missing), ("not in the code", extra), ("wrong default", wrong)] if keys]


def test_run_keys_match_the_config():
    code = {k: v for k, v in field_defaults(Config).items() if not k.startswith("model")}
    doc = doc_table("## Run keys")
    assert doc is not None, "docs/config.md has no '## Run keys' table"
    assert not mismatches(doc, code), "docs/config.md run keys: " + "; ".join(mismatches(doc, code))


@pytest.mark.parametrize("name", [n for n in model_names() if n not in PROSE_ONLY])
def test_model_keys_match_the_model_config(name):
    fields = field_defaults(model_config_class(name))
    code = {f"model.{k}": v for k, v in fields.items() if k != "name"}
    doc = doc_table(f"### `model.*` for `--model {name}`")
    assert doc is not None, f"docs/config.md has no table for --model {name}"
    assert not mismatches(doc, code), f"docs/config.md, --model {name}: " + "; ".join(mismatches(doc, code))


def test_yaml_example_builds():
    example = DOC.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    build_config(yaml.safe_load(example))


@pytest.mark.parametrize("name", model_names())
def test_registry_config_class_is_the_models_own(name):
    """The registry's torch-free name → config map and each model's ``config_class`` name the same class."""
    from m3bsr.models.registry import model_class

    assert model_config_class(name) is model_class(name).config_class
