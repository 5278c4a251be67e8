"""The contract every model implements (M3BSR and every baseline).

The engine, evaluation, comparison and serving know nothing else about a model:

* ``loss(batch) -> dict[str, Tensor]``: named scalar terms; the engine sums them and logs each.
  ``"main"`` is the next-item cross-entropy (Eq. 24) over the query positions.
* ``represent(batch) -> Tensor [B, P, d]``: a user vector per query (``batch.query_times``),
  using only events strictly before each query.
* ``score(reps, items=None) -> Tensor``: raw scores, ``[B, P, n_items + 1]`` over the whole
  catalogue (column 0 is padding), or ``[B, P, C]`` for ``items`` of shape ``[C]`` or a ``slice``
  (shared, e.g. a chunk of the catalogue) or ``[B, P, C]`` (per query, e.g. sampled candidates).
  The base implementation is linear in ``output_layer()`` (Eq. 23); evaluation then reads that
  table once. A model may override ``score`` (evaluation then calls it chunk by chunk).
* ``history_bonus(reps, batch) -> (items [B, P, H], bonus [B, P, H]) | None`` (optional): extra
  scores for items of each query's own history (a repeat head); the engine adds them to the
  scores of those items everywhere scores are read (loss, both protocols, serving). Duplicates add up.
* ``data_mode(cfg, catalogue) -> DataMode`` (classmethod, before the model is built): what the model
  reads of this dataset, in a few words, and a notice when parts of it are inert (e.g. behavior-aware
  parts on a single-behavior dataset); an :class:`~m3bsr.errors.InputError` naming the key to set
  when it cannot run on it. The engine records the mode in metrics.json; ``compare`` tabulates it.
* ``output_rows(items) -> (W [C, d], b [C] | None)`` (optional): the rows of ``output_layer()`` for
  item ids [C]; the sampled loss reads only these. The default indexes ``output_layer()``; a model
  whose table is computed (item vectors from content) overrides it to compute only those rows.

Training loss (``train.loss``): the engine leaves ``loss_sampler`` None for the full softmax, or sets
a :class:`~m3bsr.models.sampled.NegativeSampler` for the sampled one; :meth:`main_loss` (and any
model cross-entropy over the catalogue, through :meth:`item_loss`) then scores each query's positive
against the batch's shared negatives with the logQ correction (:mod:`m3bsr.models.sampled`).
With ``train.loss_chunk_scores`` the engine sets ``loss_chunk``, and the full loss is computed that many
queries at a time, each chunk's scores recomputed in backward (:func:`chunked_cross_entropy`).

Models return raw scores; the engine masks padding and history and computes metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from m3bsr.batch import PAD, Catalogue, SequenceBatch
from m3bsr.config import BaseModelConfig
from m3bsr.models.sampled import NegativeSampler, sampled_cross_entropy


SINGLE_BEHAVIOR_MODE = "target (single-behavior data)"
"""The mode of every model that runs on a dataset without an auxiliary behavior."""


@dataclass(frozen=True)
class DataMode:
    """How a model reads a dataset: ``mode`` in a few words (metrics.json, compare's table) and a
    ``notice`` printed once when training starts, or None."""

    mode: str
    notice: str | None = None


class SequentialRecommender(nn.Module):
    """Base class: subclasses set ``config_class`` and implement :meth:`represent` and
    :meth:`output_layer` (or override :meth:`score`)."""

    config_class: ClassVar[type[BaseModelConfig]] = BaseModelConfig
    # False for a model whose represent() is the same constant for every user (pop): export refuses user vectors.
    user_vectors: ClassVar[bool] = True
    # train.loss=sampled: set by the engine (not a parameter or buffer: checkpoints are unchanged).
    loss_sampler: NegativeSampler | None = None
    # train.loss_chunk_scores: queries per chunk of the full-catalogue loss, set by the engine; None = one pass.
    loss_chunk: int | None = None

    def __init__(self, cfg: BaseModelConfig, catalogue: Catalogue):
        super().__init__()
        self.cfg = cfg
        self.n_items = catalogue.n_items

    @classmethod
    def data_mode(cls, cfg: BaseModelConfig, catalogue: Catalogue, where: str = "the dataset") -> DataMode:
        """What this model reads of ``catalogue``'s dataset (``where`` names it in errors and notices).

        The default suits single-stream models: with a ``model.input`` key, ``merged`` reads the
        auxiliary and target events by time and ``target`` the target events; without one, the target
        events. On a single-behavior dataset both read the target stream, and nothing is inert."""
        if catalogue.single_behavior:
            return DataMode(SINGLE_BEHAVIOR_MODE)
        merged = getattr(cfg, "input", "target") == "merged"
        return DataMode("merged: auxiliary + target" if merged else "target only")

    # --- to implement ---------------------------------------------------------------------------
    def represent(self, batch: SequenceBatch) -> Tensor:
        """[B, P, d] user representation per query."""
        raise NotImplementedError

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        """``(W [n_items + 1, d], b [n_items + 1] or None)``: score = reps @ W.T + b (Eq. 23)."""
        raise NotImplementedError

    # --- shared behaviour -----------------------------------------------------------------------
    @property
    def linear_score(self) -> bool:
        """True when this model keeps the base :meth:`score`, i.e. scores are ``F.linear(reps,
        *output_layer())`` (Eq. 23), so callers may build the output layer once and multiply themselves."""
        return type(self).score is SequentialRecommender.score

    def score(self, reps: Tensor, items: Tensor | slice | None = None) -> Tensor:
        """Raw scores of ``reps`` [B, P, d] against all items or ``items``: ids [C] or [B, P, C], or
        a ``slice`` of item ids (a contiguous catalogue chunk, read without a copy) → [B, P, C]."""
        weight, bias = self.output_layer()
        if items is None:
            return F.linear(reps, weight, bias)  # [B, P, I+1]
        if isinstance(items, slice):
            return F.linear(reps, weight[items], bias[items] if bias is not None else None)
        if items.dim() == 1:
            b = bias[items] if bias is not None else None
            return F.linear(reps, weight[items], b)  # [B, P, C]
        w = weight[items]  # [B, P, C, d]
        out = torch.einsum("bpd,bpcd->bpc", reps, w)
        return out + bias[items] if bias is not None else out

    def output_rows(self, items: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(W [C, d], b [C] or None)``: the rows of :meth:`output_layer` for item ids ``items`` [C]."""
        weight, bias = self.output_layer()
        return weight[items], (bias[items] if bias is not None else None)

    def sampled_scores(self, reps: Tensor, labels: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        """Raw scores for the sampled loss: ``reps`` [N, d] against each query's own positive ``labels``
        [N] → [N], and against the shared ``negatives`` [S] → [N, S].

        With the base linear :meth:`score` (Eq. 23) the rows of positives and negatives are read
        once through :meth:`output_rows`; a model that overrides :meth:`score` is asked through it."""
        if not self.linear_score:
            pos = self.score(reps[:, None, :], labels[:, None, None])[:, 0, 0]  # [N]
            return pos, self.score(reps[None], negatives)[0]  # [N, S]
        n = len(labels)
        weight, bias = self.output_rows(torch.cat([labels, negatives]))  # [N + S, d], [N + S]
        pos = (reps.float() * weight[:n].float()).sum(-1)  # [N]; float32 under autocast too
        neg = F.linear(reps, weight[n:])  # [N, S]
        if bias is not None:
            pos, neg = pos + bias[:n], neg + bias[n:]
        return pos, neg

    def sampled_loss_error(self) -> str | None:
        """Why ``train.loss=sampled`` cannot apply to this model as configured (None: it can)."""
        return None

    def history_bonus(self, reps: Tensor, batch: SequenceBatch) -> tuple[Tensor, Tensor] | None:
        """Optional scores added to the items of each query's own history: ``(items [B, P, H],
        bonus [B, P, H])``, item 0 = no entry. None (the default): no bonus."""
        return None

    def full_scores(self, batch: SequenceBatch) -> Tensor:
        """[B, P, n_items + 1] raw scores of every item at every query, history bonus included."""
        reps = self.represent(batch)
        return add_bonus(self.score(reps), self.history_bonus(reps, batch))

    def main_loss(self, reps: Tensor, batch: SequenceBatch) -> Tensor:
        """Eq. 24: mean cross-entropy of the true next target item over the query positions.

        With a ``loss_sampler`` (``train.loss=sampled``): its sampled-softmax estimate, the history
        bonus applied to the positive and to every sampled item (:func:`~m3bsr.models.sampled.sampled_logits`)."""
        mask = batch.query_mask
        bonus = self.history_bonus(reps, batch)
        return self.item_loss(reps[mask], batch.labels[mask],
                              None if bonus is None else (bonus[0][mask], bonus[1][mask]))

    def item_loss(self, reps: Tensor, labels: Tensor, bonus: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Mean cross-entropy of item ``labels`` [N] given query vectors ``reps`` [N, d] (and their history
        ``bonus`` ([N, H], [N, H]) or None): over the whole catalogue (padding excluded), or sampled
        with the ``loss_sampler`` when one is set."""
        if self.loss_sampler is not None:
            return sampled_cross_entropy(self, reps, labels, self.loss_sampler, bonus)
        if self.loss_chunk and len(labels) > self.loss_chunk and self.linear_score:
            return chunked_cross_entropy(reps, *self.output_layer(), labels, bonus, self.loss_chunk)
        return _catalogue_cross_entropy(self.score(reps), labels, bonus, "mean")

    def main_and_aux_target_loss(self, reps: Tensor, batch: SequenceBatch, weight: float) -> dict[str, Tensor]:
        """Eq. 24 plus ``weight`` x the cross-entropy of every auxiliary event's item (no history
        bonus: the repeat head models the target behavior). ``reps`` [B, P + La, d] is the
        representation of :func:`with_aux_queries` ``(batch)``: the target queries, then one query per
        auxiliary slot at that event's time (read from the events strictly before it)."""
        P = batch.labels.shape[1]
        aux = batch.aux_items != PAD  # [B, La]
        # Always the same term names (DDP sums them by name); a window may have no auxiliary event.
        return {"main": self.main_loss(reps[:, :P], batch),
                "aux_targets": (weight * self.item_loss(reps[:, P:][aux], batch.aux_items[aux])
                                if aux.any() else reps.new_zeros(()))}

    def loss(self, batch: SequenceBatch) -> dict[str, Tensor]:
        """Named loss terms; the default is the main cross-entropy only."""
        return {"main": self.main_loss(self.represent(batch), batch)}


def with_aux_queries(batch: SequenceBatch) -> SequenceBatch:
    """``batch`` with one more query per auxiliary slot ([B, P] → [B, P + La]): at the event's time,
    labelled with its item (padding slots get padding labels, so no query)."""
    return replace(batch, query_times=torch.cat([batch.query_times, batch.aux_times], 1),
                   labels=torch.cat([batch.labels, batch.aux_items], 1))


def add_bonus(scores: Tensor, bonus: tuple[Tensor, Tensor] | None) -> Tensor:
    """``scores`` [B, P, n_items + 1] plus a :meth:`~SequentialRecommender.history_bonus` (or None)."""
    if bonus is None:
        return scores
    items, values = bonus
    return scores.scatter_add(-1, items, values.to(scores.dtype))


def _catalogue_cross_entropy(logits: Tensor, labels: Tensor, bonus: tuple[Tensor, Tensor] | None,
                             reduction: str) -> Tensor:
    """Eq. 24 over scores ``logits`` [N, I+1] (history ``bonus`` added, padding never a valid answer)."""
    logits = add_bonus(logits, bonus)
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


def _chunk_cross_entropy_sum(reps: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                             bonus: tuple[Tensor, Tensor] | None) -> Tensor:
    return _catalogue_cross_entropy(F.linear(reps, weight, bias), labels, bonus, "sum")


def chunked_cross_entropy(reps: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                          bonus: tuple[Tensor, Tensor] | None, chunk: int) -> Tensor:
    """Eq. 23-24 as in :meth:`SequentialRecommender.item_loss`, ``chunk`` queries at a time: ``reps``
    [N, d] against the output layer ``weight`` [I+1, d], ``bias`` [I+1] or None → mean cross-entropy.

    Each chunk's [chunk, I+1] scores are recomputed in backward (:func:`torch.utils.checkpoint.checkpoint`)
    instead of kept, so the loss holds one chunk's scores at a time rather than all N queries'; the price
    is one more scoring pass. Same value and gradients as the one-pass loss up to float summation order."""
    total = reps.new_zeros((), dtype=torch.float32)
    for start in range(0, len(labels), chunk):
        part = slice(start, start + chunk)
        part_bonus = None if bonus is None else (bonus[0][part], bonus[1][part])
        total = total + checkpoint(_chunk_cross_entropy_sum, reps[part], weight, bias, labels[part], part_bonus,
                                   use_reentrant=False)
    return total / len(labels)


def candidate_bonus(candidates: Tensor, bonus: tuple[Tensor, Tensor] | None) -> Tensor | float:
    """The history bonus of each candidate: ``candidates`` [N, C], bonus ``([N, H], [N, H])`` → [N, C]."""
    if bonus is None:
        return 0.0
    items, values = bonus
    hit = (candidates.unsqueeze(-1) == items.unsqueeze(1)) & (items.unsqueeze(1) != 0)  # [N, C, H]
    return (hit.to(values.dtype) * values.unsqueeze(1)).sum(-1)
