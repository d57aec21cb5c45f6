"""Decoding files into segments: passages, timed audio windows, and the failures."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_png, write_wav

from engine.errors import MediaError
from indexer.reader import ReaderConfig, read_file, segment_bounds, split_passages
from indexer.scan import FileEntry, Work


def _work(path, modality):
    return Work(FileEntry(str(path), modality, path.stat().st_size, 0.0), "h")


def test_segment_bounds_cover_the_recording_with_overlap():
    assert segment_bounds(12.0, 30.0, 5.0) == [(0.0, 12.0)]
    assert segment_bounds(30.0, 30.0, 5.0) == [(0.0, 30.0)]
    assert segment_bounds(65.0, 30.0, 5.0) == [(0.0, 30.0), (25.0, 55.0), (50.0, 65.0)]
    assert segment_bounds(55.0, 30.0, 5.0) == [(0.0, 30.0), (25.0, 55.0)]


def test_split_passages_merges_short_paragraphs_and_cuts_long_ones():
    assert split_passages("  \n\n \t ") == []
    assert split_passages("one\n\ntwo  words", 100) == ["one\ntwo words"]
    long = " ".join(f"w{i}" for i in range(100))
    parts = split_passages(f"intro\n\n{long}", 50)
    assert all(len(p) <= 50 for p in parts)
    assert " ".join(" ".join(parts).split()) == f"intro {long}"
    assert split_passages("x" * 120, 50) == ["x" * 50, "x" * 50, "x" * 20]


def test_long_recording_is_read_in_timed_windows(tmp_path):
    path = write_wav(tmp_path / "talk.wav", 65.0)
    decoded = read_file(_work(path, "speech"))
    segments = list(decoded.segments)
    assert decoded.duration == pytest.approx(65.0)
    assert [(s.segment, s.start, s.end) for s in segments] == [
        (0, 0.0, 30.0), (1, 25.0, 55.0), (2, 50.0, 65.0),
    ]  # fmt: skip
    assert [len(s.payload) for s in segments] == [480_000, 480_000, 240_000]
    assert segments[0].payload.dtype == np.float32


def test_image_and_note(tmp_path):
    path = write_png(tmp_path / "a.png", 0, size=20)
    image = read_file(_work(path, "image"), ReaderConfig(max_image_side=10))
    assert (image.width, image.height) == (20, 20)  # the file's size is recorded
    assert image.segments[0].payload.size == (10, 10)  # the encoder gets a smaller copy
    (tmp_path / "n.md").write_text("alpha\n\nbeta")
    note = read_file(_work(tmp_path / "n.md", "text"), ReaderConfig(passage_chars=5))
    assert [(s.segment, s.text) for s in note.segments] == [(0, "alpha"), (1, "beta")]


def test_read_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty file \(0 bytes\)"):
        read_file(_work(tmp_path / "empty.png", "image"))
    (tmp_path / "blank.txt").write_text(" \n\n ")
    with pytest.raises(MediaError, match="text note is empty"):
        read_file(_work(tmp_path / "blank.txt", "text"))
    silent = write_wav(tmp_path / "zero.wav", 0.0)
    with pytest.raises(MediaError, match="audio is 0.00 s long, nothing to index"):
        read_file(_work(silent, "speech"))
    long = write_wav(tmp_path / "long.wav", 3 * 3600, rate=1)  # 3 h at 1 Hz: a tiny file
    with pytest.raises(MediaError, match=r"audio is 3.0 h long, over the limit of 1.0 h"):
        read_file(_work(long, "speech"), ReaderConfig(max_audio_seconds=3600))
