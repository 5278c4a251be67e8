"""``train.low_memory``: have the C allocator give freed large blocks back to the system at once.

Why: glibc's ``malloc`` maps a block of 128 KB or more on its own and unmaps it when freed, but the
first time such a block is freed it raises this threshold to the block's size, so from then on tensors
of that size live on the heap, where freed pages stay resident and blocks of other sizes do not fit in
their holes. A small CPU run thus peaks well above its live tensors (about 630 against 479 MB for 200
users x 300 items at batch 256; docs/training.md "Memory"). Fixing the threshold maps and unmaps
every block of 256 KB or more: the peak follows the live tensors, and every step pays for fresh zeroed
pages (slower epochs, the more so where page faults are dear, as in virtual machines).

The setting is process-wide and cannot be undone: glibc keeps a threshold once one is set. It changes
no number a run computes, only where memory comes from.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # <malloc.h>
LOW_MEMORY_THRESHOLD = 256 * 1024  # bytes: blocks this large or larger are mapped and unmapped


def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc, else None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no handle for the process itself
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def release_freed_memory(threshold: int = LOW_MEMORY_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (``mallopt(M_MMAP_THRESHOLD)``) for the rest of
    the process. Returns True when applied, False where the C library is not glibc (nothing changes)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
