"""Search at scale: exact (Flat) vs HNSW vs IVF-PQ on seeded unit vectors.

    nice -n 5 .venv/bin/python benchmarks/search_scale.py --sizes 10000,100000,1000000

For each data set ("uniform": i.i.d. unit vectors, the worst case for ANN; "clustered": a
mixture of Gaussians on a low-dimensional latent subspace, normalized, which is closer to
real embeddings) and each size, every index type is built and measured: build time, memory
(RSS delta from /proc/self/statm after building and after reading the file back, and file
size, bytes per vector), single-query latency
p50/p99 (k=10), batch QPS and recall@10 against the exact index (the baseline, built and
searched in the same process). Speed-ups are ratios to Flat at the same size.

recall@10 is the 10-NN overlap |ANN top-10 ∩ exact top-10| / 10 (stricter than FAISS's
usual 1-recall@10, which is also printed as `R1@10`).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import (
    append_results,
    make_parser,
    percentiles,
    release_memory,
    rss_bytes,
    table,
    time_calls,
)

K = 10  # hits per query
CLUSTERS = 1024  # Gaussian components of the clustered data set
LATENT_DIM = 64  # intrinsic dimension of the clustered data set
TRAIN_MAX = 50_000  # vectors used to train IVF/PQ (about 49 per list at nlist 1024)
HNSW_EF = (16, 32, 64, 128, 256, 512)  # efSearch sweep
NPROBE = (4, 8, 16, 32, 64, 128)  # nprobe sweep
K_FACTOR = (2, 4, 8, 16)  # re-ranking depth sweep for ",RFlat" factories
OPQ_NITER = 10  # OPQ rotation iterations (FAISS default 50)
OPQ_TRAIN = 20_000  # vectors OPQ trains its rotation on (FAISS default 65,536)
TRAIN_BLAS_THRESHOLD = 20  # queries above which k-means uses BLAS (FAISS's usual default)
PQ_NITER = 10  # k-means iterations per PQ sub-quantizer (FAISS default 25)
PQ_POINTS_PER_CENTROID = 64  # PQ trains on 256 × this many vectors (FAISS default 256 × 256)
# "+RFlat": the index before it, re-ranked exactly from float32 vectors (no retraining).
# "IVF{nlist},PQ16+32" (FAISS's IndexIVFPQR): a 16-byte PQ code of the residual finds
# k_factor × k candidates, a 32-byte PQ code of what that code missed re-ranks them; 48 B of
# codes + an 8-byte id per vector. FAISS implements it for L2 only; on unit vectors L2 ranks
# exactly as inner product does (‖q − x‖² = 2 − 2 q·x), so it is built with METRIC_L2.
# OPQ ("OPQ48,IVF{nlist},PQ48") can be named with --factories: its training takes minutes
# per size at dim 384 on 2 cores in this FAISS build, so it is not in the default run.
DEFAULT_FACTORIES = (
    "Flat", "HNSW32", "IVF{nlist},Flat", "IVF{nlist},SQ8", "IVF{nlist},PQ48",
    "IVF{nlist},PQ16+32", "IVF{nlist},PQ32", "+RFlat",
)  # fmt: skip
REFINE_PQ = re.compile(r"PQ\d+\+\d+")  # IVFPQR factories: "PQ{M}+{M_refine}"


@dataclass
class Row:
    data: str
    n: int
    factory: str
    param: str
    build_s: float
    rss_b: float  # bytes/vector, RSS delta after build (the building process)
    file_b: float  # bytes/vector on disk
    loaded_b: float  # bytes/vector, RSS delta of reading the file back (a searching process)
    p50_ms: float
    p99_ms: float
    qps: float
    recall: float  # 10-NN overlap
    r1: float  # 1-recall@10


# ---- data --------------------------------------------------------------------------------------


def unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(kind: str, n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """`(n, dim)` float32, L2-normalized, seeded; made in chunks to bound peak memory."""
    out = np.empty((n, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    if kind == "clustered":
        basis_rng = np.random.default_rng(12345)  # the same space for base and queries
        centres = unit_rows(basis_rng.standard_normal((CLUSTERS, dim), dtype=np.float32))
        basis, _ = np.linalg.qr(basis_rng.standard_normal((dim, LATENT_DIM)))
        basis = basis.T.astype(np.float32)  # (latent, dim), orthonormal rows
        scales = (0.6 / np.sqrt(np.arange(1, LATENT_DIM + 1))).astype(np.float32)  # power law
        weights = basis_rng.dirichlet(np.full(CLUSTERS, 2.0))  # unequal cluster sizes
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        if kind == "uniform":
            block = rng.standard_normal((m, dim), dtype=np.float32)
        else:
            which = rng.choice(CLUSTERS, size=m, p=weights)
            latent = rng.standard_normal((m, LATENT_DIM), dtype=np.float32) * scales
            noise = rng.standard_normal((m, dim), dtype=np.float32) * (0.05 / np.sqrt(dim))
            block = centres[which] + latent @ basis + noise
        out[start : start + m] = unit_rows(block.astype(np.float32))
    return out


# ---- measuring ---------------------------------------------------------------------------------


def recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(10-NN overlap, 1-recall@10) of `found` (q, k) against `truth` (q, k)."""
    overlap = np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth, strict=True)])
    r1 = np.mean([t[0] in f for f, t in zip(found, truth, strict=True)])
    return float(overlap), float(r1)


def measure(index, queries: np.ndarray, truth: np.ndarray | None, n_single: int,
            budget_s: float) -> tuple[float, float, float, np.ndarray, float, float]:  # fmt: skip
    """p50, p99 (ms), QPS, ids, recall, r1 of `index` (a raw faiss index) for `queries`."""
    single = time_calls(lambda i: index.search(queries[i : i + 1], K), n_single,
                        budget_s=budget_s)  # fmt: skip
    p50, p99 = percentiles(single, 50, 99)
    t = time.perf_counter()
    _, ids = index.search(queries, K)
    qps = len(queries) / (time.perf_counter() - t)
    r, r1 = recall(ids, truth) if truth is not None else (1.0, 1.0)
    return p50, p99, qps, ids, r, r1


def file_and_loaded_bytes(faiss, index, scratch: Path, flags: int = 0) -> tuple[int, int]:
    """(file size, RSS delta of `faiss.read_index(file, flags)`): what a search process that
    opens the index holds, without the growth slack that adding in place leaves behind (each
    inverted list's vectors double their capacity as they grow)."""
    path = scratch / "index.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    release_memory()
    rss0 = rss_bytes()
    loaded = faiss.read_index(str(path), flags)
    release_memory()
    held = rss_bytes() - rss0
    del loaded
    release_memory()
    path.unlink()
    return size, held


def _refine_sweep(refine, ivf, probes, factors) -> list[tuple[str, object]]:
    """(label, setter) pairs over nprobe of `ivf` × k_factor of `refine` (the re-ranking depth)."""
    return [(f"nprobe={p} k_factor={kf}",
             lambda p=p, kf=kf: (setattr(refine, "k_factor", kf), setattr(ivf, "nprobe", p)))
            for p in probes for kf in factors if p <= ivf.nlist]  # fmt: skip


def sweep(faiss, index, factory: str) -> list[tuple[str, object]]:
    """(label, setter) pairs for the query-time knob of `factory`."""
    inner = index
    if "RFlat" in factory:
        return _refine_sweep(index, faiss.extract_index_ivf(index.base_index), (16, 32, 64),
                             K_FACTOR)  # fmt: skip
    if REFINE_PQ.search(factory):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))  # IndexIVFPQR: its k_factor
        return _refine_sweep(ivf, ivf, (32, 64, 128), (16, 32))
    if "HNSW" in factory:
        hnsw = faiss.downcast_index(inner)
        return [(f"efSearch={ef}", lambda ef=ef: setattr(hnsw.hnsw, "efSearch", ef))
                for ef in HNSW_EF]  # fmt: skip
    if "IVF" in factory:
        ivf = faiss.extract_index_ivf(inner)
        return [(f"nprobe={p}", lambda p=p: setattr(ivf, "nprobe", p))
                for p in NPROBE if p <= ivf.nlist]  # fmt: skip
    return [("exact", lambda: None)]


def _limit_training(faiss, index) -> None:
    """Cut PQ and OPQ training to what 2 cores finish in seconds: this FAISS build's k-means
    on PQ sub-vectors (d = 6..12) takes ~2 s per sub-quantizer on 10k vectors at defaults."""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter, vt.max_train_points = OPQ_NITER, OPQ_TRAIN
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return
    if hasattr(ivf, "do_polysemous_training"):
        # the factory turns on polysemous training (simulated annealing of the PQ codes for
        # Hamming filtering, which nothing here uses): ~3 min per PQ index on 2 cores
        ivf.do_polysemous_training = False
    for pq in (getattr(ivf, "pq", None), getattr(ivf, "refine_pq", None)):
        if pq is not None:
            pq.cp.niter = PQ_NITER
            pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID
    if isinstance(ivf, faiss.IndexIVFPQR):
        # L2 IVF-PQ precomputes an nlist × M × 256 float table (16 MB at IVF1024,PQ16):
        # 17 B/vector at 1M, more than the 64 B/vector this index is meant for. Without it a
        # query builds its tables per probed list instead.
        ivf.use_precomputed_table = -1


def nlist_for(n: int) -> int:
    """IVF lists for `n` vectors: 1024 (the factory the issue names) where it can be trained."""
    nlist = 1024
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    return nlist


def run_size(faiss, kind: str, n: int, args, scratch: Path) -> list[Row]:
    dim = args.dim
    base = make_data(kind, n, dim, seed=1)
    queries = make_data(kind, args.queries, dim, seed=2)
    rows: list[Row] = []
    truth = previous = None
    previous_factory, previous_build, previous_rss = "", 0.0, 0.0
    for template in args.factories:
        factory = template.format(nlist=nlist_for(n))
        if "HNSW" in factory and n > args.hnsw_max and kind != "clustered":
            print(f"skipping {factory} on {kind} n={n} (--hnsw-max {args.hnsw_max})")
            continue
        if factory.startswith("+"):  # wrap the previous index, e.g. "+RFlat"
            factory = f"{previous_factory},{factory[1:]}"
        release_memory()
        rss0 = rss_bytes()
        t = time.perf_counter()
        if factory.endswith(",RFlat") and previous is not None:
            # the refine layer over the already-built index: float32 copies, no retraining
            index = faiss.IndexRefineFlat(previous, faiss.swig_ptr(base))
            index.own_fields = False
            build = previous_build + time.perf_counter() - t
        else:
            metric = faiss.METRIC_L2 if REFINE_PQ.search(factory) else faiss.METRIC_INNER_PRODUCT
            index = faiss.index_factory(dim, factory, metric)
            _limit_training(faiss, index)
            if not index.is_trained:
                # this FAISS build ships distance_compute_blas_threshold = 128000, so k-means
                # on < 128k points runs the scalar path: 10x slower PQ training than BLAS
                saved = faiss.cvar.distance_compute_blas_threshold
                faiss.cvar.distance_compute_blas_threshold = TRAIN_BLAS_THRESHOLD
                index.train(base[: min(n, TRAIN_MAX)])
                faiss.cvar.distance_compute_blas_threshold = saved
            index.add(base)
            build = time.perf_counter() - t
        release_memory()
        rss_b = (rss_bytes() - rss0) / n + (previous_rss if factory.endswith(",RFlat") else 0)
        # IVFPQR: reading would rebuild the L2 table _limit_training turned off
        flags = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE if REFINE_PQ.search(factory) else 0
        file_b, loaded_b = (b / n for b in file_and_loaded_bytes(faiss, index, scratch, flags))
        for label, setter in sweep(faiss, index, factory):
            setter()
            budget = args.latency_budget
            p50, p99, qps, ids, r, r1 = measure(index, queries, truth, args.single, budget)
            if factory == "Flat":
                truth = ids
            rows.append(Row(kind, n, factory, label, build, rss_b, file_b, loaded_b, p50, p99,
                            qps, r, r1))  # fmt: skip
            print(_fmt(rows[-1]), flush=True)
        if factory.endswith(",RFlat"):
            del index
            previous = None
        else:
            previous, previous_factory, previous_build, previous_rss = index, factory, build, rss_b
    del previous
    del base
    release_memory()
    return rows


def idmap_overhead(faiss, n: int) -> float:
    """Bytes/vector that `IndexIDMap2` (what `engine.vectors.VectorIndex` wraps every index
    in) adds on top of the index it wraps: its id array and its reverse hash map."""
    release_memory()
    rss0 = rss_bytes()
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(1))
    index.add_with_ids(np.zeros((n, 1), np.float32), np.arange(n, dtype=np.int64) * 7 + 1)
    release_memory()
    out = (rss_bytes() - rss0) / n - 4  # minus the 1-d vectors themselves
    del index
    release_memory()
    return out


def _fmt(r: Row) -> str:
    return (
        f"{r.data:9} n={r.n:>8} {r.factory:24} {r.param:22} build {r.build_s:7.1f}s "
        f"rss {r.rss_b:7.0f} B/v file {r.file_b:7.0f} B/v loaded {r.loaded_b:7.0f} B/v p50 {r.p50_ms:8.3f} ms "
        f"p99 {r.p99_ms:8.3f} ms qps {r.qps:9.0f} R@10 {r.recall:.3f} R1@10 {r.r1:.3f}"
    )


# ---- reporting ---------------------------------------------------------------------------------


def best(rows: list[Row], *, recall_min: float, bytes_max: float | None = None,
         r1: bool = False) -> Row | None:  # fmt: skip
    """The fastest row (p50) reaching `recall_min` (of R1@10 if `r1`, else R@10), within
    `bytes_max` of loaded RSS and of file if given."""
    ok = [r for r in rows if (r.r1 if r1 else r.recall) >= recall_min
          and (bytes_max is None or max(r.file_b, r.loaded_b) <= bytes_max)]  # fmt: skip
    return min(ok, key=lambda r: r.p50_ms) if ok else None


def report(rows: list[Row], args, idmap_b: float) -> str:
    from engine.vectors import FLAT_LIMIT, HNSW_EF_SEARCH, choose_factory

    out = []
    for kind in args.data:
        for n in sorted({r.n for r in rows if r.data == kind}):
            sub = [r for r in rows if r.data == kind and r.n == n]
            flat = next(r for r in sub if r.factory == "Flat")
            out.append(f"\n### {kind} vectors, n = {n:,}, dim {args.dim}\n")
            out.append(table(
                ["index", "query knob", "build s", "build RSS B/vec", "file B/vec",
                 "loaded RSS B/vec", "p50 ms",
                 "p99 ms", "× Flat p50", "batch QPS", "× Flat QPS", "R@10", "R1@10"],
                [(r.factory, r.param, r.build_s, r.rss_b, r.file_b, r.loaded_b, r.p50_ms,
                  r.p99_ms,
                  flat.p50_ms / r.p50_ms, r.qps, r.qps / flat.qps, r.recall, r.r1)
                 for r in sub],
            ))  # fmt: skip
    out.append("\n### Targets (at the largest size run) and the automatic choice\n")
    lines = []
    for kind in args.data:
        n = max(r.n for r in rows if r.data == kind)
        sub = [r for r in rows if r.data == kind and r.n == n]
        fast = best(sub, recall_min=0.95)
        small = best(sub, recall_min=0.90, bytes_max=64)
        small_r1 = best(sub, recall_min=0.90, bytes_max=64, r1=True)
        lines.append((kind, n, "p50 ≤ 10 ms at R@10 ≥ 0.95",
                      _verdict(fast, lambda r: r.p50_ms <= 10)))  # fmt: skip
        lines.append((kind, n, "≤ 64 B/vec at R@10 ≥ 0.90",
                      _verdict(small, lambda r: True, within=64)))  # fmt: skip
        lines.append((kind, n, "≤ 64 B/vec at R1@10 ≥ 0.90 (FAISS's recall@10)",
                      _verdict(small_r1, lambda r: True, within=64)))  # fmt: skip
    out.append(table(["data", "n", "target", "best measured"], lines))
    choice = []
    for kind in args.data:
        for n in sorted({r.n for r in rows if r.data == kind}):
            factory = choose_factory(n)
            want = "exact" if factory == "Flat" else f"efSearch={HNSW_EF_SEARCH}"
            hit = [r for r in rows if r.data == kind and r.n == n and r.factory == factory
                   and r.param == want]  # fmt: skip
            if hit:
                r = hit[0]
                choice.append((kind, n, factory, want, r.p50_ms, r.loaded_b + idmap_b,
                               r.recall))  # fmt: skip
    if not choice:  # the factories run did not include the one choose_factory picks
        return "".join(out)
    out.append(
        f"\n`choose_factory(n)` (Flat up to {FLAT_LIMIT:,}, then HNSW32, efSearch "
        f"{HNSW_EF_SEARCH}) as measured; RAM includes the `IndexIDMap2` wrapper of "
        f"`VectorIndex`, measured at {idmap_b:.0f} B/vector:\n\n"
    )
    out.append(table(["data", "n", "choose_factory", "knob", "p50 ms", "RAM B/vec", "R@10"],
                     choice))  # fmt: skip
    return "".join(out)


def _verdict(row: Row | None, ok, *, within: float | None = None) -> str:
    if row is None:
        where = f"within {within:.0f} B/vec " if within is not None else ""
        return f"MISSED: no configuration {where}reached the recall"
    mark = "met" if ok(row) else "MISSED"
    return (
        f"{mark}: {row.factory} {row.param}: p50 {row.p50_ms:.2f} ms, R@10 "
        f"{row.recall:.3f}, R1@10 {row.r1:.3f}, {max(row.loaded_b, row.file_b):.0f} B/vec "
        "(file or loaded RSS)"
    )


def main() -> None:
    ap = make_parser(__doc__, model=False)
    ap.add_argument(
        "--sizes",
        default="10000,100000",
        help="comma list of index sizes (the issue's full run: 10000,100000,1000000)",
    )
    ap.add_argument("--data", default="uniform,clustered", help="comma list: uniform,clustered")
    ap.add_argument("--dim", type=int, default=384, help="vector width (the model's dim)")
    ap.add_argument("--queries", type=int, default=1000, help="queries for recall and batch QPS")
    ap.add_argument("--single", type=int, default=200, help="single queries timed per setting")
    ap.add_argument(
        "--latency-budget",
        type=float,
        default=3.0,
        help="seconds of single-query timing per setting (at least 5 queries)",
    )
    ap.add_argument(
        "--factories",
        default=";".join(DEFAULT_FACTORIES),
        help="semicolon list of FAISS factories; {nlist} is filled in by size",
    )
    ap.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    ap.add_argument(
        "--hnsw-max",
        type=int,
        default=100_000,
        help="above this size HNSW is built for the clustered data only (an HNSW "
        "build of 1M vectors takes ~15 min on 2 busy cores)",
    )
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    args.data = [d.strip() for d in args.data.split(",") if d.strip()]
    args.factories = [f.strip() for f in args.factories.split(";") if f.strip()]
    if "Flat" not in args.factories:
        args.factories.insert(0, "Flat")  # the baseline and the ground truth
    args.factories.remove("Flat")
    args.factories.insert(0, "Flat")
    sizes = [int(s) for s in args.sizes.split(",")]

    import faiss

    faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.data:
            for n in sizes:
                rows += run_size(faiss, kind, n, args, Path(tmp))
    idmap_b = idmap_overhead(faiss, max(sizes))
    body = report(rows, args, idmap_b)
    total = time.perf_counter() - started
    print(body)
    print(f"total {total:.0f} s")
    if not args.no_results:
        append_results(
            "Search at scale", body,
            notes=f"{args.threads} FAISS threads, k={K}, {args.queries} queries for recall/QPS, "
                  f"up to {args.single} timed single queries per setting; PID {os.getpid()} "
                  f"ran {total:.0f} s in all; training on ≤ {TRAIN_MAX:,} vectors; clustered = "
                  f"{CLUSTERS} Gaussians, {LATENT_DIM}-d latent with power-law spectrum, "
                  "normalized",
        )  # fmt: skip


if __name__ == "__main__":
    main()
