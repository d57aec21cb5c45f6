"""Image heads in int8 from their second call (`engine.heads.Int8OnReuse`)."""

import numpy as np
import pytest
import torch

from engine.config import HeadConfig, ImageTowerConfig, ModelConfig
from engine.graph import PRECISION_ENV
from engine.heads import HeadEnsemble, Int8OnReuse
from engine.model import AlignedModel, build_heads
from engine.threads import SMALL_BATCH


def _ensemble() -> HeadEnsemble:
    torch.manual_seed(0)
    cfg = HeadConfig(in_dim=256, hidden_dim=512, out_dim=64, layers=2, dropout=0.0)
    return HeadEnsemble(cfg, 3).eval()


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.fixture(autouse=True)
def auto_precision(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)


def test_a_small_first_call_is_float32_then_int8_close_to_it():
    head = _ensemble()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    x = torch.randn(SMALL_BATCH - 1, 256)
    with torch.inference_mode():
        exact = head(x)
        wrapped = Int8OnReuse(head)
        first, second, third = wrapped(x), wrapped(x), wrapped(x)
    torch.testing.assert_close(first, exact, rtol=0, atol=0)
    assert not torch.equal(second, exact)  # the int8 copy ran
    assert _cosines(second, exact).min() > 0.999
    torch.testing.assert_close(third, second, rtol=0, atol=0)
    # the float32 module itself is left as it was: quantized in a copy
    linears = [m for m in wrapped.int8.modules() if type(m).__name__ == "Linear"]
    assert linears and all(m.weight().dtype == torch.qint8 for m in linears)
    assert all(torch.equal(head.state_dict()[k], v) for k, v in before.items())


def test_a_large_first_call_is_int8_at_once():
    head = _ensemble()
    x = torch.randn(SMALL_BATCH, 256)
    with torch.inference_mode():
        exact = head(x)
        wrapped = Int8OnReuse(head)
        first = wrapped(x)
    assert wrapped.int8 is not None and not torch.equal(first, exact)
    assert _cosines(first, exact).min() > 0.999


def test_fp32_precision_keeps_float32(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    head = _ensemble()
    x = torch.randn(2, 256)
    with torch.inference_mode():
        exact = head(x)
        wrapped = Int8OnReuse(head)
        for _ in range(3):
            torch.testing.assert_close(wrapped(x), exact, rtol=0, atol=0)
    assert wrapped.int8 is None


def test_a_failed_quantization_stays_float32(monkeypatch, caplog):
    import torch.ao.quantization as Q

    def broken(*args, **kwargs):
        raise RuntimeError("no int8 kernels")

    monkeypatch.setattr(Q, "quantize_dynamic", broken)
    head = _ensemble()
    x = torch.randn(2, 256)
    with torch.inference_mode():
        wrapped = Int8OnReuse(head)
        outs = [wrapped(x) for _ in range(3)]
        exact = head(x)
    assert all(torch.equal(o, exact) for o in outs)
    assert "int8 quantization failed" in caplog.text


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("n", [1, 12])  # an ensemble side by side on worker threads, in turn
def test_model_image_vectors_stay_close_in_int8(n, heads):
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", image=ImageTowerConfig(heads=heads))
    model = AlignedModel(cfg, build_heads(cfg), fingerprint="t")
    feats = np.random.default_rng(0).normal(size=(n, cfg.image.head.in_dim)).astype(np.float32)
    with torch.inference_mode():  # the float32 heads, for reference
        exact = model.heads["image"](torch.from_numpy(feats))
    exact = torch.nn.functional.normalize(exact, dim=-1).numpy()
    first = model.embed_image_features(feats)
    second = model.embed_image_features(feats)
    if n < SMALL_BATCH:
        np.testing.assert_allclose(first, exact, atol=1e-6)
    assert second.dtype == np.float32 and second.shape == first.shape
    np.testing.assert_allclose(np.linalg.norm(second, axis=1), 1.0, atol=1e-5)
    assert not np.array_equal(second, exact)
    assert (exact * second).sum(1).min() > 0.999
