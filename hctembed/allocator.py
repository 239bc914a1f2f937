"""Keep freed memory in the process for the next scan instead of handing it back to the kernel.

Preprocessing allocates and frees a few volume-sized buffers per scan (a 1 mm 512×512 head is 180 MB as float32).
glibc serves every block above its mmap threshold (at most 32 MB by default) with fresh pages from the kernel
and unmaps them on ``free``, so each scan pays page faults on touching its buffers again: 0.02-0.4 CPU-seconds
for 180 MB on the development VM, a third of a scan's whole cost (BENCHMARKS.md, "Core-seconds per scan").
Raising the mmap and trim thresholds lets the next scan reuse the same, already-mapped pages.

This is a process-wide setting: the command line sets it for its own process and the embedding DataLoader sets it
in each worker. The price is memory: a process keeps about its peak heap mapped (only free memory at the heap's top,
beyond ``trim_threshold``, goes back). It acts on the main thread's heap, where preprocessing runs in a worker or
a command; glibc still maps blocks above 64 MB that other threads allocate (their arenas are at most 64 MB).
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 512 << 20  # blocks up to 512 MB come from the heap and are reused
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top is returned only above 1 GB


def retain_freed_memory(*, mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when both were set. A no-op (False) where
    the C library is not glibc (macOS, Windows, musl): those allocators keep their own policy."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        gnu_version = libc.gnu_get_libc_version  # glibc only: musl's mallopt exists but does nothing
    except (OSError, AttributeError):
        log.debug("not glibc: the allocator's thresholds are left as they are")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    gnu_version.restype = ctypes.c_char_p
    done = mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    log.debug("glibc %s: mmap threshold %d, trim threshold %d: %s", gnu_version().decode(), mmap_threshold,
              trim_threshold, "set" if done else "refused")  # fmt: skip
    return done
