"""Frozen inference graphs: traced on the second call per key, same outputs as the eager module
(float32) or within bfloat16 rounding of it, eager again after `reset`, after a failed trace, or
with XMODAL_EAGER=1."""

import logging

import numpy as np
import pytest
import torch

from engine.graph import ENV_SWITCH, PRECISION_ENV, InferenceGraph, bf16_graphs
from engine.text import MiniLMTower
from engine.vision import ImageBackbone


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_traced_on_the_second_call_for_each_key(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    graph = InferenceGraph(_Scale(), key=lambda x: x.shape[1])
    x = torch.ones(2, 3)
    with torch.inference_mode():
        assert torch.equal(graph(x), x * 2) and not graph.graphs  # first call: eager
        assert torch.equal(graph(x), x * 2) and list(graph.graphs) == [3]
        assert torch.equal(graph(torch.ones(5, 3)), torch.full((5, 3), 2.0))  # any batch
        graph(torch.ones(1, 4))
        assert list(graph.graphs) == [3]  # a new key is seen eagerly once first
        graph(torch.ones(1, 4))
        assert sorted(graph.graphs) == [3, 4]
        # a frozen graph keeps the weights it was traced with: reset after changing them
        graph.module.w.fill_(3.0)
        graph.reset()
        assert torch.equal(graph(x), x * 3) and torch.equal(graph(x), x * 3)


def test_eager_when_tracing_fails_or_switched_off(monkeypatch, caplog):
    class Untraceable(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "not a tensor"

    graph = InferenceGraph(Untraceable())
    with caplog.at_level(logging.WARNING, logger="engine.graph"):
        assert graph(torch.ones(1)) == graph(torch.ones(1)) == "not a tensor"
    assert graph.broken and "tracing failed" in caplog.text

    monkeypatch.setenv(ENV_SWITCH, "1")
    eager = InferenceGraph(_Scale())
    with torch.inference_mode():
        for _ in range(3):
            eager(torch.ones(1))
    assert not eager.graphs


def test_eager_when_a_traced_graph_fails_to_run(monkeypatch, caplog):
    class Flatten(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(int(x.shape[0]) * int(x.shape[1]))  # the trace fixes this size

    monkeypatch.delenv(ENV_SWITCH, raising=False)
    graph = InferenceGraph(Flatten())
    with torch.inference_mode():
        graph(torch.ones(2, 3))
        assert graph(torch.ones(2, 3)).shape == (6,) and graph.graphs
        with pytest.raises(IndexError):  # bad for the eager module too: its error, graph kept
            graph(torch.ones(5))
        assert graph.graphs and not graph.broken
        with caplog.at_level(logging.WARNING, logger="engine.graph"):
            assert graph(torch.ones(4, 3)).shape == (12,)  # the graph fails, eager answers
    assert graph.broken and not graph.graphs and "its graph failed" in caplog.text


TEXTS = ["a dog", "Two children are playing football in a park near an old oak tree ."]


def _tower_traced_at_batch_1(monkeypatch, precision: str) -> tuple[MiniLMTower, np.ndarray]:
    """MiniLM with its graph traced on TEXTS[0] alone, and the eager vectors of TEXTS."""
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    monkeypatch.setenv(PRECISION_ENV, precision)
    tower = MiniLMTower()
    with torch.inference_mode():
        eager = torch.cat([tower.forward_tokens(tower.tokenize([t])) for t in TEXTS]).numpy()
    tower.encode(TEXTS[:1])
    tower.encode(TEXTS[:1])  # traced at batch 1, one length
    assert tower.graph.graphs
    return tower, eager / np.linalg.norm(eager, axis=1, keepdims=True)


def test_text_tower_graph_matches_eager_for_other_batches_and_lengths(monkeypatch):
    tower, eager = _tower_traced_at_batch_1(monkeypatch, "fp32")
    np.testing.assert_allclose(tower.encode(TEXTS), eager, atol=1e-5)  # batch 2, padded


def test_image_backbone_graph_matches_eager_for_other_batch_sizes(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    monkeypatch.setenv("XMODAL_ONNX", "0")  # the torch graph (ONNX Runtime: test_onnx_graph)
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    torch.manual_seed(0)
    backbone = ImageBackbone().fuse_batchnorm()
    x = torch.randn(4, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        eager = backbone(x)
        backbone.embed(x[:1])
        backbone.embed(x[:1])  # traced at batch 1
        assert list(backbone.graph.graphs) == [(3, 224, 224)]
        torch.testing.assert_close(backbone.embed(x), eager, rtol=1e-5, atol=1e-5)
        # a new tail (a bundle's tuned weights) drops the graph traced with the old one
        backbone.use_tail(backbone.tail_net)
        assert not backbone.graph.graphs


def test_a_bad_precision_setting_is_an_error_not_a_silent_eager_tower(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    monkeypatch.setenv(PRECISION_ENV, "half")
    graph = InferenceGraph(_Scale(), low_precision=True)
    with torch.inference_mode():
        graph(torch.ones(1))
        with pytest.raises(ValueError, match="XMODAL_PRECISION"):
            graph(torch.ones(1))  # the call that traces
    assert not graph.broken


def test_precision_setting(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert not bf16_graphs()
    monkeypatch.setenv(PRECISION_ENV, "auto")
    assert bf16_graphs() == torch.cpu._is_amx_tile_supported()
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(ValueError, match="XMODAL_PRECISION"):
        bf16_graphs()


needs_bf16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bfloat16 here"
)


@needs_bf16
def test_bfloat16_graphs_stay_close_to_float32(monkeypatch):
    """Forced bfloat16: float32 in and out, the eager module untouched, sentence vectors within
    bfloat16 rounding (cosine ≥ 0.999) of float32."""
    tower, eager = _tower_traced_at_batch_1(monkeypatch, "bf16")
    (graph,) = tower.graph.graphs.values()
    assert graph.original_name == "_Bfloat16"
    out = tower.encode(TEXTS)
    assert out.dtype == np.float32
    assert (out * eager).sum(1).min() > 0.999
    assert next(tower.model.parameters()).dtype == torch.float32

    # a module that holds its own graph (like engine.vision's) is copied without the graph
    module = _Scale()
    module.graph = InferenceGraph(module, low_precision=True)
    x = torch.full((2, 3), 1.5)
    with torch.inference_mode():
        module.graph(x)
        assert torch.equal(module.graph(x), x * 2)  # 1.5 and 2 are exact in bfloat16
    (graph,) = module.graph.graphs.values()
    assert graph.original_name == "_Bfloat16" and module.w.dtype == torch.float32


def test_each_thread_runs_its_own_graph():
    """oneDNN's fused kernels are not safe to run from two threads at once: each thread that
    calls the module traces its own graph; `reset` drops them all."""
    from concurrent.futures import ThreadPoolExecutor

    graph = InferenceGraph(_Scale())
    x = torch.ones(3)
    with torch.inference_mode():
        graph(x)
        graph(x)
        mine = graph.graphs[None]

        def other_thread() -> object:
            assert torch.equal(graph(x), x * 2)
            return graph.graphs[None]

        with ThreadPoolExecutor(1) as pool:
            theirs = pool.submit(other_thread).result()
        assert theirs is not mine and graph.graphs[None] is mine
        graph.reset()
        assert not graph.graphs


def test_text_tower_side_by_side_batches_of_other_sizes_match_eager(monkeypatch):
    """Two workers (`engine.threads`), each with its own graph, run MiniLM side by side on
    batches of other sizes and lengths: the vectors are the eager ones and nothing falls back.
    (The shared graph's failure, one worker's batch of 22 running into the other's 23, came
    with FSDD's transcripts; these texts do not reproduce it.)"""
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tower = MiniLMTower()
        words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        mixed = [f"A {w}." for w in words] + [f"{w}" for w in words] + ["A deer on a rock."]
        mixed = (mixed * 3)[:48]
        short = words + words[:5] + [f"{w}." for w in words * 3][:29] + ["A man in a red shirt"]
        calls = [words] + [mixed] * 3 + [short] * 6
        for texts in calls:
            with torch.inference_mode():
                eager = tower.forward_tokens(tower.tokenize(texts))  # padded like the graph's
            eager = torch.nn.functional.normalize(eager, dim=-1).numpy()
            np.testing.assert_allclose(tower.encode(texts), eager, atol=1e-4)
            assert not tower.graph.broken
    finally:
        torch.set_num_threads(torch_threads)
