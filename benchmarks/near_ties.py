"""How close the 10th and 11th nearest neighbours are, against what a code of B bytes can resolve.

    .venv/bin/python benchmarks/near_ties.py [--n 1000000] [--queries 500] [--data uniform,clustered]

The search-at-scale target "≤ 64 bytes/vector at 10-NN overlap ≥ 0.9" asks a compressed code
to put the same 10 vectors on top as exact search. That needs the code's error on a query's
similarity to be small next to the gaps between the neighbours around rank 10. For each data
kind of `search_scale.py` (same generator) this prints those gaps, exact, over `--queries`
queries, and a lower bound on the error of any code of `--code-bytes` bytes per vector for
the uniform data: a Gaussian source at R bits per dimension cannot be coded with less than
2^(-2R) of its variance as squared error (Shannon's rate-distortion bound), so for a query q
independent of the code, q·(x − x̂) has a standard deviation of at least sqrt(2^(-2R) / dim).
The uniform data are Gaussian vectors divided by their norm; a code of them plus 2 bytes for
that norm (it varies by ~4 %, so 16 bits hold it to ~1e-6) would be a code of the Gaussian
vectors, so the bound is taken at R = (bytes + 2) · 8 / dim.
Appends a table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import time

import numpy as np
from _common import append_results, make_parser, table  # benchmarks/ is this script's folder
from search_scale import make_data

K = 10


def gaps(base: np.ndarray, queries: np.ndarray, chunk: int = 100) -> np.ndarray:
    """(q, 21) exact similarities of each query's 21 nearest neighbours, best first."""
    out = []
    for start in range(0, len(queries), chunk):
        s = queries[start : start + chunk] @ base.T
        top = np.partition(s, -(2 * K + 1), axis=1)[:, -(2 * K + 1) :]
        out.append(-np.sort(-top, axis=1))
    return np.concatenate(out)


def main() -> None:
    ap = make_parser(__doc__, model=False)  # it embeds nothing
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the base set")
    ap.add_argument("--dim", type=int, default=384, help="dimension (the model's: 384)")
    ap.add_argument("--queries", type=int, default=500, help="queries")
    ap.add_argument("--data", default="uniform,clustered", help="comma list: uniform,clustered")
    ap.add_argument("--code-bytes", type=int, default=56, help="code bytes a vector (64 - id)")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    rate = args.code_bytes * 8 / args.dim
    bound = float(np.sqrt(2.0 ** (-2 * (args.code_bytes + 2) * 8 / args.dim) / args.dim))
    rows = []
    t0 = time.perf_counter()
    for kind in args.data.split(","):
        base = make_data(kind, args.n, args.dim, seed=1)  # search_scale.py's seeds
        sims = gaps(base, make_data(kind, args.queries, args.dim, seed=2))
        del base
        gap = sims[:, K - 1] - sims[:, K]
        spread = sims[:, K - 1] - sims[:, 2 * K - 1]
        p25, p50, p75 = np.percentile(gap, [25, 50, 75])
        rows.append((kind, f"{args.n:,}", f"{np.median(sims[:, K - 1]):.4f}", f"{p50:.5f}",
                     f"{p25:.5f} / {p75:.5f}", f"{np.median(spread):.4f}",
                     f"{bound:.4f}" if kind == "uniform" else "-"))  # fmt: skip
        print(rows[-1], flush=True)
    text = table(
        ["data", "n", "10th similarity (median)", "10th − 11th (median)", "p25 / p75",
         "10th − 20th (median)", f"error std of any {args.code_bytes}-byte code ≥"],
        rows,
    )  # fmt: skip
    print(text)
    if not args.no_results:
        append_results(
            "Near ties at rank 10",
            text,
            notes=f"dim {args.dim}, {args.queries} queries, {rate:.3f} bits a dimension for "
            f"{args.code_bytes} code bytes; {time.perf_counter() - t0:.0f} s",
        )


if __name__ == "__main__":
    main()
