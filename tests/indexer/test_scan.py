"""Scanning folders and planning a run: what is new, changed, renamed, touched or gone."""

from __future__ import annotations

import os

from engine.store import FileRecord
from indexer.scan import FileEntry, content_hash, is_under, modality_of, plan, scan


def test_modality_by_extension():
    assert modality_of("a/B.JPG") == "image"
    assert modality_of("x.flac") == "speech"
    assert modality_of("x.m4a") == "speech" and modality_of("x.m4a", ffmpeg=False) is None
    assert modality_of("notes.md") == "text"
    assert modality_of("movie.mkv") is None


def test_scan_is_recursive_sorted_and_skips_non_media_fifos_and_symlinked_dirs(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("b/2.png", "a/deep/1.wav", "a/x.txt", "a/skip.exe"):
        (tmp_path / name).write_bytes(b"x")
    os.mkfifo(tmp_path / "a" / "pipe.wav")
    os.symlink(tmp_path / "a", tmp_path / "b" / "loop")
    found = list(scan([tmp_path, tmp_path / "a" / "x.txt"]))  # a file root, seen twice
    rel = [os.path.relpath(e.path, tmp_path) for e in found]
    assert rel == ["a/x.txt", "a/deep/1.wav", "b/2.png"]
    assert [e.modality for e in found] == ["text", "speech", "image"]
    assert found[0].size == 1


def test_content_hash_depends_on_bytes_only(tmp_path):
    (tmp_path / "a").write_bytes(b"same")
    (tmp_path / "b").write_bytes(b"same")
    (tmp_path / "c").write_bytes(b"other")
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "b")
    assert content_hash(tmp_path / "a") != content_hash(tmp_path / "c")


def test_is_under():
    assert is_under("/m/a/b.png", ["/m/a"]) and is_under("/m/a", ["/m/a"])
    assert not is_under("/m/ab/c.png", ["/m/a"])


def _rec(path, digest, size=1, mtime=1.0, ids=(1,), modality="image"):
    return FileRecord(path, modality, digest, size, mtime, ids)


def test_plan_sorts_every_file_into_one_bucket():
    hashes = {"/r/new.png": "n", "/r/changed.png": "c2", "/r/touched.png": "t",
              "/r/moved-here.png": "m"}  # fmt: skip
    known = {
        "/r/same.png": _rec("/r/same.png", "s"),
        "/r/changed.png": _rec("/r/changed.png", "c1", ids=(7, 8)),
        "/r/touched.png": _rec("/r/touched.png", "t"),
        "/r/moved-away.png": _rec("/r/moved-away.png", "m"),
        "/r/gone.png": _rec("/r/gone.png", "g"),
        "/elsewhere/kept.png": _rec("/elsewhere/kept.png", "k"),  # not under the roots
    }
    scanned = [FileEntry("/r/same.png", "image", 1, 1.0)] + [
        FileEntry(p, "image", 2, 2.0) for p in hashes
    ]
    todo = plan(scanned, known, ["/r"], hasher=hashes.__getitem__)
    assert todo.unchanged == 1
    assert [(w.entry.path, w.content_hash, w.replaces) for w in todo.work] == [
        ("/r/changed.png", "c2", (7, 8)), ("/r/new.png", "n", ()),
    ]  # fmt: skip
    assert todo.changed == 1
    assert [e.path for e in todo.touched] == ["/r/touched.png"]
    assert [(old, e.path) for old, e in todo.moves] == [("/r/moved-away.png", "/r/moved-here.png")]
    assert [r.path for r in todo.removed] == ["/r/gone.png"]


def test_plan_records_unreadable_files_and_drops_their_old_rows():
    def hasher(path):
        raise PermissionError(13, "Permission denied")

    known = {"/r/a.png": _rec("/r/a.png", "old")}
    todo = plan([FileEntry("/r/a.png", "image", 5, 5.0)], known, ["/r"], hasher=hasher)
    assert todo.failed == [("/r/a.png", "permission denied")]
    assert [r.path for r in todo.removed] == ["/r/a.png"]
