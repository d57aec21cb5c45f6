"""Frozen TorchScript graphs for the towers' inference passes: the same network, less Python.

At batch 1 much of a small network's time is Python dispatching its modules. A traced and
frozen graph runs the same ops from C++ with the same outputs: on this project's 2-core machine
(benchmarks/RESULTS.md, "Encoder speed" of 2026-11-29) 1.13x the sentences and 1.12x the
images per second at batch 1 (one thread), and with two spinning threads MiniLM-L6 took 2.7
instead of 3.8 ms per sentence, EfficientNet-Lite0 7.7 instead of 13.0 ms per image.

Tracing costs ~0.1–0.3 s, so a graph is traced on a module's *second* call with a given input
shape: a one-shot command (`xmodal search`) pays nothing, anything that encodes more gets the
graph. Any failure to trace falls back to the eager module, logged once.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "XMODAL_EAGER"  # set to 1 to run every tower eagerly (debugging, comparisons)


class InferenceGraph:
    """Calls `module(*inputs)` eagerly at first, then through a frozen trace of it.

    `key(*inputs)` names what a trace is specialized to (e.g. the image side, not the batch
    size); a new key is seen once eagerly before it is traced. Use under `torch.inference_mode()`
    only: the graph has no autograd. Call `reset()` after changing the module's weights.
    """

    def __init__(self, module: torch.nn.Module, *, key: Callable[..., Hashable] | None = None):
        self.module = module
        self.key = key or (lambda *inputs: None)
        self.graphs: dict[Hashable, Any] = {}
        self.seen: set[Hashable] = set()
        self.broken = False

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.broken or os.environ.get(ENV_SWITCH) == "1":
            return self.module(*inputs)
        k = self.key(*inputs)
        graph = self.graphs.get(k)
        if graph is not None:
            return graph(*inputs)
        if k not in self.seen:
            self.seen.add(k)
            return self.module(*inputs)
        graph = self._trace(inputs)
        if graph is None:
            return self.module(*inputs)
        self.graphs[k] = graph
        return graph(*inputs)

    def reset(self) -> None:
        """Forget every trace (the module's weights or structure changed)."""
        self.graphs.clear()
        self.seen.clear()
        self.broken = False

    def _trace(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        try:
            with warnings.catch_warnings():
                # shape arithmetic in Python (e.g. "same" padding) is fixed by the key
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(self.module.eval(), inputs, check_trace=False)
                return torch.jit.freeze(traced)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "stay eager"
            log.warning("running %s eagerly: tracing failed (%s)", type(self.module).__name__, exc)
            self.broken = True
            return None
