"""How many threads torch gets for a call: one for small batches, all of them for large ones.

With `OMP_WAIT_POLICY=PASSIVE` (engine/__init__.py: busy-waiting threads make every call 10-40x
slower when another job holds a core) each parallel region wakes a sleeping thread, and at
batch 1 that wake-up costs more than the second core gives back. Measured on this project's
2-core machine (benchmarks/RESULTS.md, "Encoder speed" of 2026-11-29): one thread embeds
1.5x more single texts and images per second than two (quiet; also with another job on a
core); from about 8 items on, two threads win.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALL_BATCH = 8  # calls on fewer items than this run torch on one thread


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
