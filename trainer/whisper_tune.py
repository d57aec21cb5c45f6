"""Tune Whisper base's decoder to the training voices: a low-rank adapter (LoRA) for the cascade.

Whisper base mishears the diphone and formant TTS voices the project may train on (word error
rate ~0.22 on voiced training captions), and every misheard word moves a cascaded query away
from its photo. The adapter adds `B @ A` (rank `r`) to each linear layer of the decoder's six
blocks; the encoder, embeddings and layer norms stay as packaged. It trains on cached encoder
states of voiced captions (`xmodal speech-corpus`), the transcript target being the caption
as Whisper writes text (". " not " . ", a capital first letter), read with the bundle's Whisper
prompt as the previous text in `context_share` of the steps (inference uses it) and without
in the rest (inference falls back to no prompt). The bundle stores the factors
(`engine.speech.WhisperAdapter`); the engine merges them into a copy of the packaged weights
once (`engine.speech.prepare_whisper`).

The decoder here is a float32 torch copy of CTranslate2's (`TorchDecoder`), read from the
joined `model.bin`: its greedy transcripts match CTranslate2's (tests/trainer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.ct2 import read_array, read_index
from engine.errors import MediaError, XmodalError
from engine.media import SAMPLE_RATE
from engine.speech import ENCODER_WIDTH, WhisperAdapter, decoder_prompt

log = logging.getLogger(__name__)

LAYERS = 6  # decoder blocks of Whisper base
HEADS = 8
MAX_SECONDS = 10  # longer clips are left out: their encoder window is wider
STATES = 500  # encoder states of a clip of up to 10 s (engine.speech.MIN_FRAMES / 2)
CHUNK = 256  # clips per cached states file
# the decoder's linear layers, by CTranslate2 name: fused q|k|v and output of the
# self-attention, query, fused k|v and output of the cross-attention, the feed-forward pair
LINEARS = (
    "self_attention/linear_0",
    "self_attention/linear_1",
    "attention/linear_0",
    "attention/linear_1",
    "attention/linear_2",
    "ffn/linear_0",
    "ffn/linear_1",
)


KL_CLIPS = 4  # clips of each step that the KL term (`TuneConfig.kl_weight`) is taken on


@dataclass(frozen=True)
class TuneConfig:
    rank: int = 16  # of each low-rank update
    alpha: float = 16.0  # LoRA scale: the update is (alpha / rank) * B @ A
    epochs: float = 2.0
    lr: float = 5e-4
    batch_size: int = 16
    context_share: float = 0.8  # steps that read the prompt as the previous text
    seed: int = 0
    # weight of KL(packaged ‖ adapted) over the next-token distributions from the
    # start-of-transcript token on (its no-speech probability included): keeps the decoder near
    # the packaged one where the captions do not pull it away (0: cross-entropy alone)
    kl_weight: float = 0.0


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable `scale * B @ A` (B starts at zero)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, rank: int, alpha: float):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight, dtype=torch.float32), requires_grad=False)
        self.bias = (
            None
            if bias is None
            else nn.Parameter(torch.tensor(bias, dtype=torch.float32), requires_grad=False)
        )
        out_dim, in_dim = self.weight.shape
        self.rank, self.scale = rank, alpha / max(rank, 1)
        self.A = nn.Parameter(torch.randn(rank, in_dim) / math.sqrt(in_dim))
        self.B = nn.Parameter(torch.zeros(out_dim, rank))
        self.enabled = True  # False: the frozen layer alone (`TorchDecoder.packaged`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.rank and self.enabled:
            y = y + F.linear(F.linear(x, self.A), self.B) * self.scale
        return y

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """`(A, scale * B)`: the update is their product."""
        return self.A.detach().numpy().copy(), (self.B.detach() * self.scale).numpy()


class _LayerNorm(nn.Module):
    def __init__(self, gamma: np.ndarray, beta: np.ndarray):
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor(gamma, dtype=torch.float32), requires_grad=False)
        self.beta = nn.Parameter(torch.tensor(beta, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta, 1e-5)


def _split_heads(x: torch.Tensor) -> torch.Tensor:
    n, t, d = x.shape
    return x.view(n, t, HEADS, d // HEADS).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(_split_heads(q), _split_heads(k), _split_heads(v), mask)
    return out.transpose(1, 2).reshape(q.shape)


class _Block(nn.Module):
    def __init__(self, var, prefix: str, rank: int, alpha: float):
        super().__init__()

        def norm(part: str) -> _LayerNorm:
            return _LayerNorm(var(f"{prefix}/{part}/layer_norm/gamma"), var(f"{prefix}/{part}/layer_norm/beta"))  # fmt: skip

        self.norms = nn.ModuleList(norm(p) for p in ("self_attention", "attention", "ffn"))
        self.linears = nn.ModuleDict(
            {
                name.replace("/", "__"): LoRALinear(
                    var(f"{prefix}/{name}/weight"), var(f"{prefix}/{name}/bias"), rank, alpha
                )
                for name in LINEARS
            }
        )

    def forward(self, x: torch.Tensor, states: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        lin = {k.replace("__", "/"): m for k, m in self.linears.items()}
        q, k, v = lin["self_attention/linear_0"](self.norms[0](x)).split(x.shape[-1], dim=-1)
        x = x + lin["self_attention/linear_1"](_attend(q, k, v, causal))
        q = lin["attention/linear_0"](self.norms[1](x))
        k, v = lin["attention/linear_1"](states).split(x.shape[-1], dim=-1)
        x = x + lin["attention/linear_2"](_attend(q, k, v))
        return x + lin["ffn/linear_1"](F.gelu(lin["ffn/linear_0"](self.norms[2](x))))


class TorchDecoder(nn.Module):
    """Whisper base's decoder in float32 torch, from a CTranslate2 `model.bin`, with a LoRA
    update (rank 0: none) on every linear layer of its blocks."""

    def __init__(self, model_bin: Path, *, rank: int = 0, alpha: float = 16.0):
        super().__init__()
        data = Path(model_bin).read_bytes()
        index = read_index(data, source=str(model_bin))

        def var(name: str) -> np.ndarray | None:
            return np.array(read_array(data, index[name])) if name in index else None

        def frozen(name: str) -> nn.Parameter:
            return nn.Parameter(torch.tensor(var(name), dtype=torch.float32), requires_grad=False)

        self.embeddings = frozen("decoder/embeddings/weight")  # tied to the output projection
        self.positions = frozen("decoder/position_encodings/encodings")
        self.blocks = nn.ModuleList(
            _Block(var, f"decoder/layer_{i}", rank, alpha) for i in range(LAYERS)
        )
        self.final_norm = _LayerNorm(var("decoder/layer_norm/gamma"), var("decoder/layer_norm/beta"))  # fmt: skip

    def hidden(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """`(n, t)` token ids and `(n, s, 512)` encoder states → `(n, t, 512)` final states."""
        t = tokens.shape[1]
        x = F.embedding(tokens, self.embeddings) + self.positions[:t]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        for block in self.blocks:
            x = block(x, states, causal)
        return self.final_norm(x)

    def forward(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Next-token logits `(n, t, vocabulary)`."""
        return self.hidden(tokens, states) @ self.embeddings.T

    @contextlib.contextmanager
    def packaged(self) -> Iterator[None]:
        """Run the packaged decoder inside: every update switched off."""
        lins = [lin for block in self.blocks for lin in block.linears.values()]
        for lin in lins:
            lin.enabled = False
        try:
            yield
        finally:
            for lin in lins:
                lin.enabled = True

    def adapter(self) -> WhisperAdapter:
        """The trained updates, by CTranslate2 variable name."""
        factors = {}
        for i, block in enumerate(self.blocks):
            for key, lin in block.linears.items():
                factors[f"decoder/layer_{i}/{key.replace('__', '/')}/weight"] = lin.factors()
        return WhisperAdapter(factors)


def as_written(caption: str) -> str:
    """A caption as Whisper writes text: no space before punctuation, one space between words,
    a capital first letter ("a dog runs , jumps ." → "A dog runs, jumps.")."""
    text = re.sub(r"\s+", " ", re.sub(r"\s+([.,!?;:])", r"\1", caption.strip()))
    return text[:1].upper() + text[1:]


@dataclass
class StateCache:
    """Encoder states of voiced captions, `(n, 500, 512)` float16, and their captions."""

    states: np.ndarray
    captions: list[str]


def cache_states(
    audio: Sequence[Path], captions: Sequence[str], whisper, cache_dir: Path, *, progress=False
) -> StateCache:
    """Whisper's encoder states of each clip as inference computes them (a window of 10 s,
    `engine.speech.MIN_FRAMES`), cached in `cache_dir` by chunks of `CHUNK` clips. A chunk's
    file is named by its clips (path, size, modification time) and captions, so a rerun, or a
    manifest that only appends rows, reuses what is there. Clips longer than `MAX_SECONDS` or
    unreadable are left out, with a warning."""
    from tqdm import tqdm

    from engine.media import load_audio

    if len(audio) != len(captions):
        raise ValueError(f"{len(audio)} clips but {len(captions)} captions")
    folder = Path(cache_dir) / "whisper-states"
    folder.mkdir(parents=True, exist_ok=True)
    parts, kept = [], []
    starts = range(0, len(audio), CHUNK)
    for start in tqdm(starts, desc="encoder states", unit="chunk", disable=not progress):
        rows = range(start, min(start + CHUNK, len(audio)))
        path = folder / f"{_chunk_key([audio[i] for i in rows], [captions[i] for i in rows])}.npz"
        if not path.exists():
            states = np.zeros((len(rows), STATES, ENCODER_WIDTH), np.float16)
            keep = np.zeros(len(rows), bool)
            clips = {}
            for j, i in enumerate(rows):
                try:
                    clips[j] = load_audio(audio[i])
                except MediaError as exc:
                    log.warning("skipping %s", exc)
                    continue
                if len(clips[j]) > MAX_SECONDS * SAMPLE_RATE:
                    log.warning("skipping %s: longer than %d s", audio[i], MAX_SECONDS)
                    del clips[j]
            # clips of up to 10 s get the 10 s window alone or together (engine.speech.
            # MIN_FRAMES), so they are encoded several at a time, on Whisper's workers
            for group in _groups(list(clips), whisper.workers * 4):
                encoded = whisper.encode([clips[j] for j in group])
                states[group], keep[group] = encoded.states, True
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, states=states, keep=keep)
            tmp.replace(path)
        with np.load(path) as z:
            keep = z["keep"]
            parts.append(z["states"][keep])
        kept += [captions[start + j] for j in np.flatnonzero(keep)]
    if not kept:
        raise XmodalError("no clip could be encoded")
    return StateCache(np.concatenate(parts), kept)


def _chunk_key(audio: Sequence[Path], captions: Sequence[str]) -> str:
    """Names a chunk of cached states: its clips (path, size, modification time: a clip
    written again gets new states) and captions, and the states' shape."""
    key = hashlib.sha256(f"{STATES} {ENCODER_WIDTH}".encode())
    for a, c in zip(audio, captions, strict=True):
        try:
            st = Path(a).stat()
            stamp = f"{st.st_size} {st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        key.update(f"\n{a}\t{stamp}\t{c}".encode())
    return key.hexdigest()[:20]


def _groups(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def train_adapter(
    decoder: TorchDecoder,
    cache: StateCache,
    tokenizer,
    *,
    context: str,
    cfg: TuneConfig,
    progress: bool = False,
) -> list[float]:
    """Train `decoder`'s LoRA factors on `cache` (teacher forcing, cross-entropy on the
    transcript tokens and the end token, plus `cfg.kl_weight` times the mean KL divergence of
    the adapted next-token distributions from the packaged decoder's, at every position from
    the start-of-transcript token on); returns the loss of every step."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    plain, prompted = decoder_prompt(tokenizer), decoder_prompt(tokenizer, context)
    end = tokenizer.token_to_id("<|endoftext|>")
    targets = [
        tokenizer.encode(" " + as_written(c), add_special_tokens=False).ids + [end]
        for c in cache.captions
    ]
    params = [p for p in decoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps = max(1, round(cfg.epochs * len(targets) / cfg.batch_size))
    warm = max(1, min(50, steps // 10))

    def lr_at(step: int) -> float:
        return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order: list[int] = []
    losses = []
    decoder.train()
    bar = tqdm(range(steps), desc="whisper adapter", unit="step", disable=not progress)
    for _ in bar:
        if len(order) < cfg.batch_size:
            order = rng.sample(range(len(targets)), len(targets))
        batch = [order.pop() for _ in range(min(cfg.batch_size, len(order)))]
        seqs, labels, starts = [], [], []
        for i in batch:
            with_context = context.strip() and rng.random() < cfg.context_share
            prefix = prompted if with_context else plain
            seqs.append(prefix + targets[i][:-1])
            labels.append([-100] * (len(prefix) - 1) + targets[i])
            starts.append(len(prefix) - len(plain))  # the start-of-transcript token
        width = max(map(len, seqs))
        tokens = torch.tensor([s + [end] * (width - len(s)) for s in seqs])
        label = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        states = torch.from_numpy(cache.states[batch].astype(np.float32))
        # next-token logits only where a loss reads them (the vocabulary is 51,865 wide)
        if cfg.kl_weight:
            span = torch.arange(width)
            keep = torch.stack(
                [(span >= a) & (span < len(s)) for a, s in zip(starts, seqs, strict=True)]
            )  # from the start-of-transcript token on: a superset of the labelled positions
        else:
            keep = label != -100
        logits = decoder.hidden(tokens, states)[keep] @ decoder.embeddings.T
        loss = F.cross_entropy(logits, label[keep], ignore_index=-100)
        if cfg.kl_weight:
            # on the first KL_CLIPS clips of the step only: the packaged decoder's pass costs
            # about as much as the adapted one's (cross-attention over 500 frames per clip)
            k = min(KL_CLIPS, len(batch))
            with torch.no_grad(), decoder.packaged():
                packaged = decoder.hidden(tokens[:k], states[:k])[keep[:k]] @ decoder.embeddings.T
            kl = F.kl_div(
                F.log_softmax(logits[: len(packaged)], dim=-1), F.log_softmax(packaged, dim=-1),
                log_target=True, reduction="batchmean",
            )  # fmt: skip
            loss = loss + cfg.kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    decoder.eval()
    return losses


@dataclass(frozen=True)
class TuneReport:
    clips: int  # clips trained on (readable, at most 10 s)
    losses: list[float]  # of every step


def tune_whisper(
    bundle: Path,
    manifests: Path | Sequence[Path],
    *,
    cache_dir: Path,
    cfg: TuneConfig = TuneConfig(),
    progress: bool = False,
) -> TuneReport:
    """Train a Whisper adapter on the voiced captions of `manifests` (rows with `audio`, in
    the order given) and write it into `bundle` (config `speech.adapter`,
    `whisper_adapter.safetensors`). The adapter starts from the packaged weights, whatever the
    bundle had."""
    from engine.model import load_model
    from engine.speech import Whisper, prepare_whisper
    from trainer.manifest import read_manifest

    model = load_model(bundle)
    manifests = [manifests] if isinstance(manifests, str | Path) else list(manifests)
    rows = [r for m in manifests for r in read_manifest(m).rows if r.audio is not None]
    if not rows:
        names = ", ".join(str(m) for m in manifests)
        raise XmodalError(f"{names}: no rows with audio to tune Whisper on")
    whisper = Whisper()  # the packaged weights: states are what the adapter's decoder reads
    cache = cache_states(
        [r.audio for r in rows], [r.caption for r in rows], whisper, cache_dir, progress=progress
    )
    decoder = TorchDecoder(prepare_whisper() / "model.bin", rank=cfg.rank, alpha=cfg.alpha)
    losses = train_adapter(
        decoder, cache, whisper.tokenizer, context=model.config.speech.prompt, cfg=cfg,
        progress=progress,
    )  # fmt: skip
    give_adapter(bundle, decoder.adapter())
    return TuneReport(clips=len(cache.captions), losses=losses)


def give_adapter(bundle: Path, adapter: WhisperAdapter) -> None:
    """Write `adapter` into `bundle` and name it in its config (`speech.adapter`), replacing
    any adapter it had. A bundle whose config cannot be read fails before anything is written."""
    config = ModelConfig.load(bundle)
    adapter.save(bundle)  # first: until the config names it, loaders ignore it
    dataclasses.replace(config, speech=dataclasses.replace(config.speech, adapter=True)).save(
        bundle
    )
