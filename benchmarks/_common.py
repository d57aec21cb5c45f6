"""Shared helpers of the benchmark scripts: machine notes, timing, memory, tables, media.

Not a benchmark itself. Every script appends one section to `benchmarks/RESULTS.md` that
names the machine, the date, the load average, the exact command and the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
PAGE = os.sysconf("SC_PAGE_SIZE")  # bytes
SENTENCES = [
    "A black dog runs across the green grass with a ball in its mouth.",
    "Two children are playing football in a park near the river.",
    "A man in a red jacket climbs a snowy mountain at sunrise.",
    "A woman sits on a bench reading a book under a tree.",
    "The meeting about the quarterly budget is moved to Thursday afternoon.",
    "Remember to buy milk, eggs and fresh bread on the way home.",
]

# OpenMP's default busy-waiting makes 2-thread torch/FAISS calls 10-40x slower when another
# job holds a core (see RESULTS.md); these are recorded with every command.
ENV_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import engine  # noqa: E402, F401 - the product's OpenMP settings, before torch or faiss load
from engine.cpu import cpu_fields  # noqa: E402 - no torch: FAISS may still load first

# ---- machine and results ---------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's guess."""
    return cpu_fields().get("model name") or platform.processor() or platform.machine()


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")  # what moves our kernels


def cpu_family() -> str:
    """Family/model and the vector flags that change which kernels run (int8 ones above all),
    from /proc/cpuinfo: "AMD EPYC" alone names CPUs with and without AVX-512."""
    fields = cpu_fields()
    if not fields:
        return "flags unknown"
    flags = set(fields.get("flags", "").split())
    have = "/".join(f for f in ISA_FLAGS if f in flags) or "none of " + "/".join(ISA_FLAGS)
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {have}"


def load_average() -> str:
    """1, 5 and 15 minute load averages, e.g. "1.95 2.10 2.40"."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def reference_ms(loops: int = 1_000_000, runs: int = 5) -> float:
    """Median milliseconds of a fixed pure-Python loop: the machine's speed *now*.

    The project's VMs change speed between and even within sessions (a fused EfficientNet graph
    took 7.2 ms at one hour and 12–15 ms the next, same code): tables whose reference differs
    were measured in different states and compare only through their in-run ratios.
    """
    times = []
    for _ in range(runs):
        start, total = time.perf_counter(), 0
        for i in range(loops):
            total += i
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[runs // 2]


def machine_line() -> str:
    """One line naming the machine, its cores, memory, current load and reference speed."""
    mem = os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30
    return (
        f"{platform.node()}, {cpu_model()} ({cpu_family()}), {os.cpu_count()} cores, "
        f"{mem:.0f} GiB RAM, "
        f"Python {platform.python_version()}, load average {load_average()}, "
        f"reference loop {reference_ms():.1f} ms (`_common.reference_ms`; lower = faster state)"
    )


def command_line() -> str:
    """The command that ran this script, as one could paste it (with the OpenMP settings
    that change the numbers on a busy machine)."""
    env = [f"{k}={os.environ[k]}" for k in ENV_KEYS if k in os.environ]
    return " ".join([*env, ".venv/bin/python", *(shlex.quote(a) for a in sys.argv)])


def append_results(title: str, body: str, *, notes: str = "") -> None:
    """Append a dated section to RESULTS.md: machine, command, the tables in `body`."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## {title} — {stamp}\n\n"
        f"- machine: {machine_line()}\n"
        f"- command: `{command_line()}`\n"
        + (f"- notes: {notes}\n" if notes else "")
        + f"\n{body.rstrip()}\n"
    )
    with open(RESULTS, "a") as f:
        f.write(text)
    print(f"\nappended to {RESULTS}")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats are printed with 3 significant digits or more."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "-"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.3g}" if abs(v) >= 0.01 else f"{v:.2g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- timing and memory -----------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS deltas mean something."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def percentiles(samples_s: Sequence[float], *qs: float) -> list[float]:
    """Percentiles `qs` (0-100) of `samples_s`, in milliseconds."""
    return [float(np.percentile(np.asarray(samples_s) * 1e3, q)) for q in qs]


def time_calls(fn: Callable[[int], object], n: int, *, budget_s: float = 1e9,
               min_calls: int = 5) -> list[float]:  # fmt: skip
    """Wall seconds of `fn(i)` for i in range(n), stopping early once `budget_s` is spent
    (but after at least `min_calls`)."""
    out: list[float] = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
        if len(out) >= min_calls and time.perf_counter() - start > budget_s:
            break
    return out


# ---- models and media ------------------------------------------------------------------------


MODEL_HELP = ("model name or bundle path (default: 'default' if shipped, "
              "else an untrained bundle with the real towers)")  # fmt: skip


def make_parser(doc: str, *, model: bool = True) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as description, defaults shown,
    and, with `model`, the `--model` option every model-using benchmark takes."""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    if model:
        ap.add_argument("--model", help=MODEL_HELP)
    return ap


def resolve_model_arg(model: str | None, scratch: Path) -> tuple[str, str]:
    """`(spec, label)`: `model` if given; else "default" if it loads; else an untrained bundle
    with the real towers (same encoders and shapes, so the same speed) written to `scratch`."""
    from engine.errors import ModelError
    from engine.model import resolve_model

    if model:
        return model, model
    try:
        resolve_model("default")
        return "default", "default"
    except ModelError:
        return str(make_untrained_bundle(scratch / "untrained-bundle")), (
            "untrained bundle (default model not shipped yet; real towers, random heads)"
        )


def make_untrained_bundle(path: Path) -> Path:
    """A model bundle with the default towers, a fused speech branch and random heads."""
    import torch

    from engine.config import ModelConfig, SpeechHeadConfig, SpeechTowerConfig
    from engine.model import AlignedModel, build_heads

    torch.manual_seed(0)
    speech = SpeechTowerConfig(branch="fused", head=SpeechHeadConfig())
    config = ModelConfig(name="bench-untrained", speech=speech)
    AlignedModel(config, build_heads(config), fingerprint="-").save(path)
    return path


def make_images(folder: Path, n: int, *, size: tuple[int, int] = (640, 480),
                seed: int = 0) -> list[Path]:  # fmt: skip
    """`n` seeded JPEGs of smooth colour fields (they compress like photos, unlike noise)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        paths.append(folder / f"img{i:05d}.jpg")
        img.save(paths[-1], quality=85)
    return paths


def make_speech(folder: Path, n: int, *, seed: int = 0) -> list[Path]:
    """`n` WAV clips spoken by espeak-ng (2 to 4 sentences each, 16 kHz mono after decode)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        words = " ".join(rng.choice(SENTENCES, size=int(rng.integers(2, 5))))
        paths.append(folder / f"clip{i:04d}.wav")
        subprocess.run(["espeak-ng", "-s", "160", "-w", str(paths[-1]), words], check=True,
                       capture_output=True)  # fmt: skip
    return paths


def make_notes(folder: Path, n: int, *, seed: int = 0) -> list[Path]:
    """`n` text notes of 1 to 3 short paragraphs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paras = ["\n".join(rng.choice(SENTENCES, size=3)) for _ in range(int(rng.integers(1, 4)))]
        paths.append(folder / f"note{i:04d}.txt")
        paths[-1].write_text("\n\n".join(paras) + "\n")
    return paths


def audio_seconds(paths: Sequence[Path]) -> float:
    """Total duration of the audio files at `paths`."""
    import soundfile as sf

    return sum(sf.info(str(p)).duration for p in paths)
