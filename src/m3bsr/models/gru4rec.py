"""GRU4Rec: a recurrent network over the item sequence.

Hidasi, Karatzoglou, Baltrunas & Tikk, "Session-based Recommendations with Recurrent Neural
Networks", ICLR 2016. Defaults follow the paper: one GRU layer, dropout 0.5 on the hidden
output (its best RSC15 setting), a separate (untied) output layer with item biases.

NOTE (docs/baselines.md "Deviations from the papers"): the paper's session-parallel mini-batches with
TOP1/BPR ranking losses are replaced by the project's training pass: every target position of a
window, full-softmax cross-entropy. Items enter through an embedding instead of one-hot (the
paper's embedding variant), so the hidden size is shared with every other model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from m3bsr.batch import Catalogue, SequenceBatch
from m3bsr.models.base import SequentialRecommender
from m3bsr.models.configs import GRU4RecConfig
from m3bsr.models.layers import gather_latest_before, sequence_input


class GRU4Rec(SequentialRecommender):
    """GRU over the (right-padded) sequence; a query reads the hidden state after the latest
    event strictly before it. Padding comes after every real token, so it never reaches a
    real state. Shapes: [B, L] → GRU [B, L, d] → :meth:`represent` [B, P, d].
    """

    config_class = GRU4RecConfig

    def __init__(self, cfg: GRU4RecConfig, catalogue: Catalogue):
        super().__init__(cfg, catalogue)
        d = cfg.hidden_size
        self.target_behavior = catalogue.target_behavior
        self.item_emb = nn.Embedding(catalogue.n_items + 1, d, padding_idx=0)
        self.gru = nn.GRU(d, d, num_layers=cfg.n_layers, batch_first=True,
                          dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.out_weight = nn.Parameter(torch.randn(catalogue.n_items + 1, d) * 0.02)
        self.out_bias = nn.Parameter(torch.zeros(catalogue.n_items + 1))
        self.null = nn.Parameter(torch.randn(d) * 0.02)

    def represent(self, batch: SequenceBatch) -> Tensor:
        items, _, times = sequence_input(batch, self.cfg.input, self.target_behavior)
        h, _ = self.gru(self.item_emb(items))  # [B, L, d]
        return self.drop(gather_latest_before(h, times, batch.query_times, self.null))  # [B, P, d]

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        return self.out_weight, self.out_bias
