"""The prepared dataset directory: the one on-disk contract between ``prepare`` and everything else.

Layout (all written atomically by :func:`write_prepared` inside :func:`m3bsr.atomic.atomic_dir`)::

    DIR/manifest.json        schema_version, source file hashes, prepare config, behaviors, statistics
    DIR/events.parquet       user:int32 item:int32 stream:int8 behavior:int8 timestamp:int64 order:int64
                             sorted by (user, order); stream 0 = auxiliary, 1 = target;
                             behavior indexes manifest["behaviors"]["names"]; order = per-user rank
                             in (timestamp, input order), 0-based
    DIR/users.parquet        user:int32 (1..U), original:string
    DIR/items.parquet        item:int32 (1..I), original:string, side_<name>:int32 (0 = unknown),
                             [text, image, label_<name>]:string (labels: read by no model)
    DIR/valid.parquet        user:int32 item:int32 order:int64 candidates:list<int32>[C] (positive first)
    DIR/test.parquet         same, for the test targets
    DIR/features/<m>.npy     float32 [I + 1, D_m] for modality m (row 0 and missing rows zero)
    DIR/features/<m>_mask.npy bool [I + 1], True where the item has a feature

Every file reads without m3bsr (Parquet, NumPy without pickle, JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from m3bsr import checks
from m3bsr.arrow import to_numpy
from m3bsr.batch import Catalogue
from m3bsr.errors import input_error

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 1
EVENT_COLUMNS = {"user": "int32", "item": "int32", "stream": "int8", "behavior": "int8",
                 "timestamp": "int64", "order": "int64"}


@dataclass
class EvalTargets:
    """The valid or test targets: one row per evaluated user.

    ``user`` [N], ``item`` [N] (the positive), ``order`` [N] (event rank of the predicted event),
    ``candidates`` [N, C] (positive first, then the sampled negatives).
    """

    user: np.ndarray
    item: np.ndarray
    order: np.ndarray
    candidates: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def to_table(self) -> pa.Table:
        c = self.candidates.astype(np.int32)
        cand = pa.FixedSizeListArray.from_arrays(pa.array(c.reshape(-1)), c.shape[1] if c.ndim == 2 else 0)
        return pa.table({"user": self.user.astype(np.int32), "item": self.item.astype(np.int32),
                         "order": self.order.astype(np.int64), "candidates": cand})

    @classmethod
    def from_table(cls, t: pa.Table) -> "EvalTargets":
        cand = t.column("candidates").combine_chunks()
        width = cand.type.list_size if len(t) else 0
        flat = to_numpy(cand.flatten()) if len(t) else np.zeros(0, np.int32)
        return cls(user=to_numpy(t.column("user")).astype(np.int64),
                   item=to_numpy(t.column("item")).astype(np.int64),
                   order=to_numpy(t.column("order")).astype(np.int64),
                   candidates=flat.astype(np.int64).reshape(len(t), width))


@dataclass
class PreparedDataset:
    """A prepared dataset loaded in memory (see the module docstring for the files).

    ``tables`` holds events, users and items as read (Arrow). Training reads them column by column
    (:meth:`column`); the DataFrame views (``events``, ``users``, ``items``) are built on first use, so
    a process that never asks for one never imports pandas (about 40 MB resident; docs/training.md).
    """

    root: Path
    manifest: dict[str, Any]
    tables: dict[str, pa.Table]
    valid: EvalTargets
    test: EvalTargets
    features: dict[str, np.ndarray] = field(default_factory=dict)
    feature_masks: dict[str, np.ndarray] = field(default_factory=dict)

    def column(self, table: str, name: str) -> np.ndarray:
        """Numeric column ``name`` of ``table`` (``events``, ``users`` or ``items``), read-only [rows]."""
        return to_numpy(self.tables[table].column(name))

    @cached_property
    def events(self) -> pd.DataFrame:
        """events.parquet as a DataFrame (the columns of the module docstring)."""
        return self.tables["events"].to_pandas()

    @cached_property
    def users(self) -> pd.DataFrame:
        """users.parquet as a DataFrame: ``user``, ``original``."""
        return self.tables["users"].to_pandas()

    @cached_property
    def items(self) -> pd.DataFrame:
        """items.parquet as a DataFrame: ``item``, ``original``, side ids, text/image paths, labels."""
        return self.tables["items"].to_pandas()

    @property
    def n_users(self) -> int:
        return int(self.manifest["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.manifest["n_items"])

    @property
    def behavior_names(self) -> list[str]:
        return list(self.manifest["behaviors"]["names"])

    @property
    def target_behavior(self) -> str:
        return str(self.manifest["behaviors"]["target"])

    def catalogue(self) -> Catalogue:
        """The item-side tensors a model may use."""
        side_cols = [c for c in self.tables["items"].column_names if c.startswith("side_")]
        side_ids, side_sizes = {}, {}
        item = self.column("items", "item")
        for col in side_cols:
            ids = np.zeros(self.n_items + 1, np.int64)
            ids[item] = self.column("items", col)
            side_ids[col[5:]] = torch.from_numpy(ids)
            side_sizes[col[5:]] = int(ids.max()) + 1
        return Catalogue(
            n_items=self.n_items,
            behavior_names=self.behavior_names,
            target_behavior=self.behavior_names.index(self.target_behavior) + 1,
            features={m: torch.from_numpy(x) for m, x in self.features.items()},
            feature_masks={m: torch.from_numpy(x) for m, x in self.feature_masks.items()},
            side_ids=side_ids,
            side_sizes=side_sizes,
        )

    @staticmethod
    def read_manifest(root: str | Path) -> dict:
        """The manifest of a prepared directory, without reading its tables (its ``features`` key lists
        the content modalities). Raises :class:`InputError` if ``root`` is not one this version reads."""
        manifest_path = checks.prepared_dir(Path(root)) / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise input_error(str(manifest_path), f"invalid JSON at line {e.lineno}",
                              "Re-run `m3bsr prepare`") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise input_error(str(manifest_path), f"schema_version {version!r}, this m3bsr reads {SCHEMA_VERSION}",
                              "Re-run `m3bsr prepare` with this version")
        return manifest

    @classmethod
    def load(cls, root: str | Path) -> "PreparedDataset":
        """Read a prepared directory. Raises :class:`InputError` if it is not one."""
        root = Path(root)
        manifest = cls.read_manifest(root)
        features, masks = {}, {}
        for m in manifest.get("features", {}):
            features[m] = np.load(root / "features" / f"{m}.npy", allow_pickle=False)
            masks[m] = np.load(root / "features" / f"{m}_mask.npy", allow_pickle=False)
        return cls(
            root=root,
            manifest=manifest,
            tables={name: read_parquet(root / f"{name}.parquet") for name in ("events", "users", "items")},
            valid=EvalTargets.from_table(read_parquet(root / "valid.parquet")),
            test=EvalTargets.from_table(read_parquet(root / "test.parquet")),
            features=features,
            feature_masks=masks,
        )


def read_parquet(path: Path) -> pa.Table:
    """One Parquet file as an Arrow table. Why not ``pq.read_table``: it goes through
    ``pyarrow.dataset``, which imports pandas."""
    with pq.ParquetFile(path) as f:
        return f.read()


def write_prepared(out: Path, *, manifest: dict[str, Any], events: pd.DataFrame, users: pd.DataFrame,
                   items: pd.DataFrame, valid: EvalTargets, test: EvalTargets,
                   features: dict[str, np.ndarray] | None = None,
                   feature_masks: dict[str, np.ndarray] | None = None) -> None:
    """Write every file of a prepared dataset into ``out`` (a fresh directory from ``atomic_dir``).

    ``manifest`` gets ``schema_version``, ``n_users``, ``n_items`` and ``features`` filled in.
    """
    out = Path(out)
    events = events[list(EVENT_COLUMNS)].astype(EVENT_COLUMNS)
    features = features or {}
    feature_masks = feature_masks or {}
    manifest = {"schema_version": SCHEMA_VERSION, **manifest,
                "n_users": int(len(users)), "n_items": int(len(items)),
                "features": {m: {"dim": int(x.shape[1]), "missing": int((~feature_masks[m][1:]).sum())}
                             for m, x in features.items()}}
    pq.write_table(pa.Table.from_pandas(events, preserve_index=False), out / "events.parquet")
    pq.write_table(pa.Table.from_pandas(users, preserve_index=False), out / "users.parquet")
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), out / "items.parquet")
    pq.write_table(valid.to_table(), out / "valid.parquet")
    pq.write_table(test.to_table(), out / "test.parquet")
    if features:
        (out / "features").mkdir(exist_ok=True)
    for m, x in features.items():
        np.save(out / "features" / f"{m}.npy", np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
        np.save(out / "features" / f"{m}_mask.npy", np.asarray(feature_masks[m], dtype=bool), allow_pickle=False)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
