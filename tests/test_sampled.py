"""Sampled softmax (``train.loss=sampled``, m3bsr.models.sampled): the exact reduction to the full
loss, logQ, accidental hits, the history bonus of sampled items, sparse gradients, the proposal,
and the full loss left bit for bit as it was."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from factories import make_tiny_prepared
from m3bsr.config import build_config
from m3bsr.data.batches import WindowBuilder
from m3bsr.data.prepared import PreparedDataset
from m3bsr.models.base import candidate_bonus
from m3bsr.models.registry import build_model, model_names
from m3bsr.models.sampled import NegativeSampler, sampled_logits, shared_candidate_bonus

pytestmark = pytest.mark.usefixtures("one_thread")

# Every registered model with a loss to sample (pop is fitted by counting), plus the M3BSR variants
# that change the output layer: the paper preset's linear Eq. 23 layer, and the default's tied vectors
# with the repeat head's history bonus.
MODELS = [(n, ()) for n in model_names() if n != "pop"] + [("m3bsr", ("model.preset=paper",))]
IDS = [n + ("-paper" if ov else "") for n, ov in MODELS]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_tiny_prepared(tmp_path_factory.mktemp("ss") / "tiny", n_users=24)
    ds = PreparedDataset.load(root)
    windows = WindowBuilder(ds, 8).train_windows()
    return ds.catalogue(), windows, windows.batch(slice(0, 10))


def make(name, catalogue, overrides=()):
    cfg = build_config({}, model=name, overrides=["model.hidden_size=16", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, catalogue)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the repeat head starts at zero: give it values, so its bonus is not 0
        for pname, prm in model.named_parameters():
            if pname.startswith("repeat."):
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    return model


def uniform_all_items(model, windows, seed=0):
    """S = I, alpha = 0, without replacement: every item exactly once, q_i = 1/I."""
    return NegativeSampler.from_labels(windows.labels, model.n_items, model.n_items, alpha=0.0,
                                       replacement=False, seed=seed)


@pytest.mark.parametrize("name,overrides", MODELS, ids=IDS)
def test_all_items_uniform_without_replacement_is_the_full_loss(data, name, overrides):
    """With S = I uniform draws without replacement every logit is the full one + log I (a constant,
    the positive's included), so the softmax and the loss are the full ones; each model's other terms
    (diffusion noise, contrast) are untouched, since the draws use their own generator."""
    catalogue, windows, batch = data
    model = make(name, catalogue, overrides)
    torch.manual_seed(7)
    full = {k: float(v.detach()) for k, v in model.loss(batch).items()}
    model.loss_sampler = uniform_all_items(model, windows)
    torch.manual_seed(7)
    sampled = {k: float(v.detach()) for k, v in model.loss(batch).items()}
    assert sampled.keys() == full.keys()
    for k in full:
        assert sampled[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k


def full_logits(model, batch):
    """[N, I + 1] the full loss's logits of the real queries (history bonus in), their reps and labels."""
    reps = model.represent(batch)
    mask = batch.query_mask
    bonus = model.history_bonus(reps, batch)
    logits = model.score(reps[mask]).float()
    if bonus is not None:
        logits = logits.scatter_add(1, bonus[0][mask], bonus[1][mask].float())
    bonus = None if bonus is None else (bonus[0][mask], bonus[1][mask])
    return logits, reps[mask], batch.labels[mask], bonus


@pytest.mark.parametrize("overrides", [(), ("model.preset=paper",)], ids=["tied+bonus", "linear"])
def test_logits_are_the_full_logits_shifted_by_log_q(data, overrides):
    """The derivation, logit by logit (M3BSR with the repeat head's bonus, and the linear Eq. 23):
    o_n(i) = s_n(i) + bonus_n(i) - log q_i, here - log(1/I) = + log I; the positive's own copy among
    the negatives is the only -inf of each row, and the positive (column 0) is never masked."""
    catalogue, windows, batch = data
    model = make("m3bsr", catalogue, overrides).eval()
    sampler = uniform_all_items(model, windows)
    with torch.no_grad():
        full, reps, labels, bonus = full_logits(model, batch)
        if overrides == ():  # the default's repeat head: a real bonus, on the sampled items too
            assert bonus is not None and bool((bonus[1] != 0).any())
        negatives = sampler.draw()
        assert sorted(negatives.tolist()) == list(range(1, model.n_items + 1))
        logits = sampled_logits(model, reps, labels, negatives, sampler.log_q, bonus)
    I = model.n_items
    assert logits.shape == (len(labels), 1 + I)
    assert torch.allclose(logits[:, 0], full.gather(1, labels[:, None])[:, 0] + math.log(I), atol=1e-5)
    hit = negatives[None, :] == labels[:, None]  # [N, I]: exactly one per row
    assert bool((hit.sum(1) == 1).all())
    neg = logits[:, 1:]
    assert bool(torch.isinf(neg[hit]).all()) and bool(torch.isfinite(neg[~hit]).all())
    expected = full[:, negatives] + math.log(I)
    assert torch.allclose(neg[~hit], expected[~hit], atol=1e-5)
    loss = F.cross_entropy(logits, labels.new_zeros(len(labels)))
    full[:, 0] = float("-inf")
    assert float(loss) == pytest.approx(float(F.cross_entropy(full, labels)), rel=1e-6)


def test_accidental_hits_masked_positive_kept(data):
    """Popularity draws with replacement, plus the positives forced among the negatives: a negative
    equal to a query's positive is -inf for that query only; column 0 = s(y) - log q_y, always finite."""
    catalogue, windows, batch = data
    model = make("gru4rec", catalogue).eval()
    sampler = NegativeSampler.from_labels(windows.labels, model.n_items, 32, alpha=1.0, seed=3)
    with torch.no_grad():
        reps = model.represent(batch)[batch.query_mask]
        labels = batch.labels[batch.query_mask]
        negatives = torch.cat([labels[:4], sampler.draw()])
        logits = sampled_logits(model, reps, labels, negatives, sampler.log_q)
        raw = model.score(reps[None])[0].float()  # [N, I + 1]
    hit = negatives[None, :] == labels[:, None]
    assert bool(hit[:4].any(1).all())  # rows 0-3 have their positive among the negatives
    assert torch.equal(torch.isinf(logits[:, 1:]), hit)
    assert bool(torch.isfinite(logits[:, 0]).all())
    expected_pos = raw.gather(1, labels[:, None])[:, 0] - sampler.log_q[labels]
    assert torch.allclose(logits[:, 0], expected_pos, atol=1e-5)
    expected_neg = raw[:, negatives] - sampler.log_q[negatives]
    assert torch.allclose(logits[:, 1:][~hit], expected_neg[~hit], atol=1e-5)


def test_shared_candidate_bonus_equals_candidate_bonus():
    """The item → column scatter gives each shared candidate (repeated ones too) the history bonus
    that the per-query comparison of base.candidate_bonus gives; history padding (0) adds nothing."""
    g = torch.Generator().manual_seed(0)
    n_items, N, H = 30, 7, 9
    items = torch.randint(0, n_items + 1, (N, H), generator=g)
    items[:, -2:] = 0  # padding entries
    items[0, :3] = 5  # an item repeated in one history: its bonuses add up
    values = torch.randn(N, H, generator=g)
    candidates = torch.tensor([5, 3, 5, 17, 30, 1, 3])
    got = shared_candidate_bonus(candidates, (items, values), n_items)
    want = candidate_bonus(candidates.expand(N, -1), (items, values))
    assert torch.allclose(got, want, atol=1e-6)


def nonzero_rows(grad):
    return set((grad.abs().reshape(len(grad), -1).sum(1) > 0).nonzero()[:, 0].tolist())


@pytest.mark.parametrize("name,overrides,param", [
    ("gru4rec", (), "out_weight"), ("gru4rec", (), "out_bias"),
    ("m3bsr", ("model.preset=paper",), "out.weight"), ("m3bsr", (), "out_bias")])
def test_gradient_reaches_only_the_sampled_output_rows(data, name, overrides, param):
    """Output layer rows (linear W, b; the tied scorer's bias) get a gradient exactly for the batch's
    positives and the drawn negatives; the full loss touches every real item's row."""
    catalogue, windows, batch = data
    model = make(name, catalogue, overrides)
    model.loss_sampler = NegativeSampler.from_labels(windows.labels, model.n_items, 8, seed=0)
    state = model.loss_sampler.generator.get_state()
    drawn = model.loss_sampler.draw()
    model.loss_sampler.generator.set_state(state)  # the loss draws the same negatives again
    model.loss(batch)["main"].backward()
    prm = dict(model.named_parameters())[param]
    expected = set(drawn.tolist()) | set(batch.labels[batch.query_mask].tolist())
    assert nonzero_rows(prm.grad) == expected and len(expected) < model.n_items
    model.zero_grad(set_to_none=True)
    model.loss_sampler = None
    model.loss(batch)["main"].backward()
    assert nonzero_rows(prm.grad) == set(range(1, model.n_items + 1))


def test_proposal_is_smoothed_popularity_and_never_padding():
    """q_i = (c_i + 1)^alpha / sum (padding 0 excluded); draws follow q; without replacement the
    draws are distinct and capped at the catalogue; a seed fixes the draws."""
    counts = torch.tensor([99, 0, 1, 3, 7, 0])  # item 0's count is ignored
    labels = torch.repeat_interleave(torch.arange(6), counts)
    for alpha in (0.0, 0.5, 1.0):
        s = NegativeSampler.from_labels(labels, 5, 4, alpha=alpha, seed=0)
        w = torch.tensor([1.0, 2.0, 4.0, 8.0, 1.0]) ** alpha
        assert s.probs[0] == 0 and s.log_q[0] == float("-inf")
        assert torch.allclose(s.probs[1:], w / w.sum(), atol=1e-7)
        assert torch.allclose(s.log_q[1:], (w / w.sum()).log(), atol=1e-6)
    s = NegativeSampler.from_labels(labels, 5, 20_000, alpha=1.0, seed=0)
    draws = s.draw()
    assert int(draws.min()) >= 1
    freq = torch.bincount(draws, minlength=6)[1:].float() / len(draws)
    assert torch.allclose(freq, s.probs[1:], atol=0.015)
    again = NegativeSampler.from_labels(labels, 5, 20_000, alpha=1.0, seed=0).draw()
    other = NegativeSampler.from_labels(labels, 5, 20_000, alpha=1.0, seed=1).draw()
    assert torch.equal(draws, again) and not torch.equal(draws, other)
    distinct = NegativeSampler.from_labels(labels, 5, 1024, alpha=1.0, replacement=False, seed=0)
    assert distinct.n == 5 and sorted(distinct.draw().tolist()) == [1, 2, 3, 4, 5]


BASE_MAIN = [(n, ov) for n, ov in MODELS if n not in ("bert4rec", "mbstr")]  # those two: own CE positions


@pytest.mark.parametrize("name,overrides", BASE_MAIN, ids=[n + ("-paper" if ov else "") for n, ov in BASE_MAIN])
def test_full_main_loss_is_eq24_bit_for_bit(data, name, overrides):
    """No sampler (train.loss=full): ``main_loss`` is exactly (torch.equal, values and gradients of the
    reps) Eq. 24 written out: catalogue logits + history bonus, padding column masked, mean CE."""
    catalogue, windows, batch = data
    model = make(name, catalogue, overrides)
    torch.manual_seed(5)
    reps = model.represent(batch).detach().requires_grad_(True)
    main = model.main_loss(reps, batch)
    (g_main,) = torch.autograd.grad(main, reps)
    mask = batch.query_mask
    logits = model.score(reps[mask])
    bonus = model.history_bonus(reps, batch)
    if bonus is not None:
        logits = logits.scatter_add(1, bonus[0][mask], bonus[1][mask].to(logits.dtype))
    logits[:, 0] = float("-inf")
    ref = F.cross_entropy(logits.float(), batch.labels[mask])
    (g_ref,) = torch.autograd.grad(ref, reps)
    assert torch.equal(main, ref) and torch.equal(g_main, g_ref)


# --------------------------------------------------------------------------- through the engine

def run_cfg(seed=0, **sets):
    base = {"train.device": "cpu", "train.batch_size": 8, "train.max_epochs": 2, "data.max_len": 10,
            "eval.item_chunk": 16, "model.hidden_size": 16, "train.loss": "sampled", "train.loss_negatives": 16}
    base.update(sets)
    return build_config({}, model="gru4rec", overrides=[f"{k}={v}" for k, v in base.items()] + [f"seed={seed}"])


def test_sampled_training_is_seeded_and_resumes_exactly(tiny_prepared, tmp_path):
    """Same seed → identical metrics; another seed differs; 1 epoch + resume to 2 = 2 straight (the
    negatives' generator is in last.pt); evaluation stays full-catalogue (both protocols)."""
    from m3bsr.engine.train import resume, train

    one = train(run_cfg(), tiny_prepared, tmp_path / "a", quiet=True)
    two = train(run_cfg(), tiny_prepared, tmp_path / "b", quiet=True)
    other = train(run_cfg(seed=1), tiny_prepared, tmp_path / "c", quiet=True)
    assert one["valid"] == two["valid"] and one["test"] == two["test"]
    assert one["valid"] != other["valid"]
    assert set(one["test"]) == {"sampled", "full"}
    train(run_cfg(**{"train.max_epochs": 1}), tiny_prepared, tmp_path / "r", quiet=True)
    resumed = resume(tmp_path / "r", ["train.max_epochs=2"], quiet=True)
    assert resumed["valid"] == one["valid"] and resumed["test"] == one["test"]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    r = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], r["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"]["negatives"], r["rng"]["negatives"])
    assert "loss sampled: 16 negatives per batch" in (tmp_path / "a" / "train.log").read_text()
    full = train(run_cfg(**{"train.loss": "full"}), tiny_prepared, tmp_path / "f", quiet=True)
    assert full["valid"] != one["valid"]
    assert "loss sampled" not in (tmp_path / "f" / "train.log").read_text()
    assert "negatives" not in torch.load(tmp_path / "f" / "last.pt", weights_only=True)["rng"]


def test_config_errors_are_one_line(tiny_prepared, tmp_path, capsys):
    """Bad train.loss* values and SASRec's bce with train.loss=sampled: exit 2, one line naming the key;
    pop (fitted by counting) ignores train.loss."""
    from m3bsr.cli import main as cli

    args = ["train", "--dataset", str(tiny_prepared), "--device", "cpu", "--quiet", "--out", str(tmp_path / "x")]
    for bad, key in (("train.loss=softmax", "train.loss"), ("train.loss_negatives=0", "train.loss_negatives"),
                     ("train.loss_alpha=-0.5", "train.loss_alpha"), ("train.loss_replacement=maybe",
                                                                      "train.loss_replacement")):
        assert cli(args + ["--model", "gru4rec", "--set", bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err, err
    assert cli(args + ["--model", "sasrec", "--set", "model.loss=bce", "--set", "train.loss=sampled"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.loss=sampled" in err and "model.loss=bce" in err, err
    assert cli(args + ["--model", "pop", "--set", "train.loss=sampled", "--overwrite"]) == 0


@pytest.mark.parametrize("overrides", [(), ("model.preset=paper",)], ids=["tied", "linear"])
def test_m3bsr_output_rows_are_the_output_layer_rows(data, overrides):
    """M3BSR's ``output_rows`` (the tied scorer computes only the asked items' vectors) equals the
    rows of ``output_layer()``."""
    catalogue, _, _ = data
    model = make("m3bsr", catalogue, overrides)
    with torch.no_grad():
        if model.input.content_gate is not None:  # starts at zero: let the content part count
            model.input.content_gate.fill_(0.7)
        items = torch.tensor([3, 1, 3, catalogue.n_items, 17])
        weight, bias = model.output_layer()
        rows, b = model.output_rows(items)
    assert torch.allclose(rows, weight[items], atol=1e-6) and torch.equal(b, bias[items])
