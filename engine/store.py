"""The metadata store of an index: the one module that talks SQL.

An index directory holds one SQLite database (WAL mode) next to one FAISS file per modality.
Each row of `items` is one vector: a whole image, one passage of a text note, or one timed
segment of a recording; its primary key is the vector's id in FAISS. `meta` names the FAISS
file that matches the committed rows, so a commit that swaps FAISS files and rows is one
SQLite transaction (see `indexer.writer`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from engine.errors import IndexStateError, QueryError

log = logging.getLogger(__name__)

DB_FILE = "index.sqlite"
SCHEMA_VERSION = 2  # bumped when the tables change incompatibly (2: hubness penalties)
SQL_CHUNK = 900  # ids per IN (...) clause, under SQLite's bound-variable limit
HUB_COLUMNS = ("hub_text", "hub_image")  # hubness penalties, by `engine.hubness.penalty_column`

_metadata = MetaData()

items = Table(
    "items",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # = the FAISS id
    Column("path", Text, nullable=False),  # absolute path of the file
    Column("modality", String(8), nullable=False),  # "image", "speech" or "text"
    Column("content_hash", String(64), nullable=False),  # blake2b of the file's bytes
    Column("size", Integer, nullable=False),  # bytes
    Column("mtime", Float, nullable=False),  # seconds since the epoch
    Column("duration", Float),  # seconds, whole recording (speech only)
    Column("width", Integer),  # pixels (image only)
    Column("height", Integer),  # pixels (image only)
    Column("text", Text),  # transcript of a speech segment, or a text passage
    Column("segment", Integer, nullable=False, default=0),  # position within the file
    Column("start", Float),  # seconds into the recording (speech only)
    Column("end", Float),  # seconds into the recording (speech only)
    Column("added", Float, nullable=False),  # seconds since the epoch
    # hubness penalties subtracted from the cosine (engine.hubness); NULL: model without banks
    Column("hub_text", Float),  # for text and speech queries
    Column("hub_image", Float),  # for image queries
    Index("ix_items_path", "path"),
    Index("ix_items_hash", "content_hash"),
    Index("ix_items_modality", "modality"),
)

errors = Table(
    "errors",
    _metadata,
    Column("path", Text, primary_key=True),  # absolute path of the skipped file
    Column("reason", Text, nullable=False),  # why it was skipped
    Column("time", Float, nullable=False),  # seconds since the epoch
)

meta = Table(
    "meta",
    _metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

ITEM_COLUMNS = tuple(c.name for c in items.columns)


class IndexNotFoundError(IndexStateError, QueryError):
    """There is no index at the given directory (a query error and an index-state error)."""


@dataclass(frozen=True)
class ItemRow:
    """One vector's metadata, as stored in `items`."""

    id: int  # primary key and FAISS id
    path: str  # absolute path
    modality: str  # "image", "speech" or "text"
    content_hash: str  # of the whole file
    size: int  # bytes
    mtime: float  # seconds since the epoch
    added: float  # seconds since the epoch
    segment: int = 0  # position within the file
    duration: float | None = None  # seconds, whole recording
    width: int | None = None  # pixels
    height: int | None = None  # pixels
    text: str | None = None  # transcript or passage
    start: float | None = None  # seconds
    end: float | None = None  # seconds
    hub_text: float | None = None  # hubness penalty for text and speech queries
    hub_image: float | None = None  # hubness penalty for image queries


@dataclass(frozen=True)
class FileRecord:
    """What the store knows about one indexed file (all its rows together)."""

    path: str
    modality: str
    content_hash: str
    size: int
    mtime: float
    ids: tuple[int, ...]  # its rows' ids, in segment order


@dataclass(frozen=True)
class ErrorRecord:
    """A file the indexer skipped, and why."""

    path: str
    reason: str
    time: float  # seconds since the epoch


@dataclass
class Changes:
    """Everything one commit writes, applied in a single transaction."""

    rows: list[ItemRow] = field(default_factory=list)  # rows to insert
    delete_ids: list[int] = field(default_factory=list)  # rows to delete
    moves: list[tuple[str, str, float]] = field(default_factory=list)  # (old, new path, mtime)
    stats: list[tuple[str, int, float]] = field(default_factory=list)  # (path, size, mtime)
    errors: list[ErrorRecord] = field(default_factory=list)  # to record (replacing older)
    clear_errors: list[str] = field(default_factory=list)  # paths whose errors are gone
    clear_all_errors: bool = False  # drop every error row first (a rebuild)
    meta: dict[str, str] = field(default_factory=dict)  # keys to set

    def __bool__(self) -> bool:
        return bool(
            self.rows or self.delete_ids or self.moves or self.stats or self.errors
            or self.clear_errors or self.clear_all_errors or self.meta
        )  # fmt: skip


@dataclass(frozen=True)
class Filters:
    """Restrictions on which items a search may return; None means "no restriction"."""

    path: str | None = None  # SQLite GLOB on the absolute path ("*" also matches "/")
    added_since: float | None = None  # seconds since the epoch, inclusive
    added_before: float | None = None  # seconds since the epoch, exclusive
    min_duration: float | None = None  # seconds; items without a duration are excluded
    max_duration: float | None = None  # seconds; items without a duration are excluded

    def __bool__(self) -> bool:
        return any(v is not None for v in vars(self).values())


def _set_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a commit is on disk once it returns
    cur.execute("PRAGMA busy_timeout=10000")  # ms a reader waits on a checkpointing writer
    cur.close()


def _chunks(values: Sequence[Any], size: int = SQL_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


class Store:
    """The SQLite side of an index directory: items, errors and meta."""

    def __init__(self, engine: Engine, index_dir: Path) -> None:
        self.engine = engine
        self.index_dir = index_dir

    @classmethod
    def open(cls, index_dir: str | Path, *, create: bool = False) -> Store:
        """Open the store of `index_dir`; with `create`, make the directory and tables."""
        index_dir = Path(index_dir)
        db = index_dir / DB_FILE
        if not db.exists():
            if not create:
                raise IndexNotFoundError(
                    f"no xmodal index at {index_dir} ({DB_FILE} missing); "
                    f"build one with: xmodal index FOLDER --index {index_dir}"
                )
            index_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(f"sqlite:///{db}")
        event.listen(engine, "connect", _set_pragmas)
        store = cls(engine, index_dir)
        if create:
            _metadata.create_all(engine)
            with engine.begin() as conn:
                if _get_meta(conn, "schema_version") is None:
                    _put_meta(conn, {"schema_version": str(SCHEMA_VERSION)})
        store._check_schema()
        return store

    def _check_schema(self) -> None:
        version = self.meta().get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise IndexStateError(
                f"index {self.index_dir} has schema version {version}, this xmodal reads "
                f"{SCHEMA_VERSION}; rebuild it with: xmodal index FOLDER --index "
                f"{self.index_dir} --rebuild"
            )

    def close(self) -> None:
        self.engine.dispose()

    # ---- read side -------------------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        """Every meta key and value."""
        with self.engine.connect() as conn:
            return dict(conn.execute(select(meta.c.key, meta.c.value)).all())

    def get(self, ids: Iterable[int], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rows of `items` for `ids`, in the order given; ids with no row are left out.

        `columns` picks the keys of each dict (default: all); "id" is always included.
        """
        ids = [int(i) for i in ids]
        names = list(columns) if columns is not None else list(ITEM_COLUMNS)
        unknown = sorted(set(names) - set(ITEM_COLUMNS))
        if unknown:
            raise QueryError(f"unknown item columns {unknown}; available: {list(ITEM_COLUMNS)}")
        if "id" not in names:
            names.insert(0, "id")
        # One statement whatever the number of ids (a JSON array, expanded by SQLite), and plain
        # tuples: building SQLAlchemy rows cost ~30 µs each, which dominated k = 1,000 queries.
        quoted = ", ".join(f'"{n}"' for n in names)  # names are checked above
        sql = f"SELECT {quoted} FROM items WHERE id IN (SELECT value FROM json_each(?))"
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(sql, (json.dumps(sorted(set(ids))),)).fetchall()
        key = names.index("id")
        found = {row[key]: dict(zip(names, row, strict=True)) for row in rows}
        return [found[i] for i in ids if i in found]

    def ids(self, modality: str | None = None) -> np.ndarray:
        """`(n,)` int64 ids of all items, or of one modality, ascending."""
        query = select(items.c.id).order_by(items.c.id)
        if modality is not None:
            query = query.where(items.c.modality == modality)
        with self.engine.connect() as conn:
            return np.array(conn.execute(query).scalars().all(), dtype=np.int64)

    def select_ids(self, modality: str, filters: Filters) -> np.ndarray:
        """`(n,)` int64 ids of the items of `modality` that pass `filters`."""
        query = select(items.c.id).where(items.c.modality == modality)
        if filters.path is not None:
            query = query.where(items.c.path.op("GLOB")(filters.path))
        if filters.added_since is not None:
            query = query.where(items.c.added >= filters.added_since)
        if filters.added_before is not None:
            query = query.where(items.c.added < filters.added_before)
        if filters.min_duration is not None:
            query = query.where(items.c.duration >= filters.min_duration)
        if filters.max_duration is not None:
            query = query.where(items.c.duration <= filters.max_duration)
        with self.engine.connect() as conn:
            return np.array(conn.execute(query).scalars().all(), dtype=np.int64)

    def penalties(self, modality: str, column: str) -> tuple[np.ndarray, np.ndarray] | None:
        """`(ids, values)`: the hubness penalty `column` ("hub_text" or "hub_image") of every
        item of `modality`, ids ascending (int64) with float32 values, NULL as 0; None when no
        item has one (a model without query banks)."""
        if column not in HUB_COLUMNS:
            raise QueryError(f"unknown penalty column {column!r}")
        sql = f'SELECT id, "{column}" FROM items WHERE modality = ? ORDER BY id'
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(sql, (modality,)).fetchall()
        if not any(value is not None for _, value in rows):
            return None
        ids = np.fromiter((i for i, _ in rows), dtype=np.int64, count=len(rows))
        values = np.fromiter((v or 0.0 for _, v in rows), dtype=np.float32, count=len(rows))
        return ids, values

    def counts(self) -> dict[str, int]:
        """Number of items (vectors) per modality; modalities without items are absent."""
        query = select(items.c.modality, func.count()).group_by(items.c.modality)
        with self.engine.connect() as conn:
            return dict(conn.execute(query).all())

    def file_counts(self) -> dict[str, int]:
        """Number of distinct files per modality."""
        query = select(items.c.modality, func.count(items.c.path.distinct())).group_by(
            items.c.modality
        )
        with self.engine.connect() as conn:
            return dict(conn.execute(query).all())

    def files(self) -> dict[str, FileRecord]:
        """Every indexed file by absolute path."""
        query = select(
            items.c.path, items.c.modality, items.c.content_hash, items.c.size, items.c.mtime,
            items.c.id,
        ).order_by(items.c.path, items.c.segment)  # fmt: skip
        out: dict[str, FileRecord] = {}
        with self.engine.connect() as conn:
            for path, modality, digest, size, mtime, item_id in conn.execute(query):
                rec = out.get(path)
                ids = (*rec.ids, item_id) if rec else (item_id,)
                out[path] = FileRecord(path, modality, digest, size, mtime, ids)
        return out

    def same_content(self, modality: str) -> list[list[str]]:
        """Groups of two or more files of `modality` with identical bytes, sorted."""
        dupes = (
            select(items.c.content_hash)
            .where(items.c.modality == modality)
            .group_by(items.c.content_hash)
            .having(func.count(items.c.path.distinct()) > 1)
        )
        query = (
            select(items.c.content_hash, items.c.path)
            .where(items.c.content_hash.in_(dupes))
            .distinct()
            .order_by(items.c.content_hash, items.c.path)
        )
        groups: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for digest, path in conn.execute(query):
                groups.setdefault(digest, []).append(path)
        return list(groups.values())

    def errors(self) -> list[ErrorRecord]:
        """Files the indexer skipped, by path."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(errors).order_by(errors.c.path)).all()
        return [ErrorRecord(r.path, r.reason, r.time) for r in rows]

    # ---- write side ------------------------------------------------------------------------

    def commit(self, changes: Changes) -> None:
        """Apply `changes` in one transaction: all of it is on disk, or none of it."""
        with self.engine.begin() as conn:
            _apply(conn, changes)


def _apply(conn: Connection, changes: Changes) -> None:
    for chunk in _chunks(changes.delete_ids):
        conn.execute(delete(items).where(items.c.id.in_(chunk)))
    for old, new, mtime in changes.moves:
        conn.execute(update(items).where(items.c.path == old).values(path=new, mtime=mtime))
    for path, size, mtime in changes.stats:
        conn.execute(update(items).where(items.c.path == path).values(size=size, mtime=mtime))
    if changes.rows:
        conn.execute(insert(items), [vars(r) for r in changes.rows])
    if changes.clear_all_errors:
        conn.execute(delete(errors))
    for chunk in _chunks(changes.clear_errors):
        conn.execute(delete(errors).where(errors.c.path.in_(chunk)))
    for err in changes.errors:
        conn.execute(delete(errors).where(errors.c.path == err.path))
        conn.execute(insert(errors).values(path=err.path, reason=err.reason, time=err.time))
    _put_meta(conn, changes.meta)


def _get_meta(conn: Connection, key: str) -> str | None:
    return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar_one_or_none()


def _put_meta(conn: Connection, values: dict[str, str]) -> None:
    for key, value in values.items():
        conn.execute(delete(meta).where(meta.c.key == key))
        conn.execute(insert(meta).values(key=key, value=str(value)))


def now() -> float:
    """Seconds since the epoch, the time unit of every stored timestamp."""
    return time.time()


def dumps(value: Any) -> str:
    """A meta value as JSON text (meta values are strings)."""
    return json.dumps(value, sort_keys=True)
