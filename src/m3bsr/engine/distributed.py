"""Distributed data-parallel training (``torchrun --nproc_per_node=N -m m3bsr train ...``).

* :func:`process_group` opens the process group from the torchrun environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, nccl on CUDA (each
  process on ``cuda:LOCAL_RANK``). Without that environment (or ``WORLD_SIZE=1``) it is a no-op:
  a plain ``m3bsr train`` never touches ``torch.distributed``.
* :func:`shard_batches` is the distributed sampler: every rank draws the SAME permutation from the
  shared shuffle generator (one ``randperm`` per epoch, exactly as a single process does), cuts it
  into GLOBAL batches of ``train.batch_size`` windows and keeps ``block[rank::world_size]`` of each.
  So every rank runs ``ceil(n / batch_size)`` steps, and step k of all ranks together holds exactly
  the windows of a single process's step k. A rank whose share of the last block is empty gets a pad
  window with weight 0 (it runs forward/backward so the gradient all-reduce never waits forever).
* :func:`step_weight`: gradients are averaged over ranks by DDP, but the model losses are means
  over the queries of the LOCAL batch; scaling rank r's loss by ``W * n_r / N`` (``n_r`` its queries,
  ``N`` the global batch's) makes the averaged gradient the gradient of the global per-query mean,
  i.e. the single-process gradient. The same all-reduce carries a "non-finite loss" flag so that
  every rank skips or stops on the same batch.
* :func:`evaluate_sharded`: each rank ranks ``windows[rank::world_size]``; the integer ranks are
  gathered into window order and every rank computes the same metrics from all of them.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from m3bsr.data.batches import WindowArrays, training_order
from m3bsr.errors import input_error

TIMEOUT = timedelta(minutes=30)  # a rank stuck longer than this (e.g. another one crashed) fails loudly


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def context_from_env(env: dict[str, str] | None = None) -> DistContext:
    """Rank / world size / local rank as torchrun sets them (defaults: a single process)."""
    env = os.environ if env is None else env
    try:
        ctx = DistContext(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError:
        raise input_error("environment RANK/WORLD_SIZE/LOCAL_RANK", "not integers",
                          "Launch with torchrun, or unset these variables") from None
    if not 0 <= ctx.rank < ctx.world_size:
        raise input_error(f"environment RANK={ctx.rank} WORLD_SIZE={ctx.world_size}", "rank outside the world",
                          "Launch with torchrun, or unset these variables")
    return ctx


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """``cuda`` → ``cuda:LOCAL_RANK`` (one GPU per process); other devices unchanged."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", ctx.local_rank)
    return device


@contextmanager
def process_group(device: torch.device) -> Iterator[DistContext]:
    """Open (and finally destroy) the process group when launched by torchrun with WORLD_SIZE > 1."""
    ctx = context_from_env()
    if not ctx.active or dist.is_initialized():
        yield ctx
        return
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise input_error(f"LOCAL_RANK={ctx.local_rank}", f"only {torch.cuda.device_count()} GPU(s) visible",
                              "Use --nproc_per_node <= the number of GPUs on the node")
        torch.cuda.set_device(ctx.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size, timeout=TIMEOUT)
    try:
        yield ctx
        # The caller has dropped its DDP model (whose reducer holds the group); collect it now, and let
        # every rank finish its collectives before any tears the group down. Without both, a rank
        # was once aborted at exit ("terminate called without an active exception") in a test run.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives


def _flags_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (world size 1: ``flag``)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=_flags_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; world size 1: unchanged)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_flags_device(device))
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_weight(n_local: int, finite: bool, world_size: int, device: torch.device) -> tuple[float, bool]:
    """``(W * n_r / N, all ranks finite)`` for one step: the loss scale that turns DDP's gradient
    average into the gradient of the global per-query mean (module docstring)."""
    n_global, bad = all_sum([float(n_local), float(not finite)], device)
    return world_size * n_local / max(n_global, 1.0), bad == 0


# --------------------------------------------------------------------------- data


def subset(windows: WindowArrays, index: np.ndarray) -> WindowArrays:
    """The windows at ``index`` (numpy fancy indexing of every field)."""
    return WindowArrays(**{f.name: (None if getattr(windows, f.name) is None else getattr(windows, f.name)[index])
                           for f in fields(windows)})


def shard_batches(windows: WindowArrays, batch_size: int, *, generator: torch.Generator, rank: int,
                  world_size: int, pin_memory: bool = False, pool: int = 0):
    """Yield ``(batch, real)`` for this rank: its share of each global batch of the shuffled windows.

    ``real`` is False for the weight-0 pad window a rank gets when its share of a block is empty.
    Every rank yields ``ceil(len(windows) / batch_size)`` batches. ``pool`` > 0: the global batches of
    :func:`~m3bsr.data.batches.bucketed_order` (``train.bucket_by_length``), padding trimmed.
    """
    order = training_order(windows, batch_size, pool, generator)  # the single-process order
    for start in range(0, len(order), batch_size):
        block = order[start: start + batch_size]
        mine = block[rank::world_size]
        real = len(mine) > 0
        b = windows.batch(mine if real else block[:1], trim=bool(pool))
        yield (b.pin_memory() if pin_memory else b), real


def evaluate_sharded(evaluate_fn, model, windows: WindowArrays, ctx: DistContext, **kwargs):
    """``evaluate_fn(model, windows, **kwargs)`` split over ranks; returns ``(metrics, ranks)`` equal
    on every rank, ranks in window order (the single-process ranks, up to batch-composition float noise)."""
    from m3bsr.engine.metrics import metrics_from_ranks

    if not ctx.active:
        return evaluate_fn(model, windows, **kwargs)
    _, ranks = evaluate_fn(model, subset(windows, np.arange(ctx.rank, len(windows), ctx.world_size)), **kwargs)
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, ranks)  # small int arrays; transport only, nothing is written
    full = {}
    for p in ranks:
        out = np.zeros(len(windows), np.int64)
        for r, part in enumerate(gathered):
            out[r::ctx.world_size] = part[p]
        full[p] = out
    ks = kwargs["cfg"].ks
    return {p: metrics_from_ranks(v, ks) for p, v in full.items()}, full


# --------------------------------------------------------------------------- model


class LossModule(nn.Module):
    """``forward(batch) = model.loss(batch)``: routes the loss (and every ``represent`` call inside
    it) through DDP's forward, so DDP prepares its gradient buckets for that backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def wrap(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP around :class:`LossModule` (a callable ``batch -> loss dict``); ``model.loss`` itself when
    there is nothing to all-reduce (single process, or no trainable parameter such as pop)."""
    if not ctx.active or not any(p.requires_grad for p in model.parameters()):
        return model.loss
    # find_unused_parameters: a loss may leave parameters out on some batches (ablation switches, a
    # window without auxiliary events); DDP would otherwise wait for their gradients forever. It
    # costs one autograd-graph traversal per step (and a one-time warning when none is unused).
    # forward_sync_buffers=False: buffers are constants or counts (summed by sum_buffer_updates).
    return nn.parallel.DistributedDataParallel(
        LossModule(model), device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True, forward_sync_buffers=False)


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers that go into the state dict (e.g. pop's counts)."""
    keys = set(model.state_dict())
    return {n: b.detach().clone() for n, b in model.named_buffers() if n in keys}


def sum_buffer_updates(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Buffers accumulated during an epoch (pop's counts): new = before + sum over ranks of (local - before)."""
    if not dist.is_initialized():
        return
    for name, buf in model.named_buffers():
        if name in before and buf.dtype != torch.bool:
            delta = buf - before[name]
            dist.all_reduce(delta)
            buf.copy_(before[name] + delta)
