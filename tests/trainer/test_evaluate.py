"""Recall@k on hand-made cases whose answers are known by construction, and `evaluate` end to end
with a stub embedder (no real model)."""

from __future__ import annotations

import json
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import trainer.evaluate as ev
from engine.embedder import SpeechEmbedding
from engine.errors import XmodalError
from trainer.evaluate import build_eval_set, evaluate, format_table, recall_at_k
from trainer.manifest import read_manifest

KS4 = (1, 2, 3, 4)


def _scores(rows: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Queries and candidates whose inner products are exactly `rows` (one-hot queries)."""
    s = np.asarray(rows, dtype=np.float32)
    return np.eye(len(s), dtype=np.float32), s.T.copy()


def test_recall_ranks_by_construction():
    q, c = _scores([[3, 2, 1, 0], [0, 1, 2, 3], [1, 3, 2, 0]])
    res = recall_at_k(q, c, [{0}, {0}, {2}], ks=KS4)  # best relevant ranks: 0, 3, 1
    assert res["R@1"] == pytest.approx(100 / 3)
    assert res["R@2"] == pytest.approx(200 / 3)
    assert res["R@3"] == pytest.approx(200 / 3)
    assert res["R@4"] == 100.0
    assert (res["queries"], res["candidates"]) == (3, 4)


def test_identity_is_perfect_and_default_ks_are_1_5_10():
    v = np.eye(6, dtype=np.float32)
    res = recall_at_k(v, v, [{i} for i in range(6)])
    assert res == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "queries": 6, "candidates": 6}


def test_multiple_relevant_items_count_the_best_one():
    q, c = _scores([[0, 5, 1, 4], [0, 5, 1, 4]])
    res = recall_at_k(q, c, [{2, 3}, {0, 2}], ks=KS4)  # best relevant ranks: 1 (cand 3), 2 (cand 2)
    assert [res[f"R@{k}"] for k in KS4] == [0.0, 50.0, 100.0, 100.0]


def test_ties_are_broken_against_the_query():
    # all three score alike: two non-relevant candidates rank above the relevant one
    q, c = _scores([[1, 1, 1]])
    assert recall_at_k(q, c, [{1}], ks=(1, 2, 3)) == {
        "R@1": 0.0,
        "R@2": 0.0,
        "R@3": 100.0,
        "queries": 1,
        "candidates": 3,
    }


def test_a_collapsed_model_scores_zero_not_one_hundred():
    same = np.ones((4, 3), dtype=np.float32)
    res = recall_at_k(same, same, [{i} for i in range(4)], ks=(1, 3))
    assert res["R@1"] == 0.0 and res["R@3"] == 0.0


def test_ties_between_relevant_items_do_not_hurt():
    q, c = _scores([[2, 2, 0], [2, 0, 2]])
    res = recall_at_k(q, c, [{0, 1}, {0}], ks=(1, 2))  # ranks 0 and 1 (tied with cand 2)
    assert (res["R@1"], res["R@2"]) == (50.0, 100.0)


def test_k_beyond_the_candidates_is_a_full_hit():
    q, c = _scores([[0, 1]])
    assert recall_at_k(q, c, [{0}], ks=(10,))["R@10"] == 100.0


def test_blocked_scoring_matches_brute_force(monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((53, 8)).astype(np.float32)
    c = rng.standard_normal((29, 8)).astype(np.float32)
    relevant = [set(rng.choice(29, size=rng.integers(1, 4), replace=False).tolist()) for _ in q]
    order = np.argsort(-(q @ c.T), axis=1)
    brute = [
        next(r for r, j in enumerate(row) if j in rel)
        for row, rel in zip(order, relevant, strict=True)
    ]
    monkeypatch.setattr(ev, "MAX_BLOCK", 29 * 4)  # 4 queries per block, the last one partial
    res = recall_at_k(q, c, relevant)
    for k in (1, 5, 10):
        assert res[f"R@{k}"] == pytest.approx(100.0 * np.mean(np.asarray(brute) < k))


def test_a_large_case_is_fast_and_exact():
    rng = np.random.default_rng(1)
    c = rng.standard_normal((1000, 64)).astype(np.float32)
    image_of = np.repeat(np.arange(1000), 5)
    q = c[image_of] + 0.01 * rng.standard_normal((5000, 64)).astype(np.float32)
    res = recall_at_k(q, c, [{int(i)} for i in image_of])
    assert res["R@1"] == 100.0 and res["queries"] == 5000 and res["candidates"] == 1000


@pytest.mark.parametrize(
    ("relevant", "match"),
    [([set()], "no relevant candidate"), ([{3}], "outside 0..1"), ([{0}, {1}], "2 relevance sets")],
)
def test_recall_rejects_bad_relevance(relevant, match):
    with pytest.raises(ValueError, match=match):
        recall_at_k(np.ones((1, 2)), np.ones((2, 2)), relevant)


def test_recall_rejects_bad_vectors_and_ks():
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.array([[np.nan, 1.0]]), np.ones((2, 2)), [{0}])
    with pytest.raises(ValueError, match="2-d but candidates 3-d"):
        recall_at_k(np.ones((1, 2)), np.ones((2, 3)), [{0}])
    with pytest.raises(ValueError, match=r"must be \(n, d\)"):
        recall_at_k(np.ones(2), np.ones((2, 2)), [{0}])
    with pytest.raises(ValueError, match="positive cut-offs"):
        recall_at_k(np.ones((1, 2)), np.ones((2, 2)), [{0}], ks=(0,))


# --- evaluate over a manifest, with a stub embedder --------------------------------------------

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
AXIS = {"red": 0, "crimson": 0, "green": 1, "blue": 2}
CLIP_SAMPLES = {"red": 1600, "green": 3200}  # the stub tells clips apart by length


class StubEmbedder:
    """Colour words, colour images and clip lengths land on the same axis of a 4-d space."""

    name, dim, fingerprint = "stub", 4, "stub-1"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def _axis(self, i: int) -> np.ndarray:
        return np.eye(self.dim, dtype=np.float32)[i]

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(("text", len(texts)))
        return np.stack([self._axis(next(a for w, a in AXIS.items() if w in t)) for t in texts])

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.calls.append(("image", len(images)))
        return np.stack([self._axis(int(np.argmax(img.getpixel((0, 0))))) for img in images])

    def embed_speech(self, clips: Sequence[np.ndarray]) -> SpeechEmbedding:
        self.calls.append(("speech", len(clips)))
        axes = [0 if len(c) == CLIP_SAMPLES["red"] else 1 for c in clips]
        return SpeechEmbedding(np.stack([self._axis(a) for a in axes]), [""] * len(clips))


def _wav(path: Path, samples: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(np.full(samples, 1000, dtype="<i2").tobytes())


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for name, rgb in COLORS.items():
        Image.new("RGB", (4, 4), rgb).save(tmp_path / "img" / f"{name}.png")
    for name, samples in CLIP_SAMPLES.items():
        _wav(tmp_path / "wav" / f"{name}.wav", samples)
    (tmp_path / "m.tsv").write_text(
        "image\tcaption\taudio\n"
        "img/red.png\ta red square\twav/red.wav\n"
        "img/red.png\tcrimson box\t\n"
        "img/green.png\ta green square\twav/green.wav\n"
        "img/blue.png\ta blue square\t\n"
    )
    return tmp_path


def test_eval_set_candidates_and_relevance(manifest_dir: Path):
    es = build_eval_set(read_manifest(manifest_dir / "m.tsv"))
    assert [p.name for p in es.images] == ["red.png", "green.png", "blue.png"]
    assert es.texts == ("a red square", "crimson box", "a green square", "a blue square")
    assert [p.name for p in es.audios] == ["red.wav", "green.wav"]
    assert es.relevance("text->image") == ([0, 1, 2, 3], [{0}, {0}, {1}, {2}])
    assert es.relevance("image->text") == ([0, 1, 2], [{0, 1}, {2}, {3}])
    assert es.relevance("speech->image") == ([0, 1], [{0}, {1}])
    assert es.relevance("image->speech") == ([0, 1], [{0}, {1}])  # blue has no audio
    assert es.relevance("speech->text") == ([0, 1], [{0}, {2}])
    assert es.relevance("text->speech") == ([0, 2], [{0}, {1}])  # only voiced captions ask
    with pytest.raises(XmodalError, match="unknown direction"):
        es.relevance("text->text")


def test_evaluate_every_direction_with_a_stub_embedder(manifest_dir: Path):
    stub = StubEmbedder()
    results = evaluate(read_manifest(manifest_dir / "m.tsv"), stub, batch_size=3)
    assert list(results) == list(ev.DIRECTIONS)
    counts = {k: (v["queries"], v["candidates"]) for k, v in results.items()}
    assert counts == {
        "text->image": (4, 3),
        "image->text": (3, 4),
        "speech->image": (2, 3),
        "image->speech": (2, 2),
        "text->speech": (2, 2),
        "speech->text": (2, 4),
    }
    for direction in (
        "text->image",
        "image->text",
        "speech->image",
        "image->speech",
        "text->speech",
    ):
        assert results[direction]["R@1"] == 100.0
    # the red clip ties "a red square" (relevant) with "crimson box" (not): pessimistic rank 1
    assert results["speech->text"]["R@1"] == 50.0
    assert results["speech->text"]["R@5"] == 100.0
    assert stub.calls == [("text", 3), ("text", 1), ("image", 3), ("speech", 2)]
    json.dumps(results)  # JSON-ready as it is


def test_evaluate_takes_precomputed_vectors_and_named_speech_branches(manifest_dir: Path):
    manifest = read_manifest(manifest_dir / "m.tsv")
    texts = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]] * 3.0  # not normalized: evaluate does it
    images = np.eye(4, dtype=np.float32)[[0, 1, 2]]
    wrong_way = np.eye(4, dtype=np.float32)[[1, 0]]
    results = evaluate(
        manifest,
        text_vectors=texts,
        image_vectors=images,
        speech_branches={"parallel": images[:2], "swapped": wrong_way},
    )
    assert "speech->image" not in results
    assert results["speech(parallel)->image"]["R@1"] == 100.0
    assert results["image->speech(parallel)"]["R@1"] == 100.0
    assert results["text->speech(swapped)"]["R@1"] == 0.0
    assert results["speech(swapped)->text"]["queries"] == 2
    assert len(results) == 2 + 4 * 2


def test_evaluate_embeds_only_what_it_was_not_given(manifest_dir: Path):
    stub = StubEmbedder()
    texts = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]
    results = evaluate(read_manifest(manifest_dir / "m.tsv"), stub, text_vectors=texts)
    assert [kind for kind, _ in stub.calls] == ["image", "speech"]
    assert results["text->image"]["R@1"] == 100.0


def test_manifest_without_audio_gives_text_and_image_directions(manifest_dir: Path):
    (manifest_dir / "t.tsv").write_text("image\tcaption\nimg/red.png\tred\nimg/blue.png\tblue\n")
    results = evaluate(read_manifest(manifest_dir / "t.tsv"), StubEmbedder())
    assert list(results) == ["text->image", "image->text"]


def test_same_caption_text_is_relevant_wherever_it_appears(manifest_dir: Path):
    _wav(manifest_dir / "wav" / "red2.wav", 1600)
    (manifest_dir / "d.tsv").write_text(
        "image\tcaption\taudio\n"
        "img/red.png\ta red thing\twav/red.wav\n"
        "img/red.png\ta red thing\twav/red2.wav\n"  # the same caption, another voice
        "img/green.png\ta red thing\t\n"  # the same text describes another image
    )
    es = build_eval_set(read_manifest(manifest_dir / "d.tsv"))
    assert es.texts == ("a red thing", "a red thing")  # one per (image, caption)
    assert es.relevance("text->image") == ([0, 1], [{0, 1}, {0, 1}])
    assert es.relevance("text->speech") == ([0, 1], [{0, 1}, {0, 1}])
    assert es.relevance("speech->image")[1] == [{0, 1}, {0, 1}]


def test_evaluate_errors_name_the_fix(manifest_dir: Path):
    manifest = read_manifest(manifest_dir / "m.tsv")
    with pytest.raises(XmodalError, match="needs an embedder"):
        evaluate(manifest, text_vectors=np.eye(4))
    with pytest.raises(XmodalError, match="recompute them in the order of build_eval_set"):
        evaluate(manifest, text_vectors=np.eye(4)[:3], image_vectors=np.eye(4)[:3])
    with pytest.raises(XmodalError, match="batch_size must be at least 1"):
        evaluate(manifest, StubEmbedder(), batch_size=0)
    (manifest_dir / "e.tsv").write_text("image\tcaption\nimg/missing.png\tx\n")
    with pytest.raises(XmodalError, match="no usable rows"):
        evaluate(read_manifest(manifest_dir / "e.tsv"), StubEmbedder())


def test_format_table_lists_every_direction():
    results = {
        "text->image": {
            "R@1": 18.94,
            "R@5": 45.4,
            "R@10": 58.0,
            "queries": 5000,
            "candidates": 1000,
        },
        "speech(parallel)->image": {
            "R@1": 5.0,
            "R@5": 9.0,
            "R@10": 20.0,
            "queries": 50,
            "candidates": 10,
        },
    }
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["direction", "R@1", "R@5", "R@10", "queries", "candidates"]
    assert lines[2].split() == ["text->image", "18.9", "45.4", "58.0", "5000", "1000"]
    assert lines[3].split()[0] == "speech(parallel)->image"
    assert format_table({}) == "(no direction to evaluate)"


class BranchStub(StubEmbedder):
    """`embed_speech(clips, branch=...)`: "wrong" maps every clip to the blue axis."""

    def embed_speech(
        self, clips: Sequence[np.ndarray], *, branch: str | None = None
    ) -> SpeechEmbedding:
        out = super().embed_speech(clips)
        if branch == "wrong":
            return SpeechEmbedding(np.tile(self._axis(2), (len(clips), 1)), out.transcripts)
        return out


def test_evaluate_embeds_named_branches_one_call_per_branch(manifest_dir: Path):
    stub = BranchStub()
    manifest = read_manifest(manifest_dir / "m.tsv")
    results = evaluate(manifest, stub, branches=("right", "wrong"))
    assert "speech->image" not in results
    assert results["speech(right)->image"]["R@1"] == 100.0
    assert results["speech(wrong)->image"]["R@1"] == 0.0
    assert [kind for kind, _ in stub.calls].count("speech") == 2


class SharedEncoderStub(StubEmbedder):
    """Looks like `AlignedModel`: a Whisper tower encoded once, branches combined afterwards."""

    class _Whisper:
        def __init__(self, calls: list) -> None:
            self.calls = calls

        def encode(self, clips):
            self.calls.append(("encode", len(clips)))
            return type("Encoded", (), {"states": [len(c) for c in clips], "lengths": None})()

    def __init__(self) -> None:
        super().__init__()
        self.whisper = self._Whisper(self.calls)

    def listen(self, clips):
        encoded = self.whisper.encode(clips)
        heard = [[("red" if n == CLIP_SAMPLES["red"] else "green", -0.5)] for n in encoded.states]
        return encoded, heard

    def combine_speech(self, hypotheses, states, lengths, branch):
        cascaded = self.embed_text([h[0][0] for h in hypotheses])
        return cascaded if branch == "cascaded" else 2.0 * cascaded[:, ::-1]


def test_evaluate_branches_share_one_whisper_pass(manifest_dir: Path):
    stub = SharedEncoderStub()
    results = evaluate(read_manifest(manifest_dir / "m.tsv"), stub, branches=("cascaded", "odd"))
    assert stub.calls.count(("encode", 2)) == 1
    assert not any(kind == "speech" for kind, _ in stub.calls)
    assert results["speech(cascaded)->text"]["R@5"] == 100.0
    assert results["text->speech(cascaded)"]["R@1"] == 100.0
    assert results["speech(odd)->image"]["R@1"] == 0.0


def test_eval_command_warns_prints_the_table_and_writes_json(
    manifest_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    from click.testing import CliRunner

    import engine.model
    from trainer.cli import eval_command

    asked: list[str] = []
    monkeypatch.setattr(
        engine.model, "load_model", lambda name: asked.append(name) or StubEmbedder()
    )
    with (manifest_dir / "m.tsv").open("a") as fh:
        fh.write("img/missing.png\ta lost square\t\n")
    out = manifest_dir / "results.json"
    result = CliRunner().invoke(eval_command, [str(manifest_dir / "m.tsv"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert asked == ["default"]
    assert "line 6: image" in result.stderr and "file not found" in result.stderr
    assert "text->image" in result.stdout and "speech->text" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["text->image"] == {
        "R@1": 100.0,
        "R@5": 100.0,
        "R@10": 100.0,
        "queries": 4,
        "candidates": 3,
    }


def test_recall_percentages_are_the_nearest_floats():
    # 824 of 1,000 queries hit: 100 * mean gives 82.39999999999999, which JSON shows as is
    eye = np.eye(1000, dtype=np.float32)
    relevant = [{i} if i < 824 else {(i + 1) % 1000} for i in range(1000)]
    result = recall_at_k(eye, eye, relevant, ks=(1,))
    assert result["R@1"] == 82.4 and json.dumps(result["R@1"]) == "82.4"


def test_candidate_penalties_rerank_by_construction():
    q, c = _scores([[0.9, 0.8, 0.1]])  # one query; candidate 1 is the relevant one
    assert recall_at_k(q, c, [{1}], ks=(1, 2))["R@1"] == 0.0
    demoted = recall_at_k(q, c, [{1}], ks=(1, 2), cand_penalty=np.array([0.2, 0.0, 0.0]))
    assert demoted["R@1"] == 100.0  # 0.9 - 0.2 < 0.8
    boosted = recall_at_k(q, c, [{1}], ks=(1, 2), cand_penalty=np.array([0.0, 0.0, -0.75]))
    assert (boosted["R@1"], boosted["R@2"]) == (0.0, 0.0)  # 0.1 + 0.75 beats both
    with pytest.raises(ValueError, match="cand_penalty must be 3 finite values"):
        recall_at_k(q, c, [{1}], cand_penalty=np.array([0.0, np.nan, 0.0]))


def test_evaluate_uses_the_penalty_column_of_the_query_kind(manifest_dir: Path):
    """A penalty that only text queries see (column 0) sinks the red image for text→image
    and speech→image, and leaves image queries alone; `hubness=False` ignores it."""

    class PenalizedStub(StubEmbedder):
        def hub_penalty(self, vectors: np.ndarray, modality: str) -> np.ndarray:
            red = vectors @ self._axis(0) > 0.5  # the red image (and red texts/clips)
            return np.stack([np.where(red, 2.0, 0.0), np.zeros(len(vectors))], axis=1)

    manifest = read_manifest(manifest_dir / "m.tsv")
    plain = evaluate(manifest, StubEmbedder())
    corrected = evaluate(manifest, PenalizedStub())
    assert evaluate(manifest, PenalizedStub(), hubness=False) == plain
    # the two red captions (of 4) and the red clip (of 2) lose their image
    assert corrected["text->image"]["R@1"] == 50.0 and plain["text->image"]["R@1"] == 100.0
    assert corrected["speech->image"]["R@1"] == 50.0
    assert corrected["image->text"] == plain["image->text"]  # image queries: column 1, zeros
    assert corrected["image->speech"] == plain["image->speech"]
