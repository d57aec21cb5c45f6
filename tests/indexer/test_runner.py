"""Indexing runs: incremental changes, bad files, rejected writes, rebuilds, the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import StubEmbedder, assert_consistent, write_png, write_wav

from engine.cli import main
from engine.errors import IndexStateError, MediaError, XmodalError
from engine.store import IndexNotFoundError, Store
from indexer.mapper import Encoded
from indexer.reader import Decoded, Segment
from indexer.runner import _read_ahead, index_folders, remove_paths
from indexer.scan import FileEntry, Work
from indexer.writer import IndexWriter, ModelInfo, WriterConfig

STUB_INFO = ModelInfo("stub", 32, "stub-v1", "conftest:make_stub")


def _rows(index_dir: Path) -> dict[str, tuple[int, ...]]:
    store = Store.open(index_dir)
    try:
        return {Path(p).name: rec.ids for p, rec in store.files().items()}
    finally:
        store.close()


def _errors(index_dir: Path) -> dict[str, str]:
    store = Store.open(index_dir)
    try:
        return {Path(e.path).name: e.reason for e in store.errors()}
    finally:
        store.close()


def _run(media, index_dir, stub, **kw):
    stub.calls.clear()
    summary = index_folders([media], index_dir, stub, **kw)
    assert_consistent(index_dir, fingerprint=stub.fingerprint)
    return summary


def test_incremental_add_change_delete_rename_touch(tmp_path, media, stub):
    index = tmp_path / "index"
    first = _run(media, index, stub)
    assert (first.added, first.items, first.failed) == (7, 7, 0)
    before = _rows(index)

    again = _run(media, index, stub)
    assert (again.unchanged, again.items, sum(stub.calls.values())) == (7, 0, 0)
    assert _rows(index) == before

    write_png(media / "photos" / "new.png", 42)
    s = _run(media, index, stub)
    assert (s.added, s.unchanged, dict(stub.calls)) == (1, 7, {"image": 1})
    after = _rows(index)
    assert {k: v for k, v in after.items() if k != "new.png"} == before
    assert min(after["new.png"]) > max(max(ids) for ids in before.values())

    write_png(media / "photos" / "img1.png", 99)  # new bytes, same name
    s = _run(media, index, stub)
    assert (s.updated, s.items, dict(stub.calls)) == (1, 1, {"image": 1})
    changed = _rows(index)
    assert changed["img1.png"] != after["img1.png"]
    assert {k: v for k, v in changed.items() if k != "img1.png"} == {
        k: v for k, v in after.items() if k != "img1.png"
    }

    (media / "notes" / "recipe.md").unlink()
    s = _run(media, index, stub)
    assert (s.removed, s.items) == (1, 0) and "recipe.md" not in _rows(index)

    os.rename(media / "audio" / "low.wav", media / "audio" / "renamed.wav")
    s = _run(media, index, stub)
    assert (s.renamed, s.items, sum(stub.calls.values())) == (1, 0, 0)
    rows = _rows(index)
    assert rows["renamed.wav"] == changed["low.wav"] and "low.wav" not in rows

    os.utime(media / "audio" / "high.wav", (1e9, 1e9))  # same bytes, new mtime
    s = _run(media, index, stub)
    assert (s.unchanged, s.items, sum(stub.calls.values())) == (7, 0, 0)
    store = Store.open(index)
    assert {r["mtime"] for r in store.get(rows["high.wav"], ["mtime"])} == {1e9}
    store.close()
    s = _run(media, index, stub)  # and now it is skipped without hashing
    assert s.unchanged == 7


def test_remove_paths_and_missing_roots(tmp_path, media, stub):
    index = tmp_path / "index"
    _run(media, index, stub)
    removed = remove_paths(index, [media / "photos", media / "notes" / "beach.txt"])
    assert [Path(p).name for p in removed] == ["beach.txt", "img0.png", "img1.png", "img2.png"]
    assert_consistent(index)
    assert sorted(_rows(index)) == ["high.wav", "low.wav", "recipe.md"]
    with pytest.raises(IndexNotFoundError, match="no xmodal index at"):
        remove_paths(tmp_path / "nowhere", ["x"])
    with pytest.raises(XmodalError, match="does not exist; give folders or files to index"):
        index_folders([tmp_path / "missing"], index, stub)
    assert_consistent(index)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))  # fmt: skip


def _bad_corpus(folder: Path) -> dict[str, str]:
    """Tiny bad files, and a pattern of the reason each must be recorded with."""
    folder.mkdir(parents=True, exist_ok=True)
    good = write_png(folder / "good.png", 1).read_bytes()
    (folder / "corrupt.png").write_bytes(os.urandom(300))
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "wrong-ext.jpg").write_text("this is a note, not a photo")
    (folder / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    (folder / "text.wav").write_text("not audio at all")
    (folder / "noise.flac").write_bytes(os.urandom(500))
    write_wav(folder / "zero-length.wav", 0.0)
    write_wav(folder / "five-hours.wav", 5 * 3600, rate=1)  # a 36 kB file that lasts 5 h
    expected = {
        "corrupt.png": "not a recognized image format",
        "truncated.png": "corrupt or truncated image",
        "zero.png": r"empty file \(0 bytes\)",
        "wrong-ext.jpg": "not a recognized image format",
        "bomb.png": "decompression bomb",
        "text.wav": "cannot decode audio",
        "noise.flac": "cannot decode audio",
        "zero-length.wav": "nothing to index",
        "five-hours.wav": "5.0 h long, over the limit",
    }
    if os.geteuid() != 0:  # root reads anything
        shutil.copy(folder / "good.png", folder / "locked.png")
        os.chmod(folder / "locked.png", 0)
        expected["locked.png"] = "permission denied"
    return expected


def test_bad_files_are_recorded_and_the_rest_indexed(tmp_path, stub):
    folder = tmp_path / "bad"
    expected = _bad_corpus(folder)
    write_wav(folder / "fine.wav", 1.0)
    (folder / "note.txt").write_text("a fine note")
    index = tmp_path / "index"
    s = _run(folder, index, stub)
    assert s.failed == len(expected) and s.added == 3, s.errors
    assert sorted(_rows(index)) == ["fine.wav", "good.png", "note.txt"]
    errors = _errors(index)
    assert sorted(errors) == sorted(expected)
    for name, pattern in expected.items():
        assert re.search(pattern, errors[name]), (name, errors[name])

    s = _run(folder, index, stub)  # a rerun retries them: same errors, nothing else
    assert (s.failed, s.items) == (len(expected), 0)
    write_png(folder / "corrupt.png", 3)  # fixed: indexed, its error cleared
    (folder / "zero.png").unlink()  # gone: its error cleared
    s = _run(folder, index, stub)
    assert s.added == 1 and "corrupt.png" in _rows(index)
    assert "corrupt.png" not in _errors(index) and "zero.png" not in _errors(index)

    out = CliRunner().invoke(main, ["index", "errors", "--index", str(index), "--json"])
    assert out.exit_code == 0
    assert len(json.loads(out.output)) == len(expected) - 2


def test_a_changed_file_that_turns_bad_loses_its_old_rows(tmp_path, media, stub):
    index = tmp_path / "index"
    _run(media, index, stub)
    (media / "photos" / "img0.png").write_bytes(b"garbage now")
    s = _run(media, index, stub)
    assert s.failed == 1 and "img0.png" not in _rows(index)
    assert "img0.png" in _errors(index)


class _Picky(StubEmbedder):
    """Fails on images whose top-left pixel is pure red; returns NaN for pure green ones."""

    def embed_images(self, images):
        firsts = [img.getpixel((0, 0)) for img in images]
        if (255, 0, 0) in firsts:
            raise RuntimeError("model choked")
        out = super().embed_images(images)
        out[[f == (0, 255, 0) for f in firsts]] = np.nan
        return out


def test_embedder_failures_are_isolated_to_their_files(tmp_path, media):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(media / "photos" / "red.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(media / "photos" / "green.png")
    index = tmp_path / "index"
    s = _run(media, index, _Picky(), batch_size=4)
    assert s.added == 7 and s.failed == 2
    errors = _errors(index)
    assert errors["red.png"] == "embedding failed: model choked"
    assert "NaN or infinity" in errors["green.png"]


def test_long_recordings_become_timed_segments_with_transcripts(tmp_path, stub):
    folder = tmp_path / "talks"
    write_wav(folder / "talk.wav", 65.0)
    index = tmp_path / "index"
    s = _run(folder, index, stub, batch_size=2)
    assert (s.added, s.items) == (1, 3)
    store = Store.open(index)
    rows = store.get(_rows(index)["talk.wav"])
    store.close()
    assert [(r["segment"], r["start"], r["end"]) for r in rows] == [
        (0, 0.0, 30.0), (1, 25.0, 55.0), (2, 50.0, 65.0),
    ]  # fmt: skip
    assert [r["text"] for r in rows] == ["30.0 seconds", "30.0 seconds", "15.0 seconds"]
    assert {r["duration"] for r in rows} == {65.0}


def test_commits_every_n_vectors_keep_only_the_latest_files(tmp_path, media, stub):
    index = tmp_path / "index"
    _run(media, index, stub, writer_config=WriterConfig(commit_every=2), batch_size=1)
    store = Store.open(index)
    meta = store.meta()
    store.close()
    assert int(meta["generation"]) >= 4
    assert sorted(p.name for p in index.glob("*.faiss")) == sorted(
        v for k, v in meta.items() if k.startswith("vectors:")
    )


def test_rejected_writes_leave_the_index_consistent(tmp_path, media, stub):
    index = tmp_path / "index"
    _run(media, index, stub)
    before = _rows(index)
    other = ModelInfo("other", 32, "other-v2", "other")
    with pytest.raises(IndexStateError, match=r"built with model 'stub'.*--model other --rebuild"):
        IndexWriter.open(index, other)
    assert_consistent(index)

    writer = IndexWriter.open(index, STUB_INFO)
    with pytest.raises(IndexStateError, match="another xmodal process is writing"):
        IndexWriter.open(index, STUB_INFO)
    work = Work(FileEntry(str(media / "x.png"), "image", 1, 1.0), "h")
    seg = [Segment(None)]
    with pytest.raises(ValueError, match=r"expected vectors of shape \(1, 32\), got \(1, 8\)"):
        writer.add_file(Decoded(work, seg), seg, Encoded(np.ones((1, 8), np.float32), None))
    with pytest.raises(ValueError, match="NaN or infinity"):
        writer.add_file(Decoded(work, seg), seg, Encoded(np.full((1, 32), np.nan), None))
    writer.close()
    assert_consistent(index)
    assert _rows(index) == before

    writer = IndexWriter.open(index, STUB_INFO)
    writer.add_file(Decoded(work, seg), seg, Encoded(np.ones((1, 32), np.float32), None))
    writer.release()  # dropped without a commit: as if killed
    assert_consistent(index)
    assert _rows(index) == before


def test_rebuild_with_another_model(tmp_path, media, stub):
    index = tmp_path / "index"
    _run(media, index, stub)
    other = StubEmbedder(fingerprint="other-v2", name="other")
    with pytest.raises(IndexStateError, match="--rebuild"):
        index_folders([media], index, other)
    s = _run(media, index, other, rebuild=True)
    assert (s.added, s.items) == (7, 7)
    assert_consistent(index, fingerprint="other-v2")


def test_cli_index_sync_remove_errors(tmp_path, media):
    index = tmp_path / "index"
    runner = CliRunner()
    args = ["index", str(media), "--index", str(index), "--model", "conftest:make_stub"]
    out = runner.invoke(main, [*args, "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert (summary["added"], summary["items"], summary["failed"]) == (7, 7, 0)
    out = runner.invoke(main, args)
    assert out.exit_code == 0 and "7 files: 0 added" in out.output and "items/s" in out.output
    out = runner.invoke(main, ["index", "remove", str(media / "photos"), "--index", str(index)])
    assert out.exit_code == 0 and "removed 3 files" in out.output
    assert_consistent(index)
    out = runner.invoke(main, ["index", "errors", "--index", str(index)])
    assert out.exit_code == 0
    out = runner.invoke(main, [*args[:4], "--model", "other:thing"])
    assert out.exit_code == 2 and "cannot load embedder 'other:thing'" in out.output


def test_read_ahead_decodes_in_order_and_at_most_depth_ahead():
    import threading

    started: list[int] = []
    lock = threading.Lock()

    def reader(work):
        with lock:
            started.append(work)
        if work == 3:
            raise MediaError(f"/f{work}", "bad file")
        return f"decoded {work}"

    seen = []
    for work, read in _read_ahead(list(range(10)), reader, depth=2):
        read.exception()  # wait for this one
        with lock:
            assert len(started) <= work + 3  # this file and at most `depth` more were started
        if work == 3:
            assert isinstance(read.exception(), MediaError)
        else:
            assert read.result() == f"decoded {work}"
        seen.append(work)
    assert seen == list(range(10)) and sorted(started) == list(range(10))


def test_text_reaches_the_embedder_several_batches_at_a_time(tmp_path, stub):
    """The text tower sorts a call's texts by length before batching: bigger calls, less
    padding. Other modalities keep `batch_size` per call."""
    from indexer.mapper import TEXT_BATCHES

    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(TEXT_BATCHES + 1):
        (folder / f"n{i}.txt").write_text(f"note number {i}\n")
    sizes = []
    real = stub.embed_text
    stub.embed_text = lambda texts: sizes.append(len(texts)) or real(texts)
    s = _run(folder, tmp_path / "index", stub, batch_size=1)
    assert s.added == TEXT_BATCHES + 1
    assert sizes == [TEXT_BATCHES, 1]
