"""Conditional diffusion denoisers (paper Eq. 6-13; docs/model.md "diffusion").

* :class:`ConditionalDenoiser` is the noise estimator of Eq. 9 ("CI"), stacked for G groups so
  several denoisers run as one batched kernel.
* :class:`DiffusionDenoising` owns the training loss (``diffusion_loss``) and what flows
  downstream (``denoise_output``) for a group of denoisers sharing one :class:`NoiseSchedule`.
* :class:`ModalityDenoiser` (CDMD-M, Eq. 6-10) and :class:`BehaviorDenoiser` (CDMD-B, Eq. 11-13)
  only decide what is denoised, what conditions it and which mask applies.
* :class:`ModalityMLP` is the paper's Figure 5 comparison: a plain 2-layer MLP in CDMD-M's place
  (``modality_denoiser=mlp``), trained by the main loss only.

Every tensor of a group stack is ``[G, N, L, d]``: G denoisers, N sequences, L tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3bsr.batch import PAD_TIME
from m3bsr.models.diffusion import NoiseSchedule
from m3bsr.models.layers import GroupedLinear, GroupedTransformerBlock, time_mask


def timestep_embedding(t: Tensor, d: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps: ``t`` [*] → [*, d] (Transformer/DDPM style)."""
    half = d // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float().unsqueeze(-1) * freqs  # [*, half]
    emb = torch.cat([angles.sin(), angles.cos()], -1)
    return F.pad(emb, (0, d - 2 * half))


class ConditionalDenoiser(nn.Module):
    """Noise estimator ε̂(x_t, t, cond) of Eq. 9, for G independent denoisers.

    ``q = x_t + W_t sinusoid(t)``; ``h = LN(q + CrossAttn(q, cond)); h = LN(h + FFN(h))``;
    ``ε̂ = W_o h``. NOTE (docs/model.md, DECIDED): the paper gives the estimator no timestep input; we add
    the timestep embedding to the query. A learned null key per group is visible exactly to the
    queries whose condition is empty (e.g. a click before any favor), so they still attend somewhere;
    ``null_token=False`` drops it where a condition can never be empty (CDMD-M: a token sees itself).

    Shapes: ``x_t`` [G, N, L, d], ``t`` [G, N] or [G, N, L], ``cond`` [G, N, Lc, d],
    ``mask`` [G or 1, N, L, Lc] bool → ε̂ [G, N, L, d].
    """

    def __init__(self, groups: int, d: int, n_heads: int, dropout: float, null_token: bool = True):
        super().__init__()
        self.d = d
        self.time = GroupedLinear(groups, d, d)
        self.null = nn.Parameter(torch.randn(groups, 1, 1, d) * 0.02) if null_token else None
        self.block = GroupedTransformerBlock(groups, d, n_heads, dropout)
        self.out = GroupedLinear(groups, d, d)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, mask: Tensor) -> Tensor:
        G, N, L, d = x_t.shape
        if t.dim() == 2:  # one step per sequence: embed [G, N, 1] and broadcast over the L tokens
            t = t.unsqueeze(-1)
        q = x_t + self.time(timestep_embedding(t, d).to(x_t.dtype))  # [G, N, L, d]
        mask = mask.expand(G, N, L, cond.shape[2])
        if self.null is None:
            return self.out(self.block(q, mask, kv=cond))
        cond = torch.cat([cond, self.null.to(cond.dtype).expand(G, N, 1, d)], 2)  # [G, N, Lc+1, d]
        mask = torch.cat([mask, ~mask.any(-1, keepdim=True)], -1)  # null visible iff nothing else is
        return self.out(self.block(q, mask, kv=cond))


def normalize_x0(x: Tensor) -> Tensor:
    """DECIDED (docs/model.md "DECIDED choices"): LayerNorm without affine parameters on the feature entering a
    denoiser, so the trainable projections cannot shrink x_0 until the ε-loss is trivial."""
    return F.layer_norm(x, x.shape[-1:])


def masked_mse(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid tokens of the per-token mean squared error, summed over the G groups.

    Shapes: ``a``, ``b`` [G, N, L, d], ``valid`` [G or 1, N, L] bool → scalar.
    """
    err = (a - b).float().pow(2).mean(-1)  # [G, N, L]
    w = valid.expand_as(err).float()
    return ((err * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1.0)).sum()


class DiffusionDenoising(nn.Module):
    """G conditional denoisers sharing one schedule: the loss and the downstream output.

    * x_0 = LayerNorm without affine parameters of the input feature (scale DECIDED, docs/model.md).
    * ``diffusion_loss="eps"`` (DECIDED default): t ~ U{1..T} per sequence,
      ``L = ||ε - ε̂(x_t, t, cond)||²``; ``"literal"`` (Eq. 10/13 as printed): the squared distance
      between the observed (noisy) feature and the denoised output.
    * ``denoise_output`` (FLAG): ``x0`` = one estimate at step K from the observed feature taken as
      x_K; ``reverse_chain`` = K deterministic Eq. 8 steps from x_K; ``none`` = x_K itself. The same
      path runs in training and evaluation (deterministic; dropout only in training).
    """

    def __init__(self, groups: int, d: int, n_heads: int, dropout: float, schedule: NoiseSchedule,
                 infer_steps: int, diffusion_loss: str, denoise_output: str, null_token: bool = True):
        super().__init__()
        if not 1 <= infer_steps <= schedule.T:
            raise ValueError(f"infer_steps must be in 1..T={schedule.T}, got {infer_steps}")
        self.net = ConditionalDenoiser(groups, d, n_heads, dropout, null_token)
        self.schedule = schedule
        self.K = infer_steps
        self.diffusion_loss = diffusion_loss
        self.denoise_output = denoise_output

    def forward(self, x: Tensor, cond: Tensor, mask: Tensor, valid: Tensor,
                need_loss: bool) -> tuple[Tensor, Tensor | None]:
        """``x`` [G, N, L, d] features, ``cond`` [G, N, Lc, d], ``mask`` [G|1, N, L, Lc],
        ``valid`` [G|1, N, L] real tokens → (denoised [G, N, L, d], loss scalar or None)."""
        G, N = x.shape[:2]
        x_obs = normalize_x0(x)  # NOTE: scale DECIDED (docs/model.md) — x_0 cannot shrink to zero
        noisy = None  # the ε-loss's training sample (x_t, t)
        if need_loss and self.diffusion_loss == "eps":
            t = self.schedule.sample_timesteps((G, N), x.device)
            noise = torch.randn_like(x_obs)
            noisy = (self.schedule.add_noise(x_obs, noise, t), t)  # Eq. 6-7: sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε
        out, eps_noisy = self.denoise(x_obs, cond, mask, noisy)
        if not need_loss:
            return out, None
        if self.diffusion_loss == "eps":  # Eq. 10 / 13, DECIDED: ||ε - ε̂(x_t, t, cond)||²
            return out, masked_mse(eps_noisy, noise, valid)
        return out, masked_mse(x_obs, out, valid)  # Eq. 10 / 13 as printed

    def denoise(self, x_obs: Tensor, cond: Tensor, mask: Tensor,
                noisy: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """``denoise_output`` from the observed feature ``x_obs`` [G, N, L, d] taken as x_K.

        ``noisy`` = (x_t [G, N, L, d], t [G, N]), the ε-loss's sample, rides in the first estimator
        call (one batched kernel) → (output [G, N, L, d], ε̂ of ``noisy`` or None).
        """
        sched, K = self.schedule, self.K
        if self.denoise_output == "none":  # x_K itself; the estimator still trains on the ε-loss
            eps_noisy = None if noisy is None else self.estimate(x_obs, K, cond, mask, noisy)[1]
            return x_obs, eps_noisy
        eps_hat, eps_noisy = self.estimate(x_obs, K, cond, mask, noisy)  # Eq. 9 at step K
        if self.denoise_output == "x0":  # one-shot: (x_K - sqrt(1-ᾱ_K) ε̂) / sqrt(ᾱ_K)
            return sched.x0(x_obs, eps_hat, self._steps(K, x_obs)), eps_noisy
        out = sched.step(eps_hat, self._steps(K, x_obs), x_obs)  # reverse_chain: Eq. 8 from x_K to x_0
        for t in range(K - 1, 0, -1):
            out = sched.step(self.estimate(out, t, cond, mask)[0], self._steps(t, x_obs), out)
        return out, eps_noisy

    def estimate(self, x_t: Tensor, t: int, cond: Tensor, mask: Tensor,
                 noisy: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """ε̂(x_t, t, cond) of Eq. 9: ``x_t`` [G, N, L, d] at step ``t`` → ([G, N, L, d], None).

        With ``noisy`` = (x_t' [G, N, L, d], t' [G, N]) the N sequences of the ε-loss run in the
        same estimator call (2N sequences, one batched kernel) and their ε̂ comes second.
        """
        G, N = x_t.shape[:2]
        t_full = self._steps(t, x_t)
        if noisy is None:
            return self.net(x_t, t_full, cond, mask), None
        x_noisy, t_noisy = noisy
        both = self.net(torch.cat([x_t, x_noisy], 1), torch.cat([t_full, t_noisy], 1),
                        torch.cat([cond, cond], 1), torch.cat([mask.expand(G, N, *mask.shape[2:])] * 2, 1))
        return both[:, :N], both[:, N:]

    @staticmethod
    def _steps(t: int, like: Tensor) -> Tensor:
        """Step ``t`` for every sequence of ``like`` [G, N, ...] → [G, N] long."""
        return torch.full(like.shape[:2], t, device=like.device, dtype=torch.long)


class ModalityDenoiser(nn.Module):
    """CDMD-M (Eq. 6-10): for each behavior stream and content modality m, denoise ``h[b][m]``
    conditioned on ``h[b][id]`` of the same behavior. Tokens of one event see each other:
    a key is visible iff its time <= the query's time. Groups: (aux, m) for m in ``modalities``,
    then (target, m)."""

    def __init__(self, modalities: list[str], d: int, n_heads: int, dropout: float,
                 schedule: NoiseSchedule, infer_steps: int, diffusion_loss: str, denoise_output: str):
        super().__init__()
        self.modalities = list(modalities)
        self.diffusion = DiffusionDenoising(2 * len(self.modalities), d, n_heads, dropout, schedule,
                                            infer_steps, diffusion_loss, denoise_output, null_token=False)

    def forward(self, aux: dict[str, Tensor], tgt: dict[str, Tensor], aux_times: Tensor, tgt_times: Tensor,
                need_loss: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None]:
        """``aux[m]``, ``tgt[m]`` [B, L, d] (same L), times [B, L] → denoised content streams, loss."""
        M = len(self.modalities)
        x = torch.stack([aux[m] for m in self.modalities] + [tgt[m] for m in self.modalities])  # [2M, B, L, d]
        cond = torch.stack([aux["id"]] * M + [tgt["id"]] * M)  # [2M, B, L, d]
        masks = torch.stack([time_mask(aux_times, aux_times, strict=False),
                             time_mask(tgt_times, tgt_times, strict=False)])  # [2, B, L, L]
        mask = masks.repeat_interleave(M, 0)  # [2M, B, L, L]
        valid = torch.stack([aux_times, tgt_times]).repeat_interleave(M, 0) < PAD_TIME  # [2M, B, L]
        out, loss = self.diffusion(x, cond, mask, valid, need_loss)
        return ({m: out[k] for k, m in enumerate(self.modalities)},
                {m: out[M + k] for k, m in enumerate(self.modalities)}, loss)


class ModalityMLP(nn.Module):
    """CDMD-M's place taken by a plain MLP (``modality_denoiser=mlp``, the paper's Figure 5 comparison):
    per (behavior stream, content modality) group, ``W_2 GELU(W_1 x_0)`` with x_0 the same normalised
    feature CDMD-M starts from (:func:`normalize_x0`); no condition, no diffusion, no loss of its own
    (trained by the main loss only). Groups as :class:`ModalityDenoiser`: (aux, m) then (target, m)."""

    def __init__(self, modalities: list[str], d: int):
        super().__init__()
        self.modalities = list(modalities)
        G = 2 * len(self.modalities)
        self.mlp = nn.Sequential(GroupedLinear(G, d, d), nn.GELU(), GroupedLinear(G, d, d))

    def forward(self, aux: dict[str, Tensor], tgt: dict[str, Tensor], aux_times: Tensor, tgt_times: Tensor,
                need_loss: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], None]:
        """``aux[m]``, ``tgt[m]`` [B, L, d] → mapped content streams (same shapes), no loss; the
        times are unused (a token sees nothing but itself) and kept for :class:`ModalityDenoiser`'s signature."""
        M = len(self.modalities)
        x = torch.stack([aux[m] for m in self.modalities] + [tgt[m] for m in self.modalities])  # [2M, B, L, d]
        out = self.mlp(normalize_x0(x))
        return ({m: out[k] for k, m in enumerate(self.modalities)},
                {m: out[M + k] for k, m in enumerate(self.modalities)}, None)


class BehaviorDenoiser(nn.Module):
    """CDMD-B (Eq. 11-13): for each modality m, denoise the auxiliary stream ``h[aux][m]``
    conditioned on the target stream ``h[target][m]`` of the same modality. An auxiliary token
    only sees target events strictly before it. The target side is not behavior-denoised."""

    def __init__(self, modalities: list[str], d: int, n_heads: int, dropout: float,
                 schedule: NoiseSchedule, infer_steps: int, diffusion_loss: str, denoise_output: str):
        super().__init__()
        self.modalities = list(modalities)
        self.diffusion = DiffusionDenoising(len(self.modalities), d, n_heads, dropout, schedule,
                                            infer_steps, diffusion_loss, denoise_output)

    def forward(self, aux: dict[str, Tensor], tgt: dict[str, Tensor], aux_times: Tensor, tgt_times: Tensor,
                need_loss: bool) -> tuple[dict[str, Tensor], Tensor | None]:
        """``aux[m]`` [B, La, d], ``tgt[m]`` [B, Lt, d], times → denoised auxiliary streams, loss."""
        x = torch.stack([aux[m] for m in self.modalities])  # [M, B, La, d]
        cond = torch.stack([tgt[m] for m in self.modalities])  # [M, B, Lt, d]
        mask = time_mask(aux_times, tgt_times, strict=True).unsqueeze(0)  # [1, B, La, Lt]
        valid = (aux_times < PAD_TIME).unsqueeze(0)  # [1, B, La]
        out, loss = self.diffusion(x, cond, mask, valid, need_loss)
        return {m: out[k] for k, m in enumerate(self.modalities)}, loss
