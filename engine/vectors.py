"""The vector side of an index: one FAISS index per modality, ids = SQLite primary keys.

Index types are FAISS factory strings (`"Flat"`, `"HNSW32"`, `"IVF1024,PQ32"`), chosen by
size unless the user names one. Every index is wrapped in `IndexIDMap2` with inner-product
metric: vectors are L2-normalized, so scores are cosines. Files are saved atomically (temp
name, fsync, `os.replace`, fsync of the directory) and read memory-mapped where FAISS can.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import IndexStateError

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

FLAT_LIMIT = 20_000  # vectors; up to here exact search answers in milliseconds
LARGE_FACTORY = "HNSW32"  # above FLAT_LIMIT: graph search, exact vectors kept, no training
HNSW_EF_SEARCH = 128  # HNSW candidate list at query time; higher = better recall, slower
IVF_NPROBE = 32  # IVF lists visited per query (capped at nlist)
REFINE_K_FACTOR = 8  # candidates re-scored exactly per hit by ",RFlat" factories
IVF_TRAIN_PER_LIST = 39  # FAISS wants about this many training vectors per IVF list
EXACT_SUBSET_LIMIT = 50_000  # filtered searches over at most this many ids are brute force
SUFFIX = ".faiss"


def choose_factory(n: int, *, flat_limit: int = FLAT_LIMIT) -> str:
    """The factory string for an index of `n` vectors: exact up to `flat_limit`, HNSW above."""
    return "Flat" if n <= flat_limit else LARGE_FACTORY


def min_train_size(factory: str) -> int:
    """How many vectors an index of `factory` needs before it can be trained (0: none)."""
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) * IVF_TRAIN_PER_LIST if match else 0


BLAS_THRESHOLD = 20  # query batches at least this big use BLAS (faiss's default, 128000,
# kept batched exact search and k-means training off BLAS: ~10x slower, benchmarks/RESULTS.md)


def _faiss():
    import faiss  # lazy: keeps `xmodal --help` fast

    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return faiss


class VectorIndex:
    """One modality's vectors: `(n, dim)` float32, L2-normalized, keyed by int64 ids."""

    def __init__(self, index: faiss.IndexIDMap2, factory: str, *, read_only: bool = False):
        self.index = index
        self.factory = factory
        self.read_only = read_only  # memory-mapped: search only
        _tune(index)

    @classmethod
    def create(cls, dim: int, factory: str = "Flat") -> VectorIndex:
        """An empty index; `factory` must not need training (use `build` for IVF)."""
        if min_train_size(factory):
            raise IndexStateError(f"factory {factory!r} needs training; use VectorIndex.build")
        return cls(_new(dim, factory), factory)

    @classmethod
    def build(cls, dim: int, factory: str, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
        """An index of `factory` holding `vectors` `(n, dim)` float32 under `ids` `(n,)` int64.

        Trains the index on `vectors` first when the factory needs it.
        """
        index = _new(dim, factory)
        vectors = _as_matrix(vectors, dim)
        if not index.is_trained:
            if len(vectors) < min_train_size(factory):
                raise IndexStateError(
                    f"factory {factory!r} needs at least {min_train_size(factory)} vectors to "
                    f"train, got {len(vectors)}; use a smaller nlist or 'Flat'"
                )
            index.train(vectors)
        out = cls(index, factory)
        out.add(ids, vectors)
        return out

    @classmethod
    def load(cls, path: str | Path, factory: str, *, mmap: bool = False) -> VectorIndex:
        """Read an index file; with `mmap`, map it read-only where the index type allows."""
        faiss = _faiss()
        path = str(path)
        try:
            if mmap:
                try:
                    return cls(faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC), factory,
                               read_only=True)  # fmt: skip
                except RuntimeError:
                    log.debug("%s cannot be memory-mapped; reading it", path)
            return cls(faiss.read_index(path), factory)
        except RuntimeError as exc:
            raise IndexStateError(f"cannot read vector file {path}: {exc}") from exc

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        """`(n,)` int64 ids in storage order."""
        return _faiss().vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add `vectors` `(n, dim)` float32, L2-normalized, under new `ids` `(n,)` int64."""
        self._writable()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = _as_matrix(vectors, self.dim)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        """Drop `ids` (absent ids are ignored); rebuilds index types that cannot remove."""
        self._writable()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids) or not self.ntotal:
            return
        try:
            self.index.remove_ids(_faiss().IDSelectorBatch(ids))
        except RuntimeError:  # HNSW cannot remove: rebuild from the kept vectors
            kept_ids, kept = self.vectors()
            keep = ~np.isin(kept_ids, ids)
            self.index = VectorIndex.build(self.dim, self.factory, kept_ids[keep], kept[keep]).index

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All `(ids (n,) int64, vectors (n, dim) float32)`; lossy for PQ-compressed types."""
        n = self.ntotal
        if n == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return self.ids(), self.index.index.reconstruct_n(0, n).astype(np.float32)

    def rebuild(self, factory: str) -> VectorIndex:
        """The same vectors in an index of another type."""
        ids, vectors = self.vectors()
        return VectorIndex.build(self.dim, factory, ids, vectors)

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` by cosine for `queries` `(q, dim)` float32, L2-normalized.

        Returns `(scores (q, k) float32, ids (q, k) int64)`, best first; missing places have
        id -1. `allowed` `(m,)` int64 restricts the candidates: Flat uses a FAISS selector
        (exact); other types score small subsets exactly from their stored vectors.
        """
        queries = _as_matrix(queries, self.dim)
        faiss = _faiss()
        if allowed is None:
            scores, ids = self.index.search(queries, k)
            return scores, ids.astype(np.int64)
        allowed = np.ascontiguousarray(allowed, dtype=np.int64)
        small = len(allowed) <= EXACT_SUBSET_LIMIT
        if self.factory != "Flat" and (small or "RFlat" in self.factory):  # refine: no selector
            subset = self._stored(allowed)
            if subset is not None:
                return _brute_force(queries, k, *subset)
        params = _params(self.index, faiss.IDSelectorBatch(allowed))
        scores, ids = self.index.search(queries, k, params=params)
        return scores, ids.astype(np.int64)

    def _stored(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """`(ids, vectors)` of the `wanted` ids present, read from exact storage; None when
        the index keeps no exact vectors addressable by position (IVF, PQ)."""
        faiss = _faiss()
        inner = faiss.downcast_index(self.index.index)
        if hasattr(inner, "refine_index"):
            store = faiss.downcast_index(inner.refine_index)
        elif hasattr(inner, "hnsw"):
            store = faiss.downcast_index(inner.storage)
        else:
            return None
        if not isinstance(store, faiss.IndexFlat):
            return None
        id_map = self.ids()
        order = np.argsort(id_map, kind="stable")
        where = np.searchsorted(id_map[order], wanted)
        where = np.minimum(where, len(order) - 1)
        found = id_map[order[where]] == wanted
        positions = order[where[found]]
        return wanted[found], store.reconstruct_batch(positions)

    def save(self, path: str | Path) -> None:
        """Write atomically: a temp file, fsync, `os.replace`, then fsync the directory."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        _faiss().write_index(self.index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def _writable(self) -> None:
        if self.read_only:
            raise IndexStateError("this vector index is memory-mapped read-only")


def file_key(modality: str) -> str:
    """The meta key naming the committed vector file of `modality`."""
    return f"vectors:{modality}"


def factory_key(modality: str) -> str:
    """The meta key holding the factory string of `modality`'s index."""
    return f"factory:{modality}"


def file_name(modality: str, generation: int) -> str:
    """Vector files are never overwritten: each commit writes a new generation."""
    return f"{modality}.{generation:06d}{SUFFIX}"


def open_all(
    index_dir: str | Path, meta: dict[str, str], modalities: tuple[str, ...], *, mmap: bool
) -> dict[str, VectorIndex]:
    """The committed vector index of each modality that has one, as `meta` names them."""
    out = {}
    for modality in modalities:
        name = meta.get(file_key(modality))
        if name:
            path = Path(index_dir) / name
            if not path.exists():
                raise IndexStateError(
                    f"vector file {path} is missing; rebuild the index with: "
                    f"xmodal index FOLDER --index {index_dir} --rebuild"
                )
            out[modality] = VectorIndex.load(path, meta[factory_key(modality)], mmap=mmap)
    return out


def _brute_force(
    queries: np.ndarray, k: int, ids: np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    if len(ids):
        sims = queries @ vectors.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        scores[:, : top.shape[1]] = np.take_along_axis(sims, top, axis=1)
        out_ids[:, : top.shape[1]] = ids[top]
    return scores, out_ids


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new(dim: int, factory: str) -> faiss.IndexIDMap2:
    faiss = _faiss()
    try:
        inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexStateError(
            f"invalid FAISS factory string {factory!r}: {exc}; try 'Flat', 'HNSW32' "
            f"or 'IVF1024,PQ32'"
        ) from exc
    view = faiss.downcast_index(inner)  # a second handle; `inner` keeps owning the index
    if hasattr(view, "do_polysemous_training"):
        # polysemous codes are never used here and cost minutes of training on 2 cores
        view.do_polysemous_training = False
    return faiss.IndexIDMap2(inner)


def _tune(index: faiss.IndexIDMap2) -> None:
    faiss = _faiss()
    inner = faiss.downcast_index(index.index)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    if hasattr(inner, "k_factor"):
        inner.k_factor = REFINE_K_FACTOR
    try:
        ivf = faiss.extract_index_ivf(inner)
    except RuntimeError:
        return
    ivf.nprobe = min(IVF_NPROBE, ivf.nlist)


def _params(index: faiss.IndexIDMap2, selector: faiss.IDSelector):
    faiss = _faiss()
    inner = faiss.downcast_index(index.index)
    if hasattr(inner, "hnsw"):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=4 * HNSW_EF_SEARCH)
    try:
        ivf = faiss.extract_index_ivf(inner)
    except RuntimeError:
        return faiss.SearchParameters(sel=selector)
    return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)


def _as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"vectors must be (n, {dim}) float32, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinity")
    return vectors
