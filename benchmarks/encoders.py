"""Encoding speed of the model's towers, batch 1 and 32: images/s (JPEG decode included),
speech × real time (parallel and cascaded branches), text sentences/s.

    .venv/bin/python benchmarks/encoders.py [--model default] [--seconds 20]

Images and text are timed as shipped (on x86 CPUs with VNNI the default model's text path runs
in int8 under ONNX Runtime, engine.text.MiniLMTower.whole_path; on CPUs with AMX the text graph
runs in bfloat16; the image backbone runs under ONNX Runtime, engine.onnx_graph; the image heads
run in int8, engine.heads.Int8OnReuse), with XMODAL_PRECISION=int8 (the int8 text path on any
CPU; images as shipped), with torch graphs only
(XMODAL_ONNX=0), with float32 graphs and heads (XMODAL_PRECISION=fp32), and, as baselines in
the same process, with the towers
eager (XMODAL_EAGER=1, no engine.graph) and eager with all torch threads at every batch size
(also no engine.threads): the code before those two. Media are generated here (seeded
smooth-colour JPEGs at 224 px, an espeak-ng clip), so the
script needs nothing outside the repository. Appends a table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine.threads  # noqa: E402 - imports engine first: the product's OpenMP settings, before torch

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import cpu_family, reference_ms  # noqa: E402 - benchmarks/ is this script's folder
from PIL import Image  # noqa: E402

from engine.graph import ENV_SWITCH, PRECISION_ENV  # noqa: E402
from engine.media import SAMPLE_RATE, load_audio, load_image  # noqa: E402
from engine.model import load_model, text_path_here  # noqa: E402
from engine.onnx_graph import ONNX_ENV  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
SENTENCES = [
    "A black dog runs across the green grass with a ball in its mouth .",
    "Two children are playing football in a park .",
    "A man in a red jacket climbs a snowy mountain .",
    "A woman sits on a bench reading a book .",
]


def _timed(fn, n_items: int, seconds: float) -> float:
    """Items per second of `fn` (which handles `n_items`), repeated for about `seconds`."""
    fn()  # warm-up; the second call traces the tower's graph (engine.graph)
    fn()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += n_items
    return done / (time.perf_counter() - start)


def _variants(model, fn, n_items: int, seconds: float) -> tuple[float, ...]:
    """`_timed` as shipped, with XMODAL_PRECISION=int8, without ONNX Runtime (torch graphs
    only, the code before engine.onnx_graph), with float32 graphs and heads, then with every
    tower eager, then eager with all torch threads at every batch size (the code before
    engine.graph and engine.threads)."""

    def retrace() -> None:
        model.text_tower.graph.reset()
        whole = model.__dict__.get("_text_whole")  # the int8 text path, once made
        if whole is not None:
            whole.reset()
        model.image_backbone.graph.reset()
        model.image_backbone.onnx.reset()

    retrace()
    shipped = _timed(fn, n_items, seconds)
    small = engine.threads.SMALL_BATCH
    try:
        os.environ[PRECISION_ENV] = "int8"
        int8 = _timed(fn, n_items, seconds)
        os.environ.pop(PRECISION_ENV)
        os.environ[ONNX_ENV] = "0"
        retrace()
        torch_graphs = _timed(fn, n_items, seconds)
        os.environ.pop(ONNX_ENV)
        os.environ[PRECISION_ENV] = "fp32"
        retrace()
        fp32 = _timed(fn, n_items, seconds)
        os.environ[ENV_SWITCH] = "1"
        eager = _timed(fn, n_items, seconds)
        engine.threads.SMALL_BATCH = 0
        return shipped, int8, torch_graphs, fp32, eager, _timed(fn, n_items, seconds)
    finally:
        os.environ.pop(ONNX_ENV, None)
        os.environ.pop(ENV_SWITCH, None)
        os.environ.pop(PRECISION_ENV, None)
        engine.threads.SMALL_BATCH = small
        retrace()


def make_jpegs(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # smooth random colour fields compress like photos, unlike white noise
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((224, 224), Image.Resampling.BICUBIC)
        paths.append(folder / f"img{i}.jpg")
        img.save(paths[-1], quality=85)
    return paths


def make_speech(folder: Path) -> np.ndarray:
    wav = folder / "s.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), " ".join(SENTENCES[:2])], check=True)
    return load_audio(wav)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model name or bundle path")
    ap.add_argument("--seconds", type=float, default=15.0, help="time per measurement")
    args = ap.parse_args()
    model = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), 32)
        for bs in (1, 32):
            rates = _variants(
                model,
                lambda bs=bs: model.embed_images([load_image(p) for p in paths[:bs]]),
                bs,
                args.seconds,
            )
            rows.append(("images/s (decode + encode)", bs, *rates, "≥ 60"))
        clip = make_speech(Path(tmp))
        dur = len(clip) / SAMPLE_RATE
        for branch in ("parallel", "cascaded", "fused"):
            for bs in (1, 32) if branch == "parallel" else (1,):
                rate = _timed(
                    lambda bs=bs, b=branch: model.embed_speech([clip] * bs, branch=b),
                    bs,
                    args.seconds,
                )
                rows.append(
                    (
                        f"speech × real time ({branch}, {dur:.1f} s clips)",
                        bs,
                        rate * dur,
                        None,
                        None,
                        None,
                        None,
                        None,
                        "≥ 8 (parallel)",
                    )
                )
        for bs in (1, 32, 1024):  # 1024: one call as `xmodal eval` or training caches make
            batch = (SENTENCES * 256)[:bs]
            rates = _variants(model, lambda b=batch: model.embed_text(b), bs, args.seconds)
            rows.append(("text sentences/s", bs, *rates, "≥ 300"))
    header = (
        "| what | batch | shipped | XMODAL_PRECISION=int8 | × shipped | torch graphs (no ONNX "
        "Runtime) | × torch graphs | float32 graphs and heads | eager | eager, all threads "
        "| × eager, all threads | target |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    table = header + "".join(
        f"| {w} | {b} | {r:.1f} | {i:.1f} | {i / r:.2f} | {g:.1f} | {r / g:.2f} | {f:.1f} "
        f"| {e:.1f} | {p:.1f} | {r / p:.2f} | {t} |\n"
        if e
        else f"| {w} | {b} | {r:.1f} | - | - | - | - | - | - | - | - | {t} |\n"
        for w, b, r, i, g, f, e, p, t in rows
    )
    print(table)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with open(RESULTS, "a") as f:
        f.write(
            f"\n## Encoder speed — {stamp}\n`python benchmarks/encoders.py --model {args.model} "
            f"--seconds {args.seconds}` on {platform.node()} ({torch.get_num_threads()} torch threads, "
            f"{platform.processor() or platform.machine()}, {cpu_family()}; shipped = text path in "
            f"{text_path_here(model.config, smoothed=bool(model.text_scales))}, image graphs in "
            f"float32; reference "
            f"loop {reference_ms():.1f} ms, see benchmarks/_common.py)\n\n{table}"
        )


if __name__ == "__main__":
    main()
