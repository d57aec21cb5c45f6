"""The trained parts of the aligned model: projection heads from frozen features to the space."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import HeadConfig, SpeechHeadConfig

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
