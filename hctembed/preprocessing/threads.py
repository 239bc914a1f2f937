"""One intra-op thread for a scan's preprocessing, whatever the process's torch setting.

A scan's spline products are dozens of small matrix products per slab, each ending at a barrier. With a second
intra-op thread they gain little on a quiet machine (0.139 s against 0.118 s on one thread for a 5 mm head, 2
cores) and on a busy one every barrier waits for a descheduled thread: 3.3x slower beside two busy processes,
against 2.0x on one thread (BENCHMARKS.md, "Preprocessing on a busy machine"). The streamed path's inflate thread
is the second thread a scan uses; scans run in parallel across DataLoader workers, not within one scan.

``torch.set_num_threads`` acts on the calling thread's OpenMP and MKL settings (checked on the CPU wheels), so an
encoder already running in another thread keeps its threads, and setting it costs microseconds. It also sets the
count a thread *starting* meanwhile gets, though, so a thread pool that encodes while other threads preprocess
(``hctembed serve``'s query threads) starts its threads with :func:`use_process_threads`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PREPROCESS_THREADS = 1


_lock = threading.Lock()
_inside = 0  # blocks running now, in any thread
_process_threads = torch.get_num_threads()  # the count outside every block (updated when none runs)


@contextmanager
def intra_op_threads(n: int = PREPROCESS_THREADS) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads in this thread; the previous count is restored after."""
    global _inside, _process_threads
    before = torch.get_num_threads()
    with _lock:
        if _inside == 0:
            _process_threads = before
        _inside += 1
    try:
        if before == n:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    finally:
        with _lock:
            _inside -= 1


def use_process_threads() -> None:
    """Give the calling (new) thread the process's intra-op thread count, whatever blocks run elsewhere now: a
    ``ThreadPoolExecutor`` ``initializer`` for threads that run an encoder."""
    torch.set_num_threads(_process_threads)
