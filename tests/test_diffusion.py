"""NoiseSchedule (Eq. 6-9) against closed forms, and the grouped denoiser blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3bsr.models.denoiser import ConditionalDenoiser, DiffusionDenoising, masked_mse
from m3bsr.models.diffusion import NoiseSchedule
from m3bsr.models.layers import GroupedTransformerBlock, TransformerBlock, masked_sdpa, split_heads, time_mask


pytestmark = pytest.mark.usefixtures("one_thread")


def _np_tables(T, b0, b1):
    beta = np.concatenate([[0.0], np.linspace(b0, b1, T)])
    alpha = 1 - beta
    return beta, alpha, np.cumprod(alpha)


def test_tables_linear_float32_and_not_in_state_dict():
    s = NoiseSchedule(10, 1e-3, 1e-1)
    beta, _, abar = _np_tables(10, 1e-3, 1e-1)
    assert s.beta.dtype == torch.float32 and s.alpha_bar.shape == (11,)
    np.testing.assert_allclose(s.beta.numpy(), beta, rtol=1e-6)
    np.testing.assert_allclose(s.alpha_bar.numpy(), abar, rtol=1e-6)
    assert float(s.alpha_bar[0]) == 1.0 and float(s.beta[1]) == pytest.approx(1e-3)
    assert float(s.beta[10]) == pytest.approx(1e-1)
    assert s.state_dict() == {}  # derived from the config, not checkpointed
    with pytest.raises(ValueError):
        NoiseSchedule(0, 1e-3, 1e-1)


def test_closed_form_add_noise_matches_iterated_forward_process():
    """Eq. 7 vs iterating Eq. 6 (x_t = sqrt(α_t) x_{t-1} + sqrt(β_t) ε_t): same mean and variance."""
    T, n = 10, 200_000
    s = NoiseSchedule(T, 1e-3, 1e-1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([2.0, -1.0, 0.5])
    xs = x0.expand(n, 3).clone()
    for t in range(1, T + 1):
        xs = s.sqrt_alpha[t] * xs + s.beta[t].sqrt() * torch.randn(n, 3, generator=g)
        closed = s.add_noise(x0.expand(n, 3), torch.randn(n, 3, generator=g), torch.full((n,), t))
        abar = float(s.alpha_bar[t])
        for x in (xs, closed):
            np.testing.assert_allclose(x.mean(0).numpy(), np.sqrt(abar) * x0.numpy(), atol=0.01)
            np.testing.assert_allclose(x.var(0).numpy(), 1 - abar, rtol=0.03, atol=1e-4)
        np.testing.assert_allclose(xs.mean(0).numpy(), closed.mean(0).numpy(), atol=0.012)


def test_reverse_step_with_true_noise_is_posterior_mean():
    """Eq. 8 with the true ε equals μ̃_t = sqrt(ᾱ_{t-1}) β_t/(1-ᾱ_t) x_0 + sqrt(α_t)(1-ᾱ_{t-1})/(1-ᾱ_t) x_t."""
    T = 15
    s = NoiseSchedule(T, 1e-3, 1e-1)
    beta, alpha, abar = _np_tables(T, 1e-3, 1e-1)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(T, 4, 8, generator=g)
    eps = torch.randn(T, 4, 8, generator=g)
    t = torch.arange(1, T + 1)
    x_t = s.add_noise(x0, eps, t)
    got = s.step(eps, t, x_t).double().numpy()
    x0n, xtn = x0.double().numpy(), x_t.double().numpy()
    tn = np.arange(1, T + 1)[:, None, None]
    mean = (np.sqrt(abar[tn - 1]) * beta[tn] / (1 - abar[tn]) * x0n
            + np.sqrt(alpha[tn]) * (1 - abar[tn - 1]) / (1 - abar[tn]) * xtn)
    np.testing.assert_allclose(got, mean, atol=2e-5)
    np.testing.assert_allclose(got[0], x0n[0], atol=2e-5)  # at t = 1 the posterior mean is x_0 itself
    assert not np.allclose(got[-1], x0n[-1], atol=1e-2)  # ... but not at larger t


def test_x0_estimate_with_true_noise_is_exact():
    s = NoiseSchedule(10, 1e-3, 1e-1)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 10, 5, generator=g), torch.randn(3, 10, 5, generator=g)
    t = torch.randint(1, 11, (3, 10), generator=g)
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(s.x0(x_t, eps, t), x0, atol=1e-5, rtol=1e-5)
    assert (s.x0(x_t, torch.zeros_like(eps), t) - x0).abs().max() > 0.1


def test_masked_sdpa_is_softmax_attention_over_visible_keys():
    """The attention core of every block: softmax(q k^T / sqrt(dh) + bias) v over the visible keys, heads
    merged; a query with no visible key is flagged (has_key False) and stays finite."""
    torch.manual_seed(0)
    N, h, Lq, Lk, dh = 2, 2, 4, 5, 3
    x = torch.randn(N, Lk, 3 * h * dh)
    q, k, v = split_heads(x, h, 3)  # each [N, h, Lk, dh]
    q = q[:, :, :Lq]
    assert q.shape == (N, h, Lq, dh) and torch.equal(k[0, 1, 2], x[0, 2, h * dh + dh: h * dh + 2 * dh])
    mask = torch.rand(N, 1, Lq, Lk) > 0.4
    mask[:, :, 0, 0] = True
    mask[1, 0, 2] = False  # a query with no visible key
    for bias in (None, torch.randn(N, h, Lq, Lk)):
        y, has_key = masked_sdpa(q, k, v, mask, 0.0, bias=bias)
        scores = q @ k.transpose(-1, -2) / dh ** 0.5 + (0 if bias is None else bias)
        want = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v  # [N, h, Lq, dh]
        want = want.transpose(1, 2).reshape(N, Lq, h * dh)
        assert y.shape == (N, Lq, h * dh) and torch.equal(has_key, mask.any(-1).transpose(1, 2))
        assert torch.isfinite(y).all() and not has_key[1, 2, 0]
        torch.testing.assert_close(y[has_key[..., 0]], want[has_key[..., 0]], atol=1e-5, rtol=1e-5)


def test_grouped_block_equals_independent_blocks():
    """One grouped kernel == G separate TransformerBlocks with the same weights."""
    torch.manual_seed(0)
    G, N, L, Lk, d = 3, 2, 5, 4, 8
    grouped = GroupedTransformerBlock(G, d, 2, 0.0).eval()
    x, kv = torch.randn(G, N, L, d), torch.randn(G, N, Lk, d)
    mask = torch.rand(G, N, L, Lk) > 0.4
    mask[0, 0, 1] = False  # a query row with no visible key
    out = grouped(x, mask, kv=kv)
    for g in range(G):
        single = TransformerBlock(d, 2, 0.0).eval()
        with torch.no_grad():
            a, ga = single.attn, grouped.attn
            a.q.weight.copy_(ga.q.weight[g].T), a.q.bias.copy_(ga.q.bias[g, 0])
            a.kv.weight.copy_(ga.kv.weight[g].T), a.kv.bias.copy_(ga.kv.bias[g, 0])
            a.out.weight.copy_(ga.out.weight[g].T), a.out.bias.copy_(ga.out.bias[g, 0])
            single.ffn.net[0].weight.copy_(grouped.ff1.weight[g].T), single.ffn.net[0].bias.copy_(grouped.ff1.bias[g, 0])
            single.ffn.net[3].weight.copy_(grouped.ff2.weight[g].T), single.ffn.net[3].bias.copy_(grouped.ff2.bias[g, 0])
            for ln, gln in ((single.ln1, grouped.ln1), (single.ln2, grouped.ln2)):
                gln.weight[g].uniform_(0.5, 1.5), gln.bias[g].uniform_(-0.5, 0.5)
                ln.weight.copy_(gln.weight[g]), ln.bias.copy_(gln.bias[g])
        out = grouped(x, mask, kv=kv)
        torch.testing.assert_close(out[g], single(x[g], mask[g], kv=kv[g]), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_denoiser_null_token_and_time_mask():
    """A query with an empty condition reads the learned null key; hidden keys have no effect."""
    torch.manual_seed(0)
    net = ConditionalDenoiser(1, 8, 2, 0.0).eval()
    x, cond = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 4, 8)
    times_q, times_k = torch.tensor([[1, 5, 9]]), torch.tensor([[2, 4, 6, 8]])
    mask = time_mask(times_q, times_k, strict=True).unsqueeze(0)  # query 0 sees nothing
    t = torch.tensor([[3]])
    out = net(x, t, cond, mask)
    cond2 = cond.clone()
    cond2[:, :, 3] += 10.0  # key at time 8: hidden from queries 0 and 1
    out2 = net(x, t, cond2, mask)
    torch.testing.assert_close(out[:, :, :2], out2[:, :, :2])
    assert (out[:, :, 2] - out2[:, :, 2]).abs().max() > 1e-3
    with torch.no_grad():
        net.null.add_(1.0)
    assert (net(x, t, cond, mask)[:, :, 0] - out[:, :, 0]).abs().max() > 1e-3  # null feeds query 0 only
    torch.testing.assert_close(net(x, t, cond, mask)[:, :, 1:], out[:, :, 1:])
    assert (net(x, torch.tensor([[7]]), cond, mask) - out).abs().max() > 1e-3  # t is an input (DECIDED)


@pytest.mark.parametrize("output", ["x0", "reverse_chain", "none"])
def test_denoising_output_deterministic_in_eval(output):
    torch.manual_seed(0)
    s = NoiseSchedule(4, 1e-3, 1e-1)
    den = DiffusionDenoising(2, 8, 2, 0.1, s, 4, "eps", output).eval()
    x, cond = torch.randn(2, 3, 5, 8) * 7, torch.randn(2, 3, 5, 8)
    mask = torch.ones(1, 3, 5, 5, dtype=torch.bool)
    valid = torch.ones(1, 3, 5, dtype=torch.bool)
    a, la = den(x, cond, mask, valid, need_loss=True)
    b, lb = den(x, cond, mask, valid, need_loss=True)
    torch.testing.assert_close(a, b)  # the output path ignores the random loss draws
    assert la.ndim == 0 and la > 0
    if output == "none":
        torch.testing.assert_close(a, torch.nn.functional.layer_norm(x, (8,)))
    else:
        assert (a - torch.nn.functional.layer_norm(x, (8,))).abs().max() > 1e-3


def test_masked_mse_ignores_padding():
    a, b = torch.zeros(2, 1, 3, 4), torch.ones(2, 1, 3, 4)
    b[:, :, 2] = 100.0
    valid = torch.tensor([[[True, True, False]]])
    assert float(masked_mse(a, b, valid)) == pytest.approx(2.0)  # 1.0 per group, summed over 2 groups
