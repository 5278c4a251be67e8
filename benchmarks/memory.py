"""Where the peak memory of a small training run goes, phase by phase (CPU, Linux).

    m3bsr prepare synthetic --set synthetic.users=200 --set synthetic.items=300 --out /tmp/d200
    python benchmarks/memory.py --dataset /tmp/d200
    python benchmarks/memory.py --dataset D --models m3bsr,sasrec --batch 256,64 --steps 3

Each model x batch size runs in its own process (peak RSS is per process), twice: once with glibc's
default allocator settings and once with ``train.low_memory=true`` (m3bsr.engine.allocator), under
which every block of 256 KB or more is mapped when allocated and unmapped when freed, so the second
peak is close to the tensors really alive at once. The worker reads ``VmRSS`` / ``VmHWM`` from
``/proc/self/status`` after each phase, in the order a run meets them:

    torch          ``import torch``
    data stack     the training module's imports (pyarrow, pydantic, tqdm, the package; not pandas)
    session        data, windows, model and optimizer (``engine.train.open_session``)
    forward        the first batch's loss; ``saved`` = bytes autograd keeps for backward (distinct
                   storages, from ``saved_tensors_hooks``), with the three largest call sites
    step 1         backward and the Adam step (the process's peak so far)
    valid          one validation pass, as after every epoch (``engine.evaluate``)
    step N         the peak after ``--steps`` batches, each followed by a validation pass (on a
                   small dataset an epoch is one or a few batches, so a run alternates the two)

Columns are cumulative MB. ``fixed`` = the last peak with ``train.low_memory``; ``retained`` = peak
under glibc defaults minus ``fixed``: memory that was freed but stayed resident because glibc keeps it
on the heap for reuse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path


def status_mb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in MB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) // 1024
    return values["VmRSS"], values["VmHWM"]


def call_site() -> str:
    """The innermost frame of the m3bsr package on the stack, as ``module.py:line``."""
    for frame in reversed(traceback.extract_stack()):
        if f"{os.sep}m3bsr{os.sep}" in frame.filename:
            return f"{frame.filename.rsplit(os.sep + 'm3bsr' + os.sep, 1)[1]}:{frame.lineno}"
    return "?"


def worker(args) -> dict:
    """Run the phases in this process; returns {phase: (rss, hwm)} plus the saved-tensor figures."""
    out = {"start": status_mb()}
    import torch
    out["torch"] = status_mb()
    from m3bsr.config import build_config
    from m3bsr.data.batches import iterate_batches, training_order
    from m3bsr.engine.evaluate import evaluate
    from m3bsr.engine.train import TrainState, open_session, train_step
    out["data stack"] = status_mb()

    cfg = build_config(model=args.model, overrides=[f"train.batch_size={args.batch}", "train.device=cpu",
                                                    f"seed={args.seed}", *args.sets])
    s = open_session(cfg, args.dataset, quiet=True)
    out["session"] = status_mb()
    order = training_order(s.train_windows, cfg.train.batch_size, cfg.train.bucket_by_length, s.shuffle_gen)
    batches = iterate_batches(s.train_windows, cfg.train.batch_size, order=order, trim=bool(cfg.train.bucket_by_length))
    state = TrainState()
    s.model.train()

    sites: Counter[str] = Counter()
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            sites[call_site()] += storage.nbytes()
        return t

    first = next(batches)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = s.loss_fn(first)
    out["forward"] = status_mb()
    total = sum(terms.values())
    s.optimizer.zero_grad(set_to_none=True)
    total.backward()
    s.optimizer.step()
    del terms, total
    out["step 1"] = status_mb()

    def validate() -> None:
        evaluate(s.model, s.valid_windows, cfg.eval, cfg.train.eval_batch_size, s.device)
        s.model.train()

    validate()
    out["valid"] = status_mb()
    for i, batch in enumerate(batches, 2):
        if i > args.steps:
            break
        train_step(s, batch, state)
        validate()
    out[f"step {args.steps}"] = status_mb()
    out["dynamo"] = "torch._dynamo" in sys.modules  # ~70 MB that training avoids (m3bsr.engine.optim)
    out["saved"] = sum(sites.values()) / 2**20
    out["sites"] = [(site, n / 2**20) for site, n in sites.most_common(3)]
    out["windows"] = len(first.users)
    return out


def measure(args, model: str, batch: int, fixed: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # an inherited setting would blur the two columns
    cmd = [sys.executable, __file__, "--worker", "--dataset", str(args.dataset), "--models", model,
           "--batch", str(batch), "--steps", str(args.steps), "--seed", str(args.seed)]
    for s in [*args.sets, f"train.low_memory={str(fixed).lower()}"]:
        cmd += ["--set", s]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"worker failed ({model}, batch {batch}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, type=Path, help="a prepared dataset directory")
    p.add_argument("--models", default="m3bsr,sasrec", help="comma-separated model names (default: %(default)s)")
    p.add_argument("--batch", default="256,64", help="comma-separated train.batch_size values (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="training steps per process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the batch order (default: 0)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="more config overrides KEY=VALUE")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not Path("/proc/self/status").is_file():
        sys.exit("benchmarks/memory.py reads /proc/self/status: Linux only")
    if args.worker:
        args.model, args.batch = args.models, int(args.batch)
        print(json.dumps(worker(args)))
        return

    phases = ["torch", "data stack", "session", "forward", "step 1", "valid", f"step {args.steps}"]
    head = f"{'model':<8} {'batch':>5} {'windows':>7} " + " ".join(f"{p:>10}" for p in phases)
    head += f" {'saved':>6} {'fixed':>6} {'retained':>8} {'dynamo':>6}  largest saved call sites (MB)"
    print(head)
    print("-" * len(head))
    for model in args.models.split(","):
        for batch in map(int, args.batch.split(",")):
            r = measure(args, model, batch, fixed=False)
            fixed = measure(args, model, batch, fixed=True)
            peak, fixed_peak = r[phases[-1]][1], fixed[phases[-1]][1]
            cells = " ".join(f"{r[p][0] if p in ('torch', 'data stack', 'session') else r[p][1]:>10}"
                             for p in phases)
            sites = ", ".join(f"{site} {mb:.1f}" for site, mb in r["sites"])
            print(f"{model:<8} {batch:>5} {r['windows']:>7} {cells} {r['saved']:>6.1f} {fixed_peak:>6} "
                  f"{peak - fixed_peak:>8} {'yes' if r['dynamo'] else 'no':>6}  {sites}")
    print("\nMB, cumulative: RSS after the import and session phases, peak RSS (VmHWM) from the forward on; "
          "saved = tensors kept for backward by the first forward; fixed = the last peak with "
          "train.low_memory=true; retained = the last peak minus fixed; dynamo = whether "
          "torch._dynamo was imported (it should not be: it costs ~70 MB).")


if __name__ == "__main__":
    main()
