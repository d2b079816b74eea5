"""Keep freed tensor memory from lingering in the process (glibc only).

glibc raises its mmap threshold after large blocks are freed, so later per-layer buffers (activations,
covariances) come from the heap, fragment it, and resident memory grows with depth although every
layer's tensors are freed (measured: +28 MB per SmolLM2 layer). A fixed threshold keeps large blocks
mmap-backed and returned to the OS on free, so peak memory stays that of one layer.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_THRESHOLD_BYTES = 128 * 1024


def release_large_frees_to_os() -> bool:
    """Fix glibc's mmap threshold at 128 KiB; returns False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
