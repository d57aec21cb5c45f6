"""The trained parts of the aligned model: projection heads from frozen features to the space."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import HeadConfig, SpeechHeadConfig
from engine.graph import precision
from engine.threads import SMALL_BATCH

log = logging.getLogger(__name__)

Runner = Callable[[Callable[[nn.Module], torch.Tensor], Sequence[nn.Module]], list[torch.Tensor]]


class MLPHead(nn.Module):
    """`(n, in_dim)` → `(n, out_dim)`, not normalized. Residual heads start as the identity."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        if cfg.residual and cfg.in_dim != cfg.out_dim:
            raise ValueError("a residual head needs in_dim == out_dim")
        dims = [cfg.in_dim] + [cfg.hidden_dim] * (cfg.layers - 1) + [cfg.out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                layers += [nn.GELU(), nn.Dropout(cfg.dropout)]
            layers.append(nn.Linear(a, b))
        self.net = nn.Sequential(*layers)
        self.residual = cfg.residual
        if cfg.residual:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return x + y if self.residual else y


class HeadEnsemble(nn.Module):
    """`n` heads of one shape, trained apart: the mean of their L2-normalized outputs (not itself
    normalized). Averaging heads that overfit differently cuts their variance."""

    def __init__(self, cfg: HeadConfig, n: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(MLPHead(cfg) for _ in range(n))

    def forward(self, x: torch.Tensor, run: Runner | None = None) -> torch.Tensor:
        """`run(fn, members)` maps `fn` over the members, e.g. side by side on worker threads
        (`engine.threads.one_thread_each`); by default one after another."""

        def unit(member: nn.Module) -> torch.Tensor:
            return F.normalize(member(x), dim=-1)

        members = list(self.members)
        units = run(unit, members) if run is not None else [unit(m) for m in members]
        return torch.stack(units).mean(0)


class SpeechHead(nn.Module):
    """Attention pooling over Whisper encoder states, then an MLP into the space.

    `(n, t, in_dim)` states with a `(n, t)` bool mask (True = valid) → `(n, out_dim)`.
    """

    def __init__(self, cfg: SpeechHeadConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.in_dim)
        self.queries = nn.Parameter(torch.randn(cfg.queries, cfg.in_dim) * cfg.in_dim**-0.5)
        self.attn = nn.MultiheadAttention(cfg.in_dim, cfg.heads, batch_first=True)
        self.proj = nn.Sequential(
            nn.Linear(cfg.queries * cfg.in_dim + cfg.in_dim, cfg.hidden_dim),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(cfg.hidden_dim, cfg.out_dim),
        )

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(states)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        pooled, _ = self.attn(q, x, x, key_padding_mask=~mask, need_weights=False)
        m = mask.unsqueeze(-1).to(x.dtype)
        mean = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.proj(torch.cat([pooled.flatten(1), mean], dim=1))


def lengths_to_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """`(n,)` valid lengths → `(n, width)` bool mask, True where a position is valid."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class Int8OnReuse:
    """Calls `module` (whose `nn.Linear` layers hold the weights), from its second call on, or
    at once for a batch of `SMALL_BATCH` or more, through a copy with int8 weights (per output
    channel) and int8 matmuls: dynamic quantization, inputs quantized per call.

    For heads whose matmuls at a batch of one mostly read weights from memory: the default
    model's 5 image heads (30M weights) at batch 1 on one thread took 8.4 ms in float32 and
    3.6 ms in int8, their vectors within cosine 0.9994 of float32's and the same held-out
    recall; the whole image path at batch 1 1.16x the images per second (an AMD EPYC VM,
    benchmarks/RESULTS.md, "Encoder speed" of 2026-11-29 19:36). Quantizing takes ~0.4 s,
    so, as with `engine.graph`'s traces, a one-shot call on a few images (`xmodal search
    --image`) stays float32. `XMODAL_PRECISION=fp32` keeps float32. Use under `torch.inference_mode()`; the module's
    weights must not change once it has been quantized.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.lock = threading.Lock()
        self.calls = 0
        self.int8: nn.Module | None = None
        self.broken = False

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if precision() == "fp32" or self.broken:
            return self.module(x, *args, **kwargs)
        with self.lock:
            self.calls += 1
            if self.int8 is None and (self.calls > 1 or len(x) >= SMALL_BATCH):
                self.int8 = self._quantize()
        return (self.int8 or self.module)(x, *args, **kwargs)

    def _quantize(self) -> nn.Module | None:
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            with warnings.catch_warnings():  # torch 2.9 points to torchao for this API
                warnings.simplefilter("ignore")
                return quantize_dynamic(
                    self.module,
                    {nn.Linear: per_channel_dynamic_qconfig},
                    dtype=torch.qint8,
                    inplace=False,
                ).eval()
        except Exception as exc:  # noqa: BLE001 - no int8 kernels here: stay float32
            log.warning("image heads stay float32: int8 quantization failed (%s)", exc)
            self.broken = True
            return None
