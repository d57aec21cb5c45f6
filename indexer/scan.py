"""Finding media files and deciding what an indexing run has to do with each.

`scan` walks folders and classifies files by extension; `plan` compares what it found with
what the index holds: new, changed, renamed, touched, unchanged and vanished files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.media import (
    AUDIO_EXTENSIONS,
    FFMPEG_AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    TEXT_EXTENSIONS,
)
from engine.store import FileRecord

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20  # bytes read at a time while hashing
HASH_BYTES = 16  # blake2b digest size; 128 bits is plenty for change detection


@dataclass(frozen=True)
class FileEntry:
    """A media file found by a scan."""

    path: str  # absolute
    modality: str  # "image", "speech" or "text"
    size: int  # bytes
    mtime: float  # seconds since the epoch


@dataclass(frozen=True)
class Work:
    """A file to decode and embed, with its content hash."""

    entry: FileEntry
    content_hash: str
    replaces: tuple[int, ...] = ()  # ids of the rows its previous version left


@dataclass
class Plan:
    """What one indexing run does; every scanned file lands in exactly one list."""

    work: list[Work] = field(default_factory=list)  # new or changed: decode and embed
    moves: list[tuple[str, FileEntry]] = field(default_factory=list)  # (old path, renamed file)
    touched: list[FileEntry] = field(default_factory=list)  # same bytes, new size/mtime record
    unchanged: int = 0  # nothing to do
    removed: list[FileRecord] = field(default_factory=list)  # gone from the scanned folders
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def changed(self) -> int:
        return sum(1 for w in self.work if w.replaces)


def modality_of(path: str | Path, *, ffmpeg: bool = True) -> str | None:
    """ "image", "speech" or "text" by file extension; None for files xmodal does not index."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in AUDIO_EXTENSIONS or (ffmpeg and ext in FFMPEG_AUDIO_EXTENSIONS):
        return "speech"
    if ext in TEXT_EXTENSIONS:
        return "text"
    return None


def scan(roots: Sequence[str | Path], *, ffmpeg: bool = True) -> Iterator[FileEntry]:
    """Media files under `roots`, recursively, sorted per folder; symlinked folders are not
    followed (no loops) and only regular files are returned (a FIFO would block a reader)."""
    seen: set[str] = set()
    for root in roots:
        root = os.path.abspath(root)
        if os.path.isfile(root):
            walk: Iterable[tuple[str, list[str], list[str]]] = [
                (os.path.dirname(root), [], [os.path.basename(root)])
            ]
        else:
            walk = os.walk(root, onerror=lambda exc: log.warning("cannot list %s", exc))
        for folder, dirs, names in walk:
            dirs.sort()
            for name in sorted(names):
                entry = _entry(os.path.join(folder, name), ffmpeg)
                if entry is not None and entry.path not in seen:
                    seen.add(entry.path)
                    yield entry


def _entry(path: str, ffmpeg: bool) -> FileEntry | None:
    modality = modality_of(path, ffmpeg=ffmpeg)
    if modality is None:
        return None
    try:
        st = os.stat(path)
    except OSError as exc:
        log.warning("cannot stat %s: %s", path, exc)
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileEntry(path, modality, st.st_size, st.st_mtime)


def content_hash(path: str | Path) -> str:
    """Hex blake2b digest of the file's bytes. Raises OSError if it cannot be read."""
    digest = hashlib.blake2b(digest_size=HASH_BYTES)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_under(path: str, roots: Sequence[str]) -> bool:
    """Whether `path` is one of `roots` or inside one of them (all absolute)."""
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def plan(
    scanned: Iterable[FileEntry],
    known: dict[str, FileRecord],
    roots: Sequence[str],
    *,
    hasher: Callable[[str], str] = content_hash,
) -> Plan:
    """Compare a scan with the index's `known` files.

    A file whose size and mtime match its record is unchanged without being read (as git
    does); otherwise its hash decides: same bytes → touched, new bytes → work. A new path
    whose bytes match a vanished file of the same modality is a rename: its rows move, no
    re-embedding. Known files under `roots` that the scan did not see are removed.
    """
    out = Plan()
    fresh: list[tuple[FileEntry, str]] = []
    seen: set[str] = set()
    for entry in scanned:
        seen.add(entry.path)
        rec = known.get(entry.path)
        if rec and rec.size == entry.size and rec.mtime == entry.mtime:
            out.unchanged += 1
            continue
        try:
            digest = hasher(entry.path)
        except OSError as exc:
            out.failed.append((entry.path, _os_reason(exc)))
            if rec:
                out.removed.append(rec)
            continue
        if rec and rec.content_hash == digest and rec.modality == entry.modality:
            out.touched.append(entry)
        elif rec:
            out.work.append(Work(entry, digest, rec.ids))
        else:
            fresh.append((entry, digest))
    roots = [os.path.abspath(r) for r in roots]
    vanished = {p: r for p, r in known.items() if p not in seen and is_under(p, roots)}
    by_hash = {(r.content_hash, r.modality): r for r in vanished.values()}
    for entry, digest in fresh:
        old = by_hash.pop((digest, entry.modality), None)
        if old is not None:
            del vanished[old.path]
            out.moves.append((old.path, entry))
        else:
            out.work.append(Work(entry, digest))
    out.removed.extend(vanished.values())
    return out


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot read: {exc.strerror or exc}"
