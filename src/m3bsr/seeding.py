"""One seed controls everything: Python, NumPy and torch generators are derived from it."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, purpose: str) -> int:
    """A stable 63-bit seed for ``purpose`` (e.g. ``"candidates"``), derived from the master seed."""
    h = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def numpy_rng(seed: int, purpose: str) -> np.random.Generator:
    """A NumPy generator for ``purpose``, independent of every other purpose."""
    return np.random.default_rng(derive_seed(seed, purpose))


def torch_generator(seed: int, purpose: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator for ``purpose`` on ``device``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, purpose))
    return g


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global RNGs (for modules such as dropout that use them)."""
    random.seed(seed)
    np.random.seed(derive_seed(seed, "numpy-global") % (2**32))
    torch.manual_seed(derive_seed(seed, "torch-global"))
