"""Checkpoints: plain dicts of tensors/ints/strings, written atomically with a sha256 sidecar.

``save_checkpoint(path, state)`` serializes ``state`` (no pickled objects: config as a plain
dict, state dicts, RNG states as uint8 tensors), keeps the previous good file as
``<name>.prev.pt`` (+ sidecar), writes the new bytes atomically (temp file, fsync, rename) and then
``<name>.pt.sha256``. ``load_checkpoint`` verifies the digest and loads with
``torch.load(weights_only=True)``; a missing, truncated or tampered file falls back to the
previous good one with a warning. Any crash point leaves a loadable pair.

For serving: :func:`load_run_model` gives ``(model, cfg, dataset)`` of a trained run.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from m3bsr import atomic
from m3bsr.errors import input_error


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _prev(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified_bytes(path: Path) -> bytes:
    """The bytes of ``path`` if its sidecar digest matches; raises ``ValueError`` saying why not."""
    if not path.is_file():
        raise ValueError("file is missing")
    side = _sidecar(path)
    if not side.is_file():
        raise ValueError("sha256 sidecar is missing (interrupted write?)")
    data = path.read_bytes()
    expected = side.read_text().split()[0] if side.read_text().strip() else ""
    if _digest(data) != expected:
        raise ValueError("sha256 mismatch (truncated or modified)")
    return data


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write ``state`` to ``path`` and its digest to ``path.sha256``; keep the previous good one."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    try:
        current = _digest(_verified_bytes(path))
    except ValueError:
        current = None
    if current is not None:
        # Rotate the current good pair into the fallback slot. Order matters: at every crash
        # point either path or path.prev verifies against its sidecar.
        atomic.write_text(_sidecar(_prev(path)), f"{current}  {_prev(path).name}\n")
        os.replace(path, _prev(path))
    atomic.write_bytes(path, data)
    atomic.write_text(_sidecar(path), f"{_digest(data)}  {path.name}\n")


def _load_bytes(data: bytes, map_location) -> dict[str, Any]:
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's refusal is a long multi-line UnpicklingError
        if "Weights only load failed" not in str(e):
            raise
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        # Never suggest weights_only=False: that would run the file's code.
        raise ValueError(f"refused: it carries a pickled Python object{what}; a checkpoint holds only "
                         "tensors and plain values") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a verified checkpoint (``weights_only=True``), falling back to ``<name>.prev.pt`` with a warning.

    Raises :class:`~m3bsr.errors.InputError` when neither is usable.
    """
    path = Path(path)
    problems = []
    for candidate in (path, _prev(path)):
        try:
            state = _load_bytes(_verified_bytes(candidate), map_location)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: try the fallback
            problems.append(f"{candidate.name}: {e}")
            continue
        if candidate != path:
            warnings.warn(f"{path}: {problems[0]}; using the previous good checkpoint {candidate.name}",
                          stacklevel=2)
        return state
    raise input_error(str(path), "no usable checkpoint (" + "; ".join(problems) + ")",
                      "Re-train the run, or restore the file")


def load_weights(model: torch.nn.Module, state: dict[str, Any], cfg, where: str) -> None:
    """``model.load_state_dict(state["model"])``; a checkpoint of another model or model config is a
    one-line :class:`~m3bsr.errors.InputError` naming the differing ``model.*`` keys, not a traceback."""
    saved = (state.get("config") or {}).get("model") or {}
    current = cfg.to_dict()["model"]
    diff = [f"model.{k}={saved.get(k)!r} (config.yaml: {current.get(k)!r})"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    fix = "Restore the run's config.yaml, or re-train with the new config"
    if saved.get("name", current["name"]) != current["name"]:
        raise input_error(where, f"the checkpoint is of model {saved['name']!r} but the run's config.yaml "
                          f"says {current['name']!r}", fix)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e).splitlines()[0])
        cause = f"the checkpoint was trained with {', '.join(diff[:3])}" if diff else detail
        raise input_error(where, f"the weights do not fit model {current['name']!r} as configured ({cause})",
                          fix) from None


def load_run_model(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu",
                   dataset: str | os.PathLike | None = None):
    """Load a trained run for inference: ``(model, cfg, dataset)``.

    ``dataset`` (a prepared dataset directory) replaces the one config.yaml names, e.g. for a run copied
    elsewhere together with its data; its fingerprint is checked all the same.

    ``model`` is the registered model built from the run's ``config.yaml`` and the prepared
    dataset's catalogue, with the weights of ``<which>.pt`` (``best`` or ``last``), on ``device``,
    in eval mode. ``cfg`` is the run's :class:`~m3bsr.config.Config`. ``dataset`` is the
    :class:`~m3bsr.data.prepared.PreparedDataset` the run was trained on (its ``users``/``items``
    tables map dense ids to original ids; ``dataset.catalogue()`` gives the item tensors). A dataset
    directory re-prepared since training (another manifest fingerprint) is an :class:`InputError`.

    Example (serving)::

        model, cfg, ds = load_run_model("runs/demo/m3bsr")
        windows = WindowBuilder(ds, cfg.data.max_len).eval_windows("test", cfg.eval.exclude)
        reps = model.represent(windows.batch(slice(0, 8)))
        scores = model.score(reps)  # [8, 1, n_items + 1]; mask column 0 and seen items yourself
    """
    from m3bsr.data.prepared import PreparedDataset
    from m3bsr.engine.runs import RunDir
    from m3bsr.models.registry import build_model

    run = RunDir(Path(run_dir))
    cfg, dataset_path = run.read_config()
    dataset_path = Path(dataset) if dataset is not None else dataset_path
    run.check_dataset(dataset_path)  # re-prepared since training: refused, naming both fingerprints
    ds = PreparedDataset.load(dataset_path)
    model = build_model(cfg.model, ds.catalogue())
    state = load_checkpoint(run.checkpoint(which), map_location="cpu")
    load_weights(model, state, cfg, str(run.checkpoint(which)))
    model.to(device).eval()
    return model, cfg, ds
