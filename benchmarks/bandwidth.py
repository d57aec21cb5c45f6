"""The physical limit of exact search: memory bandwidth vs Flat search at 1M × 384 float32.

    .venv/bin/python benchmarks/bandwidth.py [--n 1000000] [--dim 384]

Bandwidth is measured with large numpy operations on one thread (copy: bytes read + written;
sum: bytes read) and with one reader thread per core (numpy releases the GIL in reductions).
A single exact query must read every stored vector once, so its floor is
`n * dim * 4 bytes / bandwidth`; the table reports Flat search time as a multiple of that
floor, for single queries (bandwidth-bound) and per query in a batch (vectors are reused
from cache across queries through BLAS, so a batch can beat the single-query floor).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from _common import append_results, make_parser, percentiles, table, time_calls

GB = 1e9  # bytes; bandwidth is quoted in decimal GB/s


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls of `fn` (the least disturbed by other jobs)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth(size_bytes: int, repeats: int, threads: int) -> dict[str, float]:
    """GB/s of copy (read+write), sum (read) on one thread, and sum on `threads` threads."""
    a = np.ones(size_bytes // 8, dtype=np.float64)
    b = np.empty_like(a)
    np.copyto(b, a)  # fault the pages in before timing
    copy = best_of(lambda: np.copyto(b, a), repeats)
    total = best_of(lambda: a.sum(), repeats)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        par = best_of(lambda: list(pool.map(np.sum, parts)), repeats)
    return {"copy": 2 * a.nbytes / copy / GB, "sum": a.nbytes / total / GB,
            f"sum×{threads}": a.nbytes / par / GB}  # fmt: skip


def flat_search(n: int, dim: int, threads: int, n_single: int, n_batch: int) -> dict[str, float]:
    """Seconds per query of FAISS `IndexFlatIP` at `n` × `dim`: single (p50) and batched."""
    import faiss

    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(dim)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        index.add(block / np.linalg.norm(block, axis=1, keepdims=True))
    queries = rng.standard_normal((max(n_single, n_batch), dim), dtype=np.float32)
    out = {}
    for t in sorted({1, threads}):
        faiss.omp_set_num_threads(t)
        index.search(queries[:1], 10)  # warm-up
        single = time_calls(lambda i: index.search(queries[i : i + 1], 10), n_single,
                            budget_s=10)  # fmt: skip
        out[f"single query p50, {t} thread(s)"] = percentiles(single, 50)[0] / 1e3
        batch = best_of(lambda: index.search(queries[:n_batch], 10), 2) / n_batch
        out[f"batch of {n_batch}, per query, {t} thread(s)"] = batch
    return out


def main() -> None:
    ap = make_parser(__doc__, model=False)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the exact index")
    ap.add_argument("--dim", type=int, default=384, help="vector width")
    ap.add_argument("--array-gb", type=float, default=1.0, help="size of the bandwidth arrays")
    ap.add_argument("--repeats", type=int, default=5, help="best-of repeats per measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads")
    ap.add_argument("--single", type=int, default=50, help="single queries timed")
    ap.add_argument("--batch", type=int, default=256, help="queries in the batched search")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()

    bw = bandwidth(int(args.array_gb * GB), args.repeats, args.threads)
    rows = [(f"numpy {k} ({args.array_gb:g} GB array)", v) for k, v in bw.items()]
    print(table(["operation", "GB/s"], rows))
    flat = flat_search(args.n, args.dim, args.threads, args.single, args.batch)
    scanned = args.n * args.dim * 4  # bytes read by one exact query
    best_bw = max(bw.values())
    srows = []
    for label, secs in flat.items():
        floor = scanned / (best_bw * GB)
        srows.append((label, secs * 1e3, scanned / secs / GB, floor * 1e3, floor / secs))
    body = (table(["operation", "GB/s"], rows) + "\n" + table(
        ["Flat search " + f"{args.n:,}×{args.dim} f32", "ms/query", "effective GB/s",
         "bandwidth floor ms", "floor / measured"], srows))  # fmt: skip
    print(body)
    if not args.no_results:
        append_results(
            "Memory bandwidth and the exact-search floor", body,
            notes=f"{args.threads} threads for FAISS and the parallel sum; floor uses the "
                  f"best bandwidth measured ({best_bw:.1f} GB/s); 'floor / measured' = 1 means "
                  "exact search runs at the bandwidth bound, > 1 means it beats it (batch reuse)",
        )  # fmt: skip


if __name__ == "__main__":
    main()
