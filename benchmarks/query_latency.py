"""End-to-end query latency with a warm model: encode + search + metadata fetch, by modality.

    .venv/bin/python benchmarks/query_latency.py [--model PATH] [--synthetic 100000]

Two indexes are measured through the public API (`engine.search.SearchEngine`):
- "demo": generated media (JPEGs, espeak-ng clips, text notes) indexed by the real pipeline
  (`indexer.runner.index_folders`) with the real towers;
- "synthetic": `--synthetic` seeded clustered vectors split over the three modalities, with
  their rows, written through `indexer.writer.IndexWriter` in one commit (so the automatic
  index type applies: HNSW32 above `FLAT_LIMIT` vectors per modality).
Each query is timed whole (`SearchEngine.search`) and in parts: encode (`embed_query`) and
search + fetch (`search_vector`, with the query's kind, so a model's hubness correction is
included). The k = 1,000 case splits search from the metadata fetch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    SENTENCES,
    append_results,
    make_images,
    make_notes,
    make_parser,
    make_speech,
    percentiles,
    resolve_model_arg,
    table,
)

TEXT_QUERIES = ["a dog playing with a ball", "snowy mountain at sunrise", "budget meeting",
                "children in a park", "reading under a tree"]  # fmt: skip
SPEECH_QUERY_SECONDS = 5.0  # the spoken query
TARGET_MS = {"text": 50, "image": 100, "speech": 800, "k=1000": 50}
SYNTHETIC_SPLIT = {"image": 0.6, "text": 0.3, "speech": 0.1}  # share of synthetic vectors


def make_queries(folder: Path) -> dict[str, object]:
    """One query per modality: texts, a 640×480 JPEG, a 5.0 s espeak-ng WAV."""
    import soundfile as sf

    from engine.media import SAMPLE_RATE, load_audio

    image = make_images(folder / "q", 1, seed=99)[0]
    spoken = make_speech(folder / "q", 1, seed=99)[0]
    clip = load_audio(spoken)
    n = int(SPEECH_QUERY_SECONDS * SAMPLE_RATE)
    clip = np.pad(clip[:n], (0, max(0, n - len(clip))))  # exactly 5 s: speech then silence
    wav = folder / "q" / "query5s.wav"
    sf.write(wav, clip, SAMPLE_RATE)
    return {"text": TEXT_QUERIES, "image": image, "speech": wav}


def build_demo(root: Path, model, spec: str, args) -> Path:
    from indexer.runner import index_folders

    media = root / "media"
    make_images(media / "photos", args.demo_images)
    make_speech(media / "voice", args.demo_speech)
    make_notes(media / "notes", args.demo_notes)
    index_dir = root / "demo-index"
    t = time.perf_counter()
    summary = index_folders([media], index_dir, model, model_source=spec)
    print(f"demo index: {summary.items} items in {time.perf_counter() - t:.1f} s")
    return index_dir


def build_synthetic(root: Path, model, spec: str, n: int) -> Path:
    """`n` clustered vectors and rows, written through `IndexWriter` with one commit."""
    from search_scale import make_data

    from indexer.mapper import Encoded
    from indexer.reader import Decoded, Segment
    from indexer.scan import FileEntry, Work
    from indexer.writer import IndexWriter, ModelInfo, WriterConfig

    index_dir = root / "synthetic-index"
    vectors = make_data("clustered", n, model.dim, seed=7)
    info = ModelInfo.of(model, spec)  # with the model's hubness penalties, if it has banks
    config = WriterConfig(commit_every=n + 1, commit_seconds=1e9)  # one commit at the end
    t = time.perf_counter()
    with IndexWriter.open(index_dir, info, config=config) as writer:
        start = 0
        for modality, share in SYNTHETIC_SPLIT.items():
            count = int(n * share) if modality != "speech" else n - start
            for i in range(start, start + count):
                ext = {"image": "jpg", "text": "txt", "speech": "wav"}[modality]
                entry = FileEntry(f"/synthetic/{modality}/{i:07d}.{ext}", modality, 1000, 0.0)
                work = Work(entry, f"{i:032x}")
                seg = Segment(
                    None,
                    0,
                    0.0 if modality == "speech" else None,
                    5.0 if modality == "speech" else None,
                    SENTENCES[i % len(SENTENCES)] if modality == "text" else None,
                )
                decoded = Decoded(work, [seg], duration=5.0 if modality == "speech" else None,
                                  width=640 if modality == "image" else None,
                                  height=480 if modality == "image" else None)  # fmt: skip
                heard = [SENTENCES[i % len(SENTENCES)]] if modality == "speech" else None
                writer.add_file(decoded, [seg], Encoded(vectors[i : i + 1], heard))
            start += count
        added = time.perf_counter() - t
    print(f"synthetic index: {n} rows added in {added:.1f} s, committed in "
          f"{time.perf_counter() - t - added:.1f} s")  # fmt: skip
    return index_dir


def time_index(label: str, index_dir: Path, model, queries: dict, args) -> list[tuple]:
    """Rows (index, case, p50/p95 total, encode, search+fetch, target) for one index."""
    from engine.search import SearchEngine

    rows = []
    with SearchEngine.open(index_dir, model=model) as engine:
        counts = engine.store.counts()
        factories = {m: v.factory for m, v in engine.vectors.items()}
        print(f"{label}: {counts} {factories}")
        for modality in ("text", "image", "speech"):
            q = queries[modality]
            arg = (lambda i, q=q: {"text": q[i % len(q)]}) if modality == "text" else (
                lambda i, q=q, m=modality: {m: q})  # fmt: skip
            engine.search(**arg(0))  # warm-up: loads the tower, touches the index
            total, enc, srch = [], [], []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                engine.search(**arg(i), k=10)
                t1 = time.perf_counter()
                vec = engine.embed_query(**arg(i))
                t2 = time.perf_counter()
                engine.search_vector(vec, k=10, kind=modality)  # as search() does
                t3 = time.perf_counter()
                total.append(t1 - t0)
                enc.append(t2 - t1)
                srch.append(t3 - t2)
            rows.append((label, f"{modality} query, k=10", *percentiles(total, 50, 95),
                         percentiles(enc, 50)[0], percentiles(srch, 50)[0],
                         f"≤ {TARGET_MS[modality]}"))  # fmt: skip
        rows += time_plain(label, engine, args)
        rows += time_k1000(label, engine, args)
    return rows


def time_plain(label: str, engine, args) -> list[tuple]:
    """search + fetch of a text query with and without the hubness re-ranking, alternating:
    what the correction costs (the same where the model has no query banks)."""
    vec = engine.embed_query(TEXT_QUERIES[0])
    times: dict[str | None, list[float]] = {"text": [], None: []}
    for _ in range(args.repeats):
        for kind in times:
            t0 = time.perf_counter()
            engine.search_vector(vec, k=10, kind=kind)
            times[kind].append(time.perf_counter() - t0)
    nan = float("nan")
    return [(label, f"  part: search+fetch, text query, k=10, {name}",
             *percentiles(times[kind], 50, 95), nan, nan, "-")
            for kind, name in (("text", "hubness-corrected"), (None, "plain cosines"))]  # fmt: skip


def time_k1000(label: str, engine, args) -> list[tuple]:
    """k = 1,000 hits with their metadata: vector search and row fetch timed apart."""
    vec = engine.embed_query(TEXT_QUERIES[0])
    engine.search_vector(vec, k=1000, kind="text")  # warm-up
    total, vsearch, fetch = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        hits = engine.search_vector(vec, k=1000, kind="text")
        t1 = time.perf_counter()
        found = []
        for modality in engine.vectors:
            if engine.vectors[modality].ntotal:
                s, ids = engine.vectors[modality].search(vec[None], 1000)
                found += [int(i) for i in ids[0] if i >= 0]
        t2 = time.perf_counter()
        engine.store.get(found[:1000])
        t3 = time.perf_counter()
        total.append(t1 - t0)
        vsearch.append(t2 - t1)
        fetch.append(t3 - t2)
    print(f"{label} k=1000: {len(hits)} hits")
    nan = float("nan")
    return [(label, f"k=1000 hits + metadata (search_vector, {len(hits)} hits)",
             *percentiles(total, 50, 95), nan, nan, f"≤ {TARGET_MS['k=1000']}"),
            (label, "  part: vector search of every modality, k=1000",
             *percentiles(vsearch, 50, 95), nan, nan, "-"),
            (label, "  part: store.get(1,000 ids), all columns", *percentiles(fetch, 50, 95),
             nan, nan, "-")]  # fmt: skip


def main() -> None:
    ap = make_parser(__doc__)
    ap.add_argument("--demo-images", type=int, default=120, help="images in the demo index")
    ap.add_argument("--demo-speech", type=int, default=20, help="speech clips in the demo index")
    ap.add_argument("--demo-notes", type=int, default=60, help="text notes in the demo index")
    ap.add_argument(
        "--synthetic", type=int, default=100_000, help="items in the synthetic index (0: skip it)"
    )
    ap.add_argument("--repeats", type=int, default=30, help="timed queries per case")
    ap.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()

    import faiss
    import torch

    from engine.model import load_model

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec, label = resolve_model_arg(args.model, root)
        model = load_model(spec)
        queries = make_queries(root)
        rows = time_index("demo", build_demo(root, model, spec, args), model, queries, args)
        if args.synthetic:
            index_dir = build_synthetic(root, model, spec, args.synthetic)
            rows += time_index(f"synthetic {args.synthetic:,}", index_dir, model, queries, args)
    body = table(["index", "case", "p50 ms", "p95 ms", "encode p50 ms", "search+fetch p50 ms",
                  "target ms"], rows)  # fmt: skip
    print(body)
    if not args.no_results:
        append_results(
            "End-to-end query latency (warm model)",
            body,
            notes=f"model: {label}; {args.threads} torch/FAISS threads; "
            f"{args.repeats} timed queries per case after one warm-up",
        )
    # fmt: skip


if __name__ == "__main__":
    main()
