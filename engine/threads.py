"""How many threads torch gets for a call: one for small batches, all of them for large ones.

With `OMP_WAIT_POLICY=PASSIVE` (engine/__init__.py: busy-waiting threads make every call 10-40x
slower when another job holds a core) each parallel region wakes a sleeping thread, and at
batch 1 that wake-up costs more than the second core gives back. Measured on this project's
2-core machine (benchmarks/RESULTS.md, "Encoder speed" of 2026-11-29): one thread embeds
1.5x more single texts and images per second than two (quiet; also with another job on a
core); from about 8 items on, two threads win. For the image tower even large batches are
fastest one image per core: `one_thread_each`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

SMALL_BATCH = 8  # calls on fewer items than this run torch on one thread

T = TypeVar("T")
R = TypeVar("R")
_pools: dict[int, ThreadPoolExecutor] = {}


@contextmanager
def threads_for(items: int) -> Iterator[None]:
    """Run the torch work inside on one thread when `items < SMALL_BATCH`, else unchanged."""
    before = torch.get_num_threads()
    if items >= SMALL_BATCH or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread_each(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`[fn(x) for x in items]`, spread over as many Python threads as torch has threads, each
    running torch on one thread (torch releases the GIL while it computes).

    For networks that batching does not speed up: EfficientNet-Lite0's frozen graph on this
    project's 2-core machine (128 images, backbone only) took 11.0 ms per image in batches of
    16 on two torch threads, 13.3 in batches of 32, 6.4 ms one image at a time on two such
    workers. `fn` must not rely on thread-local torch state set by the caller (e.g.
    `torch.inference_mode()`: enter it inside `fn`).
    """
    before = torch.get_num_threads()
    if min(before, len(items)) <= 1:
        with threads_for(1):
            return [fn(x) for x in items]
    pool = _pools.get(before) or _pools.setdefault(  # one pool per thread count, not per call
        before, ThreadPoolExecutor(before, thread_name_prefix="xmodal-torch")
    )

    def on_one_thread(x: T) -> R:
        torch.set_num_threads(1)  # this worker's OpenMP setting
        return fn(x)

    try:
        return list(pool.map(on_one_thread, items))
    finally:
        # set_num_threads is also torch's default for threads that start using torch later: a
        # thread that starts while the workers run gets one thread (none in xmodal does)
        torch.set_num_threads(before)
