"""scripts/whisper_soup.py: a bundle gets the mean of other bundles' Whisper adapters."""

import sys
from pathlib import Path

import numpy as np
import pytest

from engine.config import ModelConfig, SpeechTowerConfig
from engine.errors import ModelError
from engine.model import AlignedModel, build_heads, bundle_fingerprint
from engine.speech import WhisperAdapter

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))

from whisper_soup import soup  # noqa: E402

NAME = "decoder/layer_0/ffn/linear_0/weight"


def _bundle(path: Path, seed: int | None) -> Path:
    cfg = ModelConfig(name="tiny", speech=SpeechTowerConfig(adapter=seed is not None))
    adapter = None
    if seed is not None:
        rng = np.random.default_rng(seed)
        a, b = rng.normal(size=(2, 4)), rng.normal(size=(6, 2))
        adapter = WhisperAdapter({NAME: (a.astype(np.float32), b.astype(np.float32))})
    model = AlignedModel(cfg, build_heads(cfg, pretrained=False), fingerprint="x",
                         whisper_adapter=adapter)  # fmt: skip
    model.save(path)
    return path


def test_soup_writes_the_mean_adapter_and_names_it(tmp_path):
    one, two = _bundle(tmp_path / "one", 1), _bundle(tmp_path / "two", 2)
    target = _bundle(tmp_path / "target", None)
    before = bundle_fingerprint(target)
    soup(target, [one, two])
    assert ModelConfig.load(target).speech.adapter
    got = WhisperAdapter.load(target)
    base = np.zeros((6, 4), np.float32)
    parts = [WhisperAdapter.load(b).merged(NAME, base) for b in (one, two)]
    np.testing.assert_allclose(got.merged(NAME, base), (parts[0] + parts[1]) / 2, atol=1e-3)
    assert bundle_fingerprint(target) != before
    with pytest.raises(ModelError, match="names no Whisper adapter"):
        soup(one, [two, target, _bundle(tmp_path / "plain", None)])
