"""Small batches run torch on one thread, large ones on all; the count is always restored."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.threads import SMALL_BATCH, one_thread_each, threads_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_batches_use_one_thread_and_restore(two_threads):
    with threads_for(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads_for(SMALL_BATCH):
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), threads_for(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_one_thread_each_spreads_items_over_workers_in_order(two_threads):
    import threading
    import time

    seen = []

    def work(x: int) -> int:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        time.sleep(0.01)  # long enough that both workers take items
        return x * x

    assert one_thread_each(work, list(range(10))) == [x * x for x in range(10)]
    assert {n for _, n in seen} == {1}  # torch on one thread inside every worker
    assert len({name for name, _ in seen}) == 2
    assert threading.main_thread().name not in {name for name, _ in seen}
    assert torch.get_num_threads() == 2
    # one item (or one torch thread): on the caller's thread, torch on one thread
    seen.clear()
    assert one_thread_each(work, [3]) == [9] and seen == [(threading.current_thread().name, 1)]
    assert torch.get_num_threads() == 2

    def bad(x: int) -> int:
        raise ValueError(f"item {x}")

    with pytest.raises(ValueError, match="item"):
        one_thread_each(bad, [1, 2])
    assert torch.get_num_threads() == 2


def test_a_graph_called_from_workers_is_traced_once_per_worker(two_threads, monkeypatch):
    """Each worker traces its own graph (oneDNN's fused kernels are not safe to share between
    threads running at once), once, however many items it runs."""
    from engine.graph import ENV_SWITCH, InferenceGraph

    monkeypatch.delenv(ENV_SWITCH, raising=False)
    traced = []
    graph = InferenceGraph(torch.nn.Linear(4, 4))
    real = graph._trace
    graph._trace = lambda inputs: traced.append(1) or real(inputs)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return graph(x)

    xs = [torch.randn(1, 4) for _ in range(16)]
    with torch.inference_mode():
        expected = [graph.module(x) for x in xs]
    for got, want in zip(one_thread_each(call, xs), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert 1 <= len(traced) <= 2 and not graph.broken  # two workers, one trace each at most
    assert not graph.graphs  # the calling thread ran nothing itself


def test_the_model_embeds_a_single_text_on_one_thread(two_threads, monkeypatch):
    from engine.model import load_model

    model = load_model("default")
    seen = []
    encode = model.text_tower.encode
    monkeypatch.setattr(
        model.text_tower,
        "encode",
        lambda texts, **kw: seen.append(torch.get_num_threads()) or encode(texts, **kw),
    )
    model.embed_text(["a dog"])
    model.embed_text(["a dog"] * SMALL_BATCH)
    assert seen == [1, 2] and torch.get_num_threads() == 2


CHECK = """
import engine, sys, torch
import numpy as np
from engine.model import load_model

a, w = torch.randn(17, 384), torch.randn(1536, 384)
torch.set_num_threads(2)


def switches() -> int:  # voluntary context switches of every thread of this process
    import os
    total = 0
    for tid in os.listdir("/proc/self/task"):
        status = open(f"/proc/self/task/{tid}/status").read()
        total += int(status.split("\\nvoluntary_ctxt_switches:")[1].split()[0])
    return total


model = load_model("default")
if sys.argv[2] == "2":  # CTranslate2 with an OpenMP team of two, as before its one-thread workers
    import ctranslate2
    from engine.speech import prepare_whisper

    model.whisper.model = ctranslate2.models.Whisper(
        str(prepare_whisper()), device="cpu", compute_type="int8", intra_threads=2
    )
model.embed_speech([np.zeros(16000, np.float32)], branch="parallel")  # one Whisper pass
with torch.inference_mode():
    before = switches()
    for _ in range(2000):
        torch.nn.functional.linear(a, w)
print(switches() - before)
"""


@pytest.mark.skipif(
    os.cpu_count() != 2, reason="libgomp throttles only with more threads than cores"
)
@pytest.mark.parametrize(
    ("order", "intra"), [("engine-first", 2), ("torch-first", 2), ("torch-first", 1)]
)
def test_whisper_does_not_stop_torch_threads_from_spinning(order, intra, tmp_path):
    """Regression: CTranslate2 loaded after torch shared torch's libgomp; after one Whisper pass
    torch's worker slept and woke on every call (~1 voluntary switch per call, 1.8x slower).
    engine/__init__.py loads CTranslate2 first, which keeps the two apart even when
    CTranslate2 runs an OpenMP team (`intra_threads=2`, forced here); the torch-first control
    shows the hazard with such a team. xmodal's Whisper runs one-thread workers and starts no
    team, so with it torch imported first is safe too."""
    script = tmp_path / "check.py"
    code = CHECK if order == "engine-first" else "import torch\n" + CHECK
    script.write_text(code)
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    out = subprocess.run([sys.executable, str(script), order, str(intra)], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
    switches = int(out.stdout.split()[-1])
    if order == "torch-first" and intra == 2:
        assert switches > 500  # the hazard itself: the check can see it
    else:
        assert switches < 200  # spinning workers: no sleeps between calls
