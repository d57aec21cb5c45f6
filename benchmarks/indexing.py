"""Indexing throughput per modality: xmodal's pipeline vs a naive per-file loop.

    .venv/bin/python benchmarks/indexing.py [--model PATH] [--images 96 --speech 16 --notes 1024]

A folder of generated media (seeded JPEGs, espeak-ng WAV clips, text notes) is indexed, one
modality at a time, by
- "pipeline": `indexer.runner.index_folders` (scan, hash, decode, batched encode, durable
  writes) into a fresh index directory;
- "naive": the baseline, in the same process with the same warm model: for each file, decode
  it, then encode it alone (batch 1), then append the vector — no batching, no overlap, no
  writes (so the ratio understates what the pipeline's extra work costs it, not the reverse).
Reported: files/s, items/s, speech × real time, and pipeline / naive. A warm-up pass runs
first so that tower loading counts in neither.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import (
    append_results,
    audio_seconds,
    make_images,
    make_notes,
    make_parser,
    make_speech,
    resolve_model_arg,
    table,
)

TARGETS = {"image": "≥ 60 images/s", "speech": "≥ 8× real time", "text": "-"}


def naive(model, modality: str, paths: list[Path]) -> tuple[float, int]:
    """Seconds and vectors for the per-file loop: decode, encode at batch 1, append."""
    from engine.media import load_audio, load_image, load_text
    from indexer.reader import split_passages

    vectors = []
    t = time.perf_counter()
    for path in paths:
        if modality == "image":
            vectors.append(model.embed_images([load_image(path)]))
        elif modality == "speech":
            vectors.append(model.embed_speech([load_audio(path)]).vectors)
        else:
            for passage in split_passages(load_text(path)):
                vectors.append(model.embed_text([passage]))
    return time.perf_counter() - t, int(sum(len(v) for v in vectors))


def pipeline(model, spec: str, folder: Path, index_dir: Path) -> tuple[float, int]:
    """Seconds and vectors for `index_folders` on `folder` into a new index."""
    from indexer.runner import index_folders

    t = time.perf_counter()
    summary = index_folders([folder], index_dir, model, model_source=spec)
    if summary.failed:
        raise RuntimeError(f"pipeline skipped files: {summary.errors[:3]}")
    return time.perf_counter() - t, summary.items


def main() -> None:
    ap = make_parser(__doc__)
    ap.add_argument("--images", type=int, default=96, help="generated 640×480 JPEGs")
    ap.add_argument("--speech", type=int, default=16, help="generated espeak-ng clips")
    ap.add_argument("--notes", type=int, default=1024, help="generated text notes")
    ap.add_argument("--modalities", default="image,speech,text", help="comma list to run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()

    import torch

    from engine.model import load_model

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec, label = resolve_model_arg(args.model, root)
        model = load_model(spec)
        makers = {"image": (make_images, args.images), "speech": (make_speech, args.speech),
                  "text": (make_notes, args.notes)}  # fmt: skip
        for modality in [m.strip() for m in args.modalities.split(",")]:
            make, count = makers[modality]
            folder = root / modality
            paths = make(folder, count)
            naive(model, modality, paths[:2])  # warm-up: loads the tower
            n_s, n_items = naive(model, modality, paths)
            p_s, p_items = pipeline(model, spec, folder, root / f"index-{modality}")
            audio = audio_seconds(paths) if modality == "speech" else 0.0
            for name, secs, items in (("naive (batch 1, no overlap)", n_s, n_items),
                                      ("pipeline (index_folders)", p_s, p_items)):  # fmt: skip
                rows.append((modality, name, len(paths), items, secs, len(paths) / secs,
                             items / secs, audio / secs if audio else float("nan"),
                             n_s / secs, TARGETS[modality]))  # fmt: skip
            print(rows[-2], rows[-1], sep="\n", flush=True)
    body = table(["modality", "method", "files", "vectors", "seconds", "files/s", "vectors/s",
                  "× real time", "× naive", "target"], rows)  # fmt: skip
    print(body)
    if not args.no_results:
        append_results(
            "Indexing throughput",
            body,
            notes=f"model: {label}; {args.threads} torch threads; × naive is the "
            "speed-up of each row over the naive loop (target ≥ 3 for the "
            "pipeline)",
        )


if __name__ == "__main__":
    main()
