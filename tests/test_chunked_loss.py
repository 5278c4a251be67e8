"""The full loss in chunks (``train.loss_chunk_scores``, m3bsr.models.base.chunked_cross_entropy): the same
loss and gradients as the one-pass Eq. 24, with no [N, I+1] score tensor kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m3bsr.config import build_config
from m3bsr.engine.train import open_session
from m3bsr.models import base
from m3bsr.models.base import _catalogue_cross_entropy, chunked_cross_entropy
from test_sampled import IDS, MODELS, data, make  # noqa: F401  (data: the module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def loss_and_grads(model, batch, chunk):
    model.loss_chunk = chunk
    torch.manual_seed(3)  # the same dropout and diffusion draws in both passes
    total = sum(model.loss(batch).values())
    model.zero_grad(set_to_none=True)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,overrides", MODELS, ids=IDS)
def test_chunked_loss_equals_the_one_pass_loss(data, name, overrides, monkeypatch):
    """Every model's training loss and every parameter's gradient, chunks of 3 queries against one pass
    (float summation order aside); the history bonus (default m3bsr, repeat head set non-zero) goes through
    the chunks too. Every model with the base linear scorer does compute in chunks (MM-SASRec: one pass)."""
    catalogue, windows, batch = data
    model = make(name, catalogue, overrides)
    calls = []
    monkeypatch.setattr(base, "chunked_cross_entropy", lambda *a: calls.append(a[-1]) or chunked_cross_entropy(*a))
    ref, ref_grads = loss_and_grads(model, batch, None)
    assert not calls
    got, got_grads = loss_and_grads(model, batch, 3)
    assert bool(calls) == model.linear_score and set(calls) <= {3}
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == ref_grads.keys()
    for key, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def largest_saved(fn):
    """(value, numel of the largest tensor autograd keeps for backward) of ``fn()``."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = fn()
    return value, max(sizes)


def test_chunks_keep_no_whole_score_matrix():
    """One pass keeps the [N, I+1] scores (softmax output) for backward; in chunks nothing larger than the
    inputs is kept, and the backward recomputes each chunk: the gradients match."""
    g = torch.Generator().manual_seed(0)
    N, I, d = 40, 500, 8
    reps = torch.randn(N, d, generator=g, requires_grad=True)
    weight = torch.randn(I + 1, d, generator=g, requires_grad=True)
    bias = torch.randn(I + 1, generator=g, requires_grad=True)
    labels = torch.randint(1, I + 1, (N,), generator=g)
    bonus = (torch.randint(0, I + 1, (N, 4), generator=g), torch.randn(N, 4, generator=g, requires_grad=True))

    whole, whole_max = largest_saved(lambda: _catalogue_cross_entropy(F.linear(reps, weight, bias), labels, bonus,
                                                                      "mean"))
    parts, parts_max = largest_saved(lambda: chunked_cross_entropy(reps, weight, bias, labels, bonus, 7))
    assert whole_max >= N * (I + 1)
    assert parts_max <= (I + 1) * d < N * (I + 1)
    ins = (reps, weight, bias, bonus[1])
    torch.testing.assert_close(parts, whole)
    for a, b in zip(torch.autograd.grad(parts, ins), torch.autograd.grad(whole, ins)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_engine_sets_queries_per_chunk_from_the_score_budget(tiny_prepared):
    """``train.loss_chunk_scores=S`` → ``S // (I + 1)`` queries per chunk (at least one); unset → one pass."""
    sets = ["train.device=cpu", "model.hidden_size=16"]
    plain = open_session(build_config({}, model="sasrec", overrides=sets), tiny_prepared, quiet=True)
    assert plain.model.loss_chunk is None
    n_rows = plain.model.n_items + 1
    for scores, want in [(10 * n_rows + 3, 10), (1, 1)]:
        cfg = build_config({}, model="sasrec", overrides=[*sets, f"train.loss_chunk_scores={scores}"])
        assert open_session(cfg, tiny_prepared, quiet=True).model.loss_chunk == want
