"""Building blocks shared by M3BSR and the baselines: time-aware masks and attention blocks.

Masks are boolean with True = "may attend" (the convention of
``torch.nn.functional.scaled_dot_product_attention``). Every attention in the models uses a
time-aware mask (docs/architecture.md "Time and causality"), not only a padding mask.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3bsr.batch import SequenceBatch
from m3bsr.errors import input_error
from m3bsr.models.configs import InputMode


def time_mask(q_times: Tensor, k_times: Tensor, *, strict: bool) -> Tensor:
    """[B, Lq, Lk] bool: query i may see key j iff ``k_times[j] < q_times[i]`` (strict) or ``<=``.

    Padding keys carry ``PAD_TIME`` and are hidden from every real query automatically.
    """
    q = q_times.unsqueeze(-1)  # [B, Lq, 1]
    k = k_times.unsqueeze(-2)  # [B, 1, Lk]
    return k < q if strict else k <= q


def latest_index_before(times: Tensor, query_times: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the latest token strictly before each query, and whether one exists.

    Shapes: ``times`` [B, L] (ascending, padding = PAD_TIME at the end), ``query_times`` [B, P]
    → ``index`` [B, P] (clamped to 0 when none), ``found`` [B, P] bool.
    """
    count = torch.searchsorted(times.contiguous(), query_times.contiguous(), right=False)  # [B, P]
    found = count > 0
    return (count - 1).clamp(min=0), found


def gather_latest_before(x: Tensor, times: Tensor, query_times: Tensor, null: Tensor) -> Tensor:
    """Read ``x`` [B, L, d] at the latest token strictly before each query → [B, P, d].

    A query with no earlier token reads the learned ``null`` vector [d] (pooling DECIDED, docs/model.md).
    """
    index, found = latest_index_before(times, query_times)
    out = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, P, d]
    return or_null(out, found, null)


def or_null(x: Tensor, found: Tensor, null: Tensor) -> Tensor:
    """``x`` [B, P, d] where ``found`` [B, P], else the learned ``null`` vector [d]."""
    return torch.where(found.unsqueeze(-1), x, null.to(x.dtype).expand_as(x))


class _MaskedScale(torch.autograd.Function):
    """``y = x * keep * scale`` saving only the boolean ``keep`` for the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, the same distribution as ``F.dropout`` (p quantised to 1/65536).

    Why: on CPU ``bernoulli_`` mask generation was about 1/3 of an M3BSR training step; 16-bit
    random integers compared with a threshold are ~2x cheaper. CUDA keeps the fused kernel.
    Draws from the global torch RNG, like ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    threshold = round(p * 65536) - 32768  # P(r < threshold) = p for r uniform on int16
    if x.device.type != "cpu" or threshold > 32767:  # p within 2^-17 of 1 does not fit int16
        return F.dropout(x, p, True)
    keep = torch.randint(-32768, 32768, x.shape, dtype=torch.int16) >= threshold
    return _MaskedScale.apply(x, keep, 1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with :func:`fast_dropout` (no parameters; checkpoints are unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)


class FeedForward(nn.Module):
    """Position-wise ``Linear → GELU → Dropout → Linear``."""

    def __init__(self, d: int, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, mult * d), nn.GELU(), FastDropout(dropout), nn.Linear(mult * d, d))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- the attention core
# Every attention of the models (MaskedAttention, GroupedAttention, MB-STR's behavior-aware block) splits
# heads with split_heads and attends with masked_sdpa; they differ only in their projections.


def check_heads(d: int, n_heads: int) -> None:
    """An :class:`~m3bsr.errors.InputError` naming ``model.n_heads`` unless ``n_heads`` divides ``d``."""
    if d % n_heads:
        raise input_error("config key model.n_heads", f"hidden size {d} is not divisible by n_heads {n_heads}",
                          "Set --set model.n_heads to a divisor of model.hidden_size")


def split_heads(x: Tensor, n_heads: int, parts: int = 1) -> Tensor:
    """``x`` [N, L, parts * d] (e.g. keys and values side by side) → [parts, N, n_heads, L, d / n_heads] (a view)."""
    N, L, width = x.shape
    return x.view(N, L, parts, n_heads, width // (parts * n_heads)).permute(2, 0, 3, 1, 4)


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``scaled_dot_product_attention`` with a boolean mask (True = may attend) that never returns NaN.

    Shapes: ``q`` [N, h, Lq, dh], ``k``, ``v`` [N, h, Lk, dh], ``mask`` [N, 1, Lq, Lk] bool, optional
    additive ``bias`` [N, h, Lq, Lk] (MB-STR's relative-position bias) → heads merged [N, Lq, h * dh] and
    ``has_key`` [N, Lq, 1] bool. A query that sees no key (SDPA would give NaN) attends to every key
    instead; the caller zeroes its output with ``has_key`` after the output projection.
    """
    has_key = mask.any(-1, keepdim=True)  # [N, 1, Lq, 1]
    safe = mask | ~has_key
    attn_mask = safe if bias is None else bias.masked_fill(~safe, float("-inf"))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # [N, h, Lq, dh]
    return y.transpose(1, 2).flatten(2), has_key.squeeze(1)


# --------------------------------------------------------------------------- attention blocks


class MaskedAttention(nn.Module):
    """Multi-head (cross-)attention with a boolean mask, via ``scaled_dot_product_attention``.

    Shapes: ``q`` [B, Lq, d], ``kv`` [B, Lk, d], ``mask`` [B, Lq, Lk] bool → [B, Lq, d].
    Rows of the mask with no True entry produce zeros (never NaN).
    """

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        check_heads(d, n_heads)
        self.h = n_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor) -> Tensor:
        (qh,) = split_heads(self.q(q), self.h)  # [B, h, Lq, dh]
        k, v = split_heads(self.kv(kv), self.h, 2)  # each [B, h, Lk, dh]
        y, has_key = masked_sdpa(qh, k, v, mask.unsqueeze(1), self.dropout if self.training else 0.0)  # [B, Lq, d]
        return self.out(y) * has_key.to(y.dtype)


class TransformerBlock(nn.Module):
    """Post-LN block: ``x = LN(x + Attn(x, kv, mask)); x = LN(x + FFN(x))`` (SASRec/BERT style).

    ``kv=None`` makes it self-attention. Shapes: ``x`` [B, Lq, d], ``kv`` [B, Lk, d],
    ``mask`` [B, Lq, Lk] bool → [B, Lq, d].

    Why a twin of :class:`GroupedTransformerBlock` (the same maths, tested equal per group): this one
    holds ``nn.Linear``/``nn.LayerNorm`` weights, with their initialisation and ``[d_out, d_in]`` layout:
    the parameters of every saved SASRec, BERT4Rec, MM-SASRec and M3BSR backbone checkpoint. A one-group
    grouped block would store them stacked and transposed (``[1, d_in, d_out]``, other names), so old
    checkpoints would need converting and fresh runs would draw other initial weights. The grouped one
    stacks G weight sets for one batched call. Both attend through :func:`masked_sdpa`.
    """

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.attn = MaskedAttention(d, n_heads, dropout)
        self.ln1 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.drop = FastDropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, kv: Tensor | None = None) -> Tensor:
        x = self.ln1(x + self.drop(self.attn(x, x if kv is None else kv, mask)))
        return self.ln2(x + self.drop(self.ffn(x)))


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x`` [*S, L, ...] at token indices ``rows`` [*S, R] along the token axis → [*S, R, ...].

    ``x`` may have size 1 in a leading axis where ``rows`` does not (a shared mask).
    """
    lead = rows.shape[:-1]
    index = [torch.arange(n, device=rows.device).view(*([1] * i), n, *([1] * (len(lead) - i)))
             if x.shape[i] == n else torch.zeros((1,) * (len(lead) + 1), dtype=torch.long, device=rows.device)
             for i, n in enumerate(lead)]
    return x[(*index, rows)]


def run_blocks(blocks, x: Tensor, mask: Tensor, rows: Tensor | None = None, *, last_only: bool = True) -> Tensor:
    """Self-attention ``blocks`` over ``x`` [*S, L, d] with ``mask`` [*S, L, L] → [*S, L, d].

    With ``rows`` [*S, R]: only those output rows, [*S, R, d]. With ``last_only`` the last block
    computes just them, with the full previous layer as keys (exact: a post-LN block is row-wise
    apart from its attention keys): inference only needs the rows read at the queries, a few per
    window. ``last_only=False`` computes every row and then reads them (training, where the
    queries cover most rows anyway).
    """
    blocks = list(blocks)
    if rows is None or not blocks or not last_only:
        for block in blocks:
            x = block(x, mask)
        return x if rows is None else take_rows(x, rows)
    for block in blocks[:-1]:
        x = block(x, mask)
    return blocks[-1](take_rows(x, rows), take_rows(mask, rows), kv=x)


class TransformerEncoder(nn.Module):
    """A stack of self-attention :class:`TransformerBlock` s sharing one mask [B, L, L]."""

    def __init__(self, d: int, n_layers: int, n_heads: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(d, n_heads, dropout) for _ in range(n_layers))

    def forward(self, x: Tensor, mask: Tensor, rows: Tensor | None = None, *, last_only: bool = True) -> Tensor:
        """``x`` [B, L, d], ``mask`` [B, L, L] → [B, L, d], or [B, R, d] at ``rows`` [B, R] (:func:`run_blocks`)."""
        return run_blocks(self.blocks, x, mask, rows, last_only=last_only)


def merge_by_time(aux_items: Tensor, aux_behaviors: Tensor, aux_times: Tensor, tgt_items: Tensor,
                  tgt_times: Tensor, target_behavior: int) -> tuple[Tensor, Tensor, Tensor]:
    """Interleave the auxiliary and target sequences into one time-ordered sequence.

    Shapes: ``aux_*`` [B, La], ``tgt_*`` [B, Lt] (left-aligned, padding time ``PAD_TIME``)
    → ``items``, ``behaviors``, ``times`` each [B, La + Lt], ascending in time, left-aligned
    (padding sorts to the end because its time is larger than every real time). Target tokens
    get behavior id ``target_behavior``; padding keeps item and behavior 0.
    """
    items = torch.cat([aux_items, tgt_items], 1)  # [B, L]
    tgt_beh = torch.where(tgt_items != 0, torch.full_like(tgt_items, target_behavior), torch.zeros_like(tgt_items))
    behaviors = torch.cat([aux_behaviors, tgt_beh], 1)  # [B, L]
    times = torch.cat([aux_times, tgt_times], 1)  # [B, L]
    times, order = torch.sort(times, dim=1, stable=True)
    return items.gather(1, order), behaviors.gather(1, order), times


# --------------------------------------------------------------------------- single-stream input
# What the single-stream baselines (GRU4Rec, SASRec, BERT4Rec, MM-SASRec) read, and their position check (the
# InputMode of their ``input`` key lives in models/configs.py, torch-free).


def sequence_input(batch: SequenceBatch, mode: InputMode, target_behavior: int) -> tuple[Tensor, Tensor, Tensor]:
    """The sequence a single-stream model reads: ``items``, ``behaviors``, ``times``, each [B, L].

    ``merged``: auxiliary + target events ordered by time (L = La + Lt); ``target``: target events
    only (L = Lt). Left-aligned, padding (item 0, time ``PAD_TIME``) at the end.
    """
    if mode == "merged":
        return merge_by_time(batch.aux_items, batch.aux_behaviors, batch.aux_times,
                             batch.tgt_items, batch.tgt_times, target_behavior)
    beh = torch.where(batch.tgt_items != 0, torch.full_like(batch.tgt_items, target_behavior),
                      torch.zeros_like(batch.tgt_items))
    return batch.tgt_items, beh, batch.tgt_times


def check_positions(length: int, max_positions: int, name: str) -> None:
    """An :class:`~m3bsr.errors.InputError` when a window is longer than the learned position table."""
    if length > max_positions:
        raise input_error("config key model.max_positions",
                          f"{name} input sequence of {length} tokens exceeds max_positions={max_positions}",
                          f"Set --set model.max_positions={length} or lower data.max_len")


# --------------------------------------------------------------------------- grouped (stacked) blocks
# G independent weight sets applied in one batched kernel each: M3BSR runs its seven denoisers and
# six specific experts as a few grouped calls instead of one small call per module.


class GroupedLinear(nn.Module):
    """G independent ``Linear(d_in, d_out)`` s. Shapes: ``x`` [G, *, d_in] → [G, *, d_out]."""

    def __init__(self, groups: int, d_in: int, d_out: int):
        super().__init__()
        bound = d_in ** -0.5  # nn.Linear's default initialisation range
        self.weight = nn.Parameter(torch.empty(groups, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        G, shape = x.shape[0], x.shape[1:-1]
        y = torch.baddbmm(self.bias, x.reshape(G, -1, x.shape[-1]), self.weight)  # [G, M, d_out]
        return y.view(G, *shape, -1)


class GroupedLayerNorm(nn.Module):
    """G independent ``LayerNorm(d)`` s. Shapes: ``x`` [G, *, d] → same."""

    def __init__(self, groups: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(groups, d))
        self.bias = nn.Parameter(torch.zeros(groups, d))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 1:  # one group: the fused affine LayerNorm kernel
            return F.layer_norm(x, x.shape[-1:], self.weight[0], self.bias[0])
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return torch.addcmul(self.bias.view(view), F.layer_norm(x, x.shape[-1:]), self.weight.view(view))


class GroupedAttention(nn.Module):
    """G independent multi-head (cross-)attentions with boolean masks (True = may attend).

    Shapes: ``q`` [G, N, Lq, d], ``kv`` [G, N, Lk, d], ``mask`` [G or 1, N, Lq, Lk] → [G, N, Lq, d].
    Rows with no True entry produce zeros (never NaN), as in :class:`MaskedAttention`.
    """

    def __init__(self, groups: int, d: int, n_heads: int, dropout: float):
        super().__init__()
        check_heads(d, n_heads)
        self.h = n_heads
        self.q = GroupedLinear(groups, d, d)
        self.kv = GroupedLinear(groups, d, 2 * d)
        self.out = GroupedLinear(groups, d, d)
        self.dropout = dropout

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor) -> Tensor:
        G, N, Lq, d = q.shape
        Lk = kv.shape[2]
        (qh,) = split_heads(self.q(q).flatten(0, 1), self.h)  # [G*N, h, Lq, dh]
        k, v = split_heads(self.kv(kv).flatten(0, 1), self.h, 2)  # each [G*N, h, Lk, dh]
        mask = mask.expand(G, N, Lq, Lk).reshape(G * N, 1, Lq, Lk)
        y, has_key = masked_sdpa(qh, k, v, mask, self.dropout if self.training else 0.0)  # [G*N, Lq, d]
        return self.out(y.view(G, N, Lq, d)) * has_key.view(G, N, Lq, 1).to(y.dtype)


class GroupedTransformerBlock(nn.Module):
    """G independent post-LN blocks: ``x = LN(x + Attn(x, kv)); x = LN(x + FFN(x))``.

    Shapes: ``x`` [G, N, Lq, d], ``kv`` [G, N, Lk, d] (``None``: self-attention),
    ``mask`` [G or 1, N, Lq, Lk] bool → [G, N, Lq, d]. Each group computes :class:`TransformerBlock`
    (why both exist: its docstring).
    """

    def __init__(self, groups: int, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.attn = GroupedAttention(groups, d, n_heads, dropout)
        self.ln1 = GroupedLayerNorm(groups, d)
        self.ff1 = GroupedLinear(groups, d, 4 * d)
        self.ff2 = GroupedLinear(groups, 4 * d, d)
        self.ln2 = GroupedLayerNorm(groups, d)
        self.drop = FastDropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, kv: Tensor | None = None) -> Tensor:
        x = self.ln1(x + self.drop(self.attn(x, x if kv is None else kv, mask)))
        return self.ln2(x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(x))))))


# --------------------------------------------------------------------------- length groups (speed only)
# Windows of a batch differ in length, but a batched call runs every window at the longest one's
# width. Running a few groups of similar length, each trimmed to its own longest window, computes
# the same values on fewer padded tokens.


def in_length_groups(fn: Callable[..., Tensor], lengths: Tensor, n_groups: int, tokens: dict[str, Any],
                     windows: dict[str, Any], *, min_group: int = 1, min_saving: float = 0.0) -> Tensor:
    """``fn(**tokens, **windows)`` over groups of windows of similar length → [B, ...] in window order.

    ``lengths`` [B]: real tokens per window (left-aligned, padding after them). ``tokens``: per-token
    arguments, tensors [B, L, ...] or dicts of them, trimmed to each group's longest window;
    ``windows``: per-window arguments, tensors [B, ...] or None. Windows are sorted by length and
    split into up to ``n_groups`` equal groups of at least ``min_group`` windows; if the groups
    would drop less than ``min_saving`` of the B·L token slots, ``fn`` runs once on the batch.
    Exact when ``fn`` treats windows independently and masks padding (a loop over groups, never
    over windows).
    """
    L = max(x.shape[1] for x in _leaves(tokens))
    B = len(lengths)
    k = min(n_groups, B // min_group)
    if k <= 1 or L <= 1:
        return fn(**tokens, **windows)
    order = torch.argsort(lengths, stable=True)
    groups = torch.tensor_split(order, k)
    if sum(len(idx) * max(int(lengths[idx[-1]]), 1) for idx in groups) > (1 - min_saving) * B * L:
        return fn(**tokens, **windows)  # the groups would save little padding
    parts = []
    for idx in groups:
        n = max(int(lengths[idx].max()), 1)
        parts.append(fn(**{name: _take(v, idx, n) for name, v in tokens.items()},
                        **{name: _take(v, idx) for name, v in windows.items()}))
    return torch.cat(parts)[torch.argsort(order)]


def _leaves(value: Any) -> list[Tensor]:
    """The tensors of a tensor, a dict of them (nested) or None."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    return [] if value is None else [value]


def _take(value: Any, idx: Tensor, n: int | None = None) -> Any:
    """Windows ``idx`` of a tensor [B, ...] (or of every tensor of a dict), trimmed to ``n`` tokens."""
    if isinstance(value, dict):
        return {name: _take(v, idx, n) for name, v in value.items()}
    if value is None:
        return None
    return value[idx] if n is None else value[idx, :n]
