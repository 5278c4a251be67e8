"""MB-STR: multi-behavior sequential transformer over the merged multi-behavior sequence.

Yuan, Gao, Li, Xu, Yu & Lin, "Multi-Behavior Sequential Transformer Recommender", SIGIR 2022.
The paper's three parts, as implemented here:

* Input: item embedding + behavior embedding per token of the time-ordered merged sequence
  (``batch.aux_*`` interleaved with the target events, which carry ``catalogue.target_behavior``).
* MB-Trm (behavior-aware attention): query/key/value and feed-forward projections are
  behavior-specific (one weight per behavior type, chosen by the token's behavior), and each head
  adds a learned bias indexed by (relative-distance bucket, query behavior, key behavior) — the
  paper's multi-behavior sequential pattern generator, in T5-style log buckets.
* BA-Pred (behavior-aware prediction): shared experts mixed by a behavior-specific softmax gate;
  the target-behavior head gives the representation scored against the (tied) item embeddings.

Defaults: 2 layers, 2 heads, dropout 0.1, 3 experts, 32 buckets (the paper follows BERT4Rec's sizes).
NOTE (docs/baselines.md "Deviations from the papers"): the paper trains with BERT4Rec's cloze task; here the
model is causal (time-masked attention) and trained like the other causal baselines with full
cross-entropy on every target position (``main``), plus the same next-item loss on auxiliary-behavior
tokens through their own behavior head (``aux``, weight ``aux_weight``), so every behavior supervises
the model as in the paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3bsr.batch import Catalogue, SequenceBatch
from m3bsr.models.base import SINGLE_BEHAVIOR_MODE, DataMode, SequentialRecommender
from m3bsr.models.configs import MBSTRConfig
from m3bsr.models.layers import (check_heads, gather_latest_before, latest_index_before, masked_sdpa, merge_by_time,
                                 or_null, split_heads, take_rows, time_mask)


def relative_bucket(distance: Tensor, n_buckets: int, max_distance: int) -> Tensor:
    """Bucket of a non-negative distance: exact below ``n/2``, logarithmic up to ``max_distance``."""
    exact = n_buckets // 2
    d = distance.clamp(min=0)
    log = exact + (torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (n_buckets - exact)).long()
    return torch.where(d < exact, d, log.clamp(max=n_buckets - 1))


class BehaviorLinear(nn.Module):
    """A linear map with one weight per behavior id (0 = padding): ``x`` [B, L, i], ``beh`` [B, L] → [B, L, o]."""

    def __init__(self, n_behaviors: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_behaviors + 1, d_in, d_out) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.zeros(n_behaviors + 1, d_out))

    def forward(self, x: Tensor, beh: Tensor) -> Tensor:
        # Tokens sorted by behavior once (one gather there, one back), then one matmul per behavior
        # on a contiguous slice: the same rows per matmul as a boolean selection each, without a
        # mask, a scatter and a zero fill per behavior. At inference padding tokens (behavior 0)
        # are left at zero: no real token attends to them.
        flat, b = x.reshape(-1, x.shape[-1]), beh.reshape(-1)  # [M, i], [M]
        order = torch.sort(b, stable=True).indices
        counts = torch.bincount(b, minlength=self.weight.shape[0]).tolist()
        xs = flat.index_select(0, order)  # grouped by behavior
        ys, start = [], 0
        for k, n in enumerate(counts):  # a handful of behaviors: one matmul each
            if k == 0 and not self.training:
                ys.append(n)  # padding at inference: n zero rows, made below
            else:
                ys.append(F.linear(xs[start:start + n], self.weight[k].T, self.bias[k]))
            start += n
        dtype = next((y.dtype for y in ys if isinstance(y, Tensor)), x.dtype)  # autocast may compute in bf16
        ys = torch.cat([y if isinstance(y, Tensor) else xs.new_zeros(y, self.weight.shape[-1], dtype=dtype)
                        for y in ys])  # [M, o] in behavior order
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return ys.index_select(0, inverse).view(*x.shape[:-1], -1)


class MBTransformerBlock(nn.Module):
    """Behavior-aware self-attention + behavior-specific FFN (post-LN). Shapes: [B, L, d] → [B, L, d].

    It attends through the shared core (``split_heads``, ``masked_sdpa``); a block of its own because its
    projections are chosen per token behavior and its attention adds the per-head relative bias.
    """

    def __init__(self, cfg: MBSTRConfig, n_behaviors: int):
        super().__init__()
        d, self.h = cfg.hidden_size, cfg.n_heads
        check_heads(d, self.h)
        self.nb = n_behaviors + 1
        self.cfg = cfg
        self.qkv = BehaviorLinear(n_behaviors, d, 3 * d)
        self.out = nn.Linear(d, d)
        self.bias = nn.Embedding(cfg.n_buckets * self.nb * self.nb, self.h)
        nn.init.zeros_(self.bias.weight)
        self.ffn1 = BehaviorLinear(n_behaviors, d, 4 * d)
        self.ffn2 = BehaviorLinear(n_behaviors, 4 * d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, beh: Tensor, mask: Tensor, bucket: Tensor, rows: Tensor | None = None) -> Tensor:
        """[B, L, d] → [B, L, d]; with token indices ``rows`` [B, R] only those rows, [B, R, d], every
        token still a key (exact: the block is row-wise apart from its attention keys)."""
        q, k, v = split_heads(self.qkv(x, beh), self.h, 3)  # each [B, h, L, dh]
        pair = (bucket * self.nb + beh[:, :, None]) * self.nb + beh[:, None, :]  # [B, L, L]
        if rows is not None:  # inference: the rows read at the queries, a few per window
            q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))  # [B, h, R, dh]
            x, beh, pair, mask = take_rows(x, rows), take_rows(beh, rows), take_rows(pair, rows), take_rows(mask, rows)
        bias = self.bias(pair).permute(0, 3, 1, 2).to(q.dtype)  # [B, h, Lq, L]
        y, has_key = masked_sdpa(q, k, v, mask.unsqueeze(1), self.cfg.dropout if self.training else 0.0,
                                 bias=bias)  # [B, Lq, d]
        x = self.ln1(x + self.drop(self.out(y) * has_key.to(y.dtype)))
        return self.ln2(x + self.drop(self.ffn2(self.drop(F.gelu(self.ffn1(x, beh))), beh)))


class MBSTR(SequentialRecommender):
    """Shapes: merged tokens [B, L] → hidden [B, L, d] → latest before query [B, P, d] → target head."""

    config_class = MBSTRConfig

    @classmethod
    def data_mode(cls, cfg: MBSTRConfig, catalogue: Catalogue, where: str = "the dataset") -> DataMode:
        """Multi-behavior; on a single-behavior dataset it runs, with its behavior-aware parts inert."""
        if not catalogue.single_behavior:
            return DataMode("multi-behavior: behavior-aware, merged")
        return DataMode(SINGLE_BEHAVIOR_MODE, f"mbstr: {where} has one behavior, so the behavior-specific "
                        "weights and attention biases are shared by every token and the auxiliary-behavior loss "
                        "is off: MB-STR runs as a Transformer with relative-distance biases on the target stream")

    def __init__(self, cfg: MBSTRConfig, catalogue: Catalogue):
        super().__init__(cfg, catalogue)
        d, nb = cfg.hidden_size, catalogue.n_behaviors
        self.target_behavior = catalogue.target_behavior
        self.item_emb = nn.Embedding(catalogue.n_items + 1, d, padding_idx=0)
        self.beh_emb = nn.Embedding(nb + 1, d, padding_idx=0)
        self.emb_ln = nn.LayerNorm(d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(MBTransformerBlock(cfg, nb) for _ in range(cfg.n_layers))
        self.experts = nn.Linear(d, cfg.n_experts * d)
        self.gates = nn.Parameter(torch.zeros(nb + 1, d, cfg.n_experts))
        self.out_ln = nn.LayerNorm(d)
        self.null = nn.Parameter(torch.randn(d) * 0.02)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.beh_emb.weight, std=0.02)  # same scale as items, or behaviors drown item identity
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            self.beh_emb.weight[0].zero_()

    def encode(self, batch: SequenceBatch, query_times: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Hidden states [B, L, d] of the merged sequence and its items, behaviors, times [B, L]. With
        ``query_times`` [B, P] the last block computes only the latest token before each query: hidden
        states [B, P, d] (inference)."""
        items, beh, times = merge_by_time(batch.aux_items, batch.aux_behaviors, batch.aux_times,
                                          batch.tgt_items, batch.tgt_times, self.target_behavior)
        L = items.shape[1]
        x = self.emb_ln(self.emb_drop(self.item_emb(items) + self.beh_emb(beh)))  # [B, L, d]
        mask = time_mask(times, times, strict=False)  # [B, L, L]
        pos = torch.arange(L, device=items.device)
        bucket = relative_bucket(pos[:, None] - pos[None, :], self.cfg.n_buckets, self.cfg.max_distance)  # [L, L]
        rows = latest_index_before(times, query_times)[0] if query_times is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, beh, mask, bucket, rows if i == len(self.blocks) - 1 else None)
        return x, items, beh, times

    def behavior_head(self, h: Tensor, beh: Tensor) -> Tensor:
        """BA-Pred: ``sum_k softmax(G_b h)_k E_k(h)`` for behavior ``beh``. Shapes: [N, d], [N] → [N, d]."""
        N, d = h.shape
        experts = self.experts(h).view(N, -1, d)  # [N, K, d]
        gate = torch.softmax(torch.einsum("nd,ndk->nk", h, self.gates[beh].to(h.dtype)), -1)  # [N, K]
        return self.out_ln(torch.einsum("nk,nkd->nd", gate, experts))

    def represent(self, batch: SequenceBatch) -> Tensor:
        if self.training:
            h, _, _, times = self.encode(batch)
            last = gather_latest_before(h, times, batch.query_times, self.null)  # [B, P, d]
        else:  # the last block computes only the rows read at the queries
            h, _, _, times = self.encode(batch, batch.query_times)  # [B, P, d]
            last = or_null(h, latest_index_before(times, batch.query_times)[1], self.null)
        B, P, d = last.shape
        beh = torch.full((B * P,), self.target_behavior, device=last.device)
        return self.behavior_head(last.reshape(B * P, d), beh).view(B, P, d)

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        return self.item_emb.weight, None

    def loss(self, batch: SequenceBatch) -> dict[str, Tensor]:
        h, items, beh, times = self.encode(batch)
        last = gather_latest_before(h, times, batch.query_times, self.null)  # [B, P, d]
        mask = batch.query_mask
        tgt = torch.full((int(mask.sum()),), self.target_behavior, device=h.device)
        reps = self.behavior_head(last[mask], tgt)  # [N, d]
        terms = {"main": self.item_loss(reps, batch.labels[mask])}  # full or sampled (train.loss)
        if self.cfg.aux_weight > 0:
            # Token i predicts token i+1 when that one is an auxiliary event (its own behavior head).
            nxt_items, nxt_beh = items[:, 1:], beh[:, 1:]
            sel = (nxt_items != 0) & (nxt_beh != self.target_behavior)
            if sel.any():
                aux = self.behavior_head(h[:, :-1][sel], nxt_beh[sel])  # [M, d]
                terms["aux"] = self.cfg.aux_weight * self.item_loss(aux, nxt_items[sel])
            else:
                terms["aux"] = h.sum() * 0.0
        return terms
