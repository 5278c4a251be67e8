"""Prepared dataset → fixed-size numpy windows → :class:`~m3bsr.batch.SequenceBatch` tensors.

Training windows hold up to ``max_len`` training targets of one user (chunks from the end of the
target sequence) and the most recent ``max_len`` auxiliary events before the window's last
target; every target in the window is a query (the all-targets pass, docs/architecture.md).
Evaluation windows hold, for one valid/test target, the most recent ``max_len`` events of each
behavior strictly before it, the stored sampled candidates, and the items to mask in full ranking.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch

from m3bsr.batch import PAD_TIME, SequenceBatch
from m3bsr.data.prepared import PreparedDataset


@dataclass
class WindowArrays:
    """Numpy twin of :class:`SequenceBatch` holding all windows; index it to get a batch."""

    users: np.ndarray
    aux_items: np.ndarray
    aux_behaviors: np.ndarray
    aux_times: np.ndarray
    tgt_items: np.ndarray
    tgt_times: np.ndarray
    query_times: np.ndarray
    labels: np.ndarray
    candidates: np.ndarray | None = None
    exclude_items: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)

    @property
    def n_targets(self) -> int:
        """Number of real queries over all windows."""
        return int((self.labels != 0).sum())

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """``(aux, tgt)`` [n] int64: the number of events in each window's two streams."""
        return (self.aux_times < PAD_TIME).sum(1), (self.tgt_times < PAD_TIME).sum(1)

    def length_order(self) -> np.ndarray:
        """[n] a stable permutation putting windows of similar length next to each other (by the
        longer stream, then the total), so a batch of neighbours trims to little padding."""
        return _by_length(*self.lengths())

    def batch(self, index: np.ndarray | slice, *, trim: bool = False) -> SequenceBatch:
        """The windows at ``index`` as a :class:`SequenceBatch` of CPU tensors.

        ``trim`` drops the trailing columns that are padding in every selected window (each stream
        to its own longest, at least 1; the exclusion lists likewise). Exact for every model:
        windows are left-aligned, positions count from the left and padding is masked.
        """
        arrays = {f.name: getattr(self, f.name)[index] if getattr(self, f.name) is not None else None
                  for f in fields(self)}
        if trim:
            for stream in ("aux", "tgt"):
                width = max(1, int((arrays[f"{stream}_times"] < PAD_TIME).sum(1).max(initial=0)))
                for k in (f"{stream}_items", f"{stream}_times") + (("aux_behaviors",) if stream == "aux" else ()):
                    arrays[k] = arrays[k][:, :width]
            if arrays["exclude_items"] is not None:
                width = max(1, int((arrays["exclude_items"] != 0).sum(1).max(initial=0)))
                arrays["exclude_items"] = arrays["exclude_items"][:, :width]
        return SequenceBatch(**{k: (torch.from_numpy(np.ascontiguousarray(v)) if v is not None else None)
                                for k, v in arrays.items()})


class _UserEvents:
    """Per-user CSR view of ``events.parquet`` (split by stream), built once."""

    def __init__(self, ds: PreparedDataset):
        ev = {c: ds.column("events", c) for c in ("user", "stream", "item", "behavior", "order")}
        self.n_users = ds.n_users
        self.streams = {}
        for stream in (0, 1):
            sel = ev["stream"] == stream
            u = ev["user"][sel]
            ptr = np.searchsorted(u, np.arange(self.n_users + 2))
            self.streams[stream] = (ptr, ev["item"][sel].astype(np.int64),
                                    ev["behavior"][sel].astype(np.int64) + 1,
                                    ev["order"][sel].astype(np.int64))

    def get(self, stream: int, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Items, behavior ids (1-based), orders of one user's stream, ordered by time."""
        ptr, items, beh, order = self.streams[stream]
        a, b = ptr[user], ptr[user + 1]
        return items[a:b], beh[a:b], order[a:b]


def _put(dst: np.ndarray, row: int, values: np.ndarray) -> None:
    dst[row, : len(values)] = values


def _alloc(n: int, L: int, p: int) -> dict[str, np.ndarray]:
    """Padded arrays for ``n`` windows of ``L`` tokens per stream and ``p`` queries."""
    return {
        "users": np.zeros(n, np.int64),
        "aux_items": np.zeros((n, L), np.int64), "aux_behaviors": np.zeros((n, L), np.int64),
        "aux_times": np.full((n, L), PAD_TIME, np.int64),
        "tgt_items": np.zeros((n, L), np.int64), "tgt_times": np.full((n, L), PAD_TIME, np.int64),
        "query_times": np.full((n, p), PAD_TIME, np.int64), "labels": np.zeros((n, p), np.int64),
    }


def _pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Ragged id lists → [len(rows), max(1, longest)] int64, right-padded with 0."""
    out = np.zeros((len(rows), max([len(r) for r in rows] + [1])), np.int64)
    for row, values in enumerate(rows):
        _put(out, row, values)
    return out


class WindowBuilder:
    """Builds training and evaluation windows of one prepared dataset for a context ``max_len``."""

    def __init__(self, ds: PreparedDataset, max_len: int):
        self.ds = ds
        self.max_len = max_len
        self.events = _UserEvents(ds)

    def _fill_aux(self, out: dict, row: int, user: int, before: int) -> None:
        items, beh, order = self.events.get(0, user)
        k = np.searchsorted(order, before)  # events strictly before `before`
        lo = max(0, k - self.max_len)
        _put(out["aux_items"], row, items[lo:k])
        _put(out["aux_behaviors"], row, beh[lo:k])
        _put(out["aux_times"], row, order[lo:k])

    def train_windows(self) -> WindowArrays:
        """All training windows: every target event before the user's first evaluation target."""
        first_eval = np.full(self.ds.n_users + 1, np.iinfo(np.int64).max, np.int64)
        for t in (self.ds.valid, self.ds.test):
            np.minimum.at(first_eval, t.user, t.order)
        spans = []  # (user, lo, hi) slices of the target stream
        for user in range(1, self.ds.n_users + 1):
            _, _, order = self.events.get(1, user)
            n = int(np.searchsorted(order, first_eval[user]))
            for hi in range(n, 0, -self.max_len):
                spans.append((user, max(0, hi - self.max_len), hi))
        out = _alloc(len(spans), self.max_len, self.max_len)
        for row, (user, lo, hi) in enumerate(spans):
            items, _, order = self.events.get(1, user)
            out["users"][row] = user
            _put(out["tgt_items"], row, items[lo:hi])
            _put(out["tgt_times"], row, order[lo:hi])
            _put(out["labels"], row, items[lo:hi])
            _put(out["query_times"], row, order[lo:hi])
            self._fill_aux(out, row, user, int(order[hi - 1]))
        return WindowArrays(**out)

    def eval_windows(self, split: Literal["valid", "test"],
                     exclude: Literal["target", "none", "all"] = "target") -> WindowArrays:
        """One window per valid/test target: history strictly before it, candidates, exclusions.

        ``exclude_items`` lists the user's target-behavior items before the query (``target``),
        also the auxiliary items (``all``), or nothing (``none``); the positive is never listed.
        """
        targets = getattr(self.ds, split)
        n = len(targets)
        out = _alloc(n, self.max_len, 1)
        excluded: list[np.ndarray] = []
        for row in range(n):
            user, item, q = int(targets.user[row]), int(targets.item[row]), int(targets.order[row])
            out["users"][row] = user
            out["labels"][row, 0] = item
            out["query_times"][row, 0] = q
            t_items, _, t_order = self.events.get(1, user)
            k = int(np.searchsorted(t_order, q))
            lo = max(0, k - self.max_len)
            _put(out["tgt_items"], row, t_items[lo:k])
            _put(out["tgt_times"], row, t_order[lo:k])
            self._fill_aux(out, row, user, q)
            seen = t_items[:k] if exclude != "none" else t_items[:0]
            if exclude == "all":
                a_items, _, a_order = self.events.get(0, user)
                seen = np.concatenate([seen, a_items[: np.searchsorted(a_order, q)]])
            seen = np.unique(seen)
            excluded.append(seen[seen != item])
        return WindowArrays(**out, candidates=targets.candidates[:, None, :].astype(np.int64),
                            exclude_items=_pad_rows(excluded))


def _by_length(aux: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """[n] the stable permutation sorting windows by their longer stream, then their total length."""
    return np.lexsort((aux + tgt, np.maximum(aux, tgt)))


def training_order(windows: WindowArrays, batch_size: int, pool: int, generator: torch.Generator) -> np.ndarray:
    """[n] one epoch's training order: a plain shuffle (one ``randperm``, the draw
    :func:`iterate_batches` makes with ``shuffle``), or :func:`bucketed_order` when ``pool`` > 0."""
    if pool:
        return bucketed_order(windows, batch_size, pool, generator)
    return torch.randperm(len(windows), generator=generator).numpy()


def bucketed_order(windows: WindowArrays, batch_size: int, pool: int, generator: torch.Generator) -> np.ndarray:
    """[n] a training order whose consecutive ``batch_size`` slices are batches of similar-length windows.

    The windows are shuffled (one ``randperm`` from ``generator``), cut into pools of ``pool`` batches,
    each pool is sorted by length (:meth:`WindowArrays.length_order`'s key) and cut into batches, and the
    full batches are shuffled (a second ``randperm``); the one short batch, if any, stays last, as in a
    plain shuffled pass. Every window appears once per epoch, as without bucketing. Trimmed
    (:meth:`WindowArrays.batch` with ``trim``), such batches carry little padding.
    """
    n = len(windows)
    perm = torch.randperm(n, generator=generator).numpy()
    aux, tgt = windows.lengths()
    pools = [perm[s: s + batch_size * pool] for s in range(0, n, batch_size * pool)]
    sorted_perm = np.concatenate([p[_by_length(aux[p], tgt[p])] for p in pools]) if n else perm
    n_full = n // batch_size
    batches = sorted_perm[: n_full * batch_size].reshape(n_full, batch_size)
    shuffled = batches[torch.randperm(n_full, generator=generator).numpy()].reshape(-1)
    return np.concatenate([shuffled, sorted_perm[n_full * batch_size:]])


def iterate_batches(windows: WindowArrays, batch_size: int, *, shuffle: bool = False,
                    generator: torch.Generator | None = None, pin_memory: bool = False,
                    rank: int = 0, world_size: int = 1, order: np.ndarray | None = None,
                    trim: bool = False, max_tokens: int | None = None):
    """Yield :class:`SequenceBatch` es of ``batch_size`` windows.

    With ``shuffle`` the order is a permutation drawn from ``generator`` (so resuming with a
    restored generator replays the same order); ``order`` gives it explicitly instead (e.g.
    :meth:`WindowArrays.length_order`). With ``world_size > 1`` each rank takes every
    ``world_size``-th window of the permutation (a distributed sampler). ``trim``: see
    :meth:`WindowArrays.batch`. ``max_tokens`` ends a batch early once its windows times its
    longest window (the longer stream) would pass that many (at least one window per batch):
    with ``order`` by length, short windows come in full batches and long ones in small batches.
    """
    n = len(windows)
    if order is None:
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    if world_size > 1:
        order = order[rank::world_size]
    if max_tokens is not None:
        aux, tgt = windows.lengths()
        longest = np.maximum(np.maximum(aux, tgt), 1)[order]
    start = 0
    while start < len(order):
        size = batch_size
        if max_tokens is not None:
            width = np.maximum.accumulate(longest[start: start + batch_size])  # [<= batch_size]
            size = max(1, int((np.arange(1, len(width) + 1) * width <= max_tokens).sum()))
        b = windows.batch(order[start: start + size], trim=trim)
        start += size
        yield b.pin_memory() if pin_memory else b


# --------------------------------------------------------------------------- histories "up to now"
# (used by serving: one window per user with everything known so far, the query after the last event)


@dataclass
class History:
    """One user's full event history, each stream ordered by time (``times`` = per-user event rank).

    ``aux_items``/``aux_behaviors``/``aux_times`` [Na]: auxiliary stream (behavior ids 1-based);
    ``tgt_items``/``tgt_times`` [Nt]: target stream.
    """

    aux_items: np.ndarray
    aux_behaviors: np.ndarray
    aux_times: np.ndarray
    tgt_items: np.ndarray
    tgt_times: np.ndarray

    @property
    def now(self) -> int:
        """Rank just after the last event: a query at this time may use every event."""
        last = [int(t[-1]) for t in (self.aux_times, self.tgt_times) if len(t)]
        return max(last) + 1 if last else 0

    def items(self) -> np.ndarray:
        """Unique items the user interacted with in any behavior."""
        return np.unique(np.concatenate([self.aux_items, self.tgt_items]))


def latest_windows(histories: list[History], max_len: int, users: np.ndarray | None = None) -> WindowArrays:
    """One window per history with its most recent ``max_len`` events of each stream and one query
    just after its last event (``labels`` is 1 as a placeholder so the query counts as real; there
    is no true next item). ``exclude_items`` lists every item of the history (0-padded).
    """
    L = max_len
    out = _alloc(len(histories), L, 1)
    if users is not None:
        out["users"][:] = users
    out["labels"][:] = 1
    for row, h in enumerate(histories):
        _put(out["aux_items"], row, h.aux_items[-L:])
        _put(out["aux_behaviors"], row, h.aux_behaviors[-L:])
        _put(out["aux_times"], row, h.aux_times[-L:])
        _put(out["tgt_items"], row, h.tgt_items[-L:])
        _put(out["tgt_times"], row, h.tgt_times[-L:])
        out["query_times"][row, 0] = h.now
    return WindowArrays(**out, exclude_items=_pad_rows([h.items() for h in histories]))


def user_history(builder: WindowBuilder, user: int) -> History:
    """Every event of dense ``user`` in ``builder``'s prepared dataset as a :class:`History`."""
    a_items, a_beh, a_order = builder.events.get(0, user)
    t_items, _, t_order = builder.events.get(1, user)
    return History(a_items, a_beh, a_order, t_items, t_order)
