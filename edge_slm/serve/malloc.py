"""The server process's C allocator setting: blocks of 1 MiB or more are mapped on their own and
returned to the system when freed.

glibc raises its mmap threshold each time such a block is freed (up to 32 MiB), so the
multi-megabyte buffers onnxruntime frees while loading and pre-packing the weights are kept in the
heap afterwards, never used again: about 11 MB of a served int8 bundle's peak
(`benchmarks/serve_memory.py`, variants `base` and `mmap-1m`). A fixed threshold keeps the
per-step blocks under 1 MiB (logits of a few rows, activations) in the heap as before; a larger
one (a float64 copy of a 150k vocabulary's logits, 1.2 MB) is mapped and unmapped each time, a
cost small beside a decode step. There is no
Python or onnxruntime setting for this, hence glibc's `mallopt` through ctypes; on other C
libraries (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_system() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; True if it was set (False when not on glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl also has mallopt, and ignores it
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
