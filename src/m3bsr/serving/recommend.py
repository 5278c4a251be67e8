"""Top-k recommendation from a trained run, with original (un-remapped) user and item ids.

A :class:`Recommender` is loaded once from a run directory (model + prepared dataset). A query is
a :class:`~m3bsr.data.batches.History`: either a known user's every event in the prepared data or
a raw list of ``(item, behavior, timestamp)`` events. Each history becomes one window with its most
recent ``data.max_len`` events per stream and one query just after its last event
(:func:`~m3bsr.data.batches.latest_windows`); many histories are scored in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from m3bsr.config import Config
from m3bsr.data.batches import History, WindowBuilder, latest_windows, user_history
from m3bsr.data.prepared import PreparedDataset
from m3bsr.errors import clip, input_error
from m3bsr.models.base import add_bonus

MAX_SCORE_CELLS = 2**25
"""Bound on batch rows x catalogue size scored at once (32 Mi floats = 128 MiB)."""


@dataclass(frozen=True)
class Recommendation:
    """One recommended item: original id and raw model score."""

    item: str
    score: float


@dataclass(frozen=True)
class Event:
    """One raw history event: original item id, behavior name (as in the manifest), timestamp."""

    item: str
    behavior: str
    timestamp: float


class Recommender:
    """A trained model plus the id maps and histories of its prepared dataset (read-only after init).

    ``model`` follows the :class:`~m3bsr.models.base.SequentialRecommender` contract; it is put in
    eval mode and only ever called under ``torch.inference_mode()``.

    ``compile=True`` runs the user encoder through ``torch.compile`` (dynamic shapes) and compiles
    it here, before the first query: about a minute on CPU, then lower per-query latency (one
    small window is hundreds of tiny kernels that the compiler fuses; see docs/performance.md).
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, dataset: PreparedDataset,
                 device: str | torch.device = "cpu", compile: bool = False):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._represent = torch.compile(self.model.represent, dynamic=True) if compile else self.model.represent
        self._output: tuple[torch.Tensor, torch.Tensor | None] | None = None  # Eq. 23's (W, b), built once
        self.cfg = cfg
        self.dataset = dataset
        self.max_len = cfg.data.max_len
        self.builder = WindowBuilder(dataset, self.max_len)
        self._user_ids = {str(o): int(u) for u, o in zip(dataset.users["user"], dataset.users["original"])}
        self._item_ids = {str(o): int(i) for i, o in zip(dataset.items["item"], dataset.items["original"])}
        originals = np.empty(dataset.n_items + 1, dtype=object)
        originals[0] = None
        originals[dataset.items["item"].to_numpy()] = dataset.items["original"].astype(str).to_numpy()
        self._item_original = originals
        names = dataset.behavior_names
        target = dataset.target_behavior
        auxiliary = dataset.manifest["behaviors"].get("auxiliary") or [b for b in names if b != target]
        # behavior name -> (stream, 1-based behavior id); behaviors outside both streams are unknown
        self.behaviors = {b: (1 if b == target else 0, names.index(b) + 1)
                          for b in names if b == target or b in auxiliary}
        if compile:  # compile now, not on the first request: a batch of one, then of two
            first = [self.user_history(u) for u in list(self._user_ids)[:2]]
            self.top_k(first[:1], 1)
            self.top_k(first, 1)

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "best", device: str = "cpu",
                 compile: bool = False) -> "Recommender":
        """Load ``run_dir``'s ``{which}.pt`` model and the prepared dataset it was trained on."""
        from m3bsr.engine.checkpoint import load_run_model

        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise input_error(str(run_dir), "run directory not found",
                              "Pass the --out directory of `m3bsr train`")
        model, cfg, dataset = load_run_model(run_dir, which=which, device=device)
        return cls(model, cfg, dataset, device=device, compile=compile)

    # ------------------------------------------------------------------------------- queries
    @property
    def n_items(self) -> int:
        return self.dataset.n_items

    @property
    def n_users(self) -> int:
        return self.dataset.n_users

    def has_user(self, user_id: Any) -> bool:
        return str(user_id) in self._user_ids

    def user_history(self, user_id: Any, where: str = "user") -> History:
        """Every event of a known user (original id). Unknown → :class:`InputError`."""
        dense = self._user_ids.get(str(user_id))
        if dense is None:
            raise input_error(f"{where} {clip(str(user_id))!r}", "unknown user (not in the run's prepared dataset)",
                              "Use an original user id from the training data, or send a raw history")
        return user_history(self.builder, dense)

    def dense_user(self, user_id: Any) -> int:
        return self._user_ids[str(user_id)]

    def parse_history(self, events: Sequence[Event], where: str = "history") -> History:
        """A raw history (original item ids, behavior names, timestamps) → :class:`History`.

        Events are ordered by (timestamp, list position), like ``prepare`` ranks a user's events.
        Unknown items or behaviors → :class:`InputError` naming the event index.
        """
        n = len(events)
        items = np.zeros(n, np.int64)
        streams = np.zeros(n, np.int64)
        behaviors = np.zeros(n, np.int64)
        stamps = np.zeros(n, np.float64)
        for j, ev in enumerate(events):
            item = self._item_ids.get(str(ev.item))
            if item is None:
                raise input_error(f"{where}[{j}].item {clip(str(ev.item))!r}", "unknown item (not in the run's "
                                  "catalogue)", "Use original item ids from the training data")
            if ev.behavior not in self.behaviors:
                raise input_error(f"{where}[{j}].behavior {clip(str(ev.behavior))!r}", "unknown behavior",
                                  f"Use one of: {', '.join(self.behaviors)}")
            items[j] = item
            streams[j], behaviors[j] = self.behaviors[ev.behavior]
            stamps[j] = float(ev.timestamp)
        rank = np.empty(n, np.int64)
        rank[np.argsort(stamps, kind="stable")] = np.arange(n)
        order = np.argsort(rank)
        items, streams, behaviors, rank = items[order], streams[order], behaviors[order], rank[order]
        aux, tgt = streams == 0, streams == 1
        return History(items[aux], behaviors[aux], rank[aux], items[tgt], rank[tgt])

    # ------------------------------------------------------------------------------- ranking
    def top_k(self, histories: Sequence[History], k: int | Sequence[int],
              exclude_seen: bool | Sequence[bool] = False,
              users: Sequence[int] | None = None) -> list[list[Recommendation]]:
        """Top-``k`` items per history, best first; one forward pass per chunk of histories.

        The padding item is never returned; with ``exclude_seen`` every item of the history is
        masked. Items whose score is not finite after masking are dropped, so a row may hold fewer
        than ``k`` items when the catalogue is exhausted. Ties keep the lower item id first.
        """
        n = len(histories)
        ks = [int(k)] * n if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        excl = [bool(exclude_seen)] * n if isinstance(exclude_seen, (bool, np.bool_)) else list(exclude_seen)
        for x in ks:
            if x < 1:
                raise input_error(f"k={x}", "k must be at least 1", "Pass a positive --k")
        chunk = max(1, min(n, MAX_SCORE_CELLS // (self.n_items + 1)))
        results: list[list[Recommendation]] = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            u = None if users is None else users[lo:hi]
            results += self._rank_chunk(histories[lo:hi], ks[lo:hi], excl[lo:hi], u)
        return results

    def _rank_chunk(self, histories: Sequence[History], ks: list[int], excl: list[bool],
                    users: Sequence[int] | None) -> list[list[Recommendation]]:
        windows = latest_windows(list(histories), self.max_len, users=users)
        batch = windows.batch(slice(None), trim=True).to(self.device)  # drop all-padding columns
        with torch.inference_mode():
            reps = self._represent(batch)  # [B, 1, d]
            scores = add_bonus(self._score(reps), self.model.history_bonus(reps, batch))[:, 0, :].float()
            scores = torch.nan_to_num(scores, nan=float("-inf"))
            scores[:, 0] = float("-inf")  # padding is never an answer
            mask = torch.tensor(excl, device=self.device)[:, None]
            drop = torch.where(mask, batch.exclude_items, torch.zeros_like(batch.exclude_items))
            scores.scatter_(1, drop, float("-inf"))  # column 0 is -inf already
            k_max = min(max(ks), self.n_items)
            # top-k selects; every item tied with the k-th score is a candidate, so the tie-break
            # (lower item id first) does not depend on the batch or on k
            kth = torch.topk(scores, k_max, dim=1).values[:, -1:]  # [B, 1]
            candidates = (scores >= kth) & torch.isfinite(scores)
            scores_np, cand_np = scores.cpu().numpy(), candidates.cpu().numpy()
        out = []
        for row, k in enumerate(ks):
            items = np.flatnonzero(cand_np[row])  # ascending item ids
            vals = scores_np[row, items]
            best = np.argsort(-vals, kind="stable")[:k]
            out.append([Recommendation(self._item_original[i], float(v)) for i, v in zip(items[best], vals[best])])
        return out

    def _score(self, reps: torch.Tensor) -> torch.Tensor:
        """``model.score(reps)`` [B, P, d] → [B, P, n_items + 1], with the output layer (Eq. 23) built at
        the first query and kept: the model is frozen here, and M3BSR's item vectors project every
        item's content features, which took most of a single-user query (10 of 17 ms on ml100k_mm).
        A model that overrides ``score`` (MM-SASRec) is asked directly."""
        if not self.model.linear_score:
            return self.model.score(reps)
        if self._output is None:
            self._output = self.model.output_layer()
        weight, bias = self._output
        return F.linear(reps, weight, bias)  # what SequentialRecommender.score computes for all items

    # ------------------------------------------------------------------------------- conveniences
    def recommend_users(self, user_ids: Iterable[Any], k: int, exclude_seen: bool = False
                        ) -> list[list[Recommendation]]:
        """Top-``k`` for known users (original ids); unknown ids → :class:`InputError`."""
        user_ids = [str(u) for u in user_ids]
        histories = [self.user_history(u) for u in user_ids]
        return self.top_k(histories, k, exclude_seen, users=[self.dense_user(u) for u in user_ids])

    def recommend_history(self, events: Sequence[Event], k: int, exclude_seen: bool = False
                          ) -> list[Recommendation]:
        """Top-``k`` for one raw history."""
        return self.top_k([self.parse_history(events)], k, exclude_seen)[0]
