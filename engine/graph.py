"""Frozen TorchScript graphs for the towers' inference passes: the same network, less Python.

At batch 1 much of a small network's time is Python dispatching its modules. A traced and
frozen graph runs the same ops from C++ with the same outputs: on this project's 2-core machine
(benchmarks/RESULTS.md, "Encoder speed" of 2026-11-29) 1.13x the sentences and 1.12x the
images per second at batch 1 (one thread), and with two spinning threads MiniLM-L6 took 2.7
instead of 3.8 ms per sentence, EfficientNet-Lite0 7.7 instead of 13.0 ms per image.

Tracing costs ~0.1–0.3 s, so a graph is traced on a module's *second* call with a given input
shape: a one-shot command (`xmodal search`) pays nothing, anything that encodes more gets the
graph. Any failure to trace falls back to the eager module, logged once. Each thread that runs
a module gets its own trace (`InferenceGraph.graphs`): oneDNN's fused kernels must not run on
two threads at once. That costs memory and a first compile per shape on each thread: 512
captions and 64 images on two workers, the process grew to 1.6–1.7 GB instead of 1.4, and
text, whose batch shapes were new, ran at 178–220 instead of 246–264 texts/s (one run each,
an AMD EPYC VM; `/work/runs/s8/q/perthread_cost.py`); shapes seen before run at full speed.

The graphs run through oneDNN Graph fusion (`torch.jit.enable_onednn_fusion`), which fuses and
pre-packs convolutions and matmuls: EfficientNet-Lite0 at batch 1 on one thread 11.0 → 7.2 ms,
same features. On CPUs with AMX tiles (bfloat16 matrix units) a graph built with
`low_precision=True` runs a bfloat16 copy of the module, inputs and outputs float32. The text
tower uses it: MiniLM-L6 4.8 → 1.8 ms per sentence at a fixed length, sentence vectors within
cosine 0.9999 of float32 and the same dev recall (benchmarks/RESULTS.md, 2026-11-29); the
image tower does not (EfficientNet-Lite0 7.2 → 3.6 ms, but cosine down to 0.992). The first call
per key, eager, stays float32. `XMODAL_PRECISION=fp32` keeps float32 everywhere (the image
heads' int8 matmuls included, `engine.heads.Int8OnReuse`), `=bf16` forces bfloat16 where
oneDNN supports it, `=int8` runs the text path in int8 under ONNX Runtime anywhere, which by
default (auto) it does only on x86 CPUs with VNNI and no AMX, for bundles with smoothing
scales (`engine.text.text_variant`, `MiniLMTower.whole_path`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from engine.config import PRECISION_ENV, precision_setting  # noqa: F401 - PRECISION_ENV: also read here

log = logging.getLogger(__name__)

ENV_SWITCH = "XMODAL_EAGER"  # set to 1 to run every tower eagerly (debugging, comparisons)


_float32_only = 0  # > 0 inside `float32_only()`


@contextlib.contextmanager
def float32_only() -> Iterator[None]:
    """Inside, `precision()` is fp32 whatever `XMODAL_PRECISION` says, for every thread: for
    work that makes targets to train on (a teacher's vectors), not queries."""
    global _float32_only
    _float32_only += 1
    try:
        yield
    finally:
        _float32_only -= 1


def precision() -> str:
    """`XMODAL_PRECISION`: auto (the default), fp32, bf16 or int8; anything else raises. fp32
    inside `float32_only()`."""
    if _float32_only:
        return "fp32"
    return precision_setting()


def bf16_graphs() -> bool:
    """Whether `low_precision` graphs run in bfloat16 here: `XMODAL_PRECISION`, else AMX."""
    choice = precision()
    if choice == "fp32":
        return False
    if choice == "bf16":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.cpu._is_amx_tile_supported()


class _Bfloat16(torch.nn.Module):
    """`module` in bfloat16 behind float32 inputs and outputs (integer inputs pass as they are)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module.to(torch.bfloat16)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = (x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs)
        return self.module(*cast).float()


class InferenceGraph:
    """Calls `module(*inputs)` eagerly at first, then through a frozen trace of it.

    `key(*inputs)` names what a trace is specialized to (e.g. the image side, not the batch
    size); a new key is seen once eagerly before it is traced. Use under `torch.inference_mode()`
    only: the graph has no autograd. Call `reset()` after changing the module's weights.
    `low_precision`: the graph may run in bfloat16 (see `bf16_graphs`); the module itself and
    its eager calls stay float32.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        key: Callable[..., Hashable] | None = None,
        low_precision: bool = False,
    ):
        self.module = module
        self.key = key or (lambda *inputs: None)
        self.low_precision = low_precision
        self.lock = threading.Lock()
        self.seen: set[Hashable] = set()
        self.broken = False
        self._local = threading.local()  # each thread's own graphs: see `graphs`
        self._generation = 0  # bumped to drop every thread's graphs

    @property
    def graphs(self) -> dict[Hashable, Any]:
        """The calling thread's traced graphs, by key. Each thread traces its own: oneDNN
        Graph's compiled partitions are not safe to run from two threads at once. Sharing one
        graph between `engine.threads`' workers, MiniLM's ran one thread's batch of 22 texts
        into the other's batch of 23 ("The size of tensor a (22) must match the size of tensor
        b (23)"), or failed with "std::bad_alloc" or "partition compile failed"; with inputs
        of one shape such a mix-up need not raise at all. A thread's graphs go when it ends."""
        local = self._local
        if getattr(local, "generation", None) != self._generation:
            local.generation, local.graphs = self._generation, {}
        return local.graphs

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.broken or os.environ.get(ENV_SWITCH) == "1":
            return self.module(*inputs)
        k = self.key(*inputs)
        graphs = self.graphs
        graph = graphs.get(k)
        if graph is None:
            with self.lock:  # one trace at a time: tracing runs the shared module
                if k in self.seen and not self.broken:
                    graph = self._trace(inputs)
                    if graph is not None:
                        graphs[k] = graph
                self.seen.add(k)
        if graph is None:
            return self.module(*inputs)
        try:
            return graph(*inputs)
        except Exception as exc:  # noqa: BLE001 - maybe a graph that traced but fails to run (a
            # shape the trace fixed, a fusion this CPU lacks): if the eager module takes the same
            # input, eager from now on; if not, the input was at fault and its error is raised
            out = self.module(*inputs)
            log.warning(
                "running %s eagerly: its graph failed (%s)", type(self.module).__name__, exc
            )
            with self.lock:
                self.broken = True
                self._generation += 1
            return out

    def reset(self) -> None:
        """Forget every thread's traces (the module's weights or structure changed)."""
        with self.lock:
            self._generation += 1
            self.seen.clear()
            self.broken = False

    def _trace(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        bf16 = self.low_precision and bf16_graphs()  # a bad XMODAL_PRECISION raises here
        try:
            with warnings.catch_warnings():
                # shape arithmetic in Python (e.g. "same" padding) is fixed by the key
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                module = self.module.eval()
                if bf16:
                    # a copy; the module may hold this graph (memo: keep it, don't copy it)
                    module = _Bfloat16(copy.deepcopy(module, {id(self): self})).eval()
                torch.jit.enable_onednn_fusion(True)
                traced = torch.jit.trace(module, inputs, check_trace=False)
                return torch.jit.freeze(traced)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "stay eager"
            log.warning("running %s eagerly: tracing failed (%s)", type(self.module).__name__, exc)
            self.broken = True
            return None
