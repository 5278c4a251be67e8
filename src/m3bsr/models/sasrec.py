"""SASRec: causal self-attention over the item sequence.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018. Defaults follow the
paper: 2 blocks, 1 head, dropout 0.2 (its ML-1m setting), learned absolute positions, the
output layer tied to the item embedding (score = <F_t, M_i>).

NOTE (docs/baselines.md "Deviations from the papers"): trained by default with full-softmax cross-entropy
on every query (Klenitskiy & Vasilev, RecSys 2023); ``loss = "bce"`` is the paper's binary
cross-entropy with one uniformly sampled negative per position.

Input (``input``): ``merged`` reads the auxiliary and target events interleaved by time (the
strongest fair input for a single-behavior model), ``target`` only the target behavior.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3bsr.batch import Catalogue, SequenceBatch
from m3bsr.models.base import SequentialRecommender, with_aux_queries
from m3bsr.models.configs import SASRecConfig
from m3bsr.models.layers import (TransformerEncoder, check_positions, latest_index_before, or_null,
                                 sequence_input, time_mask)

def sample_negatives(positives: Tensor, n_items: int) -> Tensor:
    """One item per positive, uniform over ``1..n_items`` without the positive itself. Shapes: [N] → [N].

    NOTE: draws from the global torch RNG (seeded from the run seed by the engine, like dropout).
    """
    offset = torch.randint(1, max(n_items, 2), positives.shape, device=positives.device)
    return (positives - 1 + offset) % n_items + 1


class SASRec(SequentialRecommender):
    """Causal Transformer; the representation for a query is the hidden state of the latest
    token strictly before it (a learned null vector when there is none).

    Shapes: sequence [B, L] → hidden [B, L, d] → :meth:`represent` [B, P, d].
    """

    config_class = SASRecConfig

    def __init__(self, cfg: SASRecConfig, catalogue: Catalogue):
        super().__init__(cfg, catalogue)
        d = cfg.hidden_size
        self.target_behavior = catalogue.target_behavior
        self.item_emb = nn.Embedding(catalogue.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_positions, d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.emb_ln = nn.LayerNorm(d)
        self.encoder = TransformerEncoder(d, cfg.n_layers, cfg.n_heads, cfg.dropout)
        self.null = nn.Parameter(torch.randn(d) * 0.02)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def item_vectors(self, items: Tensor) -> Tensor:
        """Input (and output) vector of each item id: [...] → [..., d]."""
        return self.item_emb(items)

    def represent(self, batch: SequenceBatch) -> Tensor:
        """[B, P, d]. Token i sees tokens with time <= its own; a query reads the latest token
        before it. In eval mode with fewer queries than tokens, the last layer computes only those rows."""
        items, _, times = sequence_input(batch, self.cfg.input, self.target_behavior)
        B, L = items.shape
        check_positions(L, self.cfg.max_positions, self.cfg.name)
        pos = self.pos_emb(torch.arange(L, device=items.device))  # [L, d]
        x = self.emb_ln(self.emb_drop(self.item_vectors(items) * math.sqrt(self.cfg.hidden_size) + pos))  # [B, L, d]
        index, found = latest_index_before(times, batch.query_times)  # [B, P]
        rows_only = not self.training and index.shape[1] < L
        h = self.encoder(x, time_mask(times, times, strict=False), index, last_only=rows_only)  # [B, P, d]
        return or_null(h, found, self.null)

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        return self.item_emb.weight, None

    def sampled_loss_error(self) -> str | None:
        if self.cfg.loss == "bce":
            return "model.loss=bce is its own sampled loss (one negative per query); set model.loss=ce"
        return None

    def loss(self, batch: SequenceBatch) -> dict[str, Tensor]:
        if self.cfg.aux_targets > 0:  # ce over the merged stream (config check)
            return self.main_and_aux_target_loss(self.represent(with_aux_queries(batch)), batch,
                                                 self.cfg.aux_targets)
        reps = self.represent(batch)
        if self.cfg.loss == "ce":
            return {"main": self.main_loss(reps, batch)}
        # Paper loss: -log sigmoid(s_pos) - log(1 - sigmoid(s_neg)), averaged over query positions.
        mask = batch.query_mask
        pos = batch.labels[mask]  # [N]
        neg = sample_negatives(pos, self.n_items)  # [N]
        r = reps[mask]  # [N, d]
        s = self.score(r[:, None, :], torch.stack([pos, neg], 1)[:, None, :])[:, 0].float()  # [N, 2]
        return {"main": F.softplus(-s[:, 0]).mean() + F.softplus(s[:, 1]).mean()}
