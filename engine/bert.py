"""A BERT encoder in plain torch, for all-MiniLM-L6-v2: no transformers import on the query path.

Importing transformers and building its model took ~1.5–2.5 s of every cold `xmodal search`;
this is the same network in plain torch. Parameter names follow transformers' `BertModel`, so
the packaged `model.safetensors` and tuned layers saved from either implementation load as is.
Tokenization uses the model's own `tokenizer.json` through `tokenizers`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ModelError

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
PAD_MULTIPLE = 8


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        n, t, width = x.shape

        def split(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(n, t, self.heads, width // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.query), split(self.key), split(self.value), attn_mask=additive_mask
        )
        return out.transpose(1, 2).reshape(n, t, width)


class _DenseNorm(nn.Module):
    """Projection, residual add and LayerNorm (BERT's `*Output` modules)."""

    def __init__(self, width_in: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)  # noqa: N815 - transformers' name

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(width, heads)
        self.output = _DenseNorm(width, width, eps)


class _Intermediate(nn.Module):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, inner)


class BertLayer(nn.Module):
    """One transformer layer: `(n, t, width)` states and a `(n, 1, 1, t)` additive mask."""

    def __init__(self, width: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.attention = _Attention(width, heads, eps)
        self.intermediate = _Intermediate(width, inner)
        self.output = _DenseNorm(inner, width, eps)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, additive_mask), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        width = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], width)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], width)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], width)
        self.LayerNorm = nn.LayerNorm(width, eps=cfg["layer_norm_eps"])  # noqa: N815

    def forward(self, ids: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.token_type_embeddings(type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class _Encoder(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.layer = nn.ModuleList(
            BertLayer(width, heads, cfg["intermediate_size"], cfg["layer_norm_eps"])
            for _ in range(cfg["num_hidden_layers"])
        )


class BertEncoder(nn.Module):
    """Token ids → per-token states of every layer (`hidden_states`, embeddings first)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
            raise ModelError(f"not a BERT model with GELU: {cfg.get('model_type')}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ModelError("only absolute position embeddings are supported")
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        *,
        stop_before: int | None = None,
    ) -> torch.Tensor:
        """`(n, t, width)` states after the last layer, or entering layer `stop_before`."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = additive_mask(attention_mask, x.dtype)
        for layer in self.layers[:stop_before]:
            x = layer(x, mask)
        return x


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(n, t)` 1/0 (or bool) mask → `(n, 1, 1, t)` 0 / most negative, added to attention scores."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def load_bert(model_dir: str | Path) -> BertEncoder:
    """A BERT model directory (`config.json`, `model.safetensors`) → eval-mode encoder."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        state = load_file(str(model_dir / WEIGHTS))
    except FileNotFoundError as exc:
        raise ModelError(f"{model_dir} needs config.json and {WEIGHTS}: {exc}") from exc
    model = BertEncoder(cfg)
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    state.pop("embeddings.position_ids", None)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{model_dir}/{WEIGHTS} does not fit a BERT encoder: {exc}") from exc
    return model.eval().requires_grad_(False)


class BertTokenizer:
    """`tokenizer.json` through `tokenizers`: padded to the longest text, truncated."""

    def __init__(self, model_dir: str | Path, *, max_tokens: int) -> None:
        from tokenizers import Tokenizer

        path = Path(model_dir) / TOKENIZER
        if not path.exists():
            raise ModelError(f"{model_dir} has no {TOKENIZER}")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(max_length=max_tokens)
        pad = self.tokenizer.padding or {}
        # to the longest text of the batch (not the file's fixed length), rounded up to 8 tokens:
        # few distinct shapes, so a fused graph (engine.graph) is not rebuilt for every length
        self.tokenizer.enable_padding(
            pad_id=pad.get("pad_id", 0),
            pad_token=pad.get("pad_token", "[PAD]"),
            pad_to_multiple_of=PAD_MULTIPLE,
        )

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encodings = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
        }
