"""Sampled softmax (``train.loss=sampled``): the next-item cross-entropy against a few shared negatives.

The full loss (Eq. 23-24) normalises over the whole catalogue. For a query n with user vector
``x_n``, score ``s_n(i)`` (Eq. 23, plus a model's history bonus) and positive ``y_n``:

    L_n = -s_n(y_n) + log sum_{i=1..I} exp s_n(i)

Sampled softmax draws S negatives ``j_1..j_S`` once per batch, shared by all its queries, from a
proposal ``q`` over items ``1..I`` (padding item 0 has ``q_0 = 0`` and is never drawn):

    q_i = (c_i + 1)^alpha / sum_{k=1..I} (c_k + 1)^alpha

``c_i`` = how often item i is a training-split target (the popularity model's counts); the + 1
keeps items that never are a training target drawable; ``alpha`` = ``train.loss_alpha`` (1 =
proportional to popularity, 0 = uniform). Every candidate's logit is corrected by log q (the logQ
correction), the positive's included:

    o_n(i) = s_n(i) - log q_i
    L_n    = -o_n(y_n) + log( exp o_n(y_n) + sum_{k=1..S} [j_k != y_n] exp o_n(j_k) )

Why the positive is corrected too: given the candidate set C = {y} u {j_1..j_S}, with y from the data
and the j_k drawn from q, the probability that a member c of C is the true item is proportional to
exp(s(c)) / q_c (Bengio & Senecal 2008; Jean et al. 2015): the same correction for every member. A
correction on the negatives only would lower each positive by log(1/q_y) relative to its negatives,
a bias towards rare items, and would not reduce to the full loss in the check below.

Accidental hits (a drawn j_k equal to the query's positive) are masked (-inf): they are the positive,
not a negative, and would count it twice. The positive itself (column 0) is never masked.

Draws are i.i.d. with replacement by default (duplicates each count, as the importance-sampling
estimate of the partition sum does). ``train.loss_replacement=false`` draws S distinct items
(successively, proportional to q; S is capped at I) with the same correction: exact for alpha = 0,
where every item's inclusion probability is S/I, a constant that cancels in the softmax; an
approximation otherwise. With S = I, alpha = 0 and no replacement the candidates are the whole
catalogue, every logit is the full one plus log I, and L_n equals the full loss (tested).

Cost per step: the scores are N x (1 + S) instead of N x (I + 1), and the gradient reaches only the
output rows of the positives and the drawn items.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class NegativeSampler:
    """Draws the batch's shared negatives from ``q_i ∝ (c_i + 1)^alpha`` (module docstring).

    ``counts`` [n_items + 1] training target counts (index 0 ignored); ``n`` negatives per draw
    (capped at n_items without replacement); ``generator`` on the counts' device (a dedicated
    stream: the draws leave dropout's global RNG untouched, and its state goes into last.pt).
    """

    def __init__(self, counts: Tensor, n: int, *, alpha: float = 1.0, replacement: bool = True,
                 generator: torch.Generator | None = None):
        n_items = len(counts) - 1
        if n_items < 1 or n < 1:
            raise ValueError(f"NegativeSampler needs at least one item and one negative (items {n_items}, n {n})")
        log_w = alpha * torch.log1p(counts.double().clamp(min=0))  # log (c + 1)^alpha, in float64
        log_w[0] = float("-inf")  # padding: never drawn
        log_q = log_w - torch.logsumexp(log_w, 0)
        self.log_q = log_q.float()  # [n_items + 1], log_q[0] = -inf
        self.probs = log_q.exp().float()  # [n_items + 1], probs[0] = 0
        self.n_items = n_items
        self.replacement = replacement
        self.n = n if replacement else min(n, n_items)
        self.alpha = alpha
        self.generator = generator

    @classmethod
    def from_labels(cls, labels: np.ndarray | Tensor, n_items: int, n: int, *, alpha: float = 1.0,
                    replacement: bool = True, seed: int | None = None,
                    device: torch.device | str = "cpu") -> "NegativeSampler":
        """From the labels of the training windows (0 = no query): ``c_i`` = occurrences of item i."""
        labels = torch.as_tensor(np.asarray(labels)).reshape(-1).long()
        counts = torch.bincount(labels[labels > 0], minlength=n_items + 1)[: n_items + 1]
        generator = None
        if seed is not None:
            from m3bsr.seeding import torch_generator
            generator = torch_generator(seed, "loss-negatives", device)
        return cls(counts.to(device), n, alpha=alpha, replacement=replacement, generator=generator)

    def draw(self) -> Tensor:
        """[S] item ids in ``1..n_items`` (never 0), on the counts' device."""
        return torch.multinomial(self.probs, self.n, self.replacement, generator=self.generator)

    def describe(self) -> str:
        how = "with" if self.replacement else "without"
        return (f"{self.n} negatives per batch, q ∝ (training target count + 1)^{self.alpha:g}, "
                f"{how} replacement, logQ-corrected")


def shared_candidate_bonus(candidates: Tensor, bonus: tuple[Tensor, Tensor], n_items: int) -> Tensor:
    """History bonus of candidates shared by every query: ``candidates`` [S] (repeats allowed),
    ``bonus = (items [N, H], values [N, H])`` (item 0 = no entry) → [N, S] float32.

    Equals ``candidate_bonus(candidates.expand(N, S), bonus)`` without the [N, S, H] comparison:
    each history entry is sent to its candidate's column through an item → column table
    (O(N·H + N·S) instead of O(N·S·H))."""
    items, values = bonus
    unique, inverse = torch.unique(candidates, return_inverse=True)  # [U], [S]
    none = len(unique)  # the column of "not a candidate"
    column = torch.full((n_items + 1,), none, dtype=torch.long, device=candidates.device)
    column[unique] = torch.arange(none, device=candidates.device)
    column[0] = none  # a history's padding entries never add
    sums = values.new_zeros(items.shape[0], none + 1, dtype=torch.float32)
    sums.scatter_add_(1, column[items], values.float())  # [N, U + 1]
    return sums[:, inverse]  # [N, S]


def sampled_logits(model, reps: Tensor, labels: Tensor, negatives: Tensor, log_q: Tensor,
                   bonus: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """[N, 1 + S] float32 logQ-corrected logits: column 0 = ``o_n(y_n)``, column 1 + k = ``o_n(j_k)``
    or -inf where ``j_k == y_n`` (an accidental hit).

    ``reps`` [N, d] query vectors, ``labels`` [N] positives, ``negatives`` [S], ``log_q`` [n_items + 1],
    ``bonus`` the queries' history bonus ``([N, H], [N, H])`` or None. Scores come from
    ``model.sampled_scores`` (the model's own scoring function)."""
    pos, neg = model.sampled_scores(reps, labels, negatives)  # [N], [N, S]
    pos, neg = pos.float(), neg.float()
    if bonus is not None:
        items, values = bonus
        pos = pos + ((items == labels[:, None]) & (items != 0)).float().mul(values.float()).sum(1)
        neg = neg + shared_candidate_bonus(negatives, bonus, model.n_items)
    pos = pos - log_q[labels]
    neg = (neg - log_q[negatives]).masked_fill(negatives[None, :] == labels[:, None], float("-inf"))
    return torch.cat([pos[:, None], neg], 1)


def sampled_cross_entropy(model, reps: Tensor, labels: Tensor, sampler: NegativeSampler,
                          bonus: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Mean over the N queries of ``L_n`` (module docstring) with one fresh draw of negatives."""
    logits = sampled_logits(model, reps, labels, sampler.draw(), sampler.log_q, bonus)
    return torch.nn.functional.cross_entropy(logits, labels.new_zeros(len(labels)))
