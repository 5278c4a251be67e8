"""Popularity baseline: every user gets the items ranked by how often they were a training target."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from m3bsr.batch import Catalogue, SequenceBatch
from m3bsr.models.base import SequentialRecommender
from m3bsr.models.configs import PopConfig


class Pop(SequentialRecommender):
    """Counts target events seen in training; score(i) = count(i) for every user.

    Training "loss" is zero and carries no gradient: the counts are accumulated in a buffer
    each time a training batch passes. ``fit_once`` tells the engine that one pass over the
    training windows is the whole fit (no epochs, no loss, no early stopping).
    """

    config_class = PopConfig
    fit_once: ClassVar[bool] = True
    user_vectors: ClassVar[bool] = False  # represent() is a constant 1: the ranking is the same for everyone

    def __init__(self, cfg: PopConfig, catalogue: Catalogue):
        super().__init__(cfg, catalogue)
        self.register_buffer("counts", torch.zeros(catalogue.n_items + 1))

    def represent(self, batch: SequenceBatch) -> Tensor:
        return torch.ones(*batch.labels.shape, 1, device=batch.labels.device)  # [B, P, 1]

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        return self.counts[:, None], None  # [I+1, 1]

    def loss(self, batch: SequenceBatch) -> dict[str, Tensor]:
        if self.training:
            labels = batch.labels[batch.query_mask]
            self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.counts.dtype))
        return {"main": torch.zeros((), device=self.counts.device)}
