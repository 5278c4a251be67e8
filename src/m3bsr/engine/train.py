"""The training loop: a short spine of named steps, the same for every model.

``train(cfg, dataset)`` = check the run dir → open a session (data, model, optimizer, generators)
→ create the run dir → fit. ``resume(run_dir)`` = read config.yaml → open a session → restore
last.pt (weights, optimizer, RNG states, epoch, best-so-far, patience) → fit. ``fit`` = epochs of
(train epoch → validate both protocols → update best / patience → checkpoints → record) until
``train.max_epochs`` or ``train.patience`` epochs without improvement of the monitored valid
metric, then test ONCE on the best checkpoint. A model with ``fit_once`` (pop) gets one pass over the
training windows instead of epochs (no loss, no progress bar; ``stop_reason`` is ``fitted``).
A run that recorded no epoch yet (Ctrl-C in epoch 1) has no last.pt: ``resume`` starts it over. Ctrl-C
during ``fit`` raises :class:`~m3bsr.errors.Interrupted` naming the command that continues the run
(logged to train.log too).

Randomness: the model is initialised after :func:`m3bsr.seeding.seed_everything`; the batch order
comes from a generator derived from the seed; dropout and model noise use the global torch RNG.
All their states go into last.pt, so a resumed run continues exactly (CPU).

Distributed (``torchrun --nproc_per_node=N -m m3bsr train ...``, :mod:`m3bsr.engine.distributed`):
a session carries ``rank``/``world_size``; each rank trains on its share of every GLOBAL batch of
``train.batch_size`` windows through DDP, evaluation is sharded and gathered, and only rank 0
(``session.is_main``) writes files. A single process never touches ``torch.distributed``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from m3bsr.config import Config
from m3bsr.data.batches import WindowArrays, WindowBuilder, iterate_batches, training_order
from m3bsr.data.prepared import PreparedDataset
from m3bsr.engine import distributed
from m3bsr.engine.allocator import LOW_MEMORY_THRESHOLD, release_freed_memory
from m3bsr.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from m3bsr.engine.evaluate import evaluate
from m3bsr.engine.metrics import metric_names
from m3bsr.engine.optim import EagerAdam
from m3bsr.engine.runs import RunDir, RunLog, default_run_dir, exists_error, format_table, resume_command
from m3bsr.engine.tracking import Tracker, check_available, open_trackers
from m3bsr.errors import InputError, Interrupted, input_error
from m3bsr.models.base import DataMode
from m3bsr.models.registry import build_model, model_class
from m3bsr.models.sampled import NegativeSampler
from m3bsr.seeding import derive_seed, seed_everything, torch_generator

CHECKPOINT_FORMAT = 1


class NonFiniteLoss(InputError):
    """A NaN/inf loss or gradient stopped the run (the last good checkpoint is kept)."""


@dataclass
class TrainState:
    """Everything besides weights/optimizer/RNG that an exact resume needs."""

    epoch: int = 0
    best_value: float = -math.inf
    best_epoch: int = 0
    best_valid: dict[str, dict[str, float]] | None = None
    bad_epochs: int = 0
    skipped_batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Session:
    """The objects of one training process."""

    cfg: Config
    dataset: Path
    ds: PreparedDataset
    builder: WindowBuilder
    model: torch.nn.Module
    loss_fn: Callable
    optimizer: torch.optim.Optimizer | None
    device: torch.device
    train_windows: WindowArrays
    valid_windows: WindowArrays
    shuffle_gen: torch.Generator
    quiet: bool
    run: RunDir | None = None
    log: RunLog = field(default_factory=lambda: RunLog(None))
    rank: int = 0
    world_size: int = 1
    ddp: bool = False  # loss_fn is a DistributedDataParallel module (gradients all-reduced)
    mode: DataMode = DataMode("")  # what the model reads of the dataset (models/base.py ``data_mode``)
    tracker: Tracker = field(default_factory=Tracker)  # train.log_to (rank 0 only; engine/tracking.py)
    low_memory: bool = False  # train.low_memory took effect (engine/allocator.py)

    @property
    def dist_ctx(self) -> distributed.DistContext:
        return distributed.DistContext(self.rank, self.world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if (self.cuda and self.cfg.train.amp) else nullcontext()


# --------------------------------------------------------------------------- public API


def train(cfg: Config, dataset: Path, out: Path | None = None, *, overwrite: bool = False,
          quiet: bool = False) -> dict:
    """Train ``cfg`` on the prepared ``dataset``, write the run dir ``out``; returns the metrics.json dict."""
    out = Path(out) if out is not None else default_run_dir(dataset, cfg.model.name, cfg.seed)
    device = resolve_device(cfg.train.device)
    with distributed.process_group(device) as ctx:
        # Every rank decides before rank 0 creates the directory (else rank 1 would see it and fail).
        if distributed.any_rank(out.exists() and not overwrite, distributed.device_for(ctx, device)):
            raise exists_error(out)
        session = open_session(cfg, Path(dataset), quiet=quiet, rank=ctx.rank, world_size=ctx.world_size,
                               local_rank=ctx.local_rank)
        run = (RunDir.create(out, cfg, dataset, overwrite=overwrite, fingerprint=fingerprint(session))
               if session.is_main else RunDir(out))
        distributed.barrier()
        attach_run(session, run)
        summary = fit_or_explain(session, TrainState())
        del session  # its DDP model must go before the process group does (distributed.process_group)
        return summary


def resume(run_dir: Path, overrides: list[str] = (), *, quiet: bool = False) -> dict:
    """Continue ``run_dir`` from last.pt (``overrides`` e.g. ``["train.max_epochs=20"]``); returns metrics.json.

    A run stopped before it recorded any epoch (Ctrl-C in epoch 1) has nothing to lose: it starts over
    from epoch 1 in the same directory, exactly as a fresh ``train`` of its config.yaml would."""
    run = RunDir(Path(run_dir))
    cfg, dataset = run.read_config(overrides)
    run.check_dataset(dataset)  # re-prepared since: refused (the weights belong to the old data)
    with distributed.process_group(resolve_device(cfg.train.device)) as ctx:
        checkpoint, why = last_checkpoint(run)  # every rank reads the same last.pt
        session = open_session(cfg, dataset, quiet=quiet, rank=ctx.rank, world_size=ctx.world_size,
                               local_rank=ctx.local_rank)
        state = (TrainState() if checkpoint is None
                 else restore(session, checkpoint, where=str(run.checkpoint("last"))))
        attach_run(session, run)
        if session.is_main:
            run.write_config(cfg, dataset, fingerprint(session))  # a run from before fingerprints gets one now
            run.write_records([r for r in run.read_records() if r["epoch"] <= state.epoch])
        distributed.barrier()
        session.log(f"resumed from last.pt at epoch {state.epoch}" if checkpoint is not None
                    else f"resumed: {why}; starting over from epoch 1", echo=True)
        summary = fit_or_explain(session, state)
        del session  # its DDP model must go before the process group does
        return summary


def last_checkpoint(run: RunDir) -> tuple[dict[str, Any] | None, str]:
    """``(last.pt, "")``, or ``(None, why)`` for a run that recorded no epoch in metrics.jsonl (stopped in
    epoch 1, before or while saving its first checkpoint): nothing is lost by starting that one over. A run
    with recorded epochs and no usable last.pt stays an error (its epochs would be lost silently)."""
    try:
        return load_checkpoint(run.checkpoint("last")), ""
    except InputError as e:
        if run.read_records():
            raise
        if not run.checkpoint("last").exists():
            return None, "no epoch was saved before the run stopped"
        return None, f"no epoch was recorded before the run stopped ({e})"


def fit_or_explain(s: Session, state: TrainState) -> dict:
    """:func:`fit`; Ctrl-C becomes :class:`Interrupted` naming the command that continues the run, and
    train.log records it."""
    try:
        result = fit(s, state)
    except KeyboardInterrupt as e:
        close_tracker(s, "KILLED")
        if isinstance(e, Interrupted):
            raise
        raise interrupted(s, state) from None
    except BaseException:
        close_tracker(s, "FAILED")
        raise
    s.tracker.close()
    return result


def close_tracker(s: Session, status: str) -> None:
    """Close the trackers of a run that stopped (``KILLED``/``FAILED``); a failure to close is not the news."""
    try:
        s.tracker.close(status)
    except Exception:  # noqa: BLE001 - the exception being raised says what went wrong
        pass


def interrupted(s: Session, state: TrainState) -> Interrupted:
    """The message (and train.log line) of a run stopped by Ctrl-C: where it stopped, what is saved, and
    the one command that continues it (or, before any saved epoch, starts it over)."""
    saved = [r["epoch"] for r in s.run.read_records()]
    command = resume_command(s.run.root)
    if saved:
        what = f"in epoch {state.epoch}, after epoch {saved[-1]} was saved"
        fix = f"Continue it from epoch {saved[-1]} with: {command}"
    else:
        what = f"in epoch {state.epoch}, before any epoch was saved"
        fix = f"Start it over with: {command}"
    s.log(f"interrupted (Ctrl-C) {what}; {fix[0].lower()}{fix[1:]}")
    return Interrupted(f"{s.run.root}: training interrupted (Ctrl-C) {what}. {fix}")


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; ``cuda`` without a GPU is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise input_error("train.device=cuda", "no CUDA device is available", "Use --device cpu or auto")
    return torch.device(name)


# --------------------------------------------------------------------------- session set-up


def open_session(cfg: Config, dataset: Path, *, quiet: bool, rank: int = 0, world_size: int = 1,
                 local_rank: int = 0) -> Session:
    """Load data, build windows, model, optimizer and generators (writes nothing).

    With ``world_size > 1`` (process group open) the loss goes through DDP and CUDA means ``cuda:local_rank``."""
    # Before the data and model are allocated, so that their blocks too follow the fixed threshold.
    low_memory = cfg.train.low_memory and release_freed_memory()
    names = metric_names(cfg.eval.ks)
    check_available(cfg.train.log_to)  # a missing tracking library stops the run before any work
    if cfg.train.monitor_metric not in names:
        raise input_error(f"train.monitor_metric={cfg.train.monitor_metric}", "not a computed metric",
                          f"Choose one of: {', '.join(names)}")
    ctx = distributed.DistContext(rank, world_size, local_rank)
    device = distributed.device_for(ctx, resolve_device(cfg.train.device))
    ds = PreparedDataset.load(dataset)
    catalogue = ds.catalogue()
    mode = model_class(cfg.model.name).data_mode(cfg.model, catalogue, where=str(dataset))  # before any work
    builder = WindowBuilder(ds, cfg.data.max_len)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, catalogue).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (EagerAdam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
                 if params else None)  # e.g. pop: buffers only
    train_windows = builder.train_windows()
    attach_loss_sampler(cfg, model, train_windows, device)
    if cfg.train.loss_chunk_scores:  # queries per chunk of the full loss: scores over the I + 1 catalogue rows
        model.loss_chunk = max(1, cfg.train.loss_chunk_scores // (catalogue.n_items + 1))
    loss_fn = distributed.wrap(model, ctx, device)  # model.loss unless DDP has gradients to all-reduce
    return Session(cfg=cfg, dataset=Path(dataset), ds=ds, builder=builder, model=model,
                   loss_fn=torch.compile(loss_fn) if cfg.train.compile else loss_fn,
                   optimizer=optimizer, device=device, train_windows=train_windows,
                   valid_windows=builder.eval_windows("valid", cfg.eval.exclude),
                   shuffle_gen=torch_generator(cfg.seed, "train-shuffle"), quiet=quiet,
                   rank=rank, world_size=world_size, ddp=isinstance(loss_fn, torch.nn.Module), mode=mode,
                   low_memory=low_memory)


def attach_loss_sampler(cfg: Config, model: torch.nn.Module, train_windows: WindowArrays,
                        device: torch.device) -> None:
    """``train.loss=sampled``: give the model a :class:`~m3bsr.models.sampled.NegativeSampler` over the
    training targets' counts, with its own generator derived from the seed (the same negatives on
    every DDP rank). ``full`` leaves it None. A model fitted once (pop) has no loss to sample."""
    if cfg.train.loss != "sampled" or getattr(model, "fit_once", False):
        return
    reason = model.sampled_loss_error()
    if reason:
        raise input_error("train.loss=sampled", f"does not apply to model {cfg.model.name}: {reason}",
                          "Or set train.loss=full")
    model.loss_sampler = NegativeSampler.from_labels(
        train_windows.labels, model.n_items, cfg.train.loss_negatives, alpha=cfg.train.loss_alpha,
        replacement=cfg.train.loss_replacement, seed=cfg.seed, device=device)


def fingerprint(session: Session) -> str | None:
    """The fingerprint of the prepared dataset as loaded (manifest.json; None for one written without it)."""
    return session.ds.manifest.get("fingerprint")


def attach_run(session: Session, run: RunDir) -> None:
    session.run = run
    session.log = RunLog(run.log_file) if session.is_main else (lambda message, echo=False: None)
    if session.is_main and session.cfg.train.log_to:
        session.tracker = open_trackers(session.cfg.train.log_to, run.root, session.cfg.to_dict())


def rng_states(session: Session) -> dict[str, Any]:
    states = {"shuffle": session.shuffle_gen.get_state(), "torch": torch.get_rng_state()}
    if session.cuda:
        states["cuda"] = torch.cuda.get_rng_state_all()
    sampler = getattr(session.model, "loss_sampler", None)
    if sampler is not None and sampler.generator is not None:
        states["negatives"] = sampler.generator.get_state()
    return states


def restore(session: Session, checkpoint: dict[str, Any], where: str = "last.pt") -> TrainState:
    """Load weights, optimizer and RNG states of a last.pt into ``session``; return the loop state."""
    load_weights(session.model, checkpoint, session.cfg, where)  # another model/config: one-line error
    if session.optimizer is not None:
        session.optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint["rng"]
    session.shuffle_gen.set_state(rng["shuffle"])
    torch.set_rng_state(rng["torch"])
    if session.cuda and "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])
    sampler = getattr(session.model, "loss_sampler", None)
    if sampler is not None and sampler.generator is not None and "negatives" in rng:
        sampler.generator.set_state(rng["negatives"])
    return TrainState(**checkpoint["state"])


# --------------------------------------------------------------------------- the loop


def fit(s: Session, state: TrainState) -> dict:
    """Epochs until max_epochs or patience (one pass for a ``fit_once`` model), then test once on the best."""
    s.log(f"model {s.cfg.model.name} on {s.dataset} ({len(s.train_windows)} windows, "
          f"{s.train_windows.n_targets} targets) device {s.device}, reads {s.mode.mode}",
          echo=True)  # says which model is trained, on what
    if s.mode.notice:
        s.log(f"notice: {s.mode.notice}", echo=True)
    sampler = getattr(s.model, "loss_sampler", None)
    if sampler is not None:
        s.log(f"loss sampled: {sampler.describe()}", echo=True)
    if s.cfg.train.low_memory:
        applied = (f"memory: freed blocks of {LOW_MEMORY_THRESHOLD // 1024} KB or more go back to the system "
                   "at once (train.low_memory)")
        s.log(applied if s.low_memory else "notice: train.low_memory has no effect here: it needs glibc's "
              "malloc (Linux); the run goes on with the default allocator", echo=True)
    once = fits_once(s)
    if s.cfg.train.bucket_by_length and not once:
        s.log(f"batches: windows of similar length, sorted in pools of {s.cfg.train.bucket_by_length} batches, "
              "padding trimmed (train.bucket_by_length)", echo=True)
    while not (state.epoch >= 1 if once else should_stop(s.cfg, state)):
        state.epoch += 1
        stats = train_epoch(s, state, progress=not once)
        if once:
            stats["loss"] = {}  # nothing was optimised; no fake "loss 0.0000"
        t0 = time.perf_counter()
        valid, _ = distributed.evaluate_sharded(evaluate, s.model, s.valid_windows, s.dist_ctx, cfg=s.cfg.eval,
                                                batch_size=s.cfg.train.eval_batch_size, device=s.device,
                                                amp=s.cfg.train.amp)
        stats["eval_seconds"] = time.perf_counter() - t0
        improved = update_best(s.cfg, state, valid)
        save_checkpoints(s, state, improved)
        record_epoch(s, state, stats, valid, improved)
    return finish(s, state)


def fits_once(s: Session) -> bool:
    """True for a model fitted by one pass over the training windows (pop's counts): no epochs."""
    return bool(getattr(s.model, "fit_once", False))


def should_stop(cfg: Config, state: TrainState) -> bool:
    return state.epoch >= cfg.train.max_epochs or state.bad_epochs >= cfg.train.patience


def train_epoch(s: Session, state: TrainState, progress: bool = True) -> dict[str, Any]:
    """One pass over the shuffled training windows; returns mean loss terms and timing.

    ``progress=False``: no bar and no step lines (a one-pass fit has no loss to show)."""
    s.model.train()
    sums: dict[str, float] = defaultdict(float)
    n_targets = skipped = 0
    batch_size, pool = s.cfg.train.batch_size, s.cfg.train.bucket_by_length
    total_steps = math.ceil(len(s.train_windows) / batch_size)  # global batches: the same on every rank
    if s.world_size > 1:
        # Dropout/noise: an independent stream per rank and epoch (an exact resume needs no per-rank state).
        torch.manual_seed(derive_seed(s.cfg.seed, f"torch-global/epoch{state.epoch}/rank{s.rank}"))
        buffers = distributed.persistent_buffers(s.model)
        batches = distributed.shard_batches(s.train_windows, batch_size, generator=s.shuffle_gen, rank=s.rank,
                                            world_size=s.world_size, pin_memory=s.cuda, pool=pool)
    else:
        order = training_order(s.train_windows, batch_size, pool, s.shuffle_gen)
        batches = ((b, True) for b in iterate_batches(s.train_windows, batch_size, order=order, trim=bool(pool),
                                                      pin_memory=s.cuda))
    bar = tqdm(batches, total=total_steps, desc=f"epoch {state.epoch}", leave=False,
               disable=s.quiet or not s.is_main or not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step, (batch, real) in enumerate(bar, 1):
        if not real and not s.ddp:  # a pad window only serves DDP's all-reduce; pop has none
            continue
        batch = batch.to(s.device, non_blocking=s.cuda)
        n = batch.n_queries if real else 0
        terms = train_step(s, batch, state, n)
        if terms is None:
            skipped += 1
            continue
        for name, value in terms.items():
            sums[name] += value * n
        n_targets += n
        rate = n_targets / max(time.perf_counter() - t0, 1e-9)
        if not progress:
            continue
        if not s.quiet:
            bar.set_postfix(loss=f"{sums['total'] / max(n_targets, 1):.4f}", tgt_s=f"{rate:.0f}")
        elif s.cfg.train.log_every and step % s.cfg.train.log_every == 0:
            s.log(f"epoch {state.epoch} step {step}/{total_steps} loss {sums['total'] / n_targets:.4f} "
                  f"targets/s {rate:.0f}", echo=True)
    seconds = time.perf_counter() - t0
    if s.world_size > 1:  # buffers (pop's counts) and the logged per-target means over all ranks
        distributed.sum_buffer_updates(s.model, buffers)
        names = sorted(sums)
        *totals, n_targets = distributed.all_sum([sums[k] for k in names] + [n_targets], s.device)
        sums = dict(zip(names, totals))
    state.skipped_batches += skipped
    return {"loss": {k: v / max(n_targets, 1) for k, v in sums.items()}, "seconds": seconds,
            "targets_per_second": n_targets / max(seconds, 1e-9), "skipped_batches": skipped}


def train_step(s: Session, batch, state: TrainState, n: int | None = None) -> dict[str, float] | None:
    """Forward, sum the named terms, backward, clip, Adam step. ``None`` = batch skipped (non-finite).

    Under DDP the loss is scaled by ``W * n / N`` (``n`` = this rank's queries, 0 for a pad window)
    so the all-reduced gradient is that of the global batch's per-query mean."""
    with s.autocast():
        terms = s.loss_fn(batch)
    total = sum(terms.values())
    values = {k: float(v.detach()) for k, v in terms.items()} | {"total": float(total.detach())}
    finite, weight = math.isfinite(values["total"]), 1.0
    if s.ddp:  # every rank must skip/stop on the same step, or the others wait in the all-reduce
        weight, finite = distributed.step_weight(batch.n_queries if n is None else n, finite, s.world_size,
                                                 s.device)
    if not finite:
        return nonfinite(s, state, f"loss {values}")
    if s.optimizer is None or not total.requires_grad:  # e.g. pop: nothing to learn by gradient
        return values
    s.optimizer.zero_grad(set_to_none=True)
    (total * weight if weight != 1.0 else total).backward()
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, s.cfg.train.grad_clip or math.inf)
    if not math.isfinite(float(norm)):
        s.optimizer.zero_grad(set_to_none=True)
        return nonfinite(s, state, f"gradient norm {float(norm)}")
    s.optimizer.step()
    return values


def nonfinite(s: Session, state: TrainState, what: str) -> None:
    """``train.nonfinite=skip``: count and skip the batch; ``stop``: raise, keeping the last good checkpoint."""
    if s.cfg.train.nonfinite == "skip":
        s.log(f"epoch {state.epoch}: non-finite {what}; batch skipped")
        return None
    kept = (f"last good checkpoint {s.run.checkpoint('last')} (epoch {state.epoch - 1})"
            if state.epoch > 1 and s.run is not None else "no checkpoint was written yet")
    message = (f"epoch {state.epoch}: non-finite {what}; training stopped, {kept}. "
               "Lower train.lr, set train.grad_clip, or pass --set train.nonfinite=skip")
    s.log(message)
    raise NonFiniteLoss(message)


def update_best(cfg: Config, state: TrainState, valid: dict[str, dict[str, float]]) -> bool:
    """Early-stopping bookkeeping on valid ``monitor_metric`` of ``monitor_protocol``; True if improved."""
    value = valid[cfg.train.monitor_protocol][cfg.train.monitor_metric]
    if value > state.best_value:
        state.best_value, state.best_epoch, state.best_valid, state.bad_epochs = value, state.epoch, valid, 0
        return True
    state.bad_epochs += 1
    return False


def save_checkpoints(s: Session, state: TrainState, improved: bool) -> None:
    """best.pt (weights) when improved, then last.pt (everything an exact resume needs)."""
    if not s.is_main:
        return
    base = {"format": CHECKPOINT_FORMAT, "config": s.cfg.to_dict(), "dataset": str(s.dataset),
            "epoch": state.epoch, "model": s.model.state_dict()}
    if improved:
        save_checkpoint(s.run.checkpoint("best"), {**base, "valid": state.best_valid})
    save_checkpoint(s.run.checkpoint("last"), {
        **base, "optimizer": s.optimizer.state_dict() if s.optimizer is not None else {},
        "rng": rng_states(s), "state": state.to_dict()})


def record_epoch(s: Session, state: TrainState, stats: dict[str, Any], valid: dict, improved: bool) -> None:
    """Append the epoch to metrics.jsonl and log one line (curves.png is drawn once, in :func:`finish`)."""
    if not s.is_main:
        return
    record = {"epoch": state.epoch, **stats, "valid": valid, "improved": improved}
    records = s.run.read_records() + [record]
    s.run.write_records(records)
    s.tracker.log_epoch(record)
    metric = s.cfg.train.monitor_metric
    head = ("fitted in one pass:" if fits_once(s) else
            f"epoch {state.epoch} loss {stats['loss'].get('total', float('nan')):.4f}")
    s.log(f"{head} "
          f"valid {metric} sampled {valid['sampled'][metric]:.4f} full {valid['full'][metric]:.4f} "
          f"{'*' if improved else ' '} {stats['seconds']:.1f}s {stats['targets_per_second']:.0f} targets/s",
          echo=True)


def finish(s: Session, state: TrainState) -> dict:
    """Test once on best.pt, write test_ranks.parquet and metrics.json, print the final table."""
    distributed.barrier()  # rank 0 has written best.pt and metrics.jsonl; every rank reads them
    best = load_checkpoint(s.run.checkpoint("best"), map_location=s.device)
    s.model.load_state_dict(best["model"])
    test = None
    if s.cfg.train.eval_test:
        windows = s.builder.eval_windows("test", s.cfg.eval.exclude)
        test, ranks = distributed.evaluate_sharded(evaluate, s.model, windows, s.dist_ctx, cfg=s.cfg.eval,
                                                   batch_size=s.cfg.train.eval_batch_size, device=s.device,
                                                   amp=s.cfg.train.amp)
        if s.is_main:
            s.run.write_test_ranks(windows.users, ranks)
    records = s.run.read_records()
    summary = {"valid": state.best_valid, "test": test, "best_epoch": state.best_epoch, "epochs": state.epoch,
               "seconds_per_epoch": float(np.mean([r["seconds"] for r in records])) if records else 0.0,
               "seed": s.cfg.seed, "model": s.cfg.model.name, "dataset": str(s.dataset),
               "dataset_fingerprint": fingerprint(s), "mode": s.mode.mode,
               "targets_per_second": float(np.mean([r["targets_per_second"] for r in records])) if records else 0.0,
               "skipped_batches": state.skipped_batches,
               "stop_reason": stop_reason(s, state)}
    if s.is_main:
        s.run.write_summary(summary)
        s.tracker.log_summary(summary)
        s.run.write_curves(records, s.cfg.train.monitor_metric)
        s.log(f"done: best epoch {state.best_epoch} of {state.epoch} ({summary['stop_reason']}); "
              f"{state.skipped_batches} batches skipped")
        print(summary_table(summary, s.cfg.eval.ks))
    return summary


def stop_reason(s: Session, state: TrainState) -> str:
    """``fitted`` (one pass, no epochs), ``patience`` or ``max_epochs``."""
    if fits_once(s):
        return "fitted"
    return "patience" if state.bad_epochs >= s.cfg.train.patience else "max_epochs"


def summary_table(summary: dict, ks: list[int]) -> str:
    """Valid (best epoch) and test metrics of both protocols as a text table."""
    rows = {f"{split} {p}": summary[split][p] for split in ("valid", "test") if summary.get(split)
            for p in ("sampled", "full")}
    how = (f"fitted in one pass, {summary['seconds_per_epoch']:.1f} s" if summary.get("stop_reason") == "fitted"
           else f"best epoch {summary['best_epoch']}, {summary['seconds_per_epoch']:.1f} s/epoch")
    return format_table(metric_names(ks), rows, title=f"{summary['model']} ({how})")
