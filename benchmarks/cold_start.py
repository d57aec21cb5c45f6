"""Cold start: process start to first result of `xmodal search --index DIR --text ...`.

    .venv/bin/python benchmarks/cold_start.py [--index DIR] [--runs 5]

Without --index, a small index is built first (generated images and notes, the real
pipeline). Then:
1. `xmodal search` is run `--runs` times as a subprocess; the median wall time is reported,
   with `xmodal --help` and `python -c pass` as baselines of the same process start;
2. one run under `python -X importtime` gives the slowest imports (cumulative);
3. in-process phases are timed in a fresh subprocess: importing `engine.search`, opening the
   index (SQLite + FAISS files), loading the model, the first query (which loads the text
   tower) and a second query;
4. whether the lazy-import and memory-mapping hooks are in place is checked.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    ROOT,
    append_results,
    make_images,
    make_notes,
    make_parser,
    resolve_model_arg,
    table,
)

QUERY = "a dog playing with a ball"
PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
from engine.search import SearchEngine
t1 = time.perf_counter()
engine = SearchEngine.open(sys.argv[1])
t2 = time.perf_counter()
model = engine.model
t3 = time.perf_counter()
hits = engine.search(sys.argv[2], k=10)
t4 = time.perf_counter()
engine.search(sys.argv[2] + " again", k=10)
t5 = time.perf_counter()
heavy = sorted(m for m in ("torch", "faiss", "sqlalchemy", "PIL", "transformers",
                           "sentence_transformers", "whisper", "ctranslate2", "soundfile")
               if m in sys.modules)
print(json.dumps({"import engine.search": t1 - t0, "open index (SQLite + FAISS)": t2 - t1,
                  "load model (bundle + heads)": t3 - t2, "first query (loads text tower)": t4 - t3,
                  "second query (warm)": t5 - t4, "heavy modules after first query": heavy,
                  "mmapped": {m: v.read_only for m, v in engine.vectors.items()}}))
"""


def xmodal() -> list[str]:
    exe = Path(sys.executable).with_name("xmodal")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "engine.cli"]


def wall(cmd: list[str], runs: int) -> list[float]:
    """Wall seconds of `runs` runs of `cmd` (stdout discarded; a failure raises)."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=ROOT)  # fmt: skip
        out.append(time.perf_counter() - t)
    return out


def import_times(index_dir: str, top: int) -> list[tuple[str, float, float]]:
    """(module, self ms, cumulative ms) of the top-level imports of one search run, slowest
    first, from `python -X importtime`."""
    code = (
        f"import sys; sys.argv = ['xmodal', 'search', '--index', {index_dir!r}, '--text', "
        f"{QUERY!r}]; from engine.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, check=True)  # fmt: skip
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = (p.strip() for p in line[len("import time:") :].split("|"))
        if not name.startswith("  "):  # a top-level import (not nested in another)
            rows.append((name.strip(), int(self_us) / 1e3, int(cum_us) / 1e3))
    return sorted(rows, key=lambda r: -r[2])[:top]


def phases(index_dir: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PHASES, index_dir, QUERY], cwd=ROOT,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_index(root: Path, spec: str) -> str:
    from engine.model import load_model
    from indexer.runner import index_folders

    make_images(root / "media" / "photos", 40)
    make_notes(root / "media" / "notes", 20)
    index_folders([root / "media"], root / "index", load_model(spec), model_source=spec)
    return str(root / "index")


def hooks() -> list[tuple[str, str]]:
    """Which cold-start hooks are in place, read from the code."""
    src = {p: (ROOT / p).read_text() for p in ("engine/cli.py", "engine/search.py",
                                               "engine/vectors.py", "engine/model.py")}  # fmt: skip
    return [
        ("CLI imports engine.search lazily (inside the command)",
         str("    from engine.search import SearchEngine" in src["engine/cli.py"])),
        ("faiss imported lazily (engine.vectors._faiss)", str("def _faiss" in src["engine/vectors.py"])),
        ("torch imported lazily by search (engine.model imported on first load)",
         str("from engine.model import load_model  # lazy" in src["engine/search.py"])),
        ("SearchEngine.open memory-maps FAISS files (IO_FLAG_MMAP_IFC)",
         str("mmap=True" in src["engine/search.py"] and "IO_FLAG_MMAP" in src["engine/vectors.py"])),
        ("model towers load on first use (cached_property)",
         str("@cached_property" in src["engine/model.py"])),
    ]  # fmt: skip


def main() -> None:
    ap = make_parser(__doc__)
    ap.add_argument("--index", help="an existing index directory (default: build a small one)")
    ap.add_argument("--runs", type=int, default=5, help="subprocess runs per command")
    ap.add_argument("--top", type=int, default=12, help="slowest imports listed")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        index_dir, label = args.index, f"existing index {args.index}"
        if index_dir is None:
            spec, mlabel = resolve_model_arg(args.model, Path(tmp))
            index_dir = build_index(Path(tmp), spec)
            label = f"40 images + 20 notes, model: {mlabel}"
        search_cmd = [*xmodal(), "search", "--index", index_dir, "--text", QUERY]
        walls = {
            "python -c pass": wall([sys.executable, "-c", "pass"], args.runs),
            "xmodal --help": wall([*xmodal(), "--help"], args.runs),
            "xmodal search --text (first result)": wall(search_cmd, args.runs),
        }
        imports = import_times(index_dir, args.top)
        phase = phases(index_dir)
    base = statistics.median(walls["python -c pass"])
    body = table(["command", "median s", "min s", "max s", "× python -c pass"],
                 [(k, statistics.median(v), min(v), max(v), statistics.median(v) / base)
                  for k, v in walls.items()])  # fmt: skip
    body += "\nIn-process phases (fresh interpreter):\n\n" + table(
        ["phase", "seconds"], [(k, v) for k, v in phase.items() if isinstance(v, float)]
    )
    body += (f"\nHeavy modules loaded by a text query: {', '.join(phase['heavy modules after first query'])}; "
             f"vector indexes memory-mapped read-only: {phase['mmapped']}\n")  # fmt: skip
    body += "\nSlowest top-level imports of one `xmodal search` run (`-X importtime`):\n\n"
    body += table(["module", "self ms", "cumulative ms"], imports)
    body += "\nCold-start hooks in the code:\n\n" + table(["hook", "in place"], hooks())
    print(body)
    if not args.no_results:
        append_results(
            "Cold start of `xmodal search`",
            body,
            notes=f"{label}; {args.runs} runs per command; PID {os.getpid()}",
        )


if __name__ == "__main__":
    main()
