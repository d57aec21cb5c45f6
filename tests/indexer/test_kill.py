"""Crash safety: SIGKILL a real `xmodal index` subprocess at several points, then check the
index is consistent and a rerun embeds only the files no commit had recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import StubEmbedder, assert_consistent, make_media, write_png

from engine.store import Store
from indexer.runner import index_folders

TESTS = Path(__file__).resolve().parents[1]
FILES = 10  # one vector each
COMMIT_EVERY = 2  # files per commit, so commits land at 2, 4, 6, ...

# (environment of the stub, files committed before the kill)
KILL_POINTS = {
    "mid-embedding": ({"XMODAL_STUB_KILL_AFTER": "5"}, 4),
    "before-faiss-rename": ({"XMODAL_STUB_KILL_AT": "before_replace", "XMODAL_STUB_KILL_NTH": "2"}, 2),
    "after-faiss-rename": ({"XMODAL_STUB_KILL_AT": "after_replace", "XMODAL_STUB_KILL_NTH": "2"}, 2),
    "after-sqlite-commit": ({"XMODAL_STUB_KILL_AT": "after_commit", "XMODAL_STUB_KILL_NTH": "3"}, 6),
}  # fmt: skip


def _index_subprocess(media: Path, index: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from engine.cli import main; main()", "index", str(media),
           "--index", str(index), "--model", "conftest:make_stub", "--batch-size", "1",
           "--commit-every", str(COMMIT_EVERY), "--no-progress"]  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    full_env = os.environ | {"PYTHONPATH": pythonpath} | env
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=120)


def _committed(index: Path) -> int:
    store = Store.open(index)
    try:
        return len(store.files())
    finally:
        store.close()


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_then_resume(tmp_path, point):
    env, committed = KILL_POINTS[point]
    media = make_media(tmp_path / "media")
    for i in range(FILES - 7):
        write_png(media / "more" / f"extra{i}.png", 50 + i)
    index = tmp_path / "index"
    log = tmp_path / "embed.log"

    proc = _index_subprocess(media, index, env | {"XMODAL_STUB_LOG": str(log)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert_consistent(index)
    assert _committed(index) == committed
    leftovers = _unreferenced(index)  # proof the kill landed where it was meant to
    if point == "before-faiss-rename":
        assert any(name.endswith(".faiss.tmp") for name in leftovers)
    elif point == "after-faiss-rename" or point == "after-sqlite-commit":
        assert any(name.endswith(".faiss") for name in leftovers)

    stub = StubEmbedder()
    summary = index_folders([media], index, stub)
    assert (summary.unchanged, summary.added, summary.items) == (
        committed, FILES - committed, FILES - committed,
    )  # fmt: skip
    assert sum(stub.calls.values()) == FILES - committed  # finished files not re-embedded
    assert_consistent(index)
    assert _committed(index) == FILES
    assert _unreferenced(index) == set()  # the rerun cleaned up


def _unreferenced(index: Path) -> set[str]:
    store = Store.open(index)
    referenced = set(store.meta().values())
    store.close()
    return {p.name for p in index.glob("*faiss*")} - referenced


def test_uninterrupted_subprocess_run_embeds_each_file_once(tmp_path):
    media = make_media(tmp_path / "media")
    log = tmp_path / "embed.log"
    proc = _index_subprocess(media, tmp_path / "index", {"XMODAL_STUB_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr
    assert sum(int(line.split()[1]) for line in log.read_text().splitlines()) == 7
    assert_consistent(tmp_path / "index")
