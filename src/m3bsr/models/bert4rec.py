"""BERT4Rec: bidirectional self-attention trained with the cloze task.

Sun, Liu, Wu, Pei, Lin, Ou & Jiang, "BERT4Rec: Sequential Recommendation with Bidirectional
Encoder Representations from Transformer", CIKM 2019. Defaults follow the paper: 2 layers,
2 heads, dropout 0.1, mask proportion rho = 0.2, learned positions, GELU output projection,
output layer tied to the item embedding plus an item bias.

Training (cloze): tokens are replaced by ``[MASK]`` with probability ``mask_prob`` and the
model predicts them with full-softmax cross-entropy. With ``mask_scope = "target"`` (default)
only target-behavior tokens are masked, so the training task matches the evaluated one (the
next target item); every window with a target gets at least one mask (its last target).
Inference: for a query at time ``q`` the sequence keeps the events before ``q`` and a
``[MASK]`` is appended right after them; its hidden state is the representation.
NOTE: mask draws use the global torch RNG (seeded from the run seed by the engine, like dropout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3bsr.batch import Catalogue, SequenceBatch
from m3bsr.models.base import SequentialRecommender
from m3bsr.models.configs import BERT4RecConfig
from m3bsr.models.layers import TransformerEncoder, check_positions, sequence_input


class BERT4Rec(SequentialRecommender):
    """Shapes: tokens [N, L] → bidirectional encoder [N, L, d] → masked positions → [*, d]."""

    config_class = BERT4RecConfig

    def __init__(self, cfg: BERT4RecConfig, catalogue: Catalogue):
        super().__init__(cfg, catalogue)
        d = cfg.hidden_size
        self.target_behavior = catalogue.target_behavior
        self.mask_id = catalogue.n_items + 1
        self.item_emb = nn.Embedding(catalogue.n_items + 2, d, padding_idx=0)  # last row = [MASK]
        self.pos_emb = nn.Embedding(cfg.max_positions, d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.emb_ln = nn.LayerNorm(d)
        self.encoder = TransformerEncoder(d, cfg.n_layers, cfg.n_heads, cfg.dropout)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.out_bias = nn.Parameter(torch.zeros(catalogue.n_items + 1))
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode_tokens(self, tokens: Tensor, rows: Tensor | None = None) -> Tensor:
        """Bidirectional encoder over non-padding tokens: [N, L] → [N, L, d], or [N, R, d] at token
        indices ``rows`` [N, R] (at inference the last layer then computes only those rows)."""
        N, L = tokens.shape
        check_positions(L, self.cfg.max_positions, self.cfg.name)
        x = self.item_emb(tokens) + self.pos_emb(torch.arange(L, device=tokens.device))  # [N, L, d]
        x = self.emb_ln(self.emb_drop(x))
        mask = (tokens != 0).unsqueeze(1).expand(N, L, L)  # [N, L, L]: every real token sees every real token
        return self.encoder(x, mask, rows, last_only=not self.training)

    def represent(self, batch: SequenceBatch) -> Tensor:
        """One sequence per real query: the events before it, then ``[MASK]`` (paper, Sec. 3.6)."""
        items, _, times = sequence_input(batch, self.cfg.input, self.target_behavior)
        bi, pi = batch.query_mask.nonzero(as_tuple=True)  # N real queries
        q = batch.query_times[bi, pi]  # [N]
        keep = times[bi] < q[:, None]  # [N, L]; a prefix, since times ascend
        tokens = torch.where(keep, items[bi], torch.zeros_like(keep, dtype=items.dtype))
        tokens = F.pad(tokens, (0, 1))  # [N, L + 1]: room for the mask after a full window
        n_before = keep.sum(1)  # [N]
        tokens.scatter_(1, n_before[:, None], self.mask_id)
        reps = self.head(self.encode_tokens(tokens, n_before[:, None])[:, 0])  # [N, d]: the [MASK] row
        out = reps.new_zeros(*batch.labels.shape, reps.shape[-1])  # [B, P, d]
        out[bi, pi] = reps
        return out

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        return self.item_emb.weight[: self.n_items + 1], self.out_bias

    def loss(self, batch: SequenceBatch) -> dict[str, Tensor]:
        """Cloze loss: cross-entropy of the original item at every masked position."""
        items, beh, _ = sequence_input(batch, self.cfg.input, self.target_behavior)
        maskable = items != 0
        if self.cfg.mask_scope == "target":
            maskable &= beh == self.target_behavior
        masked = maskable & (torch.rand(items.shape, device=items.device) < self.cfg.mask_prob)
        # Windows where the draw masked nothing mask their last maskable token (as the paper's
        # fine-tuning masks the last item), so every window with a target contributes.
        empty = ~masked.any(1) & maskable.any(1)
        last = (maskable * torch.arange(items.shape[1], device=items.device)).argmax(1)  # [B]
        masked[empty.nonzero(as_tuple=True)[0], last[empty]] = True
        tokens = torch.where(masked, torch.full_like(items, self.mask_id), items)
        h = self.encode_tokens(tokens)  # [B, L, d]
        if not bool(masked.any()):
            return {"main": h.sum() * 0.0}
        return {"main": self.item_loss(self.head(h[masked]), items[masked])}  # [M, d]: full or sampled
