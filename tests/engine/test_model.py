"""The aligned model on real packaged towers: shapes, norms, bundles, speech branches."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ModelConfig, SpeechHeadConfig, SpeechTowerConfig
from engine.errors import ModelError, QueryError
from engine.graph import PRECISION_ENV
from engine.media import SAMPLE_RATE, load_audio, load_image
from engine.model import AlignedModel, build_heads, list_models, load_model

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(autouse=True)
def float32_graphs(monkeypatch):
    """These tests compare vectors made on different paths (a first eager call, later traced
    graphs) to 1e-5: float32 graphs; tests/engine/test_graph.py covers bfloat16's."""
    monkeypatch.setenv(PRECISION_ENV, "fp32")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="tiny", speech=SpeechTowerConfig(branch="fused", head=SpeechHeadConfig())
    )
    out = tmp_path_factory.mktemp("bundle")
    AlignedModel(cfg, build_heads(cfg), fingerprint="x").save(out)
    return out


@pytest.fixture(scope="module")
def model(bundle) -> AlignedModel:
    return load_model(bundle)


def _unit_rows(x: np.ndarray, n: int, d: int) -> None:
    assert x.shape == (n, d) and x.dtype == np.float32
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_text_shapes_and_norms(model):
    vecs = model.embed_text(["a dog on a beach", "a red car"])
    _unit_rows(vecs, 2, model.dim)
    # the frozen MiniLM hub: related sentences are closer than unrelated ones
    near, far = model.embed_text(["a puppy running on the sand", "tax law amendments"])
    assert vecs[0] @ near > vecs[0] @ far


def test_empty_text_rejected(model):
    with pytest.raises(QueryError, match="non-empty"):
        model.embed_text(["  "])


def test_image_shapes_and_norms(model):
    img = load_image(FIXTURES / "beach.png")
    _unit_rows(model.embed_images([img, img.rotate(90, expand=True)]), 2, model.dim)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bundle_round_trip_identical(bundle, tmp_path, monkeypatch, precision):
    if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 here")
    monkeypatch.setenv(PRECISION_ENV, precision)
    first = load_model(bundle)
    first.save(tmp_path)
    again = load_model(tmp_path)
    assert again.fingerprint == first.fingerprint
    img = [load_image(FIXTURES / "beach.png")]
    for _ in range(3):  # eager, then through the traced graphs (engine.graph): same each time
        np.testing.assert_array_equal(first.embed_images(img), again.embed_images(img))
        np.testing.assert_array_equal(first.embed_text(["a dog"]), again.embed_text(["a dog"]))


def test_saved_weights_are_as_readable_as_the_config(bundle, tmp_path):
    # safetensors 0.8 creates its files 0600 whatever the umask; a bundle must not be
    # readable by its config but not by its weights
    from engine.model import WEIGHTS_FILE

    old = os.umask(0o022)
    try:
        load_model(bundle).save(tmp_path)
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / WEIGHTS_FILE).stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o644


def test_half_rounded_weights_are_stored_in_half_the_bytes(bundle, tmp_path):
    from safetensors.torch import load_file

    from engine.model import WEIGHTS_FILE, round_to_half

    model = load_model(bundle)
    round_to_half(model.heads)
    model.save(tmp_path)
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    assert stored["image.net.0.weight"].dtype == torch.float16
    full = (bundle / WEIGHTS_FILE).stat().st_size
    assert (tmp_path / WEIGHTS_FILE).stat().st_size < 0.55 * full
    again = load_model(tmp_path)
    img = [load_image(FIXTURES / "beach.png")]
    np.testing.assert_array_equal(model.embed_images(img), again.embed_images(img))
    np.testing.assert_array_equal(model.embed_text(["a dog"]), again.embed_text(["a dog"]))
    states = np.random.default_rng(0).normal(size=(1, 20, 512)).astype(np.float32)
    np.testing.assert_array_equal(
        model.embed_speech_states(states, np.array([20])),
        again.embed_speech_states(states, np.array([20])),
    )
    # rounding moves vectors only a little
    before = load_model(bundle)
    assert float((before.embed_images(img) * model.embed_images(img)).sum()) > 0.999


def test_speech_transcript_and_branches(model):
    clip = load_audio(FIXTURES / "dog_on_beach.wav")
    out = {b: model.embed_speech([clip], branch=b) for b in ("cascaded", "parallel", "fused")}
    assert "dog" in out["cascaded"].transcripts[0].lower()
    assert out["fused"].transcripts == out["cascaded"].transcripts
    assert out["parallel"].transcripts == [""]  # not decoded: the branch does not need it
    heard = model.embed_speech([clip], branch="parallel", transcribe=True)
    assert heard.transcripts == out["cascaded"].transcripts
    np.testing.assert_array_equal(heard.vectors, out["parallel"].vectors)
    for emb in out.values():
        _unit_rows(emb.vectors, 1, model.dim)
    np.testing.assert_allclose(
        out["cascaded"].vectors, model.embed_text([out["cascaded"].transcripts[0]]), atol=1e-5
    )


def test_transcripts_use_the_bundles_beam_size(model, monkeypatch):
    seen = []
    real = model.whisper.scored_hypotheses

    def spy(encoded, *, beam_size=1, count=1, context=""):
        seen.append((beam_size, count, context))
        return real(encoded, beam_size=beam_size, count=count, context=context)

    monkeypatch.setattr(model.whisper, "scored_hypotheses", spy)
    clip = load_audio(FIXTURES / "dog_on_beach.wav")
    assert "dog" in model.embed_speech([clip], branch="cascaded").transcripts[0].lower()
    speech = model.config.speech
    assert seen == [(speech.beam_size, speech.hypotheses, speech.prompt)] and speech.beam_size > 1


def test_whisper_context_keeps_noise_silent_and_echoes_plain(model, monkeypatch):
    import engine.speech as sp

    whisper = model.whisper
    clip = load_audio(FIXTURES / "dog_on_beach.wav")
    noise = np.random.default_rng(0).normal(0, 0.05, 5 * SAMPLE_RATE).astype(np.float32)
    enc = whisper.encode([clip, noise])
    heard = whisper.hypotheses(enc, beam_size=5, context=sp.CAPTION_PROMPT)
    assert "dog" in heard[0][0].lower() and heard[1] == []
    # a transcript that only repeats sentences of the context: the clip is heard again without
    # it (someone may have said just that), so the result is the plain transcription
    plain = whisper.hypotheses(enc, beam_size=5, count=2)
    echo = whisper.hypotheses(enc, beam_size=5, count=2, context=f"Hello there. {heard[0][0]}")
    assert echo == plain and plain[0]
    # whether a clip holds speech is decided without the context: with the echo filter off,
    # the noise still gives nothing (with the context alone Whisper "hears" the context in it)
    monkeypatch.setattr(sp, "_sentences", lambda text: [text])
    assert whisper.hypotheses(enc, beam_size=5, context=sp.CAPTION_PROMPT)[1] == []


def test_whisper_runs_a_batch_clip_by_clip_side_by_side_with_the_same_results(model, monkeypatch):
    import threading

    import engine.speech as sp

    whisper = model.whisper
    dog = load_audio(FIXTURES / "dog_on_beach.wav")
    kids = load_audio(FIXTURES / "kids_football.wav")
    noise = np.random.default_rng(1).normal(0, 0.05, 3 * SAMPLE_RATE).astype(np.float32)
    clips = [dog, kids, noise, dog[: len(dog) // 2]]

    class Spy:  # records which thread ran each CTranslate2 call, on how many clips
        def __init__(self, ct2):
            self.ct2, self.calls = ct2, []

        def encode(self, features, **kw):
            self.calls.append(("encode", threading.current_thread().name, features.shape[0]))
            return self.ct2.encode(features, **kw)

        def generate(self, features, prompts, **kw):
            self.calls.append(("generate", threading.current_thread().name, len(prompts)))
            return self.ct2.generate(features, prompts, **kw)

    def run(workers):
        monkeypatch.setattr(whisper, "workers", workers)
        spy = Spy(whisper.model)
        monkeypatch.setattr(whisper, "model", spy)
        enc = whisper.encode(clips)
        heard = whisper.hypotheses(enc, beam_size=5, count=2, context=sp.CAPTION_PROMPT)
        monkeypatch.setattr(whisper, "model", spy.ct2)
        return enc, heard, spy.calls

    enc1, heard1, calls1 = run(1)
    enc3, heard3, calls3 = run(3)
    # one clip per CTranslate2 call: in the caller's thread with one worker, else on the pool
    assert {c[2] for c in calls1} == {c[2] for c in calls3} == {1}
    assert [c[0] for c in calls1].count("encode") == [c[0] for c in calls3].count("encode") == 4
    assert {c[1] for c in calls1} == {threading.current_thread().name}
    assert all(c[1].startswith("xmodal-whisper") for c in calls3)
    # the same states and transcripts either way, in the batch's order
    np.testing.assert_allclose(enc1.states, enc3.states, atol=1e-5)
    np.testing.assert_array_equal(enc1.lengths, enc3.lengths)
    assert heard1 == heard3
    assert "dog" in heard1[0][0].lower() and heard1[2] == [] and "dog" in heard1[3][0].lower()


def test_a_clip_is_heard_the_same_whatever_clips_share_its_batch(model):
    """Each clip is encoded in its own window and decoded to its own token budget: beside a
    longer clip, a short one and one over Whisper's 10 s shortest window get the states and
    transcripts they get alone (the encoder has no padding mask)."""
    import engine.speech as sp

    whisper = model.whisper
    dog = load_audio(FIXTURES / "dog_on_beach.wav")
    gap = np.zeros(8 * SAMPLE_RATE, np.float32)
    medium = np.concatenate([dog, gap, dog])  # 12.6 s
    long = np.concatenate([dog, gap, dog, gap])  # 20.6 s
    clips = [dog, medium, long]
    together = whisper.encode(clips)
    heard = whisper.scored_hypotheses(together, beam_size=2, count=2, context=sp.CAPTION_PROMPT)
    assert list(together.widths) == [500, 650, 1050]  # 10 s at least, else whole seconds (/ 2)
    assert together.states.shape[1] == 1050
    for i, clip in enumerate(clips):
        alone = whisper.encode([clip])
        assert alone.states.shape[1] == together.widths[i] == together.clip_states(i).shape[1]
        np.testing.assert_allclose(together.clip_states(i), alone.states, atol=1e-5)
        assert not together.states[i, together.widths[i] :].any()  # zeros after its own states
        assert together.lengths[i] == alone.lengths[0]
        expect = whisper.scored_hypotheses(alone, beam_size=2, count=2, context=sp.CAPTION_PROMPT)
        assert [t for t, _ in heard[i]] == [t for t, _ in expect[0]]
        np.testing.assert_allclose([s for _, s in heard[i]], [s for _, s in expect[0]], atol=1e-3)
    assert "dog" in heard[0][0][0].lower()
    # the parallel branch reads a clip's states up to its length, whatever padding follows
    np.testing.assert_allclose(
        model.embed_speech_states(together.states, together.lengths)[1],
        model.embed_speech_states(whisper.encode([medium]).states, together.lengths[1:2])[0],
        atol=1e-5,
    )


def test_cascaded_vector_averages_the_n_best(bundle, model, tmp_path):
    import dataclasses

    cfg = ModelConfig.load(bundle)
    cfg = dataclasses.replace(cfg, speech=dataclasses.replace(cfg.speech, hypotheses=3))
    nbest = AlignedModel(cfg, model.heads, fingerprint="x")
    nbest.whisper = model.whisper  # share the loaded Whisper
    clip = load_audio(FIXTURES / "dog_on_beach.wav")
    scored = nbest.scored_hypotheses(nbest.whisper.encode([clip]))[0]
    hyps, logprobs = [t for t, _ in scored], [s for _, s in scored]
    assert 1 < len(hyps) <= 3 and len(set(hyps)) == len(hyps)
    assert all(s < 0 for s in logprobs)
    assert hyps[0] == model.whisper.transcribe(nbest.whisper.encode([clip]), beam_size=5)[0]
    out = nbest.embed_speech([clip], branch="cascaded")
    assert out.transcripts == [hyps[0]]  # what users see is the most likely transcript
    mean = nbest.embed_text(hyps).sum(axis=0, keepdims=True)
    np.testing.assert_allclose(out.vectors, mean / np.linalg.norm(mean), atol=1e-5)
    assert not np.allclose(out.vectors, nbest.embed_text(hyps[:1]), atol=1e-4)


def test_speed_views_pool_the_n_best_of_every_speed(bundle, model, monkeypatch):
    import dataclasses

    from engine.media import at_speed

    cfg = ModelConfig.load(bundle)
    speech = dataclasses.replace(cfg.speech, hypotheses=3, weighting="posterior")
    plain = AlignedModel(dataclasses.replace(cfg, speech=speech), model.heads, fingerprint="x")
    views = AlignedModel(
        dataclasses.replace(cfg, speech=dataclasses.replace(speech, speeds=(1.0, 0.9))),
        model.heads, fingerprint="x",
    )  # fmt: skip
    plain.whisper = views.whisper = model.whisper  # share the loaded Whisper
    dog = load_audio(FIXTURES / "dog_on_beach.wav")
    # over 9 s: its slowed view is longer than Whisper's shortest window, and the clip's states
    # must still be those of the clip alone (the encoder has no padding mask)
    clip = np.concatenate([dog, np.zeros(8 * SAMPLE_RATE, np.float32), dog])
    real = model.whisper.encode
    alone, alone_heard = real([clip]), plain.scored_hypotheses(real([clip]))[0]
    slowed = plain.scored_hypotheses(real([at_speed(clip, 0.9)]))[0]
    calls = []
    monkeypatch.setattr(model.whisper, "encode", lambda c: calls.append(len(c)) or real(c))
    enc, heard = views.listen([clip])
    assert calls == [1, 1]  # one call per speed
    np.testing.assert_array_equal(enc.states, alone.states)  # the parallel branch's input
    assert len(alone_heard) > 1 and len(slowed) > 1 and heard == [alone_heard + slowed]
    assert "beach" in heard[0][0][0].lower()
    # one softmax over all of them: the vector and transcript embed_speech gives
    out = views.embed_speech([clip], branch="cascaded")
    np.testing.assert_allclose(
        out.vectors, views.combine_speech(heard, None, None, "cascaded"), atol=1e-5
    )
    assert out.transcripts == [alone_heard[0][0]]  # the clip as it is: its most likely transcript
    assert not np.allclose(out.vectors, plain.embed_speech([clip], branch="cascaded").vectors)
    # silent, tiny and empty clips get every view too, and still finite vectors
    calls.clear()
    quiet = views.embed_speech([np.zeros(n, np.float32) for n in (SAMPLE_RATE, 10, 0)])
    assert calls == [3, 3] and quiet.transcripts == ["", "", ""]
    assert np.all(np.isfinite(quiet.vectors))


def test_speed_views_only_count_where_the_clip_as_it_is_holds_speech(bundle, model, monkeypatch):
    import dataclasses

    cfg = ModelConfig.load(bundle)
    views = AlignedModel(
        dataclasses.replace(cfg, speech=dataclasses.replace(cfg.speech, speeds=(1.0, 1.25))),
        model.heads, fingerprint="x",
    )  # fmt: skip
    views.whisper = model.whisper
    clips = [np.full(2 * SAMPLE_RATE, 0.1, np.float32), np.full(SAMPLE_RATE, 0.1, np.float32)]
    # what a stand-in Whisper hears, by clip length: both views of the first clip hold speech;
    # the second clip as it is holds none, its faster view a transcript all the same
    said = {32000: [("a dog", -1.0)], 25600: [("a cat", -2.0)], 16000: [], 12800: [("a hat", -1.0)]}
    monkeypatch.setattr(
        views.whisper, "encode", lambda c: type("Enc", (), {"sizes": [len(x) for x in c]})()
    )
    monkeypatch.setattr(views, "scored_hypotheses", lambda enc: [said[n] for n in enc.sizes])
    _, heard = views.listen(clips)
    assert heard == [[("a dog", -1.0), ("a cat", -2.0)], []]


def test_transcript_scores_are_log_probabilities(model):
    import ctranslate2

    whisper = model.whisper
    enc = whisper.encode([load_audio(FIXTURES / "dog_on_beach.wav")])
    scored = whisper.scored_hypotheses(enc, beam_size=5, count=3)[0]
    # CTranslate2 without length normalization scores a sequence by its summed log-probability
    total = whisper.model.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(enc.states)),
        [whisper.prompt], beam_size=5, num_hypotheses=5, length_penalty=0, return_scores=True,
    )[0]  # fmt: skip
    summed = {
        whisper.tokenizer.decode(ids).strip(): score
        for ids, score in zip(total.sequences_ids, total.scores, strict=True)
    }
    ours = [s for t, s in scored if t in summed]
    assert ours and len(scored) == 3
    np.testing.assert_allclose(ours, [summed[t] for t, _ in scored if t in summed], rtol=1e-4)


def test_posterior_weighting_favours_the_likely_transcript(bundle, model):
    import dataclasses

    cfg = ModelConfig.load(bundle)
    posterior = AlignedModel(
        dataclasses.replace(cfg, speech=dataclasses.replace(cfg.speech, weighting="posterior")),
        model.heads, fingerprint="x",
    )  # fmt: skip
    texts = ["a dog runs on the beach", "a dock runs on the bench"]
    vecs = model.embed_text(texts)
    heard = [[(texts[0], -0.5), (texts[1], -4.0)], [(texts[0], -2.0), (texts[1], -2.0)], []]
    out = posterior.combine_speech(heard, None, None, "cascaded")
    w = np.exp([-0.5, -4.0]) / np.exp([-0.5, -4.0]).sum()  # 0.971, 0.029
    expected = w @ vecs
    np.testing.assert_allclose(out[0], expected / np.linalg.norm(expected), atol=1e-5)
    uniform = model.combine_speech(heard, None, None, "cascaded")
    mean = vecs.mean(axis=0)
    np.testing.assert_allclose(uniform[0], mean / np.linalg.norm(mean), atol=1e-5)
    assert out[0] @ vecs[0] > uniform[0] @ vecs[0] + 0.01
    np.testing.assert_allclose(out[1], uniform[1], atol=1e-5)  # equally likely: a plain mean
    assert not out[2].any() and not uniform[2].any()  # nothing heard: a zero vector


def test_silent_and_tiny_clips_are_finite(model):
    emb = model.embed_speech([np.zeros(SAMPLE_RATE, np.float32), np.zeros(10, np.float32)])
    assert emb.transcripts == ["", ""]
    assert np.all(np.isfinite(emb.vectors))


def test_long_clip_is_windowed(model):
    clip = load_audio(FIXTURES / "dog_on_beach.wav")
    long = np.concatenate([clip, np.zeros(31 * SAMPLE_RATE, np.float32), clip])
    emb = model.embed_speech([long], branch="cascaded")
    # both windows heard, one sentence each (Whisper base without an adapter hears the second,
    # 3.3 s of silence and then the dog, in its own 10 s window as "the brown target")
    assert emb.transcripts[0].lower().count("on the beach") == 2
    _unit_rows(emb.vectors, 1, model.dim)


def test_weights_must_match_config(bundle, tmp_path):
    import json
    import shutil

    shutil.copytree(bundle, tmp_path / "b")
    raw = json.loads((tmp_path / "b" / "config.json").read_text())
    raw["image"]["head"]["hidden_dim"] = 7
    (tmp_path / "b" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="do not match config.json"):
        load_model(tmp_path / "b")


def test_tuned_backbone_parts_load_without_reading_the_packaged_weights(tmp_path, monkeypatch):
    import engine.text
    import engine.vision
    from engine.config import ImageTowerConfig, TextTowerConfig

    cfg = ModelConfig(
        name="tuned", image=ImageTowerConfig(tuned_tail=True), text=TextTowerConfig(tuned_layers=2)
    )
    heads = build_heads(cfg)  # pretrained copies, as the trainer starts from
    shapes = build_heads(cfg, pretrained=False)
    some_weight = {"image_tail": "conv_head.weight", "text_top": "0.output.dense.weight"}
    for name, key in some_weight.items():
        a, b = heads[name].state_dict(), shapes[name].state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        assert not torch.equal(a[key], b[key])  # shapes only: the packaged weights were not read
    with torch.no_grad():
        heads["image_tail"].conv_head.weight.mul_(1.5)  # "tuned"
    AlignedModel(cfg, heads, fingerprint="x").save(tmp_path)

    def no_packaged_weights(*args, **kwargs):
        raise AssertionError("load_model read packaged weights")

    monkeypatch.setattr(engine.text, "load_text_tower", no_packaged_weights)
    monkeypatch.setattr(engine.vision.ImageBackbone, "__init__", no_packaged_weights)
    loaded = load_model(tmp_path).heads
    for name in some_weight:
        for k, v in heads[name].state_dict().items():
            assert torch.equal(loaded[name].state_dict()[k], v), (name, k)


def test_unknown_model_lists_available():
    with pytest.raises(ModelError, match="available"):
        load_model("no-such-model")
    assert isinstance(list_models(), list)


def test_heads_must_match_config_on_save_and_load(bundle, tmp_path):
    """Regression: the image-stage bundle once saved an untrained speech head its config did
    not declare; saving such a model now fails, and loading such a bundle is refused."""
    from safetensors.torch import load_file, save_file

    model = load_model(bundle)
    cascaded = ModelConfig(name="c")
    with pytest.raises(ModelError, match="do not match the config"):
        AlignedModel(cascaded, dict(model.heads), fingerprint="x").save(tmp_path / "a")
    cascaded.save(tmp_path)
    tensors = load_file(str(bundle / "heads.safetensors"))
    save_file(tensors, str(tmp_path / "heads.safetensors"))
    with pytest.raises(ModelError, match="does not declare"):
        load_model(tmp_path)


def test_whisper_context_leaves_the_decoding_budget_alone(model, monkeypatch):
    """CTranslate2 decodes up to min(max_length / 2, max_length - len(prompt) + 1) new tokens:
    with a context the budget is the same as without, and a context longer than Whisper's
    window is cut, not an error."""
    import engine.speech as sp

    whisper = model.whisper
    enc = whisper.encode([load_audio(FIXTURES / "dog_on_beach.wav")])
    caps = []
    real = whisper.model

    class Spy:
        def generate(self, states, prompts, **kw):
            caps.append(min(kw["max_length"] // 2, kw["max_length"] - len(prompts[0]) + 1))
            return real.generate(states, prompts, **kw)

    monkeypatch.setattr(whisper, "model", Spy())
    whisper.hypotheses(enc, beam_size=2)
    whisper.hypotheses(enc, beam_size=2, context=sp.CAPTION_PROMPT)
    assert caps[0] == caps[2] > 10  # caps[1]: the one-step no-speech check
    caps_alone = caps[0]
    # each clip gets its own budget, not its longest batch-mate's
    monkeypatch.setattr(whisper, "model", real)
    dog = load_audio(FIXTURES / "dog_on_beach.wav")
    pair = whisper.encode([dog, np.concatenate([dog, np.zeros(18 * SAMPLE_RATE, np.float32)])])
    monkeypatch.setattr(whisper, "model", Spy())
    monkeypatch.setattr(whisper, "workers", 1)  # calls in order
    caps.clear()
    whisper.hypotheses(pair, beam_size=2)
    assert caps[0] == caps_alone < caps[1]
    long = " ".join(["A dog runs on the beach."] * 120)  # ~840 tokens
    assert "dog" in whisper.hypotheses(enc, beam_size=2, context=long)[0][0].lower()


def test_whisper_workers_follow_the_cpus_this_process_may_use(monkeypatch):
    import engine.speech as sp

    monkeypatch.delenv("XMODAL_THREADS", raising=False)
    monkeypatch.setattr(sp.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert sp._usable_cpus() == 3
    monkeypatch.setattr(sp, "_usable_cpus", lambda: 1)
    assert sp.Whisper().workers == 1
    monkeypatch.setenv("XMODAL_THREADS", "3")
    assert sp.Whisper().workers == 3


def test_image_head_ensemble_bundle_round_trips_and_checks_its_count(tmp_path):
    """`image.heads: 3`: three heads' unit outputs averaged; a bundle whose weights hold another
    number of heads than its config names is refused."""
    import dataclasses
    import json

    from engine.config import HeadConfig, ImageTowerConfig

    head = HeadConfig(in_dim=2560, out_dim=384, hidden_dim=32)
    cfg = ModelConfig(name="ens", image=ImageTowerConfig(head=head, heads=3))
    torch.manual_seed(0)
    heads = build_heads(cfg)
    AlignedModel(cfg, heads, fingerprint="t").save(tmp_path / "b")
    loaded = load_model(tmp_path / "b")
    x = np.random.default_rng(0).standard_normal((4, 2560)).astype(np.float32)
    with torch.no_grad():
        units = [torch.nn.functional.normalize(m(torch.from_numpy(x)), dim=-1)
                 for m in heads["image"].members]  # fmt: skip
    expect = torch.nn.functional.normalize(torch.stack(units).mean(0), dim=-1).numpy()
    got = loaded.embed_image_features(x)
    np.testing.assert_allclose(got, expect, atol=1e-6)
    one = AlignedModel(dataclasses.replace(cfg, image=ImageTowerConfig(head=head)),
                       {"image": heads["image"].members[0]}, fingerprint="t")  # fmt: skip
    assert np.abs(one.embed_image_features(x) - got).max() > 1e-3  # the others count

    raw = json.loads((tmp_path / "b" / "config.json").read_text())
    raw["image"]["heads"] = 4
    (tmp_path / "b" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="do not match config.json for the image head"):
        load_model(tmp_path / "b")


def test_text_scales_travel_with_the_bundle_but_not_its_fingerprint(bundle, tmp_path):
    from engine.model import TEXT_SCALES_FILE

    model = load_model(bundle)
    assert model.text_scales is None
    scales = {"encoder.layer.0.attention.self.query": torch.rand(384) + 0.5}
    model.text_scales = scales
    model.save(tmp_path)
    again = load_model(tmp_path)
    assert again.fingerprint == model.fingerprint  # only the int8 text path's vectors change
    assert set(again.text_scales) == set(scales)
    torch.testing.assert_close(again.text_scales["encoder.layer.0.attention.self.query"],
                               scales["encoder.layer.0.attention.self.query"])  # fmt: skip
    mode = stat.S_IMODE((tmp_path / TEXT_SCALES_FILE).stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "config.json").stat().st_mode)
    # saved without scales (e.g. retrained text weights): the stale file goes
    again.text_scales = None
    again.save(tmp_path)
    assert not (tmp_path / TEXT_SCALES_FILE).exists() and load_model(tmp_path).text_scales is None


def test_int8_text_path_only_where_onnx_runtime_may_run(bundle, tmp_path, monkeypatch):
    from engine import text

    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    monkeypatch.delenv(PRECISION_ENV)  # auto: int8 on a VNNI CPU for a bundle with scales
    monkeypatch.delenv("XMODAL_EAGER", raising=False)
    monkeypatch.setattr(text, "int8_cpu", lambda: "vnni")
    monkeypatch.setattr(text, "bf16_graphs", lambda: False)
    model = load_model(bundle)
    model.text_scales = {"encoder.layer.0.output.dense": torch.ones(1536)}
    texts = ["a dog runs on the beach", "a bowl of soup on a wooden table"]
    monkeypatch.setenv("XMODAL_ONNX", "0")
    first = model.embed_text(texts)
    np.testing.assert_allclose(model.embed_text(texts), first, atol=1e-5)
    assert "_text_whole" not in model.__dict__  # no smoothed copy of the tower made for nothing
    monkeypatch.delenv("XMODAL_ONNX")
    model.embed_text(texts)  # seen
    int8 = model.embed_text(texts)  # int8 under ONNX Runtime
    assert model._text_whole.sessions
    cosines = (int8 * first).sum(1)
    assert np.all(cosines > 0.98) and not np.allclose(int8, first, atol=1e-4)
