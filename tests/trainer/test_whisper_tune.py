"""The Whisper decoder adapter (trainer.whisper_tune) on the packaged Whisper and the project's
fixture clips."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from engine.config import ModelConfig, SpeechTowerConfig
from engine.media import load_audio
from engine.model import AlignedModel, build_heads, load_model
from engine.speech import PROMPT, Whisper, prepare_whisper
from trainer import whisper_tune as W

FIXTURES = Path(__file__).parents[1] / "fixtures"
CLIPS = {
    "dog_on_beach.wav": "A brown dog is running on the beach .",
    "kids_football.wav": "Two children are playing football in a park .",
}


@pytest.fixture(scope="module")
def whisper() -> Whisper:
    return Whisper(threads=1)


@pytest.fixture(scope="module")
def decoder() -> W.TorchDecoder:
    return W.TorchDecoder(prepare_whisper() / "model.bin").eval()


def _greedy(decoder, whisper, states: np.ndarray, limit: int = 40) -> str:
    tokens = [whisper.tokenizer.token_to_id(t) for t in PROMPT]
    end = whisper.tokenizer.token_to_id("<|endoftext|>")
    start = len(tokens)
    with torch.inference_mode():
        for _ in range(limit):
            logits = decoder(torch.tensor([tokens]), torch.from_numpy(states))[0, -1]
            token = int(logits.argmax())
            if token == end:
                break
            tokens.append(token)
    return whisper.tokenizer.decode(tokens[start:]).strip()


def test_torch_decoder_transcribes_as_ctranslate2(decoder, whisper):
    """Greedy transcripts token for token as CTranslate2's in float32 (the engine's int8 may
    differ in a letter's case)."""
    import ctranslate2

    exact = ctranslate2.models.Whisper(str(prepare_whisper()), compute_type="float32")
    prompt = [whisper.tokenizer.token_to_id(t) for t in PROMPT]
    for name in CLIPS:
        encoded = whisper.encode([load_audio(FIXTURES / name)])
        states = ctranslate2.StorageView.from_array(encoded.states)
        ids = exact.generate(states, [prompt], beam_size=1, max_length=60)[0].sequences_ids[0]
        expect = whisper.tokenizer.decode(ids).strip()
        assert "beach" in expect or "football" in expect
        assert _greedy(decoder, whisper, encoded.states) == expect


def test_as_written():
    assert W.as_written("a dog runs , jumps .") == "A dog runs, jumps."
    assert W.as_written("  Two  dogs play ! ") == "Two dogs play!"


@pytest.fixture
def voiced(tmp_path) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 180, 120)).save(tmp_path / "photo.png")
    lines = ["image\tcaption\taudio"]
    for name, caption in CLIPS.items():
        shutil.copy(FIXTURES / name, tmp_path / name)
        lines.append(f"photo.png\t{caption}\t{name}")
    lines.append("photo.png\tno recording here\t")
    (tmp_path / "voiced.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "voiced.tsv"


def test_states_are_cached_and_reused(whisper, tmp_path):
    audio = [FIXTURES / n for n in CLIPS]
    first = W.cache_states(audio, list(CLIPS.values()), whisper, tmp_path)
    assert first.states.shape == (2, W.STATES, 512) and first.states.dtype == np.float16
    expect = whisper.encode([load_audio(audio[1])]).states[0]
    np.testing.assert_allclose(first.states[1], expect, rtol=1e-3, atol=2e-3)  # float16

    class NoWhisper:
        def encode(self, clips):
            raise AssertionError("should come from the cache")

    again = W.cache_states(audio, list(CLIPS.values()), NoWhisper(), tmp_path)
    np.testing.assert_array_equal(again.states, first.states)
    assert again.captions == list(CLIPS.values())


def test_appended_rows_reuse_the_chunks_before_them(whisper, tmp_path, monkeypatch):
    monkeypatch.setattr(W, "CHUNK", 1)
    audio, captions = [FIXTURES / n for n in CLIPS], list(CLIPS.values())
    W.cache_states(audio[:1], captions[:1], whisper, tmp_path)
    encoded = []

    class Counting:
        workers = whisper.workers

        def encode(self, clips):
            encoded.extend(clips)
            return whisper.encode(clips)

    both = W.cache_states(audio, captions, Counting(), tmp_path)
    assert len(encoded) == 1 and len(both.captions) == 2  # only the appended clip
    W.cache_states(audio[:1], ["another caption"], Counting(), tmp_path)
    assert len(encoded) == 2  # a chunk is named by its captions too


def test_training_lowers_the_loss_and_the_adapter_names_ct2_weights(whisper, tmp_path):
    cache = W.cache_states([FIXTURES / n for n in CLIPS], list(CLIPS.values()), whisper, tmp_path)
    decoder = W.TorchDecoder(prepare_whisper() / "model.bin", rank=4)
    zero = decoder.adapter()  # B starts at zero: no change yet
    assert all(not b.any() for _, b in zero.factors.values())
    assert len(zero.factors) == W.LAYERS * len(W.LINEARS)
    cfg = W.TuneConfig(rank=4, epochs=15, lr=2e-3, batch_size=2)
    losses = W.train_adapter(decoder, cache, whisper.tokenizer, context="A prompt.", cfg=cfg)
    assert len(losses) == 15 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    trained = decoder.adapter()
    a, b = trained.factors["decoder/layer_5/ffn/linear_1/weight"]
    assert a.shape == (4, 2048) and b.shape == (512, 4) and np.abs(b).max() > 0


def test_kl_weight_keeps_the_adapted_decoder_near_the_packaged_one(whisper, tmp_path):
    cache = W.cache_states([FIXTURES / n for n in CLIPS], list(CLIPS.values()), whisper, tmp_path)
    tokens = torch.tensor([[whisper.tokenizer.token_to_id(t) for t in PROMPT]])
    states = torch.from_numpy(cache.states[:1].astype(np.float32))

    def drift(kl_weight: float) -> float:
        decoder = W.TorchDecoder(prepare_whisper() / "model.bin", rank=4)
        cfg = W.TuneConfig(rank=4, epochs=8, lr=2e-3, batch_size=2, kl_weight=kl_weight)
        losses = W.train_adapter(decoder, cache, whisper.tokenizer, context="", cfg=cfg)
        assert np.isfinite(losses).all()
        with torch.inference_mode():
            adapted = F.log_softmax(decoder(tokens, states), dim=-1)
            with decoder.packaged():
                packaged = F.log_softmax(decoder(tokens, states), dim=-1)
            assert not torch.equal(adapted, packaged)  # switched off inside, on again after
        return float((packaged.exp() * (packaged - adapted)).sum(-1).mean())

    assert drift(20.0) < 0.5 * drift(0.0)


def test_tune_whisper_writes_an_adapter_the_engine_uses(voiced, tmp_path, monkeypatch):
    """End to end: `xmodal tune-whisper` gives a bundle the adapter; loading the bundle merges
    it into a cached copy of Whisper's weights, which CTranslate2 loads and decodes with."""
    import engine.speech as S
    from trainer.cli import tune_whisper as command

    packaged = prepare_whisper()  # joined once by setup
    monkeypatch.setattr(S, "_joined_whisper", lambda: packaged)
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "xcache"))
    cfg = ModelConfig(name="tiny", speech=SpeechTowerConfig(prompt="A dog."))
    bundle = tmp_path / "bundle"
    AlignedModel(cfg, build_heads(cfg), fingerprint="x").save(bundle)
    before = load_model(bundle).fingerprint
    short = tmp_path / "short"  # a second manifest, elsewhere: its rows are added
    short.mkdir()
    shutil.copy(FIXTURES / "dog_on_beach.wav", short / "dog.wav")
    (short / "short.tsv").write_text("image\tcaption\taudio\n../photo.png\tA brown dog.\tdog.wav\n")
    args = [str(bundle), str(voiced), str(short / "short.tsv"), "--cache-dir", str(tmp_path / "c")]
    result = CliRunner().invoke(
        command, args + ["--rank", "2", "--epochs", "2", "--batch-size", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "3 clips" in result.output
    model = load_model(bundle)
    assert model.config.speech.adapter and model.fingerprint != before
    assert len(model.whisper_adapter.factors) == W.LAYERS * len(W.LINEARS)
    clip = load_audio(FIXTURES / "dog_on_beach.wav")
    heard = model.whisper.transcribe(model.whisper.encode([clip]))
    merged = list((tmp_path / "xcache").glob("whisper-base-ct2-*"))
    assert len(merged) == 1 and (merged[0] / "model.bin").exists()
    assert "dog" in heard[0].lower()


def test_the_shipped_model_hears_the_fixtures_through_its_adapter():
    """The default bundle's adapter fits Whisper base's decoder, changes its weights a little,
    and the merged Whisper still transcribes the project's (espeak-ng) clips."""
    from engine.ct2 import read_array, read_index

    model = load_model("default")
    adapter = model.whisper_adapter
    assert model.config.speech.adapter and adapter is not None
    data = (prepare_whisper() / "model.bin").read_bytes()
    index = read_index(data)
    assert set(adapter.factors) <= set(index)
    for name in (
        "decoder/layer_0/self_attention/linear_0/weight",
        "decoder/layer_5/ffn/linear_1/weight",
    ):
        base = read_array(data, index[name]).astype(np.float32)
        update = adapter.merged(name, base) - base
        assert 0 < np.linalg.norm(update) < 0.5 * np.linalg.norm(base)
    for name, caption in CLIPS.items():
        heard = model.scored_hypotheses(model.whisper.encode([load_audio(FIXTURES / name)]))[0][0][
            0
        ]
        words = set(caption.lower().split())
        assert len(words & set(heard.lower().rstrip(".").split())) >= len(words) - 1, heard
