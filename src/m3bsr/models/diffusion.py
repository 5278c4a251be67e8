"""The noise schedule of the conditional diffusion denoisers (paper Eq. 6-9; docs/model.md "diffusion").

Stateless and network-free (the diffusers scheduler habit): it knows ``T`` and the betas and
offers ``add_noise`` (Eq. 7), ``step`` (Eq. 8) and ``x0`` (the one-shot estimate); the caller
owns the loop and the noise estimator. Timesteps are 1-based: ``t`` in ``1..T``; index 0 of
every table is the clean state (ᾱ_0 = 1), so ``x_0`` is what ``step`` returns at ``t = 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NoiseSchedule(nn.Module):
    """Linear betas ``β_1..β_T`` from ``beta_start`` to ``beta_end``; α_t = 1 - β_t, ᾱ_t = Π α.

    Tables are computed in float64 and stored as non-persistent float32 buffers of length
    ``T + 1`` (they follow the config, so they are not part of checkpoints).
    """

    def __init__(self, T: int, beta_start: float, beta_end: float):
        super().__init__()
        if T < 1:
            raise ValueError(f"the diffusion schedule needs T >= 1, got {T}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.T = T
        beta = torch.zeros(T + 1, dtype=torch.float64)
        beta[1:] = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        alpha = 1.0 - beta
        alpha_bar = torch.cumprod(alpha, 0)  # alpha_bar[0] = 1
        tables = {
            "beta": beta,
            "alpha": alpha,
            "alpha_bar": alpha_bar,
            "sqrt_alpha": alpha.sqrt(),
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - alpha_bar).sqrt(),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    def _at(self, table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` broadcast against ``like``: ``t`` has the leading shape of ``like``."""
        v = table[t.long()]
        return v.reshape(*v.shape, *([1] * (like.dim() - v.dim()))).to(like.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Eq. 7 in closed form: ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε``.

        Shapes: ``x0``, ``noise`` [..., d]; ``t`` integer with any leading shape of ``x0``.
        NOTE: the paper's Eq. 1 writes the mean as (1 - β); we use the standard sqrt form (docs/model.md).
        """
        return self._at(self.sqrt_alpha_bar, t, x0) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t, x0) * noise

    def step(self, eps_hat: Tensor, t: Tensor, x_t: Tensor) -> Tensor:
        """Eq. 8, deterministic reverse step: ``x_{t-1} = (x_t - β_t / sqrt(1-ᾱ_t) ε̂) / sqrt(α_t)``.

        With the true noise this is the mean of the posterior q(x_{t-1} | x_t, x_0).
        """
        coef = self._at(self.beta, t, x_t) / self._at(self.sqrt_one_minus_alpha_bar, t, x_t)
        return (x_t - coef * eps_hat) / self._at(self.sqrt_alpha, t, x_t)

    def x0(self, x_t: Tensor, eps_hat: Tensor, t: Tensor) -> Tensor:
        """One-shot estimate ``x_0 = (x_t - sqrt(1-ᾱ_t) ε̂) / sqrt(ᾱ_t)`` (``denoise_output=x0``)."""
        return ((x_t - self._at(self.sqrt_one_minus_alpha_bar, t, x_t) * eps_hat)
                / self._at(self.sqrt_alpha_bar, t, x_t))

    def sample_timesteps(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Uniform ``t`` in ``1..T`` (the ``eps`` loss), from the global torch RNG like dropout."""
        return torch.randint(1, self.T + 1, shape, device=device)

    def extra_repr(self) -> str:
        return f"T={self.T}, beta=[{float(self.beta[1]):g}, {float(self.beta[-1]):g}]"
