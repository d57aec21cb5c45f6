"""Inference passes under ONNX Runtime: the image backbone (float32) and the text path (int8).

On the 2-core AMD EPYC VM (AVX2, no AVX-512) EfficientNet-Lite0 with the default model's tail
took 11–19 ms an image through the frozen TorchScript graph (`engine.graph`), on one thread or
two, and 8–12 ms under ONNX Runtime on two threads (15 on one); features within 2.5e-5 of
torch's. Whole images, JPEG decode and heads included (`benchmarks/encoders.py`, RESULTS.md
2026-11-30): 1.64× the images per second at batch 1 (66.0 against 40.2), 1.13× at batch 32.
The network is mostly depthwise convolutions, which ONNX Runtime's kernels run faster here.
MiniLM gained little under ONNX Runtime in float32 (5.8 against 7.5 ms a sentence on two
threads; `embed_text` at batch 1 runs one thread, 9.0 against 9.8), but its int8 copy, with the
text head, runs ~2.5× the sentences per second of the torch graph at batch 1 and 32 on an
AVX-512 VNNI CPU (`engine.text.MiniLMTower.whole_path`; 7-bit weights on x86 CPUs without VNNI,
`engine.cpu.int8_cpu`).

`OnnxGraph(module, key=...)` exports `module` once per key into the cache
(`engine.speech.cache_root() / "onnx"`, named by a hash of the weights, the input shapes but
their dynamic axes, torch's version and, for int8, the quantization recipe; written under a
temporary name, then renamed, so a crash leaves no half file; a file
unused for 30 days goes when another is exported), and
runs it in an ONNX Runtime session with as many threads as torch has at the call (sessions by
thread count: `engine.threads`' workers run one-thread calls side by side on one session). Like
`InferenceGraph` it waits for a key's second call, so a one-shot command pays no export or
session start, and it gives up for good, logged once, if ONNX Runtime is missing or the export
or a session fails: the caller then runs its torch path. `XMODAL_ONNX=0` (or `XMODAL_EAGER=1`)
turns it off. Use under `torch.inference_mode()`; call `reset()` after changing the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.cpu import int8_cpu
from engine.graph import ENV_SWITCH

log = logging.getLogger(__name__)

ONNX_ENV = "XMODAL_ONNX"  # 0 turns ONNX Runtime off
OPSET = 17


def onnx_enabled() -> bool:
    """Whether ONNX Runtime may run a tower here (`XMODAL_ONNX`, `XMODAL_EAGER`)."""
    return os.environ.get(ONNX_ENV, "1") != "0" and os.environ.get(ENV_SWITCH) != "1"


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of `module`'s parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class OnnxGraph:
    """Calls `module(*inputs)` through ONNX Runtime from a key's second call on; returns None
    where the caller should run its own path (off, first call, failure).

    `inputs` names the module's inputs (one float32 `x` by default) and `dynamic` the axes of
    each that may vary (the batch axis by default; the output's batch axis always varies).
    `variant()`, asked at each call, says how to run it now: "float32" (the default), "int8"
    (the export dynamically quantized: int8 weights per output channel, activations quantized
    per call; see `engine.text.MiniLMTower.whole_path` for what that costs and gives), or None
    (not now: the caller's path). Each variant is exported and first seen on its own.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        key: Callable[..., Hashable],
        inputs: tuple[str, ...] = ("x",),
        dynamic: tuple[int, ...] = (0,),
        variant: Callable[[], str | None] = lambda: "float32",
    ):
        self.module = module
        self.key = key
        self.inputs = inputs
        self.dynamic = dynamic
        self.variant = variant
        self.lock = threading.Lock()
        self.seen: set[Hashable] = set()
        self.files: dict[Hashable, Path] = {}
        self.sessions: dict[tuple[Hashable, int], Any] = {}
        self.broken = False

    @property
    def active(self) -> bool:
        """Whether calls may run under ONNX Runtime now: switched on, not given up, and a
        variant to run."""
        return not self.broken and onnx_enabled() and self.variant() is not None

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor | None:
        if self.broken or not onnx_enabled():
            return None
        variant = self.variant()
        if variant is None:
            return None
        k = (self.key(*xs), variant)
        threads = torch.get_num_threads()
        session = self.sessions.get((k, threads))
        if session is None:
            with self.lock:
                if k not in self.seen:
                    self.seen.add(k)
                    return None
                session = self.sessions.get((k, threads)) or self._session(k, xs, threads)
            if session is None:
                return None
        feed = {
            name: np.ascontiguousarray(x.detach().numpy())
            for name, x in zip(self.inputs, xs, strict=True)
        }
        try:
            (out,) = session.run(None, feed)
        except Exception as exc:  # noqa: BLE001 - a session that fails to run: torch from now on
            log.warning("running %s in torch: ONNX Runtime failed (%s)", self._name, exc)
            self.broken = True
            return None
        return torch.from_numpy(out)

    def reset(self) -> None:
        """Forget exports and sessions (the module's weights changed)."""
        with self.lock:
            self.seen.clear()
            self.files.clear()
            self.sessions.clear()
            self.broken = False

    @property
    def _name(self) -> str:
        return type(self.module).__name__

    def _session(self, k: Hashable, xs: tuple[torch.Tensor, ...], threads: int) -> Any:
        try:
            import onnxruntime as ort

            path = self.files.get(k) or self._export(k, xs)
            self.files[k] = path
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # idle threads sleep instead of spinning, leaving the cores to decoding and to
            # torch (same speed here: 9.5 ms an image on two threads, spinning or not)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - no ONNX Runtime, no export: torch it is
            log.warning("running %s in torch: no ONNX Runtime session (%s)", self._name, exc)
            self.broken = True
            return None
        self.sessions[(k, threads)] = session
        return session

    def _export(self, k: tuple[Hashable, str], xs: tuple[torch.Tensor, ...]) -> Path:
        from engine.speech import cache_root, prune_unused

        with torch.inference_mode(False):  # export traces: no inference tensors
            example = tuple(x[:1].detach().clone().contiguous() for x in xs)
        fixed = [tuple(s for i, s in enumerate(x.shape) if i not in self.dynamic) for x in example]
        shapes = fixed[0] if len(fixed) == 1 else fixed  # one input: the name exports had before
        tag = f"{weights_digest(self.module)} {shapes} {torch.__version__}"
        reduce_range = k[1] == "int8" and int8_cpu() == "x86"
        if k[1] == "int8":
            tag += f" int8 {INT8_RECIPE}" + (" reduce-range" if reduce_range else "")
        name = f"{self._name.lower()}-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.onnx"
        path = cache_root() / "onnx" / name
        if path.is_file():
            with contextlib.suppress(OSError):  # a read-only cache still works
                os.utime(path)  # last use, for `prune_unused`
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                axes = {name: {i: f"d{i}" for i in self.dynamic} for name in self.inputs}
                torch.onnx.export(
                    self.module.eval(), example, str(partial), input_names=list(self.inputs),
                    output_names=["y"], dynamic_axes={**axes, "y": {0: "d0"}},
                    opset_version=OPSET, dynamo=False,
                )  # fmt: skip
            if k[1] == "int8":
                _quantize(partial, reduce_range=reduce_range)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        log.info("exported %s for ONNX Runtime: %s", self._name, path)
        # each bundle with its own tuned tail leaves a 13 MB file (its text path 23 MB); one
        # deleted too early is only exported again (~0.7 s; the text path ~4 s)
        prune_unused(path.parent.glob("*.onnx"), keep=path)
        return path


INT8_RECIPE = "quantize_dynamic QInt8 per-channel"  # in the export's name: a new recipe, a new file


class _NoPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _quantize(path: Path, *, reduce_range: bool = False) -> None:
    """Replace the float32 ONNX file `path` with its dynamically quantized copy (7-bit weights
    with `reduce_range`, for x86 CPUs without VNNI: `int8_cpu`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.name + ".int8")
    hint = _NoPreprocessHint()  # quantize_dynamic suggests a pass that we measured no need for
    logging.getLogger().addFilter(hint)
    try:
        quantize_dynamic(
            path, out, weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range
        )
        os.replace(out, path)
    finally:
        logging.getLogger().removeFilter(hint)
        out.unlink(missing_ok=True)
