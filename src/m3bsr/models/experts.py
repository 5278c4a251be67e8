"""Multi-expert interest extraction, MEIE (paper Eq. 14-22; docs/model.md).

Experts (E = 2M + 1 with M modalities, or 2M without the common expert):

* specific experts (Eq. 18-19): one causal Transformer per (behavior, modality), run as one
  grouped stack; ``share_specific_experts`` (FLAG) ties the click and favor expert of a modality;
* common expert (Eq. 16-17): cross-attention with Q = the M·La auxiliary tokens, K = V = the
  M·Lt target tokens (an auxiliary token sees target events strictly before it), then a
  Transformer causal by time; or, with ``common_expert="merged"``, a vector computed outside
  (M3BSR's merged-stream backbone) and passed to :meth:`forward`.

Pooling (DECIDED): a query at time t reads each expert at its latest event before t (the common
expert: the mean of the M modality tokens of the latest auxiliary event); a stream with no event
before t reads a learned null vector. Expert order in every ``[..., E, d]`` tensor: auxiliary
modalities, target modalities, then common.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3bsr.batch import PAD_TIME
from m3bsr.models.layers import (GroupedTransformerBlock, TransformerBlock, TransformerEncoder, in_length_groups,
                                 latest_index_before, or_null, run_blocks, time_mask)


MIN_BUCKET = 16  # windows per length group: smaller groups cost more in call overhead than they save
MIN_SAVING = 0.25  # at inference, split into length groups only if that removes this share of the padded tokens


class MultiExpertInterestExtractor(nn.Module):
    """Experts (Eq. 14-19), disentanglement loss (Eq. 20) and fusion (Eq. 21-22)."""

    def __init__(self, modalities: list[str], d: int, n_layers: int, n_heads: int, dropout: float, *,
                 share_specific: bool, use_common: bool, fusion: str, contrast: str, tau: float,
                 length_buckets: int = 1, own_common: bool = True):
        super().__init__()
        self.length_buckets = length_buckets
        self.modalities = list(modalities)
        M = len(self.modalities)
        self.share_specific = share_specific
        self.use_common = use_common
        self.fusion, self.contrast, self.tau = fusion, contrast, tau
        groups = M if share_specific else 2 * M
        self.specific = nn.ModuleList(GroupedTransformerBlock(groups, d, n_heads, dropout)
                                      for _ in range(max(n_layers, 1)))
        self.own_common = use_common and own_common
        if self.own_common:
            self.cross = TransformerBlock(d, n_heads, dropout)  # Eq. 16
            self.common = TransformerEncoder(d, n_layers, n_heads, dropout)  # Eq. 17
        self.n_experts = 2 * M + int(use_common)
        self.null = nn.Parameter(torch.randn(2 * M + int(self.own_common), d) * 0.02)  # per pooled stream
        E = self.n_experts
        if fusion in ("gate", "residual"):
            self.w_s = nn.Linear(2 * M * d, d)  # Eq. 22: W_s [s_1..s_2M]
            if use_common and fusion == "gate":
                self.w_g = nn.Linear(E * d, d)  # Eq. 21: g = sigmoid(W_g [h_common; s] + b_g)
            if use_common and fusion == "residual":
                self.gate = nn.Parameter(torch.zeros(d))  # closed at initialisation: y = h_common
        else:
            self.router = nn.Sequential(nn.Linear(E * d, d), nn.GELU(), nn.Linear(d, E))

    # ------------------------------------------------------------------------------ experts
    def forward(self, aux: dict[str, Tensor], tgt: dict[str, Tensor], aux_times: Tensor, tgt_times: Tensor,
                query_times: Tensor, common: Tensor | None = None) -> Tensor:
        """Pooled expert vectors (Eq. 14-19). ``aux[m]``, ``tgt[m]`` [B, L, d] (same L), times [B, L],
        ``query_times`` [B, P], ``common`` [B, P, d] (given when the common expert is computed
        outside, else None) → [B, P, E, d]. :meth:`by_length` runs it in groups of similar length.

        In eval mode with fewer queries than tokens, the last layer of each expert computes only the
        rows its queries read (:func:`run_blocks`); training runs every row.
        """
        B, L, d = aux[self.modalities[0]].shape
        M = len(self.modalities)
        P = query_times.shape[1]
        idx_a, found_a = latest_index_before(aux_times, query_times)  # [B, P]: the row each query reads
        idx_t, found_t = latest_index_before(tgt_times, query_times)
        rows_only = not self.training and P < L
        x = torch.stack([torch.stack([aux[m] for m in self.modalities]),
                         torch.stack([tgt[m] for m in self.modalities])])  # [2, M, B, L, d]
        masks = torch.stack([time_mask(aux_times, aux_times, strict=False),
                             time_mask(tgt_times, tgt_times, strict=False)])  # [2, B, L, L]
        if self.share_specific:  # click and favor of a modality go through the same weights
            h = x.transpose(0, 1).reshape(M, 2 * B, L, d)  # [M, 2B, L, d]
            mask = masks.reshape(1, 2 * B, L, L)
            rows = torch.cat([idx_a, idx_t]).expand(M, 2 * B, P)
        else:
            h = x.reshape(2 * M, B, L, d)  # [2M, B, L, d]
            mask = masks.repeat_interleave(M, 0)  # [2M, B, L, L]
            rows = torch.stack([idx_a, idx_t]).repeat_interleave(M, 0)  # [2M, B, P]
        h = run_blocks(self.specific, h, mask, rows, last_only=rows_only)  # Eq. 18-19 → [G, N, P, d]
        h = h.view(M, 2, B, P, d).transpose(0, 1) if self.share_specific else h.view(2, M, B, P, d)
        # Pooling (DECIDED): each expert read at its latest event before the query, else its null vector.
        per_stream = h.permute(0, 2, 3, 1, 4).reshape(2, B, P, M * d)  # [2, B, P, M·d]
        null = self.null[: 2 * M].view(2, M * d)
        pooled = [or_null(per_stream[0], found_a, null[0]), or_null(per_stream[1], found_t, null[1])]
        experts = torch.cat(pooled, -1).view(B, P, 2 * M, d)  # [B, P, 2M, d]
        if self.own_common:
            h_common = self._common(x[0], x[1], aux_times, tgt_times, idx_a, rows_only)  # Eq. 16-17: [B, P, d]
            c = or_null(h_common, found_a, self.null[-1])
            experts = torch.cat([experts, c.unsqueeze(2)], 2)  # [B, P, 2M+1, d]
        return experts if common is None else torch.cat([experts, common.unsqueeze(2)], 2)

    def by_length(self, aux: dict[str, Tensor], tgt: dict[str, Tensor], aux_times: Tensor, tgt_times: Tensor,
                  query_times: Tensor, common: Tensor | None = None) -> Tensor:
        """:meth:`forward` (same arguments and result) run over up to ``length_buckets`` groups of
        windows of similar length, each trimmed to its longest window (:func:`in_length_groups`;
        speed only: every window is independent here and padding is masked).

        Most windows of a random batch are far shorter than its longest. Smaller groups also keep the
        temporaries in cache: on full ml100k windows, where nothing is trimmed, one group of 256
        trains ~1.4x slower than four of 64. At inference (no temporaries kept) a batch whose groups
        would save less than ``MIN_SAVING`` of its padded tokens, such as a length-sorted evaluation
        batch, runs as one group.
        """
        lengths = torch.maximum((aux_times < PAD_TIME).sum(1), (tgt_times < PAD_TIME).sum(1))  # [B]
        return in_length_groups(self, lengths, self.length_buckets,
                                tokens=dict(aux=aux, tgt=tgt, aux_times=aux_times, tgt_times=tgt_times),
                                windows=dict(query_times=query_times, common=common),
                                min_group=MIN_BUCKET, min_saving=0.0 if self.training else MIN_SAVING)

    def _common(self, aux: Tensor, tgt: Tensor, aux_times: Tensor, tgt_times: Tensor, rows: Tensor,
                last_only: bool) -> Tensor:
        """Common expert (Eq. 16-17): ``aux``, ``tgt`` [M, B, L, d] → the output at the auxiliary
        events ``rows`` [B, R] → [B, R, d] (``last_only``: see :func:`run_blocks`)."""
        M, B, L, d = aux.shape
        q = aux.permute(1, 2, 0, 3).reshape(B, L * M, d)  # [B, L·M, d], event-major
        kv = tgt.permute(1, 2, 0, 3).reshape(B, L * M, d)
        qt = aux_times.repeat_interleave(M, 1)  # [B, L·M]
        kt = tgt_times.repeat_interleave(M, 1)
        share = self.cross(q, time_mask(qt, kt, strict=True), kv=kv)  # Eq. 16
        tokens = (rows.unsqueeze(-1) * M + torch.arange(M, device=rows.device)).flatten(1)  # [B, R·M]
        h = self.common(share, time_mask(qt, qt, strict=False), tokens, last_only=last_only)  # Eq. 17
        return h.view(B, -1, M, d).mean(2)

    # ------------------------------------------------------------------------------ fusion
    def fuse(self, experts: Tensor) -> Tensor:
        """Eq. 21-22: [B, P, E, d] → y [B, P, d].

        NOTE (FLAG ``fusion``, docs/model.md): as printed the shapes disagree. ``gate``:
        ``g = sigmoid(W_g [h_common; s] + b_g)``, ``y = g·h_common + (1-g)·W_s s`` (without the
        common expert, ``y = W_s s``); ``router``: softmax weights over the experts from an MLP;
        ``residual``: ``y = h_common + γ ⊙ W_s s`` with γ [d] starting at zero (the specific experts
        join the common expert as a branch that is closed at initialisation).
        """
        flat = experts.flatten(-2)  # [B, P, E·d]
        if self.fusion == "router":
            w = torch.softmax(self.router(flat), -1)  # [B, P, E]
            return (w.unsqueeze(-1) * experts).sum(-2)
        n_spec = experts.shape[-2] - int(self.use_common)
        spec = self.w_s(experts[..., :n_spec, :].flatten(-2))
        if not self.use_common:
            return spec
        if self.fusion == "residual":
            return experts[..., -1, :] + self.gate.to(spec.dtype) * spec
        g = torch.sigmoid(self.w_g(flat))  # Eq. 21
        return g * experts[..., -1, :] + (1 - g) * spec  # Eq. 22

    # ------------------------------------------------------------------------------ Eq. 20
    def contrast_loss(self, e1: Tensor, e2: Tensor | None, window: Tensor) -> Tensor:
        """Disentanglement loss (Eq. 20) over the expert vectors of N real queries.

        ``e1`` [N, E, d] (first pass), ``e2`` [N, E, d] (second dropout pass; ``disentangle`` only),
        ``window`` [N] the window (user) of each query, ascending. Negatives from other users are
        the vectors of one query per window (its last), so memory is O(N·E·W), not O(N²).

        * ``disentangle`` (DECIDED default): InfoNCE; the positive of vector k is vector k of the
          same query under the second pass; negatives are the query's other E-1 second-pass vectors
          and vector k of other users.
        * ``literal`` (Eq. 20 as printed): the query's other E-1 vectors are positives, vector k of
          other users are negatives (this pulls the experts together).
        """
        N, E, _ = e1.shape
        if N == 0:
            return e1.sum() * 0.0  # no query in the batch: a zero that keeps the graph
        z1 = F.normalize(e1.float(), dim=-1)
        z2 = z1 if e2 is None else F.normalize(e2.float(), dim=-1)
        last = torch.ones_like(window, dtype=torch.bool)
        last[:-1] = window[1:] != window[:-1]
        pool = z2[last]  # [W, E, d]
        other = window.unsqueeze(1) != window[last].unsqueeze(0)  # [N, W]
        s_user = torch.einsum("nkd,njd->nkj", z1, z2) / self.tau  # [N, E, E]
        s_type = torch.einsum("nkd,wkd->nkw", z1, pool) / self.tau  # [N, E, W]
        s_type = s_type.masked_fill(~other.unsqueeze(1), float("-inf"))
        eye = torch.eye(E, dtype=torch.bool, device=e1.device)
        if self.contrast == "disentangle":
            logits = torch.cat([s_user, s_type], -1)  # [N, E, E+W], positive at column k
            target = torch.arange(E, device=e1.device).expand(N, E)
            return F.cross_entropy(logits.reshape(N * E, -1), target.reshape(-1))
        pos = s_user.masked_fill(eye, float("-inf"))  # other vectors of the same user
        every = torch.cat([pos, s_type], -1)
        return (torch.logsumexp(every, -1) - torch.logsumexp(pos, -1)).mean()


def causal_mean_pool(x: Tensor, times: Tensor, query_times: Tensor) -> Tensor:
    """``w/o MEIE`` ablation: mean of the tokens strictly before each query (zero if none).

    Shapes: ``x`` [B, L, d] (left-aligned, ascending ``times`` [B, L]), ``query_times`` [B, P] → [B, P, d].
    """
    index, found = latest_index_before(times, query_times)  # the prefix has index + 1 tokens
    csum = torch.gather(x.cumsum(1), 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, P, d]
    return csum / (index + 1).unsqueeze(-1).to(x.dtype) * found.unsqueeze(-1).to(x.dtype)
