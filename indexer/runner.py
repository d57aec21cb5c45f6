"""Putting the stages together: scan → plan → read → map → write, with progress and a summary.

`run_pipeline` receives its reader, mapper and writer, so a test can swap any of them;
`index_folders` builds the default ones around an `Embedder`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.embedder import Embedder
from engine.errors import MediaError, XmodalError
from engine.store import FileRecord
from indexer.mapper import BATCH_SIZE, Encoded, Mapper, call_size
from indexer.reader import Decoded, ReaderConfig, Segment, read_file
from indexer.scan import Plan, Work, is_under, plan, scan
from indexer.writer import IndexWriter, ModelInfo, WriterConfig

log = logging.getLogger(__name__)

Reader = Callable[[Work], Decoded]
MapperFn = Callable[[str, Sequence[Any]], Encoded]


@dataclass(frozen=True)
class IndexSummary:
    """What one indexing run did."""

    index_dir: str
    scanned: int  # media files found
    added: int  # new files embedded
    updated: int  # changed files re-embedded
    renamed: int  # moved files (no re-embedding)
    unchanged: int  # files skipped, bytes unchanged
    removed: int  # files gone from the scanned folders, dropped from the index
    failed: int  # files skipped as unreadable; see `errors`
    items: int  # vectors written (images, passages, speech segments)
    seconds: float  # wall time of the run
    items_per_s: float  # vectors written per second
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of this run

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["errors"] = [{"path": p, "reason": r} for p, r in self.errors]
        return out


@dataclass
class PipelineStats:
    """Counts from `run_pipeline`."""

    files: int = 0  # files written
    items: int = 0  # vectors written
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@dataclass(eq=False)  # identity: files in flight are told apart by object
class _File:
    """A file in flight: its segments wait in batches until every one has a vector."""

    decoded: Decoded
    segments: list[Segment] = field(default_factory=list)
    vectors: list[np.ndarray | None] = field(default_factory=list)
    transcripts: list[str] = field(default_factory=list)
    read_done: bool = False
    failed: bool = False
    written: bool = False

    @property
    def ready(self) -> bool:
        done = self.read_done and not self.failed and not self.written
        return done and all(v is not None for v in self.vectors)


class _Pipeline:
    def __init__(self, reader: Reader, mapper: MapperFn, writer: IndexWriter, batch_size: int,
                 bar: Any) -> None:  # fmt: skip
        self.reader, self.mapper, self.writer = reader, mapper, writer
        self.batch_size, self.bar = batch_size, bar
        self.queues: dict[str, list[tuple[_File, int]]] = {}
        self.stats = PipelineStats()
        self.started = time.monotonic()

    def feed(self, work: Work, read: Future[Decoded] | None = None) -> None:
        """Embed and write `work`; `read` is its decoding, started ahead (else decoded here)."""
        try:
            decoded = read.result() if read is not None else self.reader(work)
        except MediaError as exc:
            self.fail(work, exc.reason)
            return
        state = _File(decoded)
        try:
            for seg in decoded.segments:
                state.segments.append(seg)
                state.vectors.append(None)
                state.transcripts.append("")
                queue = self.queues.setdefault(work.entry.modality, [])
                queue.append((state, len(state.segments) - 1))
                if len(queue) >= call_size(work.entry.modality, self.batch_size):
                    self.flush(work.entry.modality)
        except MediaError as exc:
            state.failed = True
            self.fail(work, exc.reason)
            return
        if not state.segments:
            self.fail(work, "nothing to index in this file")
            return
        state.read_done = True
        self.finish(state)

    def flush(self, modality: str) -> None:
        queue = [(s, i) for s, i in self.queues.pop(modality, []) if not s.failed]
        if not queue:
            return
        try:
            self._assign(modality, queue)
        except Exception as exc:  # noqa: BLE001 - find the file that broke the batch
            log.debug("batch of %d %s segments failed (%s); retrying per file", len(queue),
                      modality, exc)  # fmt: skip
            for state in dict.fromkeys(s for s, _ in queue):
                try:
                    self._assign(modality, [(s, i) for s, i in queue if s is state])
                except Exception as file_exc:  # noqa: BLE001 - the embedder may raise anything
                    state.failed = True
                    self.fail(state.decoded.work, f"embedding failed: {file_exc}")
        for state in dict.fromkeys(s for s, _ in queue):
            self.finish(state)

    def _assign(self, modality: str, queue: list[tuple[_File, int]]) -> None:
        encoded = self.mapper(modality, [s.segments[i].payload for s, i in queue])
        heard = encoded.transcripts or [""] * len(queue)
        for (state, i), vector, text in zip(queue, encoded.vectors, heard, strict=True):
            state.vectors[i] = vector
            state.transcripts[i] = text
            state.segments[i] = dataclasses.replace(state.segments[i], payload=None)  # free it

    def finish(self, state: _File) -> None:
        if not state.ready:
            return
        state.written = True
        encoded = Encoded(np.stack(state.vectors), state.transcripts)
        try:
            self.writer.add_file(state.decoded, state.segments, encoded)
        except ValueError as exc:
            self.fail(state.decoded.work, str(exc))
            return
        self.stats.files += 1
        self.stats.items += len(state.segments)
        self.writer.maybe_commit()
        self._progress()

    def fail(self, work: Work, reason: str) -> None:
        path = work.entry.path
        log.info("skipping %s: %s", path, reason)
        self.stats.failed.append((path, reason))
        self.writer.record_error(path, reason)
        if work.replaces:  # its old vectors describe bytes that are gone
            e = work.entry
            self.writer.remove_file(FileRecord(path, e.modality, "", 0, 0.0, work.replaces))
        self._progress()

    def _progress(self) -> None:
        if self.bar is not None:
            rate = self.stats.items / max(time.monotonic() - self.started, 1e-9)
            self.bar.update(1)
            self.bar.set_postfix(items=self.stats.items, items_per_s=f"{rate:.1f}", refresh=False)


def run_pipeline(
    works: Sequence[Work],
    *,
    reader: Reader,
    mapper: MapperFn,
    writer: IndexWriter,
    batch_size: int = BATCH_SIZE,
    progress: bool = False,
) -> PipelineStats:
    """Decode, embed and write `works`; unreadable files are recorded, never raised."""
    from tqdm import tqdm

    with tqdm(total=len(works), unit="file", disable=not progress, desc="indexing") as bar:
        pipe = _Pipeline(reader, mapper, writer, batch_size, bar)
        for work, read in _read_ahead(works, reader, depth=batch_size):
            pipe.feed(work, read)
        for modality in list(pipe.queues):
            pipe.flush(modality)
    return pipe.stats


def _read_ahead(
    works: Sequence[Work], reader: Reader, *, depth: int
) -> Iterator[tuple[Work, Future[Decoded]]]:
    """`(work, its decoding)` in order, decoded by one thread up to `depth` files ahead, so
    decoding (which releases the GIL) overlaps embedding. At most `depth` decoded files wait."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xmodal-read") as pool:
        pending: deque[tuple[Work, Future[Decoded]]] = deque()
        upcoming = iter(works)
        for work in itertools.islice(upcoming, depth):
            pending.append((work, pool.submit(reader, work)))
        try:
            while pending:
                done = pending.popleft()
                for work in itertools.islice(upcoming, 1):
                    pending.append((work, pool.submit(reader, work)))
                yield done
        finally:  # stopped early (an error while writing): drop what was not started
            for _, future in pending:
                future.cancel()


def index_folders(
    roots: Sequence[str | Path],
    index_dir: str | Path,
    embedder: Embedder,
    *,
    model_source: str = "default",
    rebuild: bool = False,
    batch_size: int = BATCH_SIZE,
    reader_config: ReaderConfig | None = None,
    writer_config: WriterConfig | None = None,
    progress: bool = False,
    reader: Reader | None = None,
    mapper: MapperFn | None = None,
) -> IndexSummary:
    """Bring the index at `index_dir` in sync with the media under `roots`.

    New and changed files are embedded with `embedder`, renamed files keep their vectors,
    files gone from `roots` are removed, unreadable files are recorded with their reason.
    `model_source` is what `--model` was (recorded so search can load the same model).
    Refuses an index built by another model unless `rebuild`, which re-embeds everything.
    """
    started = time.monotonic()
    roots = [os.path.abspath(r) for r in roots]
    for root in roots:
        if not os.path.exists(root):
            raise XmodalError(f"{root} does not exist; give folders or files to index")
    reader_config = reader_config or ReaderConfig()
    writer_config = writer_config or WriterConfig()
    reader = reader or (lambda work: read_file(work, reader_config))
    mapper = mapper or Mapper(embedder, batch_size=batch_size)
    model = ModelInfo.of(embedder, model_source)
    with IndexWriter.open(index_dir, model, config=writer_config, rebuild=rebuild) as writer:
        writer.add_roots(roots)
        known = {} if rebuild else writer.store.files()
        todo = plan(scan(roots), known, roots)
        _apply_bookkeeping(writer, todo, roots)
        writer.commit()  # renames and removals are durable before the long part starts
        stats = run_pipeline(todo.work, reader=reader, mapper=mapper, writer=writer,
                             batch_size=batch_size, progress=progress)  # fmt: skip
    seconds = time.monotonic() - started
    errors = todo.failed + stats.failed
    return IndexSummary(
        index_dir=str(Path(index_dir).absolute()),
        scanned=len(todo.work) + len(todo.moves) + len(todo.touched) + todo.unchanged
        + len(todo.failed),
        added=sum(1 for w in todo.work if not w.replaces) - _failed_new(stats, todo),
        updated=todo.changed - _failed_changed(stats, todo),
        renamed=len(todo.moves),
        unchanged=todo.unchanged + len(todo.touched),
        removed=len(todo.removed),
        failed=len(errors),
        items=stats.items,
        seconds=round(seconds, 3),
        items_per_s=round(stats.items / seconds, 2) if seconds > 0 else 0.0,
        errors=errors,
    )  # fmt: skip


def _apply_bookkeeping(writer: IndexWriter, todo: Plan, roots: Sequence[str]) -> None:
    for record in todo.removed:
        writer.remove_file(record)
    for old, entry in todo.moves:
        writer.move(old, entry)
    for entry in todo.touched:
        writer.touch(entry)
    for path, reason in todo.failed:
        writer.record_error(path, reason)
    gone = [r.path for r in todo.removed] + [old for old, _ in todo.moves]
    gone += [e.path for e in writer.store.errors()
             if is_under(e.path, roots) and not os.path.exists(e.path)]  # fmt: skip
    writer.clear_errors(gone)


def _failed_new(stats: PipelineStats, todo: Plan) -> int:
    new = {w.entry.path for w in todo.work if not w.replaces}
    return sum(1 for p, _ in stats.failed if p in new)


def _failed_changed(stats: PipelineStats, todo: Plan) -> int:
    changed = {w.entry.path for w in todo.work if w.replaces}
    return sum(1 for p, _ in stats.failed if p in changed)


def remove_paths(index_dir: str | Path, paths: Sequence[str | Path]) -> list[str]:
    """Drop the files at `paths` (files, or folders: everything under them) from the index.

    Returns the removed files' paths. The files on disk are not touched.
    """
    targets = [os.path.abspath(p) for p in paths]
    with IndexWriter.open(index_dir) as writer:
        gone = [rec for path, rec in writer.store.files().items() if is_under(path, targets)]
        for record in gone:
            writer.remove_file(record)
        errs = [e.path for e in writer.store.errors() if is_under(e.path, targets)]
        writer.clear_errors([r.path for r in gone] + errs)
    return sorted(r.path for r in gone)
