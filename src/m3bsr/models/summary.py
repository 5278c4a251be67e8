"""Model summary: parameters per top-level module and estimated GFLOP per window.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
attention; element-wise ops are not counted) on the batch given, then divided by its windows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from m3bsr.batch import SequenceBatch


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per top-level child module (name → count), plus ``total``.

    Parameters held directly by the model (not by a child) are listed under ``(own)``.
    """
    counts = {name: sum(p.numel() for p in child.parameters() if p.requires_grad)
              for name, child in model.named_children()}
    own = sum(p.numel() for p in model.parameters(recurse=False) if p.requires_grad)
    if own:
        counts["(own)"] = own
    counts = {k: v for k, v in counts.items() if v}
    counts["total"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure_flops(model: nn.Module, batch: SequenceBatch) -> dict[str, float]:
    """GFLOP per window of: ``represent`` (eval, the user encoder), ``score_all`` (eval, scoring
    every query against the whole catalogue) and ``train_loss_forward`` (train mode, ``loss`` with
    every auxiliary term). The model's mode is restored afterwards."""
    was_training = model.training
    n = batch.users.shape[0]
    try:
        model.eval()
        with torch.no_grad():
            rep = _flops(lambda: model.represent(batch))
            reps = model.represent(batch)
            score = _flops(lambda: model.score(reps))
        model.train()
        with torch.no_grad():
            train = _flops(lambda: model.loss(batch))
    finally:
        model.train(was_training)
    return {"represent": rep / n / 1e9, "score_all": score / n / 1e9, "train_loss_forward": train / n / 1e9}


def summarize(model: nn.Module, batch: SequenceBatch) -> str:
    """Human-readable table: parameters per top-level module, then GFLOP per window on ``batch``."""
    counts = count_parameters(model)
    flops = measure_flops(model, batch)
    width = max(len(k) for k in [*counts, *flops]) + 2
    lines = [f"{type(model).__name__}: parameters per top-level module"]
    lines += [f"  {k:<{width}}{v:>14,}" for k, v in counts.items()]
    La, Lt, P = batch.aux_items.shape[1], batch.tgt_items.shape[1], batch.labels.shape[1]
    lines.append(f"estimated forward GFLOP per window (batch of {batch.users.shape[0]}, "
                 f"La={La}, Lt={Lt}, P={P} queries)")
    lines += [f"  {k:<{width}}{v:>14.4f}" for k, v in flops.items()]
    return "\n".join(lines)
