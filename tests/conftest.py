"""Shared fixtures: a small deterministic stand-in embedder, tiny media, index checks.

`StubEmbedder` hashes text tokens, image pixel statistics and audio spectra into seeded
random projections (dim 32): deterministic across processes, so a killed subprocess and
its rerun agree. `make_stub` is its factory for `--model conftest:make_stub`; environment
variables make it kill its own process at chosen points (see `make_stub`).
"""

from __future__ import annotations

import hashlib
import os
import signal
import wave
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.embedder import SpeechEmbedding, l2_normalize

STUB_DIM = 32
SAMPLE_RATE = 16_000  # Hz
IMAGE_FEATURES = 8 * 8 + 3  # grey thumbnail + channel means
AUDIO_BANDS = 16  # log-spectrum bands of a clip


def _projection(seed: int, rows: int, dim: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def _token_vector(token: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class StubEmbedder:
    """A deterministic `Embedder` for tests; `calls` counts items embedded per modality."""

    def __init__(self, *, dim: int = STUB_DIM, fingerprint: str = "stub-v1", name: str = "stub"):
        self.name, self.dim, self.fingerprint = name, dim, fingerprint
        self.calls: Counter[str] = Counter()
        self._image_proj = _projection(1, IMAGE_FEATURES, dim)
        self._audio_proj = _projection(2, AUDIO_BANDS + 1, dim)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        self._count("text", len(texts))
        rows = [sum((_token_vector(t, self.dim) for t in text.lower().split()),
                    np.zeros(self.dim, np.float32)) for text in texts]  # fmt: skip
        return l2_normalize(np.stack(rows)) if rows else np.zeros((0, self.dim), np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self._count("image", len(images))
        feats = []
        for img in images:
            grey = np.asarray(img.convert("L").resize((8, 8)), np.float32).ravel() / 255 - 0.5
            means = np.asarray(img.convert("RGB"), np.float32).reshape(-1, 3).mean(0) / 255
            feats.append(np.concatenate([grey, means]))
        return l2_normalize(np.stack(feats) @ self._image_proj)

    def embed_speech(self, clips: Sequence[np.ndarray]) -> SpeechEmbedding:
        self._count("speech", len(clips))
        feats = []
        for clip in clips:
            spectrum = np.abs(np.fft.rfft(clip, n=1024))
            bands = np.log1p([b.mean() for b in np.array_split(spectrum, AUDIO_BANDS)])
            feats.append(np.append(bands, np.log1p(len(clip) / SAMPLE_RATE)))
        vectors = l2_normalize(np.asarray(feats, np.float32) @ self._audio_proj)
        return SpeechEmbedding(vectors, [f"{len(c) / SAMPLE_RATE:.1f} seconds" for c in clips])

    def _count(self, modality: str, n: int) -> None:
        self.calls[modality] += n


class _KillingStub(StubEmbedder):
    """Logs every embed call to $XMODAL_STUB_LOG; SIGKILLs itself after
    $XMODAL_STUB_KILL_AFTER calls."""

    batches = 0

    def _count(self, modality: str, n: int) -> None:
        super()._count(modality, n)
        if log := os.environ.get("XMODAL_STUB_LOG"):
            with open(log, "a") as f:
                f.write(f"{modality} {n}\n")
        self.batches += 1
        if self.batches == int(os.environ.get("XMODAL_STUB_KILL_AFTER", "0")):
            os.kill(os.getpid(), signal.SIGKILL)


def make_stub() -> StubEmbedder:
    """The stand-in for a subprocess (`--model conftest:make_stub`).

    $XMODAL_STUB_KILL_AT = before_replace | after_replace | after_commit, with
    $XMODAL_STUB_KILL_NTH (default 1), SIGKILLs the process at that step of the Nth commit
    that saves vectors: before the new FAISS file is renamed into place, after it is in
    place but before SQLite commits, or after SQLite commits but before old files go.
    """
    point = os.environ.get("XMODAL_STUB_KILL_AT")
    if point:
        _install_kill(point, int(os.environ.get("XMODAL_STUB_KILL_NTH", "1")))
    return _KillingStub()


def _install_kill(point: str, nth: int) -> None:
    import engine.store
    import engine.vectors

    seen = Counter()

    def hit(name: str) -> None:
        seen[name] += 1
        if seen[name] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace, real_fsync_dir = os.replace, engine.vectors.fsync_dir
    real_commit = engine.store.Store.commit

    def replace(src, dst, *args, **kwargs):
        if point == "before_replace" and str(src).endswith(".faiss.tmp"):
            hit(point)
        return real_replace(src, dst, *args, **kwargs)

    def fsync_dir(directory):
        real_fsync_dir(directory)
        if point == "after_replace":
            hit(point)

    def commit(self, changes):
        real_commit(self, changes)
        if point == "after_commit" and any(k.startswith("vectors:") for k in changes.meta):
            hit(point)

    os.replace = replace
    engine.vectors.fsync_dir = fsync_dir
    engine.store.Store.commit = commit


# ---- index checks ------------------------------------------------------------------------


def assert_consistent(index_dir: str | Path, fingerprint: str | None = "stub-v1") -> None:
    """Vector ids equal row ids per modality, counts match, the model fingerprint matches,
    and a fresh open from disk agrees."""
    from engine.search import check_index
    from engine.store import Store

    problems = check_index(index_dir)
    assert problems == [], problems
    store = Store.open(index_dir)
    try:
        meta = store.meta()
        if fingerprint is not None and "model_fingerprint" in meta:
            assert meta["model_fingerprint"] == fingerprint
        for rec in store.files().values():  # a file's rows all describe the same bytes
            rows = store.get(rec.ids, ["content_hash", "segment"])
            assert {r["content_hash"] for r in rows} == {rec.content_hash}
            assert sorted(r["segment"] for r in rows) == list(range(len(rows)))
    finally:
        store.close()


# ---- tiny media --------------------------------------------------------------------------


def write_png(path: Path, seed: int, *, size: int = 16, noise: float = 0.0) -> Path:
    """A random-pattern RGB image; `noise` > 0 perturbs it (a near-duplicate of `seed`)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3)).astype(np.float32)
    if noise:
        pixels += np.random.default_rng(seed + 1000).normal(0, noise, pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def write_wav(path: Path, seconds: float, *, freq: float = 440.0, rate: int = SAMPLE_RATE,
              seed: int = 0) -> Path:  # fmt: skip
    """A 16-bit mono tone with a little seeded noise."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, len(t))
    samples = np.clip(0.5 * np.sin(2 * np.pi * freq * t) + noise, -1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def write_note(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


NOTES = {
    "beach.txt": "a dog running on the sunny beach near the sea",
    "recipe.md": "# soup\n\nboil the carrots and onions for twenty minutes",
}


def make_media(folder: Path) -> Path:
    """Three images, two recordings, two notes: seven files, one vector each."""
    for i in range(3):
        write_png(folder / "photos" / f"img{i}.png", seed=i)
    write_wav(folder / "audio" / "low.wav", 1.0, freq=220.0)
    write_wav(folder / "audio" / "high.wav", 1.5, freq=3000.0, seed=1)
    for name, text in NOTES.items():
        write_note(folder / "notes" / name, text)
    return folder


@pytest.fixture
def stub() -> StubEmbedder:
    return StubEmbedder()


@pytest.fixture
def media(tmp_path: Path) -> Path:
    return make_media(tmp_path / "media")


@pytest.fixture
def built(tmp_path: Path, media: Path, stub: StubEmbedder) -> Path:
    """An index of `media` built with `stub`."""
    from indexer.runner import index_folders

    index_dir = tmp_path / "index"
    index_folders([media], index_dir, stub, model_source="conftest:make_stub")
    return index_dir
