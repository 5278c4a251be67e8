"""Load test of `m3bsr serve` on loopback: N concurrent clients for a bounded time.

Starts `m3bsr serve RUN_DIR` on 127.0.0.1 (a free port) in a subprocess, or targets a server
already running on a loopback ``--url``; runs ``--clients`` concurrent asyncio + httpx clients,
each posting /recommend requests back to back, until ``--duration`` seconds have passed or
``--max-requests`` were sent; then stops (and stops the server it started). Prints requests/s,
p50/p99 latency, errors (must be 0) and the server's mean micro-batch size. Exit code 1 if any
request failed.

    python benchmarks/serve_load.py --run runs/demo/sasrec --clients 200 --duration 10

Without ``--run`` it first builds a small run in a temporary folder (``m3bsr prepare synthetic``
+ one epoch of SASRec, about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pandas as pd

from m3bsr.config import read_yaml
from m3bsr.serving.local import free_port, stop, wait_healthy


def _m3bsr(*argv: str) -> list[str]:
    return [sys.executable, "-m", "m3bsr", *argv]


def build_demo_run(root: Path) -> Path:
    """A small trained run: the embedded synthetic dataset and one epoch of SASRec."""
    data, run = root / "data", root / "sasrec"
    subprocess.run(_m3bsr("prepare", "synthetic", "--out", str(data), "--quiet"), check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(_m3bsr("train", "--dataset", str(data), "--model", "sasrec", "--out", str(run), "--quiet",
                          "--set", "train.max_epochs=1", "--set", "train.device=cpu"), check=True,
                   stdout=subprocess.DEVNULL)
    return run


def run_users(run: Path) -> list[str]:
    """Original user ids of the run's prepared dataset."""
    dataset = Path(read_yaml(run / "config.yaml")["dataset"])
    return pd.read_parquet(dataset / "users.parquet")["original"].astype(str).tolist()


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    ok = host == "localhost"
    try:
        ok = ok or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not ok:
        raise SystemExit(f"--url {url}: only loopback servers (127.0.0.0/8, localhost, ::1) may be load-tested")


async def load(url: str, users: list[str], clients: int, duration: float, max_requests: int, k: int,
               exclude_seen: bool, seed: int) -> tuple[list[float], int, float, list[str]]:
    """Run the clients; returns latencies (s) of successful requests, error count, wall time, sample errors."""
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    rng = np.random.default_rng(seed)
    # One AsyncClient (one keep-alive connection) per simulated client: a single shared pool of
    # 200 connections costs the client process far more CPU per request (encode/httpx#3215).
    # They share one SSL context so creating them does not reload the CA bundle 200 times.
    ssl_ctx = ssl.create_default_context()
    pool = [httpx.AsyncClient(base_url=url, timeout=30, verify=ssl_ctx,
                              limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
            for _ in range(clients)]

    async def client(c: httpx.AsyncClient, offset: int) -> None:
        nonlocal sent
        i = offset
        while time.monotonic() < deadline and sent < max_requests:
            sent += 1
            body = {"user_id": users[i % len(users)], "k": k, "exclude_seen": exclude_seen}
            i += clients
            t0 = time.perf_counter()
            try:
                r = await c.post("/recommend", json=body)
                ok = r.status_code == 200 and len(r.json()["items"]) > 0
                if not ok:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                ok = False
                errors.append(f"{type(e).__name__}: {e}")
            if ok:
                latencies.append(time.perf_counter() - t0)

    offsets = rng.integers(0, len(users), clients)
    deadline = time.monotonic() + duration
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*[client(c, int(o)) for c, o in zip(pool, offsets)])
    finally:
        wall = time.perf_counter() - t0
        await asyncio.gather(*[c.aclose() for c in pool])
    return latencies, len(errors), wall, errors[:5]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="trained run directory (default: build a small one)")
    p.add_argument("--url", help="target a running server on loopback instead of starting one")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=200_000, help="hard bound on requests sent")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--exclude-seen", action="store_true")
    p.add_argument("--max-batch", type=int, help="server micro-batch size (server default if unset)")
    p.add_argument("--max-wait-ms", type=float, help="server micro-batch wait (server default if unset)")
    p.add_argument("--threads", type=int, help="server torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 1000 or not 0 < args.duration <= 600:
        raise SystemExit("--clients must be in 1..1000 and --duration in (0, 600]")

    with tempfile.TemporaryDirectory(prefix="m3bsr-load-") as tmp:
        run = args.run if args.run is not None else build_demo_run(Path(tmp))
        users = run_users(run)
        proc = None
        if args.url:
            check_loopback(args.url)
            url = args.url.rstrip("/")
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = _m3bsr("serve", str(run), "--host", "127.0.0.1", "--port", str(port), "--quiet")
            for flag, value in (("--max-batch", args.max_batch), ("--max-wait-ms", args.max_wait_ms),
                                ("--threads", args.threads)):
                if value is not None:
                    cmd += [flag, str(value)]
            proc = subprocess.Popen(cmd)
        try:
            try:
                before = wait_healthy(url, 120, proc)
            except RuntimeError as e:
                raise SystemExit(str(e)) from None
            lat, n_err, wall, samples = asyncio.run(load(url, users, args.clients, args.duration,
                                                         args.max_requests, args.k, args.exclude_seen, args.seed))
            after = httpx.get(f"{url}/health", timeout=5).json()
        finally:
            if proc is not None:
                stop(proc)

    lat_ms = np.array(lat) * 1000
    passes = after["forward_passes"] - before["forward_passes"]
    served = after["served_requests"] - before["served_requests"]
    figures = {
        "model": after["model"], "n_items": after["n_items"], "clients": args.clients, "seconds": round(wall, 2),
        "requests_ok": len(lat), "errors": n_err, "requests_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2) if len(lat) else None,
        "mean_batch": round(served / passes, 1) if passes else None, "batching": after["batching"],
    }
    print(f"model {figures['model']} ({figures['n_items']} items), {args.clients} clients, {wall:.1f} s, "
          f"k={args.k}, batching {after['batching']}")
    print(f"requests {len(lat)} ok, errors {n_err}")
    print(f"throughput {figures['requests_per_s']} req/s   latency p50 {figures['p50_ms']} ms   "
          f"p99 {figures['p99_ms']} ms   mean micro-batch {figures['mean_batch']}")
    for s in samples:
        print(f"  error: {s}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if n_err else 0


if __name__ == "__main__":
    raise SystemExit(main())
