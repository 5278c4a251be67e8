"""Performance benchmark: M3BSR vs SASRec training, evaluation, serving latency, memory, scaling.

    python benchmarks/run.py --quick            # < 3 min on 2 shared cores; last line = the ratio
    python benchmarks/run.py                    # the full table + scaling curves
    python benchmarks/run.py --device cuda      # the same on a GPU (see benchmarks/gpu.sh)

Every measurement runs in its own process (``bench_worker.py``) so its peak resident memory is its
own; M3BSR and SASRec runs alternate (sasrec, m3bsr, sasrec, m3bsr, ...) so a noisy shared machine
hits both alike, and the ratio is taken from runs of the same invocation. Seconds per epoch are
the mean step time x the steps of one epoch (a fixed number of shuffled steps is timed, not a
whole epoch). Writes ``reproduce/results/<host>-<date>.json`` and ``<host>-<date>-*.png`` (``--out``).
The ``ml100k_mm`` rows need the real data folder (``--data``, default ``$M3BSR_DATA``) and use the
encoded item features in ``--features`` (default ``$M3BSR_FEATURES``) when they are there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def worker(spec: dict, log) -> dict:
    """Run one measurement in a fresh process; returns its JSON (or ``{"error": ...}``)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "bench_worker.py"), json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        log(f"  FAILED {spec['kind']} {spec.get('model', '')}: {tail[0]}")
        return {"spec": spec, "error": tail[0]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"  {spec['kind']:<7} {spec.get('model', ''):<7} {spec.get('tag', '')} ({time.perf_counter() - t0:.0f} s)")
    return out


# ------------------------------------------------------------------------------------ datasets
def datasets(work: Path, quick: bool, with_curves: bool, log, real: Path | None = None,
             features: Path | None = None) -> dict[str, Path]:
    """Name -> prepared dataset under ``work`` (generated once, then reused); ``ml100k_mm`` from the real
    data folder ``real`` (with the ``features`` folder's encoded text/image, when there) if it has one."""
    from bench_data import tmall_like

    out = {"tmall_like": tmall_like(work / "tmall_like")}
    if quick:
        return out
    out["items_1m"] = tmall_like(work / "items_1m", users=4000, items=1_000_000, events=48_000)
    if with_curves:
        out["long"] = tmall_like(work / "long", users=3000, items=31_000, events=3000 * 150, buy_rate=0.5)
        for n in (3_000, 100_000, 300_000):
            out[f"items_{n}"] = tmall_like(work / f"items_{n}", users=5000, items=n, events=60_000)
    ml = real / "ml100k_mm" if real else None
    if ml is not None and ml.is_dir():
        dest = work / "ml100k_mm"
        if not (dest / "manifest.json").is_file():
            cmd = [sys.executable, "-m", "m3bsr", "prepare", str(ml), "--preset", "ml100k_mm", "--out", str(dest),
                   "--quiet"]
            for m in ("text", "image"):  # encoded features, when the encoders were run
                if features and (features / f"ml100k_{m}.parquet").is_file():
                    cmd += ["--set", f"features.{m}={features / f'ml100k_{m}.parquet'}"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out["ml100k_mm"] = dest
    elif ml is None:
        log("  no real data folder (--data / $M3BSR_DATA): ml100k_mm rows skipped")
    else:
        log(f"  {ml} absent: ml100k_mm rows skipped")
    return out


# ------------------------------------------------------------------------------------ plan
def train_pair(data: Path, name: str, d: int, args, rounds: int, steps: int, log, extra=()) -> dict:
    """Alternating sasrec / m3bsr training runs; mean over rounds of each."""
    res: dict[str, list[dict]] = {"sasrec": [], "m3bsr": []}
    for r in range(rounds):
        for model in (("sasrec", "m3bsr") if r % 2 == 0 else ("m3bsr", "sasrec")):
            spec = dict(kind="train", model=model, d=d, L=args.L, dataset=str(data), device=args.device,
                        threads=args.threads, warmup=1, steps=steps, seed=r, compile=args.compile,
                        batch=args.batch, tag=f"{name} d={d} round {r + 1}", set=list(extra))
            res[model].append(worker(spec, log))
    return {m: _mean_runs(v) for m, v in res.items()}


def _mean_runs(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error")}
    keys = ("step_s", "targets_per_s", "seconds_per_epoch", "gflops", "data_share")
    out = {k: sum(r[k] for r in ok) / len(ok) for k in keys}
    out.update(peak_rss_mb=max(r["peak_rss_mb"] for r in ok), steps_per_epoch=ok[0]["steps_per_epoch"],
               gflop_per_step=ok[0]["gflop_per_step"], runs=len(ok))
    if "peak_cuda_mb" in ok[0]:
        out["peak_cuda_mb"] = max(r["peak_cuda_mb"] for r in ok)
    return out


def run(args, save) -> dict:
    """Every section, saving the results so far after each (``save(res)``)."""
    log = (lambda msg: print(msg, flush=True))
    want = set(args.only.split(",")) if args.only else {"train", "eval", "latency", "curves"}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"datasets in {work}")
    data = datasets(work, args.quick, "curves" in want and not args.no_curves, log,
                    real=Path(args.data) if args.data else None,
                    features=Path(args.features) if args.features else None)
    rounds, steps = (2, 2) if args.quick else (args.rounds, args.steps)
    dims = (64,) if args.quick else (64, 128)
    res: dict = {"meta": {"host": socket.gethostname(), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                          "device": args.device, "threads": args.threads, "eval_threads": args.eval_threads,
                          "L": args.L, "batch": args.batch, "quick": args.quick, "compile": args.compile,
                          "torch": __import__("torch").__version__, "argv": sys.argv[1:]}}
    res["matmul"] = worker(dict(kind="matmul", device=args.device, threads=args.threads), log)
    res["train"], res["eval"], res["latency"] = {}, {}, {}
    for name in [n for n in ("tmall_like", "ml100k_mm") if n in data and "train" in want]:
        for d in dims:
            res["train"][f"{name} d={d}"] = train_pair(data[name], name, d, args, rounds, steps, log)
            save(res)
    # Several batches of users (eval batch 1024), so that evaluation's length-sorted batching applies
    # as it does on a real test split; the first N test windows of the dataset.
    # Every model (--eval-models) on the first set; M3BSR and SASRec on the others.
    every = args.eval_models.split(",")
    eval_sets = [("tmall_like", 4096 if args.quick else 16384, args.eval_threads, every)]
    if not args.quick:
        eval_sets += [("tmall_like", 16384, 1, ["sasrec", "m3bsr"])] if args.device == "cpu" else []
        eval_sets += [("items_1m", 2048, args.eval_threads, ["sasrec", "m3bsr"])]
    for name, users, threads, models in (eval_sets if "eval" in want else []):
        for model in models:
            res["eval"][f"{name} {model} {threads}t"] = worker(dict(
                kind="eval", model=model, d=64, L=args.L, dataset=str(data[name]), device=args.device,
                threads=threads, users=users, tag=f"{name} {threads} thread(s)"), log)
    save(res)
    if "latency" in want:
        res["latency"] = {m: worker(dict(kind="latency", model=m, d=64, L=args.L, dataset=str(data["tmall_like"]),
                                         device=args.device, threads=1, calls=30 if args.quick else 200,
                                         compile=args.compile), log)
                          for m in ("sasrec", "m3bsr")}
    save(res)
    if not args.quick and not args.no_curves and "curves" in want:
        res["curves"] = curves(data, args, log)
    res["meta"]["seconds"] = time.perf_counter() - t0
    return res


def curves(data: dict[str, Path], args, log) -> dict:
    """Step time vs L (dense 'long' data), vs catalogue size, vs T (x0 and reverse_chain)."""
    one = lambda model, ds, L, extra=(), tag="": worker(dict(  # noqa: E731
        kind="train", model=model, d=64, L=L, dataset=str(ds), device=args.device, threads=args.threads,
        warmup=1, steps=args.curve_steps, batch=args.curve_batch, compile=args.compile, set=list(extra),
        tag=tag), log)
    out: dict = {"L": {}, "items": {}, "T": {}}
    for L in (10, 25, 50, 100, 200):
        out["L"][L] = {m: one(m, data["long"], L, tag=f"L={L}").get("step_s") for m in ("sasrec", "m3bsr")}
    for n, key in ((3_000, "items_3000"), (31_000, "tmall_like"), (100_000, "items_100000"),
                   (300_000, "items_300000")):
        out["items"][n] = {m: one(m, data[key], args.L, tag=f"items={n}").get("step_s") for m in ("sasrec", "m3bsr")}
    for T in (1, 5, 10, 20):
        out["T"][T] = {mode: one("m3bsr", data["tmall_like"], args.L, (f"model.T_m={T}", f"model.T_b={T}",
                                                                        f"model.denoise_output={mode}"),
                                 tag=f"T={T} {mode}").get("step_s") for mode in ("x0", "reverse_chain")}
    return out


# ------------------------------------------------------------------------------------ report
def table(res: dict) -> str:
    m = res["meta"]
    lines = [f"M3BSR benchmark on {m['host']} ({m['device']}, {m['threads']} training thread(s), "
             f"{m['eval_threads']} eval thread(s), torch {m['torch']}, L={m['L']}, batch={m['batch']})",
             f"fp32 matmul peak (measured, {res['matmul'].get('n')}^3): {res['matmul'].get('gflops', 0):.1f} GFLOP/s",
             "", "training (seconds/epoch = mean step x steps/epoch, extrapolated from timed steps)",
             f"{'data / d':<20}{'model':<8}{'s/step':>8}{'steps/ep':>9}{'s/epoch':>9}{'targets/s':>10}"
             f"{'GFLOP/s':>9}{'%peak':>7}{'data%':>7}{'peakMB':>8}{'ratio':>7}"]
    peak = res["matmul"].get("gflops", float("nan"))  # noqa: the measured fp32 peak
    for key, pair in res["train"].items():
        s_ep = pair["sasrec"].get("seconds_per_epoch")
        for model, r in pair.items():
            if "error" in r:
                lines.append(f"{key:<20}{model:<8} FAILED: {r['error']}")
                continue
            ratio = r["seconds_per_epoch"] / s_ep if s_ep else float("nan")
            mem = r.get("peak_cuda_mb", r["peak_rss_mb"])
            lines.append(f"{key:<20}{model:<8}{r['step_s']:>8.3f}{r['steps_per_epoch']:>9}"
                         f"{r['seconds_per_epoch']:>9.1f}{r['targets_per_s']:>10.0f}{r['gflops']:>9.2f}"
                         f"{100 * r['gflops'] / peak:>6.1f}%{100 * r['data_share']:>6.1f}%{mem:>8.0f}{ratio:>7.2f}")
    lines += ["", "full-ranking evaluation (engine.evaluate, both protocols)",
              f"{'catalogue / model':<24}{'users':>7}{'items':>10}{'users/s':>10}{'users/cpu-s':>12}{'peakMB':>8}"]
    for key, r in res["eval"].items():
        if "error" in r:
            lines.append(f"{key:<24} FAILED: {r['error']}")
            continue
        lines.append(f"{key:<24}{r['users']:>7}{r['items']:>10}{r['users_per_s']:>10.0f}"
                     f"{r.get('users_per_cpu_s', float('nan')):>12.0f}{r['peak_rss_mb']:>8.0f}")
    compiled = ", torch.compile" if res["meta"].get("compile") else ""
    lines += ["", f"single-user top-10 latency (Recommender.top_k, 1 thread{compiled})"]
    for model, r in res["latency"].items():
        lines.append(f"  {model:<8} p50 {r.get('p50_ms', float('nan')):.2f} ms  p99 {r.get('p99_ms', float('nan')):.2f} ms")
    if "curves" in res:
        lines += ["", "scaling (seconds per training step, d=64)"]
        for axis, rows in res["curves"].items():
            for x, v in rows.items():
                lines.append(f"  {axis}={x:<8} " + "  ".join(f"{k} {val:.3f}" if val else f"{k} -" for k, val in v.items()))
    ratios = [f"ratio m3bsr/sasrec seconds-per-epoch [{shape}] = "
              f"{pair['m3bsr']['seconds_per_epoch'] / pair['sasrec']['seconds_per_epoch']:.2f}"
              for shape, pair in (res.get("train") or {}).items()
              if "seconds_per_epoch" in pair.get("m3bsr", {}) and "seconds_per_epoch" in pair.get("sasrec", {})]
    lines += ["", *ratios] if ratios else []  # one line per data shape and width, the figure users feel
    return "\n".join(lines)


def plots(res: dict, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis, label in (("L", "max_len L"), ("items", "catalogue size"), ("T", "diffusion steps T")):
        rows = res["curves"][axis]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [float(x) for x in rows]
        for series in next(iter(rows.values())):
            ax.plot(xs, [rows[x][series] or float("nan") for x in rows], marker="o", label=series)
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per training step")
        if axis == "items":
            ax.set_xscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{axis}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)  # next to the JSON
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tmall-like d=64 training + eval + latency (< 3 min)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for training (1: a shared machine stalls with more)")
    p.add_argument("--eval-threads", type=int, default=2, help="threads for the evaluation throughput runs")
    p.add_argument("--eval-models", default="sasrec,m3bsr,gru4rec,bert4rec,mbstr,mmsasrec,pop",
                   help="models of the first evaluation row set (the others: sasrec, m3bsr)")
    p.add_argument("--L", type=int, default=50, help="data.max_len")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="timed steps per training run (full mode)")
    p.add_argument("--rounds", type=int, default=2, help="alternating sasrec/m3bsr rounds (full mode)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile: train.compile=true, and the Recommender of the latency rows")
    p.add_argument("--no-curves", action="store_true")
    p.add_argument("--only", default="", help="comma-separated sections: train,eval,latency,curves")
    p.add_argument("--curve-batch", type=int, default=64, help="batch size of the scaling-curve runs")
    p.add_argument("--curve-steps", type=int, default=2, help="timed steps per scaling-curve point")
    p.add_argument("--work", default=os.environ.get("M3BSR_BENCH_WORK", "/tmp/m3bsr-bench"),
                   help="where generated datasets are cached")
    p.add_argument("--data", default=os.environ.get("M3BSR_DATA") or None,
                   help="real data folder (holding ml100k_mm/) for the ml100k_mm rows; default $M3BSR_DATA")
    p.add_argument("--features", default=os.environ.get("M3BSR_FEATURES") or None,
                   help="folder with ml100k_text.parquet / ml100k_image.parquet (m3bsr features); "
                        "default $M3BSR_FEATURES; without them the ml100k_mm rows are id only")
    p.add_argument("--out", default=str(HERE.parent / "reproduce" / "results"),
                   help="where the JSON (and PNG) results go")
    args = p.parse_args()
    from m3bsr.atomic import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("-quick" if args.quick else "") + (f"-{args.device}" if args.device != "cpu" else "") + \
        (f"-{args.only.replace(',', '-')}" if args.only else "") + ("-compile" if args.compile else "")
    stem = out / f"{socket.gethostname()}-{dt.date.today().isoformat()}{suffix}"
    res = run(args, save=lambda partial: write_json(stem.with_suffix(".partial.json"), partial))
    stem.with_suffix(".partial.json").unlink(missing_ok=True)
    if "curves" in res:
        res["plots"] = plots(res, stem)
    write_json(stem.with_suffix(".json"), res)
    print(f"wrote {stem.with_suffix('.json')} ({res['meta']['seconds']:.0f} s)")
    print(table(res))


if __name__ == "__main__":
    main()
