"""Writing vectors and rows durably, so that a kill at any point leaves a consistent index.

The protocol of one commit:
1. each changed modality's FAISS index is saved under a new generation name (temp file,
   fsync, `os.replace`, directory fsync) — the committed files are never touched;
2. one SQLite transaction inserts and deletes the rows and points `meta` at the new files;
3. the previous generation's files are deleted.
A kill before step 2 commits leaves the old files and rows, which match; a kill after leaves
the new ones, which match. Unreferenced files from an interrupted commit are deleted when the
next writer opens. Work is buffered between commits and committed whole files at a time, so a
rerun skips every file a commit recorded and embeds only the rest.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.embedder import MODALITIES, Embedder
from engine.errors import IndexStateError
from engine.store import Changes, ErrorRecord, FileRecord, ItemRow, Store, now
from engine.vectors import (
    FLAT_LIMIT,
    SUFFIX,
    VectorIndex,
    choose_factory,
    factory_key,
    file_key,
    file_name,
    fsync_dir,
    min_train_size,
    open_all,
)
from indexer.mapper import Encoded
from indexer.reader import Decoded, Segment
from indexer.scan import FileEntry, Work

log = logging.getLogger(__name__)

COMMIT_EVERY = 2_048  # vectors buffered before a commit (each commit rewrites FAISS files)
COMMIT_SECONDS = 60.0  # longest time between commits, so a kill loses at most this much
LOCK_FILE = "write.lock"
SNIPPET_CHARS = 2_000  # longest text stored per row


@dataclass(frozen=True)
class WriterConfig:
    """How vectors are stored and how often work is committed."""

    factory: str | None = None  # FAISS factory for every modality; None: chosen by size
    flat_limit: int = FLAT_LIMIT  # with factory None, exact search up to this many vectors
    commit_every: int = COMMIT_EVERY  # vectors between commits
    commit_seconds: float = COMMIT_SECONDS  # seconds between commits


@dataclass(frozen=True)
class ModelInfo:
    """What the index records about the model that made its vectors, and the model's hubness
    penalties of new vectors (`AlignedModel.hub_penalty`; None: plain cosines)."""

    name: str
    dim: int
    fingerprint: str
    source: str  # the --model value that loads it again
    penalty: Callable[[np.ndarray, str], np.ndarray | None] | None = field(
        default=None, compare=False
    )

    @classmethod
    def of(cls, embedder: Embedder, source: str) -> ModelInfo:
        penalty = getattr(embedder, "hub_penalty", None)
        return cls(embedder.name, int(embedder.dim), embedder.fingerprint, source, penalty)


def rebuild_hint(index_dir: str | Path, roots: Sequence[str], source: str) -> str:
    """The command that rebuilds `index_dir` with the model `source`."""
    folders = " ".join(roots) or "FOLDER"
    return f"xmodal index {folders} --index {index_dir} --model {source} --rebuild"


class IndexWriter:
    """The only writer of an index directory (an exclusive lock keeps it so)."""

    def __init__(self, index_dir: Path, store: Store, lock_fd: int, config: WriterConfig) -> None:
        self.index_dir = index_dir
        self.store = store
        self.config = config
        self._lock_fd = lock_fd
        meta = store.meta()
        self.dim = int(meta["dim"]) if "dim" in meta else None
        self.next_id = int(meta.get("next_id", 1))
        self.generation = int(meta.get("generation", 0))
        self.indexes = open_all(index_dir, meta, MODALITIES, mmap=False)
        self.roots: list[str] = json.loads(meta.get("roots", "[]"))
        self.pending = Changes()
        self._dirty: set[str] = set()
        self._pending_vectors = 0
        self._last_commit = time.monotonic()
        self._penalty: Callable[[np.ndarray, str], np.ndarray | None] | None = None

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        model: ModelInfo | None = None,
        *,
        config: WriterConfig = WriterConfig(),
        rebuild: bool = False,
    ) -> IndexWriter:
        """Lock `index_dir` (created if missing) for writing.

        `model` is checked against the index's fingerprint; a different model is refused
        unless `rebuild`, which empties the index first. Without `model` (removing files),
        the index must exist.
        """
        index_dir = Path(index_dir).absolute()
        store = Store.open(index_dir, create=model is not None)
        lock_fd = _lock(index_dir)
        try:
            _check_model(index_dir, store.meta(), model, rebuild)
            writer = cls(index_dir, store, lock_fd, config)
            writer._penalty = model.penalty if model is not None else None
            writer._remove_orphans()
            if rebuild and model is not None:
                writer._clear(model.dim)
            if model is not None and (rebuild or writer.dim is None):
                writer._set_model(model)
        except BaseException:
            os.close(lock_fd)
            store.close()
            raise
        return writer

    # ---- queuing changes -------------------------------------------------------------------

    def add_file(self, decoded: Decoded, segments: Sequence[Segment], encoded: Encoded) -> None:
        """Queue a decoded file's rows and vectors, replacing the rows of its old version."""
        work, entry = decoded.work, decoded.work.entry
        vectors = self._validate(encoded.vectors, len(segments))
        ids = np.arange(self.next_id, self.next_id + len(segments), dtype=np.int64)
        self._drop(entry.modality, work.replaces)
        self._index(entry.modality).add(ids, vectors)
        self.next_id += len(segments)
        added = now()
        transcripts = encoded.transcripts or [None] * len(segments)
        penalties = self._penalties(vectors, entry.modality)
        for k, (item_id, seg, heard) in enumerate(
            zip(ids.tolist(), segments, transcripts, strict=True)
        ):
            text = heard if entry.modality == "speech" else seg.text
            row = _row(item_id, work, decoded, seg, text, added)
            if penalties is not None:
                row = dataclasses.replace(
                    row, hub_text=float(penalties[k, 0]), hub_image=float(penalties[k, 1])
                )
            self.pending.rows.append(row)
        self.pending.clear_errors.append(entry.path)
        self._pending_vectors += len(segments)

    def remove_file(self, record: FileRecord) -> None:
        """Queue removal of an indexed file's rows and vectors."""
        self._drop(record.modality, record.ids)

    def move(self, old_path: str, entry: FileEntry) -> None:
        """Queue a rename: the rows keep their ids and vectors."""
        self.pending.moves.append((old_path, entry.path, entry.mtime))

    def touch(self, entry: FileEntry) -> None:
        """Queue a new size/mtime record for a file whose bytes did not change."""
        self.pending.stats.append((entry.path, entry.size, entry.mtime))

    def record_error(self, path: str, reason: str) -> None:
        """Queue a skipped file and its reason."""
        self.pending.errors.append(ErrorRecord(path, reason, now()))

    def clear_errors(self, paths: Sequence[str]) -> None:
        """Queue removal of error records (files gone or readable again)."""
        self.pending.clear_errors.extend(paths)

    def add_roots(self, roots: Sequence[str]) -> None:
        """Record the folders this index covers (shown by `xmodal info`, used in hints)."""
        merged = sorted(set(self.roots) | {os.path.abspath(r) for r in roots})
        if merged != self.roots:
            self.roots = merged
            self.pending.meta["roots"] = json.dumps(merged)

    # ---- committing ------------------------------------------------------------------------

    def maybe_commit(self) -> bool:
        """Commit if enough work or time has accumulated; True if it committed."""
        elapsed = time.monotonic() - self._last_commit
        if self._pending_vectors >= self.config.commit_every or (
            elapsed >= self.config.commit_seconds and (self.pending or self._dirty)
        ):
            self.commit()
            return True
        return False

    def commit(self) -> None:
        """Make everything queued durable: new FAISS files first, then one SQLite commit."""
        if not self.pending and not self._dirty:
            return
        self.generation += 1
        changes, old_files = self.pending, []
        meta = self.store.meta()
        for modality in sorted(self._dirty):
            index = self._retype(self.indexes[modality])
            self.indexes[modality] = index
            name = file_name(modality, self.generation)
            index.save(self.index_dir / name)
            old_files.append(meta.get(file_key(modality)))
            changes.meta[file_key(modality)] = name
            changes.meta[factory_key(modality)] = index.factory
        changes.meta.update(next_id=str(self.next_id), generation=str(self.generation),
                            updated=str(now()))  # fmt: skip
        self.store.commit(changes)
        self.pending, self._dirty, self._pending_vectors = Changes(), set(), 0
        self._last_commit = time.monotonic()
        for old in filter(None, old_files):
            (self.index_dir / old).unlink(missing_ok=True)

    def close(self) -> None:
        """Commit what is queued and release the lock."""
        try:
            self.commit()
        finally:
            self.release()

    def release(self) -> None:
        """Release the lock without committing (queued work is dropped)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
            self.store.close()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------

    def _validate(self, vectors: np.ndarray, n: int) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if self.dim is None:
            raise IndexStateError("this writer was opened without a model; it cannot add files")
        if vectors.shape != (n, self.dim):
            raise ValueError(f"expected vectors of shape ({n}, {self.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or infinity; the file is not indexed")
        return vectors

    def _penalties(self, vectors: np.ndarray, modality: str) -> np.ndarray | None:
        penalties = self._penalty(vectors, modality) if self._penalty is not None else None
        if penalties is not None and (
            penalties.shape != (len(vectors), 2) or not np.isfinite(penalties).all()
        ):
            raise ValueError("the model's hubness penalties are malformed; the file is not indexed")
        return penalties

    def _index(self, modality: str) -> VectorIndex:
        if modality not in self.indexes:
            self.indexes[modality] = VectorIndex.create(self.dim, "Flat")
        self._dirty.add(modality)
        return self.indexes[modality]

    def _drop(self, modality: str, ids: Sequence[int]) -> None:
        if ids:
            self._index(modality).remove(np.asarray(ids, dtype=np.int64))
            self.pending.delete_ids.extend(int(i) for i in ids)

    def _retype(self, index: VectorIndex) -> VectorIndex:
        target = self.config.factory
        if target is None:  # grow from exact to approximate, never back (no flapping)
            target = choose_factory(index.ntotal, flat_limit=self.config.flat_limit)
            if index.factory != "Flat":
                target = index.factory
        if target == index.factory:
            return index
        if index.ntotal < min_train_size(target):
            log.info("keeping %s until %d vectors can train %s", index.factory,
                     min_train_size(target), target)  # fmt: skip
            return index
        log.info("rebuilding a %d-vector index as %s", index.ntotal, target)
        return index.rebuild(target)

    def _clear(self, dim: int) -> None:
        self.pending.delete_ids.extend(self.store.ids().tolist())
        self.pending.clear_all_errors = True
        self.indexes = {m: VectorIndex.create(dim, "Flat") for m in self.indexes}
        self._dirty.update(self.indexes)

    def _set_model(self, model: ModelInfo) -> None:
        self.dim = model.dim
        self.pending.meta.update(
            model_name=model.name, model_fingerprint=model.fingerprint,
            model_source=model.source, dim=str(model.dim), created=str(now()),
        )  # fmt: skip

    def _remove_orphans(self) -> None:
        referenced = set(self.store.meta().values())
        removed = False
        for path in self.index_dir.iterdir():
            orphan = path.suffix == SUFFIX and path.name not in referenced
            if orphan or path.name.endswith(f"{SUFFIX}.tmp"):
                log.info("removing %s, left by an interrupted commit", path.name)
                path.unlink(missing_ok=True)
                removed = True
        if removed:
            fsync_dir(self.index_dir)


def _row(
    item_id: int, work: Work, decoded: Decoded, seg: Segment, text: str | None, added: float
) -> ItemRow:
    entry = work.entry
    return ItemRow(
        id=item_id, path=entry.path, modality=entry.modality, content_hash=work.content_hash,
        size=entry.size, mtime=entry.mtime, added=added, segment=seg.segment,
        duration=decoded.duration, width=decoded.width, height=decoded.height,
        text=text[:SNIPPET_CHARS] if text else text, start=seg.start, end=seg.end,
    )  # fmt: skip


def _lock(index_dir: Path) -> int:
    fd = os.open(index_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise IndexStateError(
            f"another xmodal process is writing to {index_dir}; wait for it to finish"
        ) from exc
    return fd


def _check_model(
    index_dir: Path, meta: dict[str, str], model: ModelInfo | None, rebuild: bool
) -> None:
    stored = meta.get("model_fingerprint")
    if model is None or stored is None or rebuild or stored == model.fingerprint:
        return
    roots = json.loads(meta.get("roots", "[]"))
    raise IndexStateError(
        f"index {index_dir} was built with model {meta.get('model_name')!r} (fingerprint "
        f"{stored[:12]}), not {model.name!r} ({model.fingerprint[:12]}); its vectors cannot be "
        f"mixed. Rebuild it with: {rebuild_hint(index_dir, roots, model.source)}"
    )
