"""Searching an index: any modality in, hits of any modality out, plus near-duplicates.

    engine = SearchEngine.open("my-index")
    hits = engine.search("a dog on a beach", to=("image",), k=5)
    hits = engine.search(speech="question.wav", min_duration=60)

Scores are cosines between L2-normalized vectors of one space, so hits of different
modalities are ranked together. This module reads through `engine.store` and never writes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from engine.embedder import MODALITIES, Embedder
from engine.errors import IndexStateError, MediaError, QueryError
from engine.hubness import penalty_column
from engine.media import load_audio, load_image, rms
from engine.store import HUB_COLUMNS, Filters, Store
from engine.vectors import VectorIndex, open_all

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"  # what `--model` means when not given: the shipped model
QUERY_MAX_SECONDS = 300.0  # a longer speech query is refused: index long recordings instead
QUERY_SILENCE_RMS = 1e-3  # a speech query quieter than this has nothing to search with
DUPE_THRESHOLD = 0.95  # cosine above which two images count as near-duplicates
DUPE_NEIGHBOURS = 16  # nearest neighbours examined per image when looking for duplicates
OPEN_RETRIES = 3  # a writer may swap vector files between reading meta and opening them
NO_FILTERS = Filters()
HIT_COLUMNS = ("path", "modality", "start", "end", "text", "segment")  # what a Hit shows
HUB_EXTRA = 100  # candidates beyond k re-ranked per modality with hubness penalties


@dataclass(frozen=True)
class Hit:
    """One search result: an image, a passage of a note, or a segment of a recording."""

    score: float  # cosine similarity to the query, minus the item's hubness penalty if any
    path: str  # absolute path of the file
    modality: str  # "image", "speech" or "text"
    start: float | None = None  # seconds into the recording (speech)
    end: float | None = None  # seconds into the recording (speech)
    text: str | None = None  # transcript of the segment, or the passage of the note
    id: int = 0  # the item's id in the index
    segment: int = 0  # position of the segment or passage within the file

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DupeGroup:
    """Files that look alike (images) or have identical bytes (any modality)."""

    modality: str
    paths: tuple[str, ...]  # sorted
    score: float  # lowest similarity along the links that joined the group; 1.0 if identical
    identical: bool  # same bytes, found by content hash

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["paths"] = list(self.paths)
        return out


@dataclass(frozen=True)
class IndexInfo:
    """A summary of an index directory."""

    index_dir: str
    model_name: str | None
    model_fingerprint: str | None
    model_source: str | None  # the --model value it was built with
    dim: int | None  # width of the vectors
    items: dict[str, int]  # vectors per modality
    files: dict[str, int]  # files per modality
    factories: dict[str, str]  # FAISS factory string per modality
    errors: int  # files skipped as unreadable
    size_bytes: int  # on disk, all files of the index directory
    roots: list[str]  # folders indexed into it

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_embedder(spec: str) -> Embedder:
    """The embedder named by `spec`: `"module:attr"` (an `Embedder`, or a class or function
    that makes one, for plugging in your own encoders) or a model name or bundle directory
    for `engine.model.load_model`."""
    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise QueryError(f"cannot load embedder {spec!r}: {exc}") from exc
        return obj() if isinstance(obj, type) or not hasattr(obj, "embed_text") else obj
    from engine.model import load_model  # lazy: torch is slow to import

    return load_model(spec)


def model_source(spec: str) -> str:
    """`spec` as it should be recorded: bundle directories become absolute paths."""
    return os.path.abspath(spec) if Path(spec).exists() else spec


class SearchEngine:
    """Read-only access to an index: search, near-duplicates and info."""

    def __init__(
        self, store: Store, vectors: dict[str, VectorIndex], model: Embedder | None = None
    ) -> None:
        self.store = store
        self.vectors = vectors
        self.meta = store.meta()
        self.index_dir = store.index_dir
        self._model = model
        self._hub: dict[tuple[str, str], tuple[np.ndarray, np.ndarray] | None] = {}
        if model is not None:
            self._check_model(model)

    @classmethod
    def open(cls, index_dir: str | Path, *, model: Embedder | str | None = None) -> SearchEngine:
        """Open the index at `index_dir` (vector files memory-mapped where possible).

        `model` is an `Embedder`, a spec for `load_embedder`, or None for the model the index
        was built with (loaded at the first query). A model with another fingerprint than the
        index's is refused with an `IndexStateError` that says how to rebuild.
        """
        store = Store.open(index_dir)
        try:
            for attempt in range(OPEN_RETRIES):
                meta = store.meta()
                try:
                    vectors = open_all(store.index_dir, meta, MODALITIES, mmap=True)
                    break
                except IndexStateError:
                    if attempt == OPEN_RETRIES - 1 or store.meta() == meta:
                        raise
            if isinstance(model, str):
                model = load_embedder(model)
            return cls(store, vectors, model)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> SearchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model(self) -> Embedder:
        """The query encoder; loaded on first use from the index's recorded model."""
        if self._model is None:
            source = self.meta.get("model_source") or DEFAULT_MODEL
            model = load_embedder(source)
            self._check_model(model)
            self._model = model
        return self._model

    # ---- search ----------------------------------------------------------------------------

    def search(
        self,
        text: str | None = None,
        *,
        image: str | Path | None = None,
        speech: str | Path | None = None,
        to: Sequence[str] | str | None = None,
        k: int = 10,
        path: str | None = None,
        added_since: float | datetime | None = None,
        added_before: float | datetime | None = None,
        min_duration: float | None = None,
        max_duration: float | None = None,
    ) -> list[Hit]:
        """The `k` items closest to one query: `text`, an `image` file or a `speech` file.

        `to` picks the modalities searched ("image", "speech", "text"; a tuple or a comma
        list; None: every modality the index has). Filters: `path`, a GLOB on the absolute
        path ("*" also matches "/"); `added_since`/`added_before`, when the item was indexed;
        `min_duration`/`max_duration`, seconds of the whole recording (excludes items
        without a duration). Hits are sorted by score, best first.
        """
        targets = self._targets(to)
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        query = self.embed_query(text, image=image, speech=speech)
        filters = Filters(path, _timestamp(added_since), _timestamp(added_before),
                          min_duration, max_duration)  # fmt: skip
        kind = "text" if text is not None else "image" if image is not None else "speech"
        return self.search_vector(query, to=targets, k=k, filters=filters, kind=kind)

    def embed_query(
        self, text: str | None = None, *, image: str | Path | None = None,
        speech: str | Path | None = None,
    ) -> np.ndarray:  # fmt: skip
        """`(dim,)` float32, L2-normalized: the query vector of exactly one input."""
        given = [name for name, v in (("text", text), ("image", image), ("speech", speech))
                 if v is not None]  # fmt: skip
        if len(given) != 1:
            raise QueryError(f"give exactly one query (text=, image= or speech=), got {given}")
        if text is not None:
            if not text.strip():
                raise QueryError("empty text query; give some words to search for")
            return self.model.embed_text([text])[0]
        if image is not None:
            return self.model.embed_images([_query_media(load_image, image, "image")])[0]
        clip = _query_media(
            functools.partial(load_audio, max_seconds=QUERY_MAX_SECONDS), speech, "speech"
        )
        if rms(clip) < QUERY_SILENCE_RMS:
            raise QueryError(f"the speech query {speech} is silent; record something to search for")
        # the model embeds a clip over 30 s window by window and averages the windows
        return self.model.embed_speech([clip]).vectors[0]

    def search_vector(
        self,
        query: np.ndarray,
        *,
        to: Sequence[str] | str | None = None,
        k: int = 10,
        filters: Filters = NO_FILTERS,
        kind: str | None = None,
    ) -> list[Hit]:
        """The `k` items closest to `query` `(dim,)` float32, L2-normalized.

        `kind` is the query's modality ("text", "speech", "image"). Given one, items indexed by
        a model with query banks are scored by cosine minus their hubness penalty for such
        queries (`engine.hubness`): the `k + max(k, HUB_EXTRA)` nearest by cosine of each
        modality are re-ranked. None: plain cosines.
        """
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        column = None if kind is None else HUB_COLUMNS[penalty_column(kind)]
        found: list[tuple[float, int]] = []
        for modality in self._targets(to):
            allowed = self.store.select_ids(modality, filters) if filters else None
            if allowed is not None and not len(allowed):
                continue
            penalties = None if column is None else self._penalties(modality, column)
            fetch = k if penalties is None else k + max(k, HUB_EXTRA)
            scores, ids = self.vectors[modality].search(query, fetch, allowed=allowed)
            scores, ids = scores[0], ids[0]
            scores, ids = scores[ids >= 0], ids[ids >= 0]
            if penalties is not None:
                scores = scores - _lookup(*penalties, ids)
                best = np.lexsort((ids, -scores))[:k]  # by score, then id
                scores, ids = scores[best], ids[best]
            found += [(float(s), int(i)) for s, i in zip(scores, ids, strict=True)]
        found.sort(key=lambda pair: (-pair[0], pair[1]))
        return self._hits(found[:k])

    def _penalties(self, modality: str, column: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The items' hubness penalties (`Store.penalties`), read from SQLite once per engine
        and modality, not at every search."""
        key = (modality, column)
        if key not in self._hub:
            self._hub[key] = self.store.penalties(modality, column)
        return self._hub[key]

    def _hits(self, found: list[tuple[float, int]]) -> list[Hit]:
        rows = {r["id"]: r for r in self.store.get([i for _, i in found], HIT_COLUMNS)}
        return [
            Hit(score, r["path"], r["modality"], r["start"], r["end"], r["text"], i, r["segment"])
            for score, i in found
            if (r := rows.get(i)) is not None
        ]

    def _targets(self, to: Sequence[str] | str | None) -> tuple[str, ...]:
        available = tuple(m for m in MODALITIES if m in self.vectors and self.vectors[m].ntotal)
        if not available:
            raise QueryError(
                f"index {self.index_dir} has no items; add some with: "
                f"xmodal index FOLDER --index {self.index_dir}"
            )
        if to is None:
            return available
        wanted = tuple(m.strip() for m in to.split(",")) if isinstance(to, str) else tuple(to)
        for modality in wanted:
            if modality not in MODALITIES:
                raise QueryError(f"unknown modality {modality!r}; choose from {MODALITIES}")
            if modality not in available:
                raise QueryError(
                    f"index {self.index_dir} has no {modality} items; it has "
                    f"{', '.join(available)} (use --to {','.join(available)})"
                )
        return wanted

    def _check_model(self, model: Embedder) -> None:
        stored = self.meta.get("model_fingerprint")
        if stored is None or stored == model.fingerprint:
            return
        roots = " ".join(json.loads(self.meta.get("roots", "[]"))) or "FOLDER"
        source = self.meta.get("model_source", DEFAULT_MODEL)
        raise IndexStateError(
            f"index {self.index_dir} was built with model {self.meta.get('model_name')!r} "
            f"(fingerprint {stored[:12]}), not {model.name!r} ({model.fingerprint[:12]}); "
            f"search it with --model {source}, or rebuild it for this model with: "
            f"xmodal index {roots} --index {self.index_dir} --model MODEL --rebuild"
        )

    # ---- duplicates and info ---------------------------------------------------------------

    def dupes(self, threshold: float = DUPE_THRESHOLD) -> list[DupeGroup]:
        """Groups of near-duplicate images (cosine ≥ `threshold`, linked transitively) and of
        recordings and notes with identical bytes; largest groups first."""
        if not 0.0 < threshold <= 1.0:
            raise QueryError(f"threshold must be in (0, 1], got {threshold}")
        groups = self._similar_images(threshold) if "image" in self.vectors else []
        for modality in ("speech", "text"):
            groups += [DupeGroup(modality, tuple(p), 1.0, True)
                       for p in self.store.same_content(modality)]  # fmt: skip
        return sorted(groups, key=lambda g: (-len(g.paths), -g.score, g.paths))

    def _similar_images(self, threshold: float) -> list[DupeGroup]:
        index = self.vectors["image"]
        ids, vectors = index.vectors()
        if len(ids) < 2:
            return []
        scores, neighbours = index.search(vectors, min(DUPE_NEIGHBOURS, len(ids)))
        links = _UnionFind()
        for row, item_id in enumerate(ids.tolist()):
            for score, other in zip(scores[row], neighbours[row], strict=True):
                if other >= 0 and other != item_id and score >= threshold:
                    links.join(item_id, int(other), float(score))
        paths = {r["id"]: r["path"] for r in self.store.get(links.members(), ["path"])}
        hashes = {r["id"]: r["content_hash"]
                  for r in self.store.get(links.members(), ["content_hash"])}  # fmt: skip
        out = []
        for members, score in links.groups():
            files = tuple(sorted({paths[i] for i in members if i in paths}))
            if len(files) > 1:
                same = len({hashes.get(i) for i in members}) == 1
                out.append(DupeGroup("image", files, min(score, 1.0), same))
        return out

    def info(self) -> IndexInfo:
        """Counts by modality, model, FAISS types, errors and size on disk."""
        meta = self.store.meta()
        size = sum(p.stat().st_size for p in self.index_dir.iterdir() if p.is_file())
        return IndexInfo(
            index_dir=str(self.index_dir.absolute()),
            model_name=meta.get("model_name"),
            model_fingerprint=meta.get("model_fingerprint"),
            model_source=meta.get("model_source"),
            dim=int(meta["dim"]) if "dim" in meta else None,
            items=self.store.counts(),
            files=self.store.file_counts(),
            factories={m: v.factory for m, v in self.vectors.items()},
            errors=len(self.store.errors()),
            size_bytes=size,
            roots=json.loads(meta.get("roots", "[]")),
        )


def check_index(index_dir: str | Path) -> list[str]:
    """Problems that make an index inconsistent (empty when it is sound): vector ids that
    differ from row ids, counts that differ, a dimension other than the recorded one."""
    problems = []
    with SearchEngine.open(index_dir) as engine:
        dim = engine.meta.get("dim")
        counts = engine.store.counts()
        for modality in MODALITIES:
            index = engine.vectors.get(modality)
            rows = engine.store.ids(modality)
            if index is None:
                if len(rows):
                    problems.append(f"{modality}: {len(rows)} rows but no vector file")
                continue
            vec_ids = np.sort(index.ids())
            if index.ntotal != counts.get(modality, 0) or not np.array_equal(vec_ids, rows):
                problems.append(
                    f"{modality}: {index.ntotal} vectors for {len(rows)} rows "
                    f"({len(np.setxor1d(vec_ids, rows))} ids differ)"
                )
            if dim is not None and index.dim != int(dim):
                problems.append(f"{modality}: vectors of width {index.dim}, meta says {dim}")
            if len(np.unique(vec_ids)) != len(vec_ids):
                problems.append(f"{modality}: duplicate vector ids")
    return problems


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.weakest: dict[int, float] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, a: int, b: int, score: float) -> None:
        ra, rb = self.find(a), self.find(b)
        low = min(score, self.weakest.get(ra, 1.0), self.weakest.get(rb, 1.0))
        self.parent[rb] = ra
        self.weakest[ra] = low

    def members(self) -> list[int]:
        return list(self.parent)

    def groups(self) -> list[tuple[list[int], float]]:
        out: dict[int, list[int]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return [(m, self.weakest.get(r, 1.0)) for r, m in out.items()]


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """`values` of `wanted` among sorted `keys`; 0 for a key that is not there."""
    if not len(keys):
        return np.zeros(len(wanted), dtype=np.float32)
    pos = np.searchsorted(keys, wanted).clip(max=len(keys) - 1)
    return np.where(keys[pos] == wanted, values[pos], np.float32(0.0))


def _query_media(loader: Any, path: str | Path, kind: str) -> Any:
    try:
        return loader(path)
    except MediaError as exc:
        raise QueryError(f"cannot read query {kind} {exc.path}: {exc.reason}") from exc


def _timestamp(value: float | datetime | None) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    return None if value is None else float(value)
