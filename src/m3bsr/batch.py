"""The tensors that flow from the data layer to every model (no file I/O, no model code).

Both the data layer (which builds them) and the models (which consume them) import this
module; neither imports the other.

Time is the per-user event rank in (timestamp, input order). A representation for a query at
time ``q`` may use only events with time ``< q`` (docs/architecture.md). Sequences are left-aligned
(right-padded): token ``j`` of a sequence sits at position ``j`` counted from the window start,
so a per-target reference pass and the all-targets pass see the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

PAD = 0
"""Padding id for items, behaviors and side ids."""

PAD_TIME = 2**62
"""Time of padding tokens: later than every query, so time masks hide them."""


@dataclass
class SequenceBatch:
    """A batch of user windows.

    Shapes (B users, La auxiliary tokens, Lt target tokens, P queries, C candidates, X excluded):

    * ``users``         [B]      dense user ids (1-based).
    * ``aux_items``     [B, La]  auxiliary-behavior item ids (e.g. clicks), 0 = padding.
    * ``aux_behaviors`` [B, La]  behavior id of each auxiliary token (1-based, see
      :attr:`Catalogue.behavior_names`), 0 = padding. Several auxiliaries may be merged.
    * ``aux_times``     [B, La]  event rank of each auxiliary token, ``PAD_TIME`` for padding.
    * ``tgt_items``     [B, Lt]  target-behavior item ids (e.g. favors), 0 = padding.
    * ``tgt_times``     [B, Lt]  event rank of each target token, ``PAD_TIME`` for padding.
    * ``query_times``   [B, P]   time of each predicted event; only events strictly earlier may be used.
    * ``labels``        [B, P]   the item to predict at each query, 0 = no query (padding).
    * ``candidates``    [B, P, C] or None  sampled-protocol candidates (evaluation only).
    * ``exclude_items`` [B, X] or None     items masked in full ranking (never the label), 0 = padding.

    In training windows the queries are the window's target events themselves
    (``query_times == tgt_times``, ``labels == tgt_items``): one forward pass yields every target.
    """

    users: Tensor
    aux_items: Tensor
    aux_behaviors: Tensor
    aux_times: Tensor
    tgt_items: Tensor
    tgt_times: Tensor
    query_times: Tensor
    labels: Tensor
    candidates: Tensor | None = None
    exclude_items: Tensor | None = None

    @property
    def query_mask(self) -> Tensor:
        """[B, P] bool, True where a query exists."""
        return self.labels != PAD

    @property
    def n_queries(self) -> int:
        """Number of real queries (targets) in the batch."""
        return int(self.query_mask.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SequenceBatch":
        """Move every tensor to ``device``."""
        return replace(self, **{f.name: (getattr(self, f.name).to(device, non_blocking=non_blocking)
                                         if getattr(self, f.name) is not None else None)
                                for f in fields(self)})

    def pin_memory(self) -> "SequenceBatch":
        """Pin every tensor (for asynchronous host→GPU copies)."""
        return replace(self, **{f.name: (getattr(self, f.name).pin_memory()
                                         if getattr(self, f.name) is not None else None)
                                for f in fields(self)})


@dataclass
class Catalogue:
    """What a model may know about items, as tensors (built by the data layer, read by models).

    * ``n_items``: real items have ids ``1..n_items``; 0 is padding.
    * ``behavior_names``: behavior id ``k`` (1-based) is ``behavior_names[k - 1]``.
    * ``target_behavior``: the behavior id of the target behavior.
    * ``features[m]``: [n_items + 1, D_m] float32 frozen features of modality ``m`` (``image``,
      ``text``); row 0 and missing rows are zero and must be read together with the mask.
    * ``feature_masks[m]``: [n_items + 1] bool, True where item has a feature (row 0 False).
    * ``side_ids[s]``: [n_items + 1] int64 side id (brand, seller, category...), 0 = unknown.
    * ``side_sizes[s]``: number of side ids including 0.
    """

    n_items: int
    behavior_names: list[str] = field(default_factory=lambda: ["click", "favor"])
    target_behavior: int = 2
    features: dict[str, Tensor] = field(default_factory=dict)
    feature_masks: dict[str, Tensor] = field(default_factory=dict)
    side_ids: dict[str, Tensor] = field(default_factory=dict)
    side_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def n_behaviors(self) -> int:
        return len(self.behavior_names)

    @property
    def single_behavior(self) -> bool:
        """True for a dataset of the target behavior alone: every window's auxiliary stream is empty."""
        return self.n_behaviors == 1

    @property
    def feature_dims(self) -> dict[str, int]:
        """Modality name → feature width."""
        return {m: int(x.shape[1]) for m, x in self.features.items()}
