"""docs/tutorial-own-data.md runs as written: its YAML and its prepare/train/recommend commands, on a
generated log of the shape it describes (string ids, a behavior column or none)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from m3bsr.cli import main as cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "tutorial-own-data.md"


def _log(folder: Path, behaviors: bool) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(1, 61):
        t = 1_700_000_000
        for _ in range(rng.integers(8, 20)):
            t += int(rng.integers(60, 86_400))
            rows.append((f"u{u}", f"i{int(rng.integers(0, 400))}", t))
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    if behaviors:
        frame["behavior"] = rng.choice(["view", "cart", "buy"], len(frame), p=[0.5, 0.1, 0.4])
    frame.to_csv(folder / ("events.csv" if behaviors else "plays.csv"), index=False)


def _commands(name: str) -> list[list[str]]:
    """The doc's `m3bsr ...` lines whose first words are ``name`` (comments stripped)."""
    out = []
    for line in DOC.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith(f"m3bsr {name} "):
            out.append(line.split()[1:])
    return out


def test_tutorial_multi_and_single_behavior(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    yaml_block = re.search(r"```yaml\n(.*?)```", DOC.read_text(), re.S).group(1)
    (tmp_path / "shop.yaml").write_text(yaml_block)
    _log(tmp_path, behaviors=True)
    _log(tmp_path, behaviors=False)
    prepare = _commands("prepare")
    assert len(prepare) == 3
    for argv in prepare:
        assert cli(argv + ["--quiet"]) == 0, argv
    assert (tmp_path / "data/shop/manifest.json").is_file() and (tmp_path / "data/plays/manifest.json").is_file()
    train = _commands("train")[0]
    assert train[:2] == ["train", "--dataset"]
    assert cli(train + ["--set", "train.max_epochs=1", "--set", "model.hidden_size=16", "--quiet"]) == 0
    capsys.readouterr()
    assert cli(_commands("recommend")[0]) == 0
    assert "u1,1," in capsys.readouterr().out
    plays = ["train", "--dataset", "data/plays", "--model", "m3bsr", "--set", "train.max_epochs=1",
             "--set", "model.hidden_size=16", "--out", "runs/plays", "--quiet"]
    assert cli(plays) == 0
