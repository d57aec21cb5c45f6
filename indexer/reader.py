"""Decoding files into segments: what one vector is made from.

An image is one segment; a text note is split into passages; a recording is split into
timed windows of at most `SEGMENT_SECONDS` with `SEGMENT_OVERLAP` seconds of overlap, read
window by window so that a long recording never sits in memory whole. Every failure is a
`MediaError` naming the file and the reason.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import MediaError
from engine.media import MAX_AUDIO_SECONDS, SAMPLE_RATE, load_audio, load_text, open_image, resample
from indexer.scan import Work

log = logging.getLogger(__name__)

SEGMENT_SECONDS = 30.0  # longest window embedded as one speech vector (Whisper's context)
SEGMENT_OVERLAP = 5.0  # seconds shared by consecutive windows, so no phrase is cut in two
MAX_PASSAGE_CHARS = 1_000  # a text note is split into passages of about this length
MIN_AUDIO_SECONDS = 0.1  # shorter recordings hold nothing to embed
MAX_IMAGE_SIDE = 1_024  # pixels; larger photos are shrunk before batching (encoders use less)
DECODE_MIN_SIDE = 224  # pixels; the image tower resizes the shorter side to 224 anyway


@dataclass(frozen=True)
class Segment:
    """The input of one vector."""

    payload: Any  # PIL RGB image, (samples,) float32 waveform at SAMPLE_RATE, or a str
    segment: int = 0  # position within the file
    start: float | None = None  # seconds (speech)
    end: float | None = None  # seconds (speech)
    text: str | None = None  # the passage (text notes)


@dataclass
class Decoded:
    """A file ready to embed; `segments` may be a lazy iterator that raises `MediaError`."""

    work: Work
    segments: Any  # Iterable[Segment]
    duration: float | None = None  # seconds (speech)
    width: int | None = None  # pixels (image)
    height: int | None = None  # pixels (image)


@dataclass(frozen=True)
class ReaderConfig:
    """How files are cut into segments."""

    segment_seconds: float = SEGMENT_SECONDS  # longest speech window
    overlap_seconds: float = SEGMENT_OVERLAP  # overlap of consecutive windows
    max_audio_seconds: float = MAX_AUDIO_SECONDS  # longer recordings are skipped
    passage_chars: int = MAX_PASSAGE_CHARS  # target passage length of text notes
    max_image_side: int = MAX_IMAGE_SIDE  # longest image side kept in memory, pixels
    decode_min_side: int = DECODE_MIN_SIDE  # JPEGs decode at reduced scale down to this side


def read_file(work: Work, config: ReaderConfig = ReaderConfig()) -> Decoded:
    """Decode `work`'s file by modality. Raises `MediaError` for an unusable file."""
    entry = work.entry
    if entry.size == 0:
        raise MediaError(entry.path, "empty file (0 bytes)")
    if entry.modality == "image":
        image, (width, height) = open_image(entry.path, min_side=config.decode_min_side)
        image.thumbnail((config.max_image_side, config.max_image_side))  # keeps aspect ratio
        return Decoded(work, [Segment(image)], width=width, height=height)
    if entry.modality == "text":
        passages = split_passages(load_text(entry.path), config.passage_chars)
        if not passages:
            raise MediaError(entry.path, "text note is empty")
        return Decoded(work, [Segment(p, i, text=p) for i, p in enumerate(passages)])
    return _read_audio(work, config)


def segment_bounds(duration: float, seconds: float, overlap: float) -> list[tuple[float, float]]:
    """`(start, end)` seconds of the windows covering `duration`; each adds new audio."""
    if duration <= seconds:
        return [(0.0, duration)]
    hop = seconds - overlap
    count = math.ceil((duration - overlap) / hop)
    return [(i * hop, min(i * hop + seconds, duration)) for i in range(count)]


def _read_audio(work: Work, config: ReaderConfig) -> Decoded:
    import soundfile as sf

    path = work.entry.path
    try:
        info = sf.info(path)
        duration, rate = info.frames / info.samplerate, int(info.samplerate)
    except Exception:  # noqa: BLE001 - not libsndfile's: decode through ffmpeg, whole
        return _whole_audio(work, config)
    _check_duration(path, duration, config)
    bounds = segment_bounds(duration, config.segment_seconds, config.overlap_seconds)
    return Decoded(work, _windows(path, rate, bounds), duration=duration)


def _check_duration(path: str, duration: float, config: ReaderConfig) -> None:
    if duration < MIN_AUDIO_SECONDS:
        raise MediaError(path, f"audio is {duration:.2f} s long, nothing to index")
    if duration > config.max_audio_seconds:
        raise MediaError(
            path, f"audio is {duration / 3600:.1f} h long, over the limit of "
            f"{config.max_audio_seconds / 3600:.1f} h"
        )  # fmt: skip


def _windows(path: str, rate: int, bounds: list[tuple[float, float]]) -> Iterator[Segment]:
    import soundfile as sf

    try:
        with sf.SoundFile(path) as f:
            for i, (start, end) in enumerate(bounds):
                f.seek(int(start * rate))
                data = f.read(int(round((end - start) * rate)), dtype="float32", always_2d=True)
                if len(data) == 0:
                    raise MediaError(path, f"audio ends before {start:.1f} s (truncated?)")
                mono = np.nan_to_num(data.mean(axis=1), nan=0.0, posinf=0.0, neginf=0.0)
                yield Segment(resample(mono, rate), i, start, end)
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile raises several types
        raise MediaError(path, f"cannot decode audio: {exc}") from exc


def _whole_audio(work: Work, config: ReaderConfig) -> Decoded:
    samples = load_audio(work.entry.path, max_seconds=config.max_audio_seconds)
    duration = len(samples) / SAMPLE_RATE
    _check_duration(work.entry.path, duration, config)
    bounds = segment_bounds(duration, config.segment_seconds, config.overlap_seconds)
    segments = [
        Segment(samples[int(s * SAMPLE_RATE) : int(e * SAMPLE_RATE)], i, s, e)
        for i, (s, e) in enumerate(bounds)
    ]
    return Decoded(work, segments, duration=duration)


def split_passages(text: str, max_chars: int = MAX_PASSAGE_CHARS) -> list[str]:
    """Paragraphs of `text`, merged up to about `max_chars` and split at sentence or word
    boundaries when longer; whitespace-only text gives no passages."""
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        pieces.extend(_split_long(para, max_chars) if para else [])
    passages: list[str] = []
    for piece in pieces:
        if passages and len(passages[-1]) + 1 + len(piece) <= max_chars:
            passages[-1] += "\n" + piece
        else:
            passages.append(piece)
    return passages


def _split_long(para: str, max_chars: int) -> list[str]:
    if len(para) <= max_chars:
        return [para]
    out: list[str] = []
    current = ""
    for word in para.split():
        while len(word) > max_chars:  # a single huge "word": cut it
            if current:
                out.append(current)
                current = ""
            out.append(word[:max_chars])
            word = word[max_chars:]
        if current and len(current) + 1 + len(word) > max_chars:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        out.append(current)
    return out
