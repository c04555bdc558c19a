"""The process's memory allocator, set for CPU inference: freed tensor memory is reused, not returned and faulted in again.

glibc's ``malloc`` serves blocks above a moving threshold (128 KiB at start, 32 MiB at most) with ``mmap`` and
gives them back to the kernel on ``free``; it also trims the heap's free top. CPU inference allocates and frees
activations of tens of MB per network call (a tile batch of 8 x 32 x 224 x 224 float32 is 51 MB), so every call
faults their pages in again: segmenting 20 dev-val images with ``auto`` (2 cores, AVX2 kernels, fp32) spent 24 s
of CPU time in the kernel and took 60.3 s; with the settings below, 1.2 s and 47.6 s (1.27x), at 3.18 GiB peak
resident memory instead of 2.08 (``python -m benchmarks.allocator --isa avx2``; ``benchmarks/README.md``).

:func:`keep_freed_memory` serves every block from the heap (no ``mmap`` per block) and keeps up to ``keep_bytes``
of freed memory in the process, so the peak resident memory stays resident until the process ends. It is a
setting of the whole process: the bundle's inference and evaluation workflows call it in ``initialize`` (``mmcs
infer``, ``mmcs evaluate``, ``python -m monai.bundle run``); the library never calls it on import. Left at glibc's
defaults, unmeasured with these settings: training, ``mmcs infer-slide`` (whose memory bound is measured as it
is) and long-lived hosts (the label server, napari), whose resident memory would no longer shrink after a large
image.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest on 64-bit systems (HEAP_MAX_SIZE / 2)
KEEP_BYTES = 2**31 - 1
TOP_PAD_BYTES = 256 * 2**20


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory(keep_bytes: int = KEEP_BYTES, top_pad: int = TOP_PAD_BYTES) -> bool:
    """Make glibc ``malloc`` serve every block from the heap and keep up to ``keep_bytes`` of freed memory.

    Args:
        keep_bytes: freed memory (bytes) at the heap's top that is kept instead of trimmed.
        top_pad: extra bytes the heap grows by each time it grows.

    Returns:
        True when every setting was applied; False where the C library is not glibc (macOS, Windows, musl),
        which is left as it is, or where glibc refused one (logged; the others still apply).
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = {
        "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
        "M_MMAP_MAX": (M_MMAP_MAX, 0),
        "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, keep_bytes),
        "M_TOP_PAD": (M_TOP_PAD, top_pad),
    }
    refused = [name for name, (parameter, value) in settings.items() if libc.mallopt(parameter, int(value)) != 1]
    if refused:
        logger.info("glibc refused the malloc setting(s) %s; those stay at their defaults", ", ".join(refused))
    return not refused


__all__ = ["keep_freed_memory"]
