"""Both evaluation protocols, every time (spec section 5).

* ``sampled``: rank the positive among the stored candidates (``batch.candidates``, positive first).
* ``full``: rank the positive against the whole catalogue, item chunk by item chunk
  (``model.score(reps, items=chunk)``, ``cfg.item_chunk`` items at a time), masking padding item 0
  and ``batch.exclude_items`` (the positive is never masked). Counts are accumulated per chunk, so
  memory is bounded by ``batch_size x item_chunk`` scores and there is no Python loop over users.

Ranks are pessimistic: ``1 + #(items other than the positive with score >= the positive's score)``.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from m3bsr.config import EvalConfig
from m3bsr.data.batches import WindowArrays, iterate_batches
from m3bsr.engine.metrics import metrics_from_ranks

PROTOCOLS = ("sampled", "full")


def _flatten_queries(reps: Tensor, batch) -> tuple[Tensor, Tensor, Tensor]:
    """Real queries only: reps [N, 1, d], labels [N], row (batch row of each query) [N]."""
    mask = batch.query_mask  # [B, P]
    rows = mask.nonzero()[:, 0]
    return reps[mask][:, None, :], batch.labels[mask], rows


def sampled_ranks(model, reps: Tensor, batch) -> Tensor:
    """[N] pessimistic ranks of the positive among ``batch.candidates`` [B, P, C] (positive first)."""
    mask = batch.query_mask
    cand = batch.candidates  # [B, P, C]
    labels = batch.labels
    if not bool((cand[..., 0] == labels)[mask].all()):
        raise ValueError("sampled candidates must hold the positive in column 0 (see data/prepared.py)")
    scores = model.score(reps, items=cand).float()  # [B, P, C]
    pos = scores[..., :1]  # [B, P, 1]
    # Negatives equal to the positive or padding never count.
    counted = (cand[..., 1:] != labels[..., None]) & (cand[..., 1:] != 0)  # [B, P, C-1]
    beats = ((scores[..., 1:] >= pos) & counted).sum(-1)  # [B, P]
    return 1 + beats[mask]


def _positive_scores(model, reps: Tensor, labels: Tensor, chunk: int) -> Tensor:
    """[N] score of each positive, computed with exactly the call that scores its chunk.

    Scoring the positive with the same ``score(reps, items=chunk)`` call as the catalogue makes a
    tie with an equal-scored item an exact float tie (counted against the positive), not an
    accident of a different reduction order. One call per distinct chunk, not per user.
    """
    pos = torch.empty(len(labels), device=reps.device, dtype=torch.float32)
    which = labels // chunk
    for c in torch.unique(which).tolist():
        sel = (which == c).nonzero()[:, 0]
        start = c * chunk
        items = torch.arange(start, min(start + chunk, model.n_items + 1), device=reps.device)
        s = model.score(reps[sel], items=items).float()[:, 0, :]  # [n_sel, chunk]
        pos[sel] = s.gather(1, (labels[sel] - start)[:, None])[:, 0]
    return pos


def full_ranks(model, reps: Tensor, batch, chunk: int) -> Tensor:
    """[N] pessimistic ranks of the positive over items ``1..n_items`` minus ``batch.exclude_items``.

    Padding, excluded items and the positive itself get score -inf in place, so each chunk costs
    one matmul, one scatter and one in-place compare-and-sum. Chunks of a few thousand items keep
    the [N, chunk] scores in cache between the matmul and the count.
    """
    q_reps, labels, rows = _flatten_queries(reps, batch)  # [N, 1, d], [N], [N]
    n = len(labels)
    n_all = model.n_items + 1
    # One chunk (the usual catalogue size): the positive's score comes from the same call below.
    pos = _positive_scores(model, q_reps, labels, chunk) if n_all > chunk else None  # [N]
    exclude = batch.exclude_items[rows] if batch.exclude_items is not None else labels.new_zeros(n, 1)  # [N, X]
    exclude = torch.where(exclude == labels[:, None], 0, exclude)  # the positive is never excluded
    exclude = torch.cat([exclude, labels[:, None]], 1)  # ... but never counts against itself
    counts = torch.zeros(n, dtype=torch.float64, device=reps.device)  # float sums of 0/1: exact
    for start in range(0, n_all, chunk):
        end = min(start + chunk, n_all)
        items = torch.arange(start, end, device=reps.device)
        scores = model.score(q_reps, items=items).float()[:, 0, :]  # [N, C]
        if pos is None:
            pos = scores.gather(1, labels[:, None])[:, 0]
        if start == 0:
            scores[:, 0] = float("-inf")  # padding
        r, c = ((exclude >= start) & (exclude < end) & (exclude != 0)).nonzero(as_tuple=True)
        scores[r, exclude[r, c] - start] = float("-inf")
        # In place, as 0/1 floats: a float sum is vectorised, a bool → integer sum is ~3x slower on CPU.
        counts += scores.ge_(pos[:, None]).sum(1)
    return 1 + counts.long()


def _unpermute(ranks: np.ndarray, windows: WindowArrays, order: np.ndarray) -> np.ndarray:
    """Ranks produced window by window in ``order`` → the same ranks in window order [N]."""
    n_q = (windows.labels != 0).sum(1)  # queries per window
    first = np.concatenate([[0], np.cumsum(n_q)[:-1]])  # where window w's ranks go in window order
    counts = n_q[order]
    start_sorted = np.concatenate([[0], np.cumsum(counts)[:-1]])  # where it sits in the sorted output
    dest = np.repeat(first[order], counts) + np.arange(counts.sum()) - np.repeat(start_sorted, counts)
    out = np.empty_like(ranks)
    out[dest] = ranks
    return out


@torch.no_grad()
def evaluate(model, windows: WindowArrays, cfg: EvalConfig, batch_size: int, device: torch.device | str,
             *, amp: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Evaluate ``model`` on evaluation ``windows`` under both protocols.

    Returns ``(metrics, ranks)``: ``metrics[p]`` maps metric names to means and ``ranks[p]`` is
    an int64 array [N] of 1-based pessimistic ranks in window order, for ``p`` in
    ``("sampled", "full")``. ``amp`` runs ``represent`` under bf16 autocast on CUDA; scores are float32.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and cuda) else nullcontext()
    out: dict[str, list[Tensor]] = {p: [] for p in PROTOCOLS}
    # Neighbours in length share a batch and each batch drops its all-padding columns: on short
    # e-commerce windows most of the [B, max_len] grid is padding. Ranks are put back in order below.
    order = windows.length_order()
    try:
        for batch in iterate_batches(windows, batch_size, pin_memory=cuda, order=order, trim=True):
            batch = batch.to(device, non_blocking=cuda)
            with autocast:
                reps = model.represent(batch)
            reps = reps.float()
            if batch.candidates is not None:
                out["sampled"].append(sampled_ranks(model, reps, batch).cpu())
            out["full"].append(full_ranks(model, reps, batch, cfg.item_chunk).cpu())
    finally:
        model.train(was_training)
    ranks = {p: _unpermute(torch.cat(v).numpy().astype(np.int64), windows, order) if v else np.zeros(0, np.int64)
             for p, v in out.items()}
    metrics = {p: metrics_from_ranks(r, cfg.ks) for p, r in ranks.items()}
    return metrics, ranks


def evaluate_run(run_dir: Path, *, device: str | None = None) -> dict:
    """Re-evaluate ``run_dir/best.pt`` on valid and test; returns ``{"valid": {p: M}, "test": {p: M}}``.

    ``device`` defaults to the run's ``train.device``. With the same machine and device this
    reproduces ``metrics.json`` exactly.
    """
    from m3bsr.data.batches import WindowBuilder
    from m3bsr.engine.checkpoint import load_run_model
    from m3bsr.engine.runs import RunDir
    from m3bsr.engine.train import resolve_device

    cfg, _ = RunDir(Path(run_dir)).read_config()
    dev = resolve_device(device or cfg.train.device)
    model, cfg, ds = load_run_model(Path(run_dir), "best", device=dev)
    builder = WindowBuilder(ds, cfg.data.max_len)
    result = {}
    for split in ("valid", "test"):
        windows = builder.eval_windows(split, cfg.eval.exclude)
        result[split], _ = evaluate(model, windows, cfg.eval, cfg.train.eval_batch_size, dev, amp=cfg.train.amp)
    return result
