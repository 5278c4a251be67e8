"""The speed-ups of M3BSR (docs/performance.md) change no output: padding trimming, MEIE length
buckets, the query-rows-only last layer at inference and the fast dropout mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import m3bsr.models.experts as experts_module
import m3bsr.models.m3bsr as m3bsr_module
from m3bsr.batch import PAD, PAD_TIME
from m3bsr.models.experts import MultiExpertInterestExtractor
from m3bsr.models.layers import FastDropout, fast_dropout, in_length_groups

from factories import CONFIGS, make_batch, make_catalogue, make_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _pad_wider(batch, extra: int):
    """The same windows with ``extra`` more padding columns in both streams."""
    wide = {}
    for name, value in (("aux_items", PAD), ("aux_behaviors", PAD), ("aux_times", PAD_TIME),
                        ("tgt_items", PAD), ("tgt_times", PAD_TIME)):
        wide[name] = F.pad(getattr(batch, name), (0, extra), value=value)
    return type(batch)(**{**{k: getattr(batch, k) for k in ("users", "query_times", "labels")}, **wide})


@pytest.mark.parametrize("overrides", CONFIGS[:5], ids=lambda o: ",".join(x.split(".")[1] for x in o) or "default")
def test_trimming_and_buckets_leave_representations_unchanged(overrides, monkeypatch):
    """Reference: no trimming, one bucket, windows 7 columns wider than needed. The fast path
    (trimmed, 4 length buckets of >= 16 windows) must give the same representation of every query."""
    batch = make_batch(B=70, L=12, seed=5)
    lengths = torch.maximum((batch.aux_times < PAD_TIME).sum(1), (batch.tgt_times < PAD_TIME).sum(1))
    assert lengths.min() < lengths.max()  # the buckets really differ in length
    fast = make_model(*overrides, "model.length_buckets=4").eval()
    slow = make_model(*overrides, "model.length_buckets=1").eval()
    slow.load_state_dict(fast.state_dict())
    groups = _count_groups(monkeypatch)
    with torch.no_grad():
        got = fast.represent(batch)
        assert groups == [4] or fast.meie is None  # the buckets really ran
        monkeypatch.setattr(m3bsr_module, "trim_padding", lambda b: b)
        want = slow.represent(_pad_wider(batch, 7))
    mask = batch.query_mask
    assert torch.allclose(got[mask], want[mask], atol=1e-5, rtol=1e-4)


def _count_groups(monkeypatch) -> list[int]:
    """Record how many window groups each MEIE call runs (1 = no bucketing)."""
    calls: list[int] = []
    original_by_length, original_forward = MultiExpertInterestExtractor.by_length, MultiExpertInterestExtractor.forward

    def by_length(self, *args):
        calls.append(0)
        return original_by_length(self, *args)

    def forward(self, *args, **kwargs):
        calls[-1] += 1
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(MultiExpertInterestExtractor, "by_length", by_length)
    monkeypatch.setattr(MultiExpertInterestExtractor, "forward", forward)
    return calls


def test_length_groups_trim_each_group_and_keep_window_order():
    """in_length_groups sorts windows by length into groups, trims each group's tokens (nested
    dicts too) to its longest window, slices per-window arguments and returns window order; groups
    that would save too little padding, or too few windows per group, run as one call."""
    lengths = torch.tensor([5, 1, 3, 8, 2, 6, 0, 4])
    x = torch.arange(80, dtype=torch.float).view(8, 10)
    valid = (torch.arange(10) < lengths[:, None]).float()
    scale = torch.arange(8, dtype=torch.float)
    widths = []

    def fn(x, parts, scale, unused):
        widths.append(x.shape[1])
        assert parts["valid"].shape == x.shape and unused is None
        return (x * parts["valid"]).sum(1) * scale  # [B]

    args = dict(tokens=dict(x=x, parts={"valid": valid}), windows=dict(scale=scale, unused=None))
    want = (x * valid).sum(1) * scale
    assert torch.equal(in_length_groups(fn, lengths, 2, **args), want)
    assert widths == [3, 8]  # sorted lengths 0 1 2 3 | 4 5 6 8
    widths.clear()
    assert torch.equal(in_length_groups(fn, lengths, 2, **args, min_saving=0.9), want)  # saves 45 % < 90 %
    assert torch.equal(in_length_groups(fn, lengths, 2, **args, min_group=5), want)  # 8 windows: one group of 5+
    assert widths == [10, 10]


def test_equal_length_batch_runs_as_one_group_at_inference(monkeypatch):
    """Buckets that would save no padding are skipped in eval mode, kept in training."""
    batch = make_batch(B=70, L=12, seed=5)
    same = type(batch)(**{k: (v[:1].expand(70, *v.shape[1:]).contiguous() if k != "users" else v)
                          for k, v in vars(batch).items() if v is not None})
    model = make_model("model.no_specific_experts=false", "model.length_buckets=4", "model.dropout=0.0")
    assert model.meie is not None
    groups = _count_groups(monkeypatch)
    with torch.no_grad():
        model.eval().represent(batch)
        model.eval().represent(same)
        model.train().represent(same)
    assert groups == [4, 1, 4]
    assert 0 < experts_module.MIN_SAVING < 1


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(x.split(".")[1] for x in o) or "default")
def test_eval_rows_only_last_layer_equals_all_rows(overrides, monkeypatch):
    """Eval mode with fewer queries than tokens: the last layer of each expert computes only the
    rows the queries read. Reference: the all-rows pass (training mode, dropout 0, no loss)."""
    batch = make_batch(B=6, L=10, seed=2, queries="random")
    assert batch.query_times.shape[1] < batch.aux_items.shape[1]
    model = make_model(*overrides, "model.dropout=0.0")
    seen = []
    original = experts_module.run_blocks
    monkeypatch.setattr(experts_module, "run_blocks", lambda blocks, x, mask, rows=None, last_only=True: seen.append(
        rows is not None and last_only) or original(blocks, x, mask, rows, last_only=last_only))
    with torch.no_grad():
        rows_only = model.eval().represent(batch)
        assert all(seen) and (seen or model.meie is None)
        seen.clear()
        all_rows = model.train().represent(batch)
        assert not any(seen)  # training computes every row
    mask = batch.query_mask
    assert torch.allclose(rows_only[mask], all_rows[mask], atol=1e-5, rtol=1e-4)


def test_sasrec_rows_only_last_layer_equals_all_rows():
    from m3bsr.config import build_config
    from m3bsr.models.registry import build_model

    torch.manual_seed(0)
    cfg = build_config(model="sasrec", overrides=["model.hidden_size=16", "model.dropout=0.0"]).model
    model = build_model(cfg, make_catalogue(False))
    batch = make_batch(B=6, L=10, seed=3, queries="random")
    with torch.no_grad():
        rows_only, all_rows = model.eval().represent(batch), model.train().represent(batch)
    mask = batch.query_mask
    assert torch.allclose(rows_only[mask], all_rows[mask], atol=1e-5, rtol=1e-4)


def test_buckets_keep_training_loss_terms_and_gradients():
    """In training mode (dropout off, so both paths are deterministic apart from the diffusion
    noise, which is seeded) the loss terms and gradients of the bucketed path match one bucket."""
    batch = make_batch(B=64, L=10, seed=6)
    fast = make_model("model.no_specific_experts=false", "model.length_buckets=4", "model.dropout=0.0").train()
    slow = make_model("model.no_specific_experts=false", "model.length_buckets=1", "model.dropout=0.0").train()
    slow.load_state_dict(fast.state_dict())
    results = []
    for model in (fast, slow):
        torch.manual_seed(1)
        terms = model.loss(batch)
        sum(terms.values()).backward()
        results.append(({k: float(v.detach()) for k, v in terms.items()},
                        torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (t1, g1), (t2, g2) = results
    assert t1.keys() == t2.keys()
    for k in t1:
        assert t1[k] == pytest.approx(t2[k], rel=1e-4, abs=1e-6)
    assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-3)


def test_fast_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = fast_dropout(x, 0.2, True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.2) < 0.005  # binomial sd ~ 0.0006
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1.25)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x = keep / (1 - p)
    assert fast_dropout(x, 0.2, False) is x and fast_dropout(x, 0.0, True) is x
    module = FastDropout(0.5)
    assert isinstance(module, torch.nn.Dropout) and module.eval()(x) is x
    assert torch.all(fast_dropout(torch.ones(1000), 0.999999, True) == 0)


def test_catalogue_projection_gives_the_same_item_vectors():
    """Speed path: with more tokens than items the catalogue is projected once and gathered; the
    vectors (and their gradients) match projecting every token."""
    model = make_model("model.content_gate=true")  # the gate's gradient runs through the content part
    assert model.input.item_content
    items = torch.randint(0, model.n_items + 1, (8, 12))  # 96 tokens > 31 catalogue rows
    assert items.numel() > model.n_items + 1
    fast = model.item_vectors(items)
    slow = model.input.item_vector(items)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    weight = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * weight).sum(), model.input.content_gate)[0]
    g_slow = torch.autograd.grad((slow * weight).sum(), model.input.content_gate)[0]
    torch.testing.assert_close(g_fast, g_slow, atol=1e-5, rtol=1e-4)
    few = items[:1, :3]
    assert torch.equal(model.item_vectors(few), model.input.item_vector(few))  # few tokens: per token


def test_bert4rec_mask_row_only_last_layer_equals_all_rows():
    """At inference BERT4Rec's last layer computes only the [MASK] row of each query's sequence."""
    from m3bsr.config import build_config
    from m3bsr.models.registry import build_model

    torch.manual_seed(0)
    cfg = build_config(model="bert4rec", overrides=["model.hidden_size=16", "model.dropout=0.0"]).model
    model = build_model(cfg, make_catalogue(False))
    batch = make_batch(B=6, L=10, seed=3, queries="random")
    seen = []
    original = model.encoder.forward
    model.encoder.forward = lambda x, mask, rows=None, last_only=True: seen.append(last_only) or original(
        x, mask, rows, last_only=last_only)
    with torch.no_grad():
        rows_only, all_rows = model.eval().represent(batch), model.train().represent(batch)
    assert seen == [True, False]
    mask = batch.query_mask
    assert mask.sum() > 6 and torch.allclose(rows_only[mask], all_rows[mask], atol=1e-5, rtol=1e-4)


def test_mbstr_rows_only_last_layer_equals_all_rows():
    """At inference MB-STR's last block computes only the rows read at the queries (and its
    behavior-specific linears skip padding tokens): the representations of the all-rows pass."""
    from m3bsr.config import build_config
    from m3bsr.models.mbstr import MBTransformerBlock
    from m3bsr.models.registry import build_model

    torch.manual_seed(0)
    cfg = build_config(model="mbstr", overrides=["model.hidden_size=16", "model.dropout=0.0"]).model
    model = build_model(cfg, make_catalogue(True))
    batch = make_batch(B=6, L=10, seed=3, queries="random")
    seen = []
    original = MBTransformerBlock.forward

    def spy(self, x, beh, mask, bucket, rows=None):
        seen.append(rows is not None)
        return original(self, x, beh, mask, bucket, rows)

    MBTransformerBlock.forward = spy
    try:
        with torch.no_grad():
            rows_only, all_rows = model.eval().represent(batch), model.train().represent(batch)
    finally:
        MBTransformerBlock.forward = original
    n = cfg.n_layers
    assert seen == [False] * (n - 1) + [True] + [False] * n  # eval: the last block only; train: none
    mask = batch.query_mask
    assert mask.sum() > 6 and torch.allclose(rows_only[mask], all_rows[mask], atol=1e-5, rtol=1e-4)
