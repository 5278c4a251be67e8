"""Helpers to run a local (loopback) server for tests and the load benchmark: a free port, a
bounded wait for ``/health``, and a bounded stop. Nothing here talks to any non-loopback address."""

from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> dict:
    """Poll ``url/health`` until it answers 200 (returns its JSON) or ``timeout_s`` passes.

    Raises :class:`RuntimeError` if the server process ``proc`` exits first or time runs out.
    """
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"server exited with code {proc.returncode} {err}".strip())
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url}/health did not answer within {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc``; kill it if it has not exited after 15 s."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
