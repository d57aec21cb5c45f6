"""engine.onnx_graph: a module's inference pass under ONNX Runtime, same outputs, cached export."""

import logging
import os
import time

import pytest
import torch

from engine import onnx_graph
from engine.onnx_graph import OnnxGraph
from engine.vision import ImageBackbone


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(torch.relu(self.conv(x)))
        return torch.cat([y.mean((2, 3)), y.amax((2, 3))], 1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    monkeypatch.delenv("XMODAL_ONNX", raising=False)
    monkeypatch.delenv("XMODAL_EAGER", raising=False)
    return tmp_path / "onnx"


def test_second_call_runs_onnx_runtime_with_the_same_outputs_any_batch(cache):
    net = Net().eval()
    graph = OnnxGraph(net, key=lambda x: tuple(x.shape[1:]))
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        assert graph(x[:1]) is None  # first call of a side: the caller's own path
        out = graph(x)  # a batch of 3 through the export of the 1-image call
        ref = net(x)
    assert out is not None and out.shape == (3, 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (file,) = cache.glob("*.onnx")
    assert not list(cache.glob(".*part"))
    # a new graph on the same weights reuses the file; changed weights export anew
    again = OnnxGraph(net, key=lambda x: tuple(x.shape[1:]))
    with torch.inference_mode():
        again(x), again(x)
    assert list(cache.glob("*.onnx")) == [file]
    with torch.no_grad():
        net.conv.bias.add_(1.0)
    graph.reset()
    with torch.inference_mode():
        graph(x)
        torch.testing.assert_close(graph(x), net(x), atol=1e-5, rtol=1e-5)
    assert len(list(cache.glob("*.onnx"))) == 2
    # an export unused for 30 days goes when another is made; one in use stays
    stale, fresh = cache / "stale.onnx", cache / "fresh.onnx"
    stale.write_bytes(b"old"), fresh.write_bytes(b"new")
    month = time.time() - 31 * 86400
    os.utime(stale, (month, month))
    with torch.no_grad():
        net.conv.bias.add_(1.0)
    graph.reset()
    with torch.inference_mode():
        graph(x), graph(x)
    assert not stale.exists() and fresh.exists() and len(list(cache.glob("*.onnx"))) == 4


def test_switched_off_or_failing_it_leaves_the_call_to_torch(cache, monkeypatch, caplog):
    net = Net().eval()
    x = torch.randn(1, 3, 16, 16)
    graph = OnnxGraph(net, key=lambda x: None)
    monkeypatch.setenv("XMODAL_ONNX", "0")
    with torch.inference_mode():
        assert graph(x) is None and graph(x) is None
    assert not graph.active
    monkeypatch.setenv("XMODAL_ONNX", "1")
    assert graph.active

    def no_export(self, k, xs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(onnx_graph.OnnxGraph, "_export", no_export)
    broken = OnnxGraph(net, key=lambda x: None)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        assert broken(x) is None and broken(x) is None and broken(x) is None
    assert broken.broken and not broken.active
    assert sum("no exporter here" in r.getMessage() for r in caplog.records) == 1


def test_image_backbone_runs_under_onnx_runtime_from_the_second_call(cache):
    torch.manual_seed(0)
    backbone = ImageBackbone().fuse_batchnorm()
    x = torch.randn(3, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        eager = backbone(x)
        backbone.embed(x[:1])
        out = backbone.embed(x)  # ONNX Runtime, exported at batch 1
        assert backbone.onnx.sessions and not backbone.graph.graphs  # no torch trace
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
        backbone.use_tail(backbone.tail_net)  # new weights: exports and sessions go
        assert not backbone.onnx.sessions and not backbone.onnx.files


class Tokens(torch.nn.Module):
    """Ids and a mask of any batch and length → masked mean of projected embeddings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 64)
        self.proj = torch.nn.Linear(64, 32)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = torch.relu(self.proj(self.embed(ids))) * mask.unsqueeze(-1)
        return states.sum(1) / mask.sum(1, keepdim=True)


def test_int8_variant_of_several_inputs_any_batch_and_length(cache):
    net = Tokens().eval()
    mode = {"now": "int8"}
    graph = OnnxGraph(
        net,
        key=lambda *xs: None,
        inputs=("ids", "mask"),
        dynamic=(0, 1),
        variant=lambda: mode["now"],
    )
    ids = torch.randint(1, 50, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.inference_mode():
        ref = net(ids, mask)
        assert graph(ids[:1, :3], mask[:1, :3]) is None  # first call: the caller's path
        int8 = graph(ids, mask)  # another batch size and length, same export
        assert int8 is not None and int8.shape == (4, 32)
        # int8 weights: close to float32, not equal
        assert 0 < (int8 - ref).abs().max() < 0.05 * ref.abs().max()
        mode["now"] = "float32"  # a variant of its own: first seen, then exported under its name
        assert graph(ids, mask) is None
        torch.testing.assert_close(graph(ids, mask), ref, atol=1e-5, rtol=1e-5)
        assert len(list(cache.glob("*.onnx"))) == 2 and len(graph.sessions) == 2
        mode["now"] = None  # no variant now: the caller's path
        assert not graph.active and graph(ids, mask) is None
        mode["now"] = "int8"
        assert graph.active
        torch.testing.assert_close(graph(ids, mask), int8)  # the session kept


def _int8_weight_range(path) -> tuple[int, int]:
    import onnx
    from onnx import numpy_helper

    weights = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(path)).graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    ]
    assert weights
    return min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)


def test_int8_weights_take_7_bits_on_a_cpu_without_vnni(cache, monkeypatch):
    net = Tokens().eval()
    ids = torch.randint(1, 50, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    outputs, files = {}, {}
    for has_vnni in (True, False):
        monkeypatch.setattr(onnx_graph, "int8_cpu", lambda v=has_vnni: "vnni" if v else "x86")
        graph = OnnxGraph(
            net, key=lambda *xs: None, inputs=("ids", "mask"), dynamic=(0, 1),
            variant=lambda: "int8",
        )  # fmt: skip
        with torch.inference_mode():
            assert graph(ids, mask) is None
            outputs[has_vnni] = graph(ids, mask)
        (files[has_vnni],) = graph.files.values()
    assert files[True] != files[False]  # a recipe of its own, a file of its own
    assert _int8_weight_range(files[True]) == (-127, 127)  # per channel: each row's peak is ±127
    low, high = _int8_weight_range(files[False])
    assert low >= -64 and high <= 64 and high - low > 100  # 7 bits, used whole
    with torch.inference_mode():
        ref = net(ids, mask)
    for out in outputs.values():
        assert 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()
