"""Cheap checks of the directories a command is given, with their one-line errors.

Torch-free (only :mod:`pathlib` and :mod:`m3bsr.errors`): the CLI runs them before a command imports
torch or pandas, so a mistyped path answers at once; the loaders call the same functions, so a
message reads the same whichever layer finds the problem.
"""

from __future__ import annotations

from pathlib import Path

from m3bsr.errors import input_error


def prepared_dir(root: str | Path) -> Path:
    """``root`` if it holds a ``manifest.json`` (written by ``m3bsr prepare``); else an InputError."""
    root = Path(root)
    if not (root / "manifest.json").is_file():
        raise input_error(str(root), "not a prepared dataset (no manifest.json)",
                          "Run `m3bsr prepare SOURCE --out DIR` first")
    return root


def run_dir(root: str | Path) -> Path:
    """``root`` if it is a run directory (holds ``config.yaml``, written by ``m3bsr train``); else an
    InputError that says whether the folder is missing or is not a run."""
    root = Path(root)
    if not root.is_dir():
        raise input_error(str(root), "run directory not found", "Pass the --out directory of `m3bsr train`")
    if not (root / "config.yaml").is_file():
        raise input_error(str(root), "not a run directory (no config.yaml)",
                          "Pass the directory written by `m3bsr train --out`")
    return root


def item_table(path: str | Path) -> Path:
    """``path`` if it is a file (``m3bsr features text``'s item table); else an InputError."""
    path = Path(path)
    if not path.is_file():
        raise input_error(str(path), "item table not found", "Pass a CSV or Parquet file with an id column")
    return path


def image_folder(folder: str | Path) -> Path:
    """``folder`` if it is a folder (``m3bsr features image``'s images); else an InputError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise input_error(str(folder), "image folder not found", "Pass a folder of <item id>.jpg/.png files")
    return folder
