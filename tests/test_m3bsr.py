"""M3BSR: time causality, all-targets == reference, gradients, ablations, flags, learning."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from m3bsr.batch import PAD_TIME, SequenceBatch
from m3bsr.config import build_config
from m3bsr.data.batches import WindowBuilder
from m3bsr.data.prepared import PreparedDataset
from m3bsr.errors import InputError
from m3bsr.models import denoiser as denoiser_module
from m3bsr.models.configs import PRESETS, M3BSRConfig
from m3bsr.models.denoiser import BehaviorDenoiser
from m3bsr.models.diffusion import NoiseSchedule
from m3bsr.models.experts import MultiExpertInterestExtractor
from m3bsr.models.layers import time_mask
from m3bsr.models.m3bsr import M3BSR
from m3bsr.models.registry import build_model
from m3bsr.models.summary import count_parameters, measure_flops, summarize

from factories import CONFIGS, N_ITEMS, PAPER, make_batch, make_model, make_tiny_prepared


pytestmark = pytest.mark.usefixtures("one_thread")


def open_gates(model: M3BSR, seed: int = 1) -> M3BSR:
    """Give every zero-initialised branch (fusion gate, repeat head) random values, so tests see them act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name in ("meie.gate", "input.content_gate") or name.startswith("repeat."):
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    return model


def reference_scores(model: M3BSR, batch: SequenceBatch) -> Tensor:
    """Every query's scores (history bonus included) from a sub-window holding only the events
    strictly before it, run alone: [B, P, n_items + 1] (zeros where there is no query)."""
    out = torch.zeros(*batch.labels.shape, model.n_items + 1)
    for b, p in batch.query_mask.nonzero().tolist():
        qt = batch.query_times[b, p]
        keep_a, keep_t = batch.aux_times[b] < qt, batch.tgt_times[b] < qt
        sub = SequenceBatch(users=batch.users[b:b + 1],
                            aux_items=batch.aux_items[b].where(keep_a, 0)[None],
                            aux_behaviors=batch.aux_behaviors[b].where(keep_a, 0)[None],
                            aux_times=batch.aux_times[b].where(keep_a, PAD_TIME)[None],
                            tgt_items=batch.tgt_items[b].where(keep_t, 0)[None],
                            tgt_times=batch.tgt_times[b].where(keep_t, PAD_TIME)[None],
                            query_times=qt.view(1, 1), labels=batch.labels[b, p].view(1, 1))
        out[b, p] = model.full_scores(sub)[0, 0]
    return out


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(x.split(".")[1] for x in o) or "default")
@pytest.mark.parametrize("queries", ["targets", "random"])
def test_all_targets_pass_equals_reference(overrides, queries):
    model = open_gates(make_model(*overrides)).eval()
    batch = make_batch(queries=queries)
    with torch.no_grad():
        fast = model.score(model.represent(batch))
        ref = model.score(model.represent_reference(batch))
        mask = batch.query_mask
        assert mask.sum() > 10
        assert (fast[mask] - ref[mask]).abs().max() < 1e-4
        if model.repeat is not None:  # the history bonus too: one pass == one sub-window per query
            full = model.full_scores(batch)
            assert (full[mask] - reference_scores(model, batch)[mask]).abs().max() < 1e-4
            assert (full[mask] - fast[mask]).abs().max() > 1e-2  # the bonus does act


def test_tables_start_small_so_items_are_told_apart():
    """The initialisation defect (docs/model.md): with N(0, 1) position/behavior tables two different
    items' tokens at one position had cosine ~0.96. Fixed in both presets; unfixed, it comes back."""
    items = torch.arange(1, N_ITEMS + 1)

    def mean_abs_cos(model: M3BSR) -> float:
        if model.merged:
            x = model.input.item_vector(items) * math.sqrt(16) + model.pos_merged.weight[3] + model.behavior.weight[1]
        else:
            x = model.input.id_repr(items) + model.pos_aux.weight[3] + model.behavior.weight[1]
        z = torch.nn.functional.normalize(x, dim=-1)
        cos = z @ z.T
        return float(cos[~torch.eye(len(items), dtype=torch.bool)].abs().mean())

    with torch.no_grad():
        for preset in ("default", "paper"):
            model = make_model(f"model.preset={preset}")
            assert mean_abs_cos(model) < 0.5, preset
            for table in (model.behavior, model.pos_merged if model.merged else model.pos_aux):
                torch.nn.init.normal_(table.weight)  # PyTorch's default, the defect
            assert mean_abs_cos(model) > 0.8, preset


@pytest.mark.parametrize("content", ["ungated", "gated"])
def test_closed_gates_give_exactly_the_backbone(content):
    """Default preset with the paper's branches on: the branches (the specific experts with CDMD-M/B,
    the repeat head, and with ``content_gate`` the content part of the item vectors) start closed, so
    the full model's scores equal those of the backbone (with content, or id-only when the content is
    gated) with the same shared weights."""
    gate = f"model.content_gate={content == 'gated'}".lower()
    full = make_model("model.no_specific_experts=false", gate).eval()
    backbone = make_model("model.no_specific_experts=true", "model.repeat=false",
                          f"model.item_content={content == 'ungated'}".lower()).eval()
    assert full.input.item_content and backbone.input.item_content == (content == "ungated")
    shared = {k: v for k, v in full.state_dict().items() if k in backbone.state_dict()}
    assert set(shared) == set(backbone.state_dict())
    backbone.load_state_dict(shared)
    batch = make_batch(queries="random")
    with torch.no_grad():
        assert torch.equal(full.full_scores(batch), backbone.full_scores(batch))
        open_gates(full)
        assert (full.full_scores(batch) - backbone.full_scores(batch)).abs().max() > 1e-2


def test_id_only_catalogue():
    model = make_model(PAPER, content=False).eval()
    assert model.modalities == ["id"] and model.cdmd_m is None and model.meie.n_experts == 3
    batch = make_batch()
    with torch.no_grad():
        assert (model.represent(batch) - model.represent_reference(batch))[batch.query_mask].abs().max() < 1e-4
    model.train()
    terms = model.loss(batch)
    assert set(terms) == {"main", "diff_b", "contrast"}
    sum(terms.values()).backward()
    assert model.input.side_emb["brand"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_future_and_padding_do_not_change_a_targets_logits(preset):
    model = open_gates(make_model(f"model.preset={preset}")).eval()
    batch = make_batch(seed=3)
    b, p = 2, 1
    q = int(batch.query_times[b, p])
    with torch.no_grad():
        base = model.full_scores(batch)[b, p]
    g = torch.Generator().manual_seed(0)

    def perturb(items, times, where):
        new = items.clone()
        new[b][where] = torch.randint(1, N_ITEMS + 1, (int(where.sum()),), generator=g)
        return new

    future_a, future_t = batch.aux_times[b] >= q, batch.tgt_times[b] >= q  # includes padding slots
    assert future_a.any() and future_t.any() and (batch.aux_times[b] == PAD_TIME).any()
    changed = SequenceBatch(**{**vars(batch), "aux_items": perturb(batch.aux_items, batch.aux_times, future_a),
                               "tgt_items": perturb(batch.tgt_items, batch.tgt_times, future_t)})
    changed.aux_behaviors = batch.aux_behaviors.clone()
    changed.aux_behaviors[b][future_a] = 2
    with torch.no_grad():
        after = model.full_scores(changed)[b, p]
    assert (after - base).abs().max() < 1e-5
    for name, times in (("aux_items", batch.aux_times), ("tgt_items", batch.tgt_times)):
        past = SequenceBatch(**vars(batch))
        past_items = getattr(batch, name).clone()
        idx = int((times[b] < q).nonzero()[-1])  # the latest event before the query does matter
        past_items[b, idx] = past_items[b, idx] % N_ITEMS + 1
        setattr(past, name, past_items)
        with torch.no_grad():
            assert (model.full_scores(past)[b, p] - base).abs().max() > 1e-4, name


@pytest.mark.parametrize("overrides,loss_terms", [
    (("model.preset=default",), {"main", "aux_targets"}),
    (("model.preset=default", "model.no_specific_experts=false"),
     {"main", "contrast", "diff_m", "diff_b", "aux_targets"}),
    ((PAPER,), {"main", "contrast", "diff_m", "diff_b"})], ids=["default", "default+branches", "paper"])
def test_every_parameter_receives_a_gradient(overrides, loss_terms):
    model = open_gates(make_model(*overrides)).train()
    terms = model.loss(make_batch(B=6, seed=1))
    assert set(terms) == loss_terms
    sum(terms.values()).backward()
    missing = [n for n, prm in model.named_parameters() if prm.grad is None or prm.grad.abs().sum() == 0]
    assert not missing, missing


@pytest.mark.parametrize("overrides", [(), ("model.no_specific_experts=false",), (PAPER,)],
                         ids=["default", "default+branches", "paper"])
def test_aux_targets_term_reads_each_auxiliary_event_from_its_past(overrides):
    """``aux_targets``: λ_a x the cross-entropy of every auxiliary item, scored (no history bonus) from a
    sub-window holding only the events strictly before it; the other terms are unchanged."""
    model = open_gates(make_model(*overrides, "model.aux_targets=0.7")).eval()
    batch = make_batch(B=6, seed=3)
    with torch.no_grad():
        torch.manual_seed(0)  # the diffusion terms draw noise
        terms = model.loss(batch)
        aux = replace(batch, query_times=batch.aux_times, labels=batch.aux_items)
        mask = aux.query_mask
        assert mask.sum() > 10
        logits = model.score(model.represent_reference(aux)[mask])
        logits[:, 0] = float("-inf")
        expected = 0.7 * F.cross_entropy(logits, aux.labels[mask])
        torch.testing.assert_close(terms["aux_targets"], expected, atol=1e-5, rtol=1e-5)
        model.cfg.aux_targets = 0.0
        torch.manual_seed(0)
        without = model.loss(batch)
        model.cfg.aux_targets = 0.7
        assert set(terms) == set(without) | {"aux_targets"}
        for name, value in without.items():  # eval mode: no dropout; the same diffusion noise
            torch.testing.assert_close(terms[name], value, atol=1e-5, rtol=1e-5)
        no_aux = replace(batch, aux_items=torch.zeros_like(batch.aux_items),
                         aux_behaviors=torch.zeros_like(batch.aux_behaviors),
                         aux_times=torch.full_like(batch.aux_times, PAD_TIME))
        assert model.loss(no_aux)["aux_targets"].item() == 0.0  # a single-behavior batch: no term, no NaN
    model.train()
    sum(model.loss(batch).values()).backward()
    assert model.input.id_emb.weight.grad.abs().sum() > 0


ABLATIONS = {
    "no_cdmd_m": ("cdmd_m", "diff_m"),
    "no_cdmd_b": ("cdmd_b", "diff_b"),
    "no_meie": ("meie", "contrast"),
    "no_disentangle": (None, "contrast"),
    "no_shared_expert": ("meie.cross", None),
}


@pytest.mark.parametrize("flag", list(ABLATIONS))
def test_each_ablation_removes_its_modules_and_loss_term(flag):
    full = make_model(PAPER)
    model = make_model(PAPER, f"model.{flag}=true")
    module, term = ABLATIONS[flag]
    names = {n for n, _ in model.named_modules()}
    if module is not None:
        assert module in {n for n, _ in full.named_modules()} and module not in names
        assert count_parameters(model)["total"] < count_parameters(full)["total"]
    terms = model.train().loss(make_batch())
    if term is not None:
        assert term not in terms
    assert "main" in terms and len(terms) == 3 + (flag == "no_shared_expert")
    sum(terms.values()).backward()
    if flag == "no_shared_expert":
        assert model.meie.n_experts == 6 and "meie.common" not in names


# a value other than either preset's for every key that M3BSRConfig.inert_keys may name
OTHER_VALUE = {"no_cdmd_m": "true", "modality_denoiser": "mlp", "T_m": "5", "lambda_m": "0.5", "T_b": "5",
               "lambda_b": "0.5", "no_cdmd_b": "true", "no_disentangle": "true", "infer_steps": "3",
               "beta_start": "0.01", "beta_end": "0.2", "diffusion_loss": "literal", "denoise_output": "none",
               "tau": "0.9", "lambda_c": "0.5", "contrast": "literal"}


def _training_loss(*overrides: str, content: bool) -> Tensor:
    model = make_model(*overrides, content=content).train()
    torch.manual_seed(1)  # the same dropout and diffusion draws for every variant
    return sum(model.loss(make_batch()).values())


@pytest.mark.parametrize("base, content", [((), True), ((PAPER,), False), ((PAPER, "model.no_cdmd_b=true"), True),
                                           ((PAPER, "model.modality_denoiser=mlp"), True),
                                           ((PAPER, "model.no_disentangle=true"), True)],
                         ids=["default", "paper-id-only", "paper-no_cdmd_b", "paper-mlp", "paper-no_disentangle"])
def test_inert_keys_change_nothing_and_the_others_do(base, content):
    cfg = build_config(model="m3bsr", overrides=list(base)).model
    inert = cfg.inert_keys(content)
    assert set(inert) <= set(OTHER_VALUE) and all(inert.values())
    ref = _training_loss(*base, content=content)
    for key in inert:
        if key == "no_cdmd_m" and cfg.modality_denoiser == "mlp":
            continue  # the config refuses both at once
        assert torch.equal(_training_loss(*base, f"model.{key}={OTHER_VALUE[key]}", content=content), ref), key
    for key in {"T_m", "lambda_m", "T_b", "lambda_b", "tau", "lambda_c"} - set(inert):  # the paper's grids
        assert not torch.equal(_training_loss(*base, f"model.{key}={OTHER_VALUE[key]}", content=content), ref), key


def _denoiser_input_rms_while_training_eps_loss_only(steps: int = 120) -> list[float]:
    model = make_model(PAPER, "model.dropout=0.0").train()
    seen = []
    hook = model.cdmd_m.diffusion.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    batch = make_batch(B=6, seed=2)
    rms = []
    for _ in range(steps):
        terms = model.loss(batch)
        rms.append(float(seen[-1][:, :6].pow(2).mean().sqrt()))  # x_K: the observed feature of every sequence
        opt.zero_grad()
        (terms["diff_m"] + terms["diff_b"]).backward()
        opt.step()
    hook.remove()
    return rms


def test_feature_norms_do_not_collapse(monkeypatch):
    """DECIDED (docs/model.md): x_0 is layer-normed before noising, so training the ε-loss cannot shrink the
    features the denoisers see. Without the LayerNorm the same training does shrink them."""
    rms = _denoiser_input_rms_while_training_eps_loss_only()
    assert min(rms) > 0.95
    monkeypatch.setattr(denoiser_module, "normalize_x0", lambda x: x)
    raw = _denoiser_input_rms_while_training_eps_loss_only()
    assert raw[-1] < 0.6 * raw[0]  # the failure mode the DECIDED LayerNorm prevents


def _train(model: M3BSR, batches: list[SequenceBatch], steps: int, lr: float, term: str | None = None) -> list[float]:
    """Adam on the summed loss; returns the total (or the named ``term``) at every step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        terms = model.loss(batches[step % len(batches)])
        total = sum(terms.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float((total if term is None else terms[term]).detach()))
    return losses


def _overfit_ratio(tmp_path, d: int, dropout: float, steps: int, term: str | None = None) -> float:
    """Train on every window of 32 synthetic users; final (mean of the last 10) / first loss."""
    ds = PreparedDataset.load(make_tiny_prepared(tmp_path / "d", n_users=32, n_items=40))
    windows = WindowBuilder(ds, 12).train_windows()
    torch.manual_seed(0)
    cfg = build_config(model="m3bsr", overrides=[f"model.hidden_size={d}", f"model.dropout={dropout}",
                                                  "model.n_layers=1", "model.T_m=4", "model.T_b=4"]).model
    model = build_model(cfg, ds.catalogue())
    losses = _train(model, [windows.batch(np.arange(len(windows)))], steps, 1e-2, term)
    return float(np.mean(losses[-10:])) / losses[0]


def test_overfits_32_users_fast(tmp_path):
    """The default's next-target loss falls by >= 90 % (about 10 s of CPU); its aux_targets term, the
    tiny dataset's random clicks, is trained too but falls less (about 77 % here)."""
    assert _overfit_ratio(tmp_path, d=16, dropout=0.0, steps=120, term="main") <= 0.1


@pytest.mark.slow
def test_overfits_32_users_with_dropout(tmp_path):
    """With dropout the diffusion and contrast terms keep a noise floor (~0.4 of the ~4.1 start),
    so the >= 90 % criterion is asserted on the main cross-entropy."""
    assert _overfit_ratio(tmp_path, d=32, dropout=0.1, steps=300, term="main") <= 0.1


def test_learns_user_interest_better_than_popularity(tmp_path):
    """tiny data: each user favors items of one block of the catalogue. After 50 steps M3BSR ranks
    the validation positive among 20 sampled candidates (HR@10) far better than popularity."""
    ds = PreparedDataset.load(make_tiny_prepared(tmp_path / "d", n_users=60, n_items=80))
    builder = WindowBuilder(ds, 12)
    train, valid = builder.train_windows(), builder.eval_windows("valid").batch(slice(None))
    labels = torch.from_numpy(train.labels)
    pop = torch.zeros(ds.n_items + 1).index_add_(0, labels[labels > 0], torch.ones(int((labels > 0).sum())))

    def hr10(scores):  # [N, C], positive in column 0; ties count against it
        return float(((scores[:, 1:] >= scores[:, :1]).sum(1) < 10).float().mean())

    torch.manual_seed(0)
    cfg = build_config(model="m3bsr", overrides=["model.hidden_size=16", "model.dropout=0.1", "model.n_layers=1",
                                                  "model.T_m=4", "model.T_b=4"]).model
    model = build_model(cfg, ds.catalogue())
    idx = np.arange(len(train))
    _train(model, [train.batch(idx[0::2]), train.batch(idx[1::2])], 50, 1e-2)
    with torch.no_grad():
        scores = model.eval().score(model.represent(valid), valid.candidates)[:, 0]
    assert hr10(scores) >= hr10(pop[valid.candidates[:, 0]]) + 0.25


@pytest.mark.parametrize("overrides", [
    ("model.contrast=literal", "model.diffusion_loss=literal", "model.fusion=router"),
    ("model.denoise_output=reverse_chain", "model.T_m=3", "model.T_b=3"),
])
def test_paper_literal_flags_train(overrides):
    model = make_model(*overrides, "model.dropout=0.0")
    batch = make_batch(B=6, seed=4)
    main0 = float(model.train().loss(batch)["main"].detach())
    losses = _train(model, [batch], 40, 1e-2)
    assert float(model.loss(batch)["main"].detach()) < 0.5 * main0 and losses[-1] < losses[0]


def test_realistic_eval_windows_and_config(tmp_path):
    ds = PreparedDataset.load(make_tiny_prepared(tmp_path / "d"))
    model = build_model(build_config(model="m3bsr", overrides=["model.hidden_size=16", PAPER]).model,
                        ds.catalogue())
    ev = WindowBuilder(ds, 10).eval_windows("valid").batch(slice(0, 12))
    model.eval()
    with torch.no_grad():
        reps = model.represent(ev)
        assert reps.shape == (12, 1, 16)
        torch.testing.assert_close(reps, model.represent_reference(ev), atol=1e-5, rtol=1e-5)
        assert model.score(reps, ev.candidates).shape == ev.candidates.shape
    assert model.cdmd_m.diffusion.schedule is model.cdmd_b.diffusion.schedule  # one shared schedule
    assert len(model.schedules) == 1 and len(make_model(PAPER, "model.T_b=5").schedules) == 2
    assert len(make_model().schedules) == 0  # the default has no denoisers
    cfg = build_config(model="m3bsr", overrides=[PAPER, "model.no_meie=true"]).model
    assert isinstance(cfg, M3BSRConfig) and cfg.no_meie and cfg.lambda_c == 0.05 and cfg.tau == 0.3
    with pytest.raises(InputError, match="no_specific_experts"):
        build_config(model="m3bsr", overrides=["model.no_meie=true"])  # the default has no mean-pool ablation
    with pytest.raises(InputError, match="infer_steps"):
        build_config(model="m3bsr", overrides=["model.infer_steps=20"])
    with pytest.raises(InputError, match="fusion"):
        build_config(model="m3bsr", overrides=["model.fusion=mean"])
    with pytest.raises(InputError, match=r"^config key model.max_positions: m3bsr input sequence of 8 tokens exceeds "
                       r"max_positions=4\. Set --set model.max_positions=8 or lower data.max_len$"):
        make_model(PAPER, "model.max_positions=4").represent(make_batch(L=8))
    with pytest.raises(InputError, match="model.max_positions=16"):  # the merged stream holds both
        make_model("model.max_positions=4").represent(make_batch(L=8))


def test_summary_reports_parameters_and_flops():
    model = make_model(PAPER, d=32)
    batch = make_batch(B=4, L=8)
    text = summarize(model, batch)
    for name in ("input", "cdmd_m", "cdmd_b", "meie", "out", "total", "represent", "train_loss_forward"):
        assert name in text
    counts = count_parameters(model)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    x0 = measure_flops(model, batch)
    chain = measure_flops(make_model(PAPER, "model.denoise_output=reverse_chain", d=32), batch)
    assert 0 < x0["represent"] < x0["train_loss_forward"]
    assert chain["represent"] > 3 * x0["represent"]  # 10 estimator calls per denoiser instead of 1


@pytest.mark.parametrize("contrast", ["disentangle", "literal"])
def test_contrast_loss_matches_explicit_loops(contrast):
    """Eq. 20 (both readings) against a loop-by-loop numpy version of the definition in docs/model.md."""
    from m3bsr.models.experts import MultiExpertInterestExtractor

    meie = MultiExpertInterestExtractor(["id", "image"], 4, 1, 1, 0.0, share_specific=True, use_common=True,
                                        fusion="gate", contrast=contrast, tau=0.3)
    g = torch.Generator().manual_seed(0)
    N, E = 6, 5
    e1, e2 = torch.randn(N, E, 4, generator=g), torch.randn(N, E, 4, generator=g)
    window = torch.tensor([0, 0, 1, 2, 2, 2])
    got = float(meie.contrast_loss(e1, e2 if contrast == "disentangle" else None, window))
    z1 = e1.numpy() / np.linalg.norm(e1.numpy(), axis=-1, keepdims=True)
    z2 = e2.numpy() / np.linalg.norm(e2.numpy(), axis=-1, keepdims=True)
    if contrast == "literal":
        z2 = z1
    last = {int(w): n for n, w in enumerate(window)}  # the last query of each window
    losses = []
    for n in range(N):
        for k in range(E):
            others = [z2[last[w], k] for w in last if w != int(window[n])]
            if contrast == "disentangle":
                cands = [z2[n, j] for j in range(E)] + others
                logits = np.array([z1[n, k] @ c for c in cands]) / 0.3
                losses.append(-(logits[k] - np.log(np.exp(logits).sum())))
            else:
                pos = np.array([z1[n, k] @ z1[n, j] for j in range(E) if j != k]) / 0.3
                neg = np.array([z1[n, k] @ c for c in others]) / 0.3
                losses.append(-(np.log(np.exp(pos).sum()) - np.log(np.exp(pos).sum() + np.exp(neg).sum())))
    assert got == pytest.approx(float(np.mean(losses)), rel=1e-5)


def test_field_defaults_are_the_default_preset():
    """docs/config.md shows the field defaults as the default preset: the two must not drift apart."""
    fields = M3BSRConfig.model_fields
    assert {key: fields[key].default for key in PRESETS["default"]} == PRESETS["default"]
    assert set(PRESETS["paper"]) == set(PRESETS["default"])


# --------------------------------------------------------------------------- equal times across behaviors
# Prepared data gives every event of a user its own rank, so there a click and a favor never share a
# time; a batch built from raw timestamps can have such ties, and then the strict masks decide what
# leaks (docs/model.md "Time causality": an auxiliary token sees target events strictly before it).

TIED_AUX = torch.tensor([[1, 3, 5, PAD_TIME]])  # clicks
TIED_TGT = torch.tensor([[2, 3, 5, PAD_TIME]])  # favors: two of them at the time of a click


def test_time_mask_with_equal_times():
    strict = time_mask(TIED_AUX, TIED_TGT, strict=True)[0].int().tolist()
    loose = time_mask(TIED_AUX, TIED_TGT, strict=False)[0].int().tolist()
    assert strict == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert loose == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def _tied_features(d: int = 8, seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return tuple({m: torch.randn(1, 4, d, generator=g) for m in ("image", "text")} for _ in range(2))


def _moved(tgt: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    out = {m: x.clone() for m, x in tgt.items()}
    for x in out.values():
        x[0, k] += 3.0
    return out


@pytest.mark.parametrize("output", ["x0", "reverse_chain"])
def test_behavior_denoiser_hides_a_favor_at_the_time_of_the_click(output):
    """CDMD-B: a click token reads the favors strictly before it; one at its own time is invisible."""
    torch.manual_seed(0)
    den = BehaviorDenoiser(["image", "text"], d=8, n_heads=2, dropout=0.0, schedule=NoiseSchedule(3, 1e-3, 1e-1),
                           infer_steps=3, diffusion_loss="eps", denoise_output=output).eval()
    aux, tgt = _tied_features()
    with torch.no_grad():
        base, _ = den(aux, tgt, TIED_AUX, TIED_TGT, need_loss=False)
        for k in range(3):  # the real favors
            out, _ = den(aux, _moved(tgt, k), TIED_AUX, TIED_TGT, need_loss=False)
            for j in range(3):  # the real clicks
                sees = bool(TIED_TGT[0, k] < TIED_AUX[0, j])
                change = max(float((out[m][0, j] - base[m][0, j]).abs().max()) for m in out)
                assert (change > 1e-4) == sees, (k, j, change)


@pytest.mark.parametrize("share", [True, False])
def test_common_expert_hides_a_favor_at_the_time_of_the_click(share):
    """MEIE's own common expert (Eq. 16): the click read by a query does not see a favor at its own time,
    while the favor experts, read at the latest favor before the query, do."""
    torch.manual_seed(0)
    meie = MultiExpertInterestExtractor(["image", "text"], 8, 2, 2, 0.0, share_specific=share, use_common=True,
                                        fusion="gate", contrast="disentangle", tau=0.3).eval()
    aux, tgt = _tied_features(seed=1)
    queries = torch.tensor([[4, 6]])  # read the clicks at 3 and 5, the favors at 3 and 5
    with torch.no_grad():
        base = meie(aux, tgt, TIED_AUX, TIED_TGT, queries)  # [1, P, E, d]: image, text (click, favor), common
        for k in range(3):
            out = meie(aux, _moved(tgt, k), TIED_AUX, TIED_TGT, queries)
            for p in range(2):
                click = int(TIED_AUX[0, int((TIED_AUX[0] < queries[0, p]).sum()) - 1])
                common = float((out[0, p, -1] - base[0, p, -1]).abs().max())
                assert (common > 1e-4) == bool(TIED_TGT[0, k] < click), (k, p, common)
                favor = int(TIED_TGT[0, int((TIED_TGT[0] < queries[0, p]).sum()) - 1])
                specific = float((out[0, p, 2:4] - base[0, p, 2:4]).abs().max())
                assert (specific > 1e-4) == bool(TIED_TGT[0, k] <= favor), (k, p, specific)


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_events_at_the_query_time_do_not_change_its_logits(preset):
    """A click and a favor at exactly a query's time, as with raw timestamps, are not history yet."""
    model = open_gates(make_model(f"model.preset={preset}")).eval()
    aux_t = torch.tensor([[1, 3, 5, 6, PAD_TIME]])
    tgt_t = torch.tensor([[2, 3, 5, PAD_TIME, PAD_TIME]])
    batch = SequenceBatch(users=torch.tensor([1]), aux_items=torch.tensor([[4, 5, 6, 7, 0]]),
                          aux_behaviors=torch.tensor([[1, 2, 1, 1, 0]]), aux_times=aux_t,
                          tgt_items=torch.tensor([[8, 9, 10, 0, 0]]), tgt_times=tgt_t,
                          query_times=torch.tensor([[3, 5]]), labels=torch.tensor([[11, 12]]))
    with torch.no_grad():
        base = model.full_scores(batch)[0]
        for name, times in (("aux_items", aux_t), ("tgt_items", tgt_t)):
            for j in range(int((times < PAD_TIME).sum())):
                items = getattr(batch, name).clone()
                items[0, j] = items[0, j] % N_ITEMS + 13
                after = model.full_scores(SequenceBatch(**{**vars(batch), name: items}))[0]
                for p, q in enumerate(batch.query_times[0].tolist()):
                    change = float((after[p] - base[p]).abs().max())
                    assert (change > 1e-5) == (int(times[0, j]) < q), (name, j, q, change)


def test_mlp_in_place_of_cdmd_m_maps_the_same_shapes_and_trains_by_the_main_loss_only():
    from m3bsr.models.denoiser import ModalityDenoiser, ModalityMLP

    full = make_model(PAPER)
    model = make_model(PAPER, "model.modality_denoiser=mlp")
    assert isinstance(full.cdmd_m, ModalityDenoiser) and isinstance(model.cdmd_m, ModalityMLP)
    assert count_parameters(model)["total"] < count_parameters(full)["total"]
    aux, tgt, aux_t, tgt_t = model._inputs(make_batch())
    out_aux, out_tgt, loss = model.cdmd_m(aux, tgt, aux_t, tgt_t, need_loss=True)
    assert loss is None and set(out_aux) == set(out_tgt) == {"image", "text"}
    assert all(out_aux[m].shape == aux[m].shape and out_tgt[m].shape == tgt[m].shape for m in out_aux)
    # a token's output is its own input through the MLP: moving one token changes that token only
    moved = {**tgt, "image": tgt["image"].clone()}
    moved["image"][0, 0] += torch.linspace(-1.0, 1.0, moved["image"].shape[-1])  # not a constant: x_0 is layer-normed
    again = model.cdmd_m(aux, moved, aux_t, tgt_t, need_loss=False)[1]["image"]
    assert (again[0, 0] - out_tgt["image"][0, 0]).abs().max() > 1e-4
    assert torch.equal(again[0, 1:], out_tgt["image"][0, 1:]) and torch.equal(again[1:], out_tgt["image"][1:])
    terms = model.train().loss(make_batch(B=6, seed=1))
    assert set(terms) == {"main", "contrast", "diff_b"}  # no diffusion loss of CDMD-M
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.cdmd_m.parameters())
    with pytest.raises(InputError, match="modality_denoiser=mlp"):
        make_model(PAPER, "model.modality_denoiser=mlp", "model.no_cdmd_m=true")
