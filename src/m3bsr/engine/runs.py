"""The run directory: what a user sees and keeps (everything written atomically)::

    RUN/config.yaml          resolved config + ``dataset:`` (the prepared dataset directory) +
                             ``dataset_fingerprint:`` (its manifest's fingerprint, null if it has none)
    RUN/metrics.jsonl        one JSON line per epoch (losses, valid metrics of both protocols, timing)
    RUN/metrics.json         final summary (see :data:`SUMMARY_KEYS`)
    RUN/best.pt last.pt      checkpoints (+ .sha256 sidecars, + .prev.pt fallbacks)
    RUN/curves.png           losses and valid metrics per epoch
    RUN/train.log            the log lines
    RUN/test_ranks.parquet   user, rank_sampled, rank_full (test ranks of the best checkpoint)

Every file reads without m3bsr (YAML, JSON, PNG, Parquet, ``torch.load(weights_only=True)``).

A run is tied to the prepared data it was trained on: :meth:`RunDir.check_dataset` (called wherever a
run is opened: evaluate, recommend, serve, resume, compare/sweep reuse) refuses a dataset directory
whose fingerprint changed since (re-prepared with ``--overwrite``). A run written before the fingerprint
was recorded gets one warning and is used as it is.
"""

from __future__ import annotations

import io
import json
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m3bsr import atomic, checks
from m3bsr.arrow import from_numpy
from m3bsr.config import Config, build_config, parse_override, read_yaml
from m3bsr.errors import InputError, input_error
from m3bsr.models.configs import with_added_keys

SUMMARY_KEYS = ("valid", "test", "best_epoch", "epochs", "seconds_per_epoch", "seed")


def default_run_dir(dataset: Path, model: str, seed: int) -> Path:
    """``runs/<dataset-name>-<model>-s<seed>`` (relative to the working directory)."""
    return Path("runs") / f"{Path(dataset).resolve().name}-{model}-s{seed}"


def resume_command(root: Path) -> str:
    """The shell command that continues (or, before any checkpoint, restarts) the run in ``root``."""
    return f"m3bsr train --resume {shlex.quote(str(root))}"


def exists_error(root: Path) -> InputError:
    """``root`` already exists: the one-line error; an unfinished run (config.yaml, no metrics.json) is
    told the command that continues it."""
    root = Path(root)
    if (root / "config.yaml").is_file() and not (root / "metrics.json").is_file():
        return input_error(str(root), "run directory already exists and holds an unfinished run (interrupted?)",
                           f"Continue it with `{resume_command(root)}`, pass --overwrite to start it over, "
                           "or choose another --out")
    return input_error(str(root), "run directory already exists",
                       "Pass --overwrite to replace it, --resume to continue it, or choose another --out")


FINGERPRINT_KEY = "dataset_fingerprint"
_READ = object()  # "read the fingerprint from the dataset's manifest.json"


def dataset_fingerprint(dataset: Path) -> str | None:
    """The ``fingerprint`` of ``dataset/manifest.json`` (data/prepare.py: sources + prepare config); None
    when the manifest has none or is unreadable (loading the dataset reports the latter)."""
    try:
        manifest = json.loads((Path(dataset) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("fingerprint") if isinstance(manifest, dict) else None


def short_fingerprint(fingerprint: str | None) -> str:
    """The first 12 hex digits (enough to tell two apart, and to grep a manifest for), or ``none``."""
    return fingerprint[:12] if fingerprint else "none"


def split_run_config(raw: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A run's config.yaml dict → (the config dict, the dataset path or None); the recorded
    ``dataset_fingerprint`` is dropped (:meth:`RunDir.check_dataset` reads it), and model keys added
    since the run was saved get the value that reproduces it (:data:`~m3bsr.models.configs.ADDED_KEYS`)."""
    raw = with_added_keys(dict(raw))
    raw.pop(FINGERPRINT_KEY, None)
    return raw, raw.pop("dataset", None)


EVALUATE_KEYS = ("train.device", "train.eval_batch_size", "train.amp")
"""Besides ``eval.*``, the config keys an evaluation may override; every other key is fixed by the weights."""


def evaluation_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` if each is an ``eval.*`` key or one of :data:`EVALUATE_KEYS`; else a one-line
    :class:`InputError` (a model or training key would describe another run than the checkpoint's)."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if not (key.startswith("eval.") or key in EVALUATE_KEYS):
            raise input_error(f"--set {text}", "evaluate changes the evaluation only (the checkpoint fixes the "
                              "model and its training)", f"Use an eval.* key or {', '.join(EVALUATE_KEYS)}; "
                              "re-train to change the rest")
    return list(overrides)


_ABSENT = object()


def config_difference(stored: dict[str, Any], asked: dict[str, Any], prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two config dicts, as ``"train.lr: stored 0.001,
    asked 0.003"`` (``absent`` for a key one side lacks); ``None`` when they are equal. Keys are visited
    in ``asked``'s order, then those only ``stored`` has."""
    for key in [*asked, *(k for k in stored if k not in asked)]:
        s, a = stored.get(key, _ABSENT), asked.get(key, _ABSENT)
        if isinstance(s, dict) and isinstance(a, dict):
            inner = config_difference(s, a, f"{prefix}{key}.")
            if inner is not None:
                return inner
        elif s != a:
            shown = ["absent" if v is _ABSENT else repr(v) for v in (s, a)]
            return f"{prefix}{key}: stored {shown[0]}, asked {shown[1]}"
    return None


Reuse = Literal["reuse", "resume", "train"]


def _json(text: str, where: str) -> Any:
    """``json.loads`` with a damaged file reported as one line naming it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise input_error(where, f"invalid JSON ({e.msg})", "Restore the file or re-train the run") from None


def _tracked(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config dict without ``train.log_to``: where the epochs are also logged (TensorBoard, MLflow)
    does not change what the run trained, so it never blocks reuse."""
    return {**config, "train": {k: v for k, v in (config.get("train") or {}).items() if k != "log_to"}}


@dataclass
class RunDir:
    """Paths of one run directory."""

    root: Path

    config = property(lambda self: self.root / "config.yaml")
    metrics_jsonl = property(lambda self: self.root / "metrics.jsonl")
    metrics_json = property(lambda self: self.root / "metrics.json")
    curves = property(lambda self: self.root / "curves.png")
    log_file = property(lambda self: self.root / "train.log")
    test_ranks = property(lambda self: self.root / "test_ranks.parquet")

    def checkpoint(self, which: str) -> Path:
        """``best.pt`` or ``last.pt``."""
        if which not in ("best", "last"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        return self.root / f"{which}.pt"

    # --- creation and config --------------------------------------------------------------------
    @staticmethod
    def _config_dict(cfg: Config, dataset: Path, fingerprint: Any) -> dict[str, Any]:
        fingerprint = dataset_fingerprint(dataset) if fingerprint is _READ else fingerprint
        return {"dataset": str(Path(dataset).resolve()), FINGERPRINT_KEY: fingerprint, **cfg.to_dict()}

    @classmethod
    def create(cls, root: Path, cfg: Config, dataset: Path, *, overwrite: bool,
               fingerprint: str | None = _READ) -> "RunDir":
        """A fresh run directory holding only ``config.yaml`` (atomic; replaces an old one only with ``overwrite``).

        ``fingerprint``: that of the dataset as loaded for training (default: read from its manifest now)."""
        root = Path(root)
        if root.exists() and not overwrite:
            raise exists_error(root)
        with atomic.atomic_dir(root, overwrite=True) as tmp:
            atomic.write_yaml(tmp / "config.yaml", cls._config_dict(cfg, dataset, fingerprint))
        return cls(root)

    def write_config(self, cfg: Config, dataset: Path, fingerprint: str | None = _READ) -> None:
        atomic.write_yaml(self.config, self._config_dict(cfg, dataset, fingerprint))

    def _read_raw(self) -> dict[str, Any]:
        """config.yaml as a dict (one-line errors for a missing, invalid or non-mapping file)."""
        checks.run_dir(self.root)
        return read_yaml(self.config, fix="Fix the file or re-train the run")

    def check_dataset(self, dataset: Path, fix: str | None = None) -> None:
        """Refuse (one-line :class:`InputError` naming both fingerprints and ``fix``) when ``dataset`` is not
        the prepared data this run was trained on: its manifest's fingerprint differs from the one recorded
        in config.yaml. A run without a recorded fingerprint (trained before it was recorded) gets one
        ``UserWarning`` and passes. A dataset directory without manifest.json passes too: loading it gives
        the error that says so."""
        raw = self._read_raw()
        if not (Path(dataset) / "manifest.json").is_file():
            return
        if FINGERPRINT_KEY not in raw:
            warnings.warn(f"{self.config}: no {FINGERPRINT_KEY} recorded (trained before m3bsr recorded it), so "
                          f"it cannot be checked that {dataset} still holds the data the run was trained on; "
                          "using it as it is", stacklevel=2)
            return
        recorded, current = raw[FINGERPRINT_KEY], dataset_fingerprint(dataset)
        if recorded == current:
            return
        raise input_error(
            str(self.config),
            f"the run was trained on prepared data with fingerprint {short_fingerprint(recorded)}, but "
            f"{Path(dataset) / 'manifest.json'} now has fingerprint {short_fingerprint(current)} (re-prepared since?)",
            fix or f"Re-train on the current data (m3bsr train --config {shlex.quote(str(self.config))} --out "
                   f"NEW_RUN_DIR), or set dataset: in {self.config} to a directory prepared from the original "
                   f"sources and settings (fingerprint {short_fingerprint(recorded)})")

    def read_config(self, overrides: list[str] = ()) -> tuple[Config, Path]:
        """The run's :class:`Config` (plus ``overrides``) and its dataset directory."""
        raw, dataset = split_run_config(self._read_raw())
        if dataset is None:
            raise input_error(str(self.config), "no 'dataset' key", "Re-train the run")
        return build_config(raw, overrides=list(overrides), source=str(self.config)), Path(dataset)

    def reuse(self, cfg: Config, dataset: Path, fix: str) -> Reuse:
        """What a command that wants ``cfg`` trained on ``dataset`` in this directory does with what is
        there (compare and sweep both ask here; ``--overwrite`` skips the question):

        * ``"train"``: no run yet (no config.yaml), or an unfinished one without last.pt (nothing to keep):
          train from scratch, replacing the directory.
        * refused, one-line :class:`InputError` ending with ``fix``: the stored config, read back through
          the typed :class:`Config` (so a key added since with its default value matches), differs from
          ``cfg`` (the first differing key is named: ``train.lr: stored 0.001, asked 0.003``), the run
          names another dataset directory, or that dataset was re-prepared since (:meth:`check_dataset`).
        * ``"reuse"``: finished: metrics.json, and with ``train.eval_test`` its test metrics and
          test_ranks.parquet; read it with :meth:`read_summary`.
        * ``"resume"``: unfinished with a last.pt: continue it (``engine.train.resume``)."""
        if not self.config.is_file():
            return "train"
        try:
            stored, stored_dataset = self.read_config()
        except InputError as e:
            raise input_error(str(self.root), f"holds a run whose config no longer reads ({e})", fix) from None
        asked_dataset = Path(dataset).resolve()
        diff = (config_difference({"dataset": str(stored_dataset)}, {"dataset": str(asked_dataset)})
                or config_difference(_tracked(stored.to_dict()), _tracked(cfg.to_dict())))
        if diff is not None:
            raise input_error(str(self.root), f"was trained with a different config or dataset ({diff})", fix)
        self.check_dataset(dataset, fix=fix)
        if self.metrics_json.is_file():
            summary = self.read_summary()
            if not cfg.train.eval_test or (summary.get("test") and self.test_ranks.is_file()):
                return "reuse"
        return "resume" if self.checkpoint("last").is_file() else "train"

    # --- per-epoch records ----------------------------------------------------------------------
    def read_records(self) -> list[dict[str, Any]]:
        if not self.metrics_jsonl.is_file():
            return []
        lines = self.metrics_jsonl.read_text().splitlines()
        return [_json(line, f"{self.metrics_jsonl} line {n}") for n, line in enumerate(lines, 1) if line.strip()]

    def write_records(self, records: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl atomically (a few hundred lines at most)."""
        atomic.write_text(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in records))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic.write_json(self.metrics_json, summary)

    def read_summary(self) -> dict[str, Any]:
        if not self.metrics_json.is_file():
            raise input_error(str(self.root), "no metrics.json (the run has not finished)",
                              "Finish it with `m3bsr train --resume RUN_DIR`")
        return _json(self.metrics_json.read_text(), str(self.metrics_json))

    def write_test_ranks(self, users: np.ndarray, ranks: dict[str, np.ndarray]) -> None:
        table = pa.table({"user": from_numpy(np.asarray(users, np.int32)),
                          "rank_sampled": from_numpy(np.asarray(ranks["sampled"], np.int64)),
                          "rank_full": from_numpy(np.asarray(ranks["full"], np.int64))})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic.write_bytes(self.test_ranks, buf.getvalue())

    def write_curves(self, records: list[dict[str, Any]], monitor_metric: str) -> None:
        """curves.png: loss terms (left) and the monitored valid metric of both protocols (right)."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4))
        ax_loss, ax_metric = fig.subplots(1, 2)
        epochs = [r["epoch"] for r in records]
        for name in records[0]["loss"] if records else []:
            ax_loss.plot(epochs, [r["loss"].get(name, np.nan) for r in records], marker="o", label=name)
        ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss terms")
        for protocol in ("sampled", "full"):
            ax_metric.plot(epochs, [r["valid"][protocol].get(monitor_metric, np.nan) for r in records],
                           marker="o", label=protocol)
        ax_metric.set(xlabel="epoch", ylabel=f"valid {monitor_metric}", title=f"valid {monitor_metric}")
        for ax in (ax_loss, ax_metric):
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        atomic.write_bytes(self.curves, buf.getvalue())


class RunLog:
    """Log lines to ``train.log`` (rewritten atomically each time) and, unless quiet, nowhere else.

    The console side is handled by the caller (tqdm / print); this keeps the file complete.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.lines: list[str] = path.read_text().splitlines() if path is not None and path.is_file() else []

    def __call__(self, message: str, echo: bool = False) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self.lines.append(line)
        if self.path is not None:
            atomic.write_text(self.path, "\n".join(self.lines) + "\n")
        if echo:
            from tqdm import tqdm

            tqdm.write(message)


def format_table(columns: list[str], rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A plain-text table: one row per key of ``rows``, one column per metric name."""
    width = max([len(k) for k in rows] + [8])
    head = f"{'':<{width}}  " + "  ".join(f"{c:>8}" for c in columns)
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for name, values in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{values.get(c, float('nan')):>8.4f}" for c in columns))
    return "\n".join(lines)
