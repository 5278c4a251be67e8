"""Atomic file and directory writes: write to a temporary sibling, fsync, then rename.

Nothing is ever left half-written: a crash leaves either the old file or the new one, and a
failed directory build leaves no directory at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from m3bsr.errors import input_error


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_sibling(path: Path, directory: bool) -> Any:
    """Create ``path``'s folder and a temporary sibling (``mkdtemp``/``mkstemp`` result). A path that
    cannot hold output (under a regular file, read-only, full disk) is a one-line InputError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        make = tempfile.mkdtemp if directory else tempfile.mkstemp
        return make(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        blocker = next((p for p in path.parents if p.exists()), None)
        why = (f"{str(blocker)!r} is a file, not a folder" if blocker is not None and not blocker.is_dir()
               else f"{e.strerror}: {e.filename}")
        raise input_error(str(path), f"cannot write here ({why})", "Choose a writable output path") from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + fsync + rename)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` for a library to write (e.g. a streaming Parquet writer); on
    success it is fsynced and renamed to ``path``, on any exception removed (``path`` is untouched)."""
    path = Path(path)
    fd, tmp = _temp_sibling(path, directory=False)
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give what an ordinary open() would
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # e.g. disk full: the old file is untouched
            raise input_error(str(path), f"cannot write here ({e.strerror or e}); the previous file is unchanged",
                              "Free disk space or choose another output path") from None
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as YAML (safe dumper) atomically."""
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling name and rename it to ``path`` on success.

    Yields the temporary directory to fill. On any exception the temporary directory is
    removed and ``path`` is untouched. With ``overwrite`` an existing ``path`` is replaced
    only after the new one is complete.
    """
    path = Path(path)
    tmp = Path(_temp_sibling(path, directory=True))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
