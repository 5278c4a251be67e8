"""Both evaluation protocols, every time (docs/training.md "Evaluation protocols").

* ``sampled``: rank the positive among the stored candidates (``batch.candidates``, positive first).
* ``full``: rank the positive against the whole catalogue, item chunk by item chunk
  (``cfg.item_chunk`` items at a time, :func:`full_ranks`), masking padding item 0
  and ``batch.exclude_items`` (the positive is never masked). Counts are accumulated per chunk, so
  memory is bounded by ``batch_size x item_chunk`` scores and there is no Python loop over users.

Ranks are pessimistic: ``1 + #(items other than the positive with score >= the positive's score)``.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from m3bsr.config import EvalConfig
from m3bsr.data.batches import WindowArrays, iterate_batches
from m3bsr.engine.metrics import metrics_from_ranks
from m3bsr.engine.runs import evaluation_overrides
from m3bsr.models.base import candidate_bonus

PROTOCOLS = ("sampled", "full")


def _flatten_queries(reps: Tensor, batch) -> tuple[Tensor, Tensor, Tensor]:
    """Real queries only: reps [N, 1, d], labels [N], row (batch row of each query) [N]."""
    mask = batch.query_mask  # [B, P]
    rows = mask.nonzero()[:, 0]
    return reps[mask][:, None, :], batch.labels[mask], rows


def sampled_ranks(model, reps: Tensor, batch, table: Tensor | None = None) -> Tensor:
    """[N] pessimistic ranks of the positive among ``batch.candidates`` [B, P, C] (positive first).

    With the linear ``table`` (:func:`linear_table`) the candidates' rows are read from it, scored
    as full ranking scores them (``[q, 1] . [w, b]``); else through ``model.score``."""
    mask = batch.query_mask
    cand, labels = batch.candidates[mask], batch.labels[mask]  # [N, C], [N]
    if not bool((cand[:, 0] == labels).all()):
        raise ValueError("sampled candidates must hold the positive in column 0 (see data/prepared.py)")
    if table is None:
        scores = model.score(reps[mask][:, None, :], items=cand[:, None, :]).float()[:, 0, :]  # [N, C]
    else:  # no output_layer() call per batch (M3BSR's computes the catalogue's item vectors)
        scores = torch.bmm(table[cand], _table_queries(reps[mask].float(), table)[:, :, None])[:, :, 0]  # [N, C]
    bonus = model.history_bonus(reps, batch)
    if bonus is not None:
        scores = scores + candidate_bonus(cand, (bonus[0][mask], bonus[1][mask].float()))
    # Negatives equal to the positive or padding never count.
    counted = (cand[:, 1:] != labels[:, None]) & (cand[:, 1:] != 0)  # [N, C-1]
    return 1 + ((scores[:, 1:] >= scores[:, :1]) & counted).sum(1)


def linear_table(model) -> Tensor | None:
    """[n_items + 1, d (+ 1)] float32: ``model.output_layer()`` with the bias, if any, as a last
    column (Eq. 23 as one matmul: ``[q, 1] @ [W, b].T``), when ``model`` keeps the base linear
    :meth:`score`; else None.

    Evaluation reads the table once and writes each chunk's scores into one reused buffer (a
    separate bias add costs a quarter of the matmul); a model that overrides ``score`` is asked
    chunk by chunk instead.
    """
    if not model.linear_score:
        return None
    weight, bias = model.output_layer()
    weight = weight.float()
    return weight if bias is None else torch.cat([weight, bias.float()[:, None]], 1)


def _table_queries(q: Tensor, table: Tensor) -> Tensor:
    """Query vectors [N, d] float32 in the layout of ``table``: ``[q, 1]`` [N, d + 1] when it holds a bias column."""
    return torch.cat([q, q.new_ones(len(q), 1)], 1) if table.shape[1] > q.shape[1] else q


def _chunk_scores(model, q: Tensor, start: int, end: int, table: Tensor | None, buf: Tensor | None = None) -> Tensor:
    """[N, end - start] float32 scores of ``q`` [N, d] against items ``start..end-1``. With the
    linear ``table``, ``q`` carries the table's width ([q, 1] when it holds a bias) and the scores
    are written into ``buf`` (flat, >= N x (end - start))."""
    if table is None:
        return model.score(q[:, None, :], items=slice(start, end)).float()[:, 0, :]
    out = None if buf is None else buf[: len(q) * (end - start)].view(len(q), end - start)
    return torch.mm(q, table[start:end].T, out=out)


def _group_by_chunk(rows: Tensor, items: Tensor, chunk: int, n_all: int, *values: Tensor) -> tuple:
    """(row, item) pairs [M] (and any per-pair ``values`` [M]) sorted by the item chunk they fall in,
    with ``bounds``: chunk k's pairs are ``[bounds[k], bounds[k + 1])``. Returns
    ``(rows, items, bounds, *values)``; the order within a chunk is kept (stable sort)."""
    key, order = torch.sort(items // chunk, stable=True)
    bounds = torch.searchsorted(key, torch.arange(-(-n_all // chunk) + 1, device=key.device)).tolist()
    return (rows[order], items[order], bounds, *(v[order] for v in values))


def full_ranks(model, reps: Tensor, batch, chunk: int, table: Tensor | None = None) -> Tensor:
    """[N] pessimistic ranks of the positive over items ``1..n_items`` minus ``batch.exclude_items``.

    Scores come ``chunk`` items at a time, from ``table`` (:func:`linear_table`) or from
    ``model.score(reps, items=slice)``: each chunk costs one matmul, one scatter of -inf (padding,
    excluded items and the positive itself) and one in-place compare-and-sum, on [N, chunk] scores
    small enough to stay in cache. The positive's score comes from the same function on the same
    item slice, so a tie with an equal-scored item is an exact float tie (counted against it).
    """
    q, labels, rows = _flatten_queries(reps, batch)  # [N, 1, d], [N], [N]
    bonus = model.history_bonus(reps, batch)
    q = q[:, 0, :].float()
    if table is not None:
        q = _table_queries(q, table)
    n = len(labels)
    n_all = model.n_items + 1
    pos = torch.empty(n, device=reps.device, dtype=torch.float32)
    which = labels // chunk
    for c in torch.unique(which).tolist():  # one call per distinct chunk, not per user
        sel = (which == c).nonzero()[:, 0]
        start = c * chunk
        s = _chunk_scores(model, q[sel], start, min(start + chunk, n_all), table)
        pos[sel] = s.gather(1, (labels[sel] - start)[:, None])[:, 0]
    if bonus is not None:  # the repeat head's scores for history items, grouped by chunk like the exclusions
        b_items, b_vals = bonus[0][batch.query_mask], bonus[1][batch.query_mask].float()  # [N, H]
        pos += candidate_bonus(labels[:, None], (b_items, b_vals))[:, 0]
        br, bc = (b_items != 0).nonzero(as_tuple=True)
        br, b_item, b_bounds, b_val = _group_by_chunk(br, b_items[br, bc], chunk, n_all, b_vals[br, bc])
    # (row, item) pairs never counted, grouped by chunk once: excluded items (never the positive),
    # the positive itself and the padding item 0.
    exclude = batch.exclude_items[rows] if batch.exclude_items is not None else labels.new_zeros(n, 0)  # [N, X]
    r, c = ((exclude != 0) & (exclude != labels[:, None])).nonzero(as_tuple=True)
    every = torch.arange(n, device=reps.device)
    r, item, bounds = _group_by_chunk(torch.cat([r, every, every]),
                                      torch.cat([exclude[r, c], labels, torch.zeros_like(labels)]), chunk, n_all)
    counts = torch.zeros(n, dtype=torch.float64, device=reps.device)  # float sums of 0/1: exact
    # One buffer for every chunk: a fresh multi-MB tensor per chunk measured ~1.7x slower on CPU.
    buf = q.new_empty(n * min(chunk, n_all)) if table is not None else None
    for k, start in enumerate(range(0, n_all, chunk)):
        scores = _chunk_scores(model, q, start, min(start + chunk, n_all), table, buf)  # [N, C]
        if bonus is not None:
            blo, bhi = b_bounds[k], b_bounds[k + 1]
            scores.index_put_((br[blo:bhi], b_item[blo:bhi] - start), b_val[blo:bhi], accumulate=True)
        lo, hi = bounds[k], bounds[k + 1]
        scores[r[lo:hi], item[lo:hi] - start] = float("-inf")
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


@torch.inference_mode()  # no autograd bookkeeping at all: the outputs are ranks
def evaluate(model, windows: WindowArrays, cfg: EvalConfig, batch_size: int, device: torch.device | str,
             *, amp: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Evaluate ``model`` on evaluation ``windows`` under both protocols.

    Returns ``(metrics, ranks)``: ``metrics[p]`` maps metric names to means and ``ranks[p]`` is
    an int64 array [N] of 1-based pessimistic ranks in window order, for ``p`` in
    ``("sampled", "full")``. ``amp`` runs ``represent`` under bf16 autocast on CUDA; scores are float32.

    On CPU with ``torch.get_num_threads()`` = T > 1, T batches are evaluated at once, each on one
    intra-op thread (:func:`_cpu_workers`); ranks are those of a one-thread run whatever T.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and cuda) else nullcontext()
    out: dict[str, list[Tensor]] = {p: [] for p in PROTOCOLS}
    # Neighbours in length share a batch and each batch drops its all-padding columns: on short
    # e-commerce windows most of the [B, max_len] grid is padding. Long windows come in smaller
    # batches (``cfg.max_tokens``). Ranks are put back in window order below.
    order = windows.length_order()

    @torch.inference_mode()  # thread-local: a worker thread enters it itself
    def rank_batch(batch) -> tuple[Tensor | None, Tensor]:
        batch = batch.to(device, non_blocking=cuda)
        with autocast:
            reps = model.represent(batch)
        reps = reps.float()
        sampled = sampled_ranks(model, reps, batch, table).cpu() if batch.candidates is not None else None
        return sampled, full_ranks(model, reps, batch, cfg.item_chunk, table).cpu()

    try:
        table = linear_table(model)  # read once: the model does not change during evaluation
        batches = iterate_batches(windows, batch_size, pin_memory=cuda, order=order, trim=True,
                                  max_tokens=cfg.max_tokens)
        for sampled, full in _map_batches(rank_batch, batches, _cpu_workers(device)):
            if sampled is not None:
                out["sampled"].append(sampled)
            out["full"].append(full)
    finally:
        model.train(was_training)
    ranks = {p: _unpermute(torch.cat(v).numpy().astype(np.int64), windows, order) if v else np.zeros(0, np.int64)
             for p, v in out.items()}
    metrics = {p: metrics_from_ranks(r, cfg.ks) for p, r in ranks.items()}
    return metrics, ranks


def _cpu_workers(device: torch.device) -> int:
    """Batches evaluated at once: ``torch.get_num_threads()`` on CPU, else 1.

    Why: splitting each of the ~1,000 small operations of a batch over T intra-op threads makes
    every one wait for its slowest thread (on a shared 2-core machine, 2 threads ran evaluation
    5-15x slower than 1, spinning), and the float results depend on T. T batches side by side on
    one thread each never wait for one another, and every batch is computed exactly as with one
    thread. PyTorch releases the GIL inside its operations.
    """
    return torch.get_num_threads() if device.type == "cpu" else 1


def _map_batches(fn, batches, workers: int) -> list:
    """``[fn(b) for b in batches]``; with ``workers`` > 1, on that many threads of one intra-op
    thread each (the process's thread count is restored after), at most ``2 x workers`` batches
    built ahead."""
    if workers <= 1:
        return [fn(b) for b in batches]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # read by each worker thread when it starts its first operation
    try:
        results, pending = [], deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="m3bsr-eval") as pool:
            for batch in batches:
                pending.append(pool.submit(fn, batch))
                if len(pending) >= 2 * workers:
                    results.append(pending.popleft().result())
            results += [f.result() for f in pending]
        return results
    finally:
        torch.set_num_threads(threads)


SPLITS = ("valid", "test")


def evaluate_run(run_dir: Path, *, device: str | None = None, exclude: str | None = None,
                 overrides: list[str] = (), checkpoint: str = "best", splits: tuple[str, ...] = SPLITS) -> dict:
    """Re-evaluate ``run_dir/<checkpoint>.pt`` (``best`` or ``last``) on ``splits``; returns
    ``{split: {protocol: metrics}}``.

    ``overrides`` (``["eval.ks=[50]", "eval.exclude=none"]``; see :func:`evaluation_overrides`) apply
    over the run's config.yaml; ``exclude`` is ``eval.exclude`` (which history items the full ranking
    masks: ``target``, ``none`` or ``all``) and ``device`` ``train.device``. With the run's own
    evaluation settings, best.pt and the same machine and device this reproduces ``metrics.json`` exactly.
    """
    from m3bsr.data.batches import WindowBuilder
    from m3bsr.engine.checkpoint import load_run_model
    from m3bsr.engine.runs import RunDir
    from m3bsr.engine.train import resolve_device

    if checkpoint not in ("best", "last") or not set(splits) <= set(SPLITS):
        raise ValueError(f"checkpoint {checkpoint!r} / splits {splits!r}: expected best|last and {SPLITS}")
    overrides = evaluation_overrides(list(overrides)) + ([f"eval.exclude={exclude}"] if exclude else [])
    cfg, _ = RunDir(Path(run_dir)).read_config(overrides)
    dev = resolve_device(device or cfg.train.device)
    model, _, ds = load_run_model(Path(run_dir), checkpoint, device=dev)
    builder = WindowBuilder(ds, cfg.data.max_len)
    result = {}
    for split in splits:
        windows = builder.eval_windows(split, cfg.eval.exclude)
        result[split], _ = evaluate(model, windows, cfg.eval, cfg.train.eval_batch_size, dev, amp=cfg.train.amp)
    return result
