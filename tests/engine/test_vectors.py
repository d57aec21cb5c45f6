"""FAISS wrapper: every search path against a brute-force numpy reference on seeded vectors."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from engine import vectors as vec
from engine.errors import IndexStateError
from engine.vectors import VectorIndex, choose_factory, min_train_size

DIM = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n: int, seed: int = 0, clusters: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered unit vectors (like real embeddings), ids offset from positions, and queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    x = _unit(centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, DIM)))
    q = _unit(x[:40] + 0.1 * rng.standard_normal((min(n, 40), DIM)))
    return np.arange(1000, 1000 + n, dtype=np.int64), x, q


def _reference(ids, x, q, k, allowed=None):
    sims = q @ x.T
    if allowed is not None:
        sims[:, ~np.isin(ids, allowed)] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


@functools.cache
def _built(factory: str, n: int = 1500) -> VectorIndex:
    """Built once per module: PQ training is the slow part of this file. Do not mutate."""
    ids, x, _ = _data(n)
    return VectorIndex.build(DIM, factory, ids, x)


def _recall(found: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, ref, strict=True)]))


def test_choose_factory_is_exact_below_the_limit_and_hnsw_above():
    assert choose_factory(10) == "Flat"
    assert choose_factory(vec.FLAT_LIMIT) == "Flat"
    assert choose_factory(vec.FLAT_LIMIT + 1) == vec.LARGE_FACTORY
    assert choose_factory(50, flat_limit=10) == vec.LARGE_FACTORY
    assert min_train_size("IVF64,PQ8") == 64 * vec.IVF_TRAIN_PER_LIST
    assert min_train_size("HNSW32") == 0


def test_flat_search_equals_brute_force():
    ids, x, q = _data(500)
    index = VectorIndex.create(DIM)
    index.add(ids, x)
    scores, found = index.search(q, 10)
    ref_scores, ref_ids = _reference(ids, x, q, 10)
    np.testing.assert_array_equal(found, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_flat_search_with_allowed_ids_equals_brute_force():
    ids, x, q = _data(500)
    allowed = ids[::7]
    index = VectorIndex.build(DIM, "Flat", ids, x)
    scores, found = index.search(q, 10, allowed=allowed)
    ref_scores, ref_ids = _reference(ids, x, q, 10, allowed)
    np.testing.assert_array_equal(found, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_k_above_size_pads_with_minus_one():
    ids, x, q = _data(5)
    scores, found = VectorIndex.build(DIM, "Flat", ids, x).search(q[:1], 8)
    assert sorted(found[0, :5]) == sorted(ids)
    assert (found[0, 5:] == -1).all()


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat", "IVF16,PQ16x4,RFlat"])
def test_approximate_search_recall_at_10(factory):
    ids, x, q = _data(1500)
    _, found = _built(factory).search(q, 10)
    assert _recall(found, _reference(ids, x, q, 10)[1]) >= 0.95


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat", "IVF16,PQ16x4,RFlat"])
@pytest.mark.parametrize("exact_limit", [0, vec.EXACT_SUBSET_LIMIT])
def test_approximate_search_with_allowed_ids(factory, exact_limit, monkeypatch):
    """Small subsets are searched exactly; with the limit at 0 the FAISS selector is used."""
    monkeypatch.setattr(vec, "EXACT_SUBSET_LIMIT", exact_limit)
    ids, x, q = _data(1500)
    allowed = ids[::3]
    _, found = _built(factory).search(q, 10, allowed=allowed)
    assert np.isin(found[found >= 0], allowed).all()
    ref = _reference(ids, x, q, 10, allowed)[1]
    assert _recall(found, ref) >= (1.0 if exact_limit else 0.95)


def test_remove_from_flat_and_from_hnsw_which_rebuilds():
    ids, x, q = _data(300)
    for factory in ("Flat", "HNSW32"):
        index = VectorIndex.build(DIM, factory, ids, x)
        gone = ids[:100]
        index.remove(np.append(gone, 99_999))  # an absent id is ignored
        assert index.ntotal == 200 and index.factory == factory
        assert not np.isin(index.ids(), gone).any()
        _, found = index.search(q, 10)
        keep = ~np.isin(ids, gone)
        assert _recall(found, _reference(ids[keep], x[keep], q, 10)[1]) >= 0.95


def test_save_load_round_trip_and_mmap(tmp_path):
    ids, x, q = _data(200)
    index = VectorIndex.build(DIM, "Flat", ids, x)
    path = tmp_path / "image.000001.faiss"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    for mmap in (False, True):
        loaded = VectorIndex.load(path, "Flat", mmap=mmap)
        assert loaded.read_only == mmap
        np.testing.assert_array_equal(loaded.ids(), ids)
        np.testing.assert_array_equal(loaded.search(q, 10)[1], index.search(q, 10)[1])
        np.testing.assert_allclose(loaded.vectors()[1], x)


def test_memory_mapped_index_refuses_writes(tmp_path):
    ids, x, _ = _data(10)
    VectorIndex.build(DIM, "Flat", ids, x).save(tmp_path / "a.faiss")
    loaded = VectorIndex.load(tmp_path / "a.faiss", "Flat", mmap=True)
    with pytest.raises(IndexStateError, match="memory-mapped read-only"):
        loaded.add(ids + 100, x)


def test_rebuild_keeps_ids_and_vectors():
    ids, x, q = _data(400)
    flat = VectorIndex.build(DIM, "Flat", ids, x)
    hnsw = flat.rebuild("HNSW32")
    assert hnsw.factory == "HNSW32"
    got_ids, got = hnsw.vectors()
    order = np.argsort(got_ids)
    np.testing.assert_array_equal(got_ids[order], ids)
    np.testing.assert_allclose(got[order], x, atol=1e-6)


def test_validation_errors(tmp_path):
    ids, x, _ = _data(10)
    index = VectorIndex.create(DIM)
    with pytest.raises(ValueError, match=r"must be \(n, 32\) float32"):
        index.add(ids, x[:, :16])
    with pytest.raises(ValueError, match="NaN or infinity"):
        index.add(ids[:1], np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(ValueError, match="3 ids for 10 vectors"):
        index.add(ids[:3], x)
    assert index.ntotal == 0  # rejected writes left nothing behind
    with pytest.raises(IndexStateError, match="invalid FAISS factory string 'Bogus7'"):
        VectorIndex.create(DIM, "Bogus7")
    with pytest.raises(IndexStateError, match="needs training; use VectorIndex.build"):
        VectorIndex.create(DIM, "IVF4,Flat")
    with pytest.raises(IndexStateError, match="needs at least 156 vectors to train, got 10"):
        VectorIndex.build(DIM, "IVF4,Flat", ids, x)
    (tmp_path / "bad.faiss").write_bytes(b"not faiss")
    with pytest.raises(IndexStateError, match="cannot read vector file"):
        VectorIndex.load(tmp_path / "bad.faiss", "Flat")
