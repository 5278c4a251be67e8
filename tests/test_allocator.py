"""``train.low_memory`` (m3bsr.engine.allocator): freed large blocks leave the process at once.

Each check runs in a fresh process: the setting is process-wide and cannot be undone, and this one
must keep glibc's defaults for the other tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from m3bsr.engine import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc's malloc")

RETAINED = textwrap.dedent("""
    import sys
    from m3bsr.engine.allocator import release_freed_memory

    def rss_kb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4

    if sys.argv[1] == "low":
        assert release_freed_memory()
    block = bytearray(8 << 20)  # 8 MB, written: mapped alone (above glibc's first threshold of 128 KB)
    del block  # unmapped; glibc now raises its threshold past 8 MB ...
    before = rss_kb()
    block = bytearray(8 << 20)  # ... so by default this one comes from the heap
    del block
    print(rss_kb() - before)
""")


def retained_kb(mode: str) -> int:
    """Resident KB that an 8 MB block, written and freed, leaves behind in a fresh process."""
    done = subprocess.run([sys.executable, "-c", RETAINED, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


@glibc
def test_low_memory_gives_a_freed_block_back_at_once():
    """By default glibc keeps the second 8 MB block resident after it is freed (the retention that
    ``train.low_memory`` is for); with :func:`release_freed_memory` nothing of it stays."""
    assert retained_kb("default") > 6 * 1024
    assert retained_kb("low") < 1024


def test_without_glibc_nothing_is_changed(monkeypatch):
    """Where the C library is not glibc the call reports that it did nothing."""
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.release_freed_memory() is False
