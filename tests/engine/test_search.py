"""Search: every path against a brute-force numpy reference, query errors, dupes, info, CLI."""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import StubEmbedder, assert_consistent, write_png, write_wav

from engine.cli import main
from engine.embedder import MODALITIES
from engine.errors import IndexStateError, QueryError
from engine.media import SAMPLE_RATE
from engine.search import SearchEngine, check_index, load_embedder
from engine.store import Filters
from engine.vectors import FLAT_LIMIT
from indexer.mapper import Encoded
from indexer.reader import Decoded, Segment
from indexer.runner import index_folders
from indexer.scan import FileEntry, Work
from indexer.writer import IndexWriter, ModelInfo, WriterConfig

DIM = 32
STUB_INFO = ModelInfo("stub", DIM, "stub-v1", "conftest:make_stub")


def _seeded_index(index_dir: Path, n: int, factory: str | None) -> dict[str, np.ndarray]:
    """`n` items per modality with clustered seeded vectors; speech item i lasts i seconds.
    Returns path -> vector."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((30, DIM))
    truth = {}
    config = WriterConfig(factory=factory, commit_every=10**9)
    with IndexWriter.open(index_dir, STUB_INFO, config=config) as writer:
        for modality in MODALITIES:
            x = centres[rng.integers(0, 30, n)] + 0.3 * rng.standard_normal((n, DIM))
            x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
            for i, v in enumerate(x):
                path = f"/seed/{modality}/{i:04d}"
                work = Work(FileEntry(path, modality, 1, 1.0), f"{modality}{i}")
                speech = modality == "speech"
                decoded = Decoded(work, [], duration=float(i) if speech else None)
                seg = Segment(None, 0, 0.0 if speech else None, float(i) if speech else None)
                writer.add_file(decoded, [seg], Encoded(v[None], ["words"] if speech else None))
                truth[path] = v
    return truth


def _reference(truth, query, k, keep=lambda path: True):
    paths = [p for p in truth if keep(p)]
    if not paths:
        return [], np.zeros(0, np.float32)
    sims = np.stack([truth[p] for p in paths]) @ query
    order = np.argsort(-sims, kind="stable")[:k]
    return [paths[i] for i in order], sims[order]


def _queries(n: int = 20) -> np.ndarray:
    q = np.random.default_rng(3).standard_normal((n, DIM))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def seeded_flat(tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("flat") / "index"
    return index_dir, _seeded_index(index_dir, 300, None)


@pytest.fixture(scope="module")
def seeded_hnsw(tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("hnsw") / "index"
    return index_dir, _seeded_index(index_dir, 1000, "HNSW32")


FILTER_CASES = {
    "none": (Filters(), lambda p: True),
    "glob": (Filters(path="/seed/*/01*"), lambda p: fnmatchcase(p, "/seed/*/01*")),
    "duration": (Filters(min_duration=50, max_duration=220),
                 lambda p: p.startswith("/seed/speech/") and 50 <= int(p[-4:]) <= 220),
}  # fmt: skip


@pytest.mark.parametrize("case", FILTER_CASES)
@pytest.mark.parametrize("to", [None, ("image",), ("speech", "text")])
def test_flat_search_equals_brute_force(seeded_flat, case, to):
    index_dir, truth = seeded_flat
    filters, keep = FILTER_CASES[case]
    wanted = to or MODALITIES
    with SearchEngine.open(index_dir, model=StubEmbedder()) as engine:
        assert set(engine.info().factories.values()) == {"Flat"}
        for q in _queries(10):
            hits = engine.search_vector(q, to=to, k=10, filters=filters)
            paths, scores = _reference(
                truth, q, 10, lambda p: keep(p) and p.split("/")[2] in wanted
            )
            assert [h.path for h in hits] == paths
            np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", FILTER_CASES)
def test_hnsw_search_recall_at_10(seeded_hnsw, case):
    index_dir, truth = seeded_hnsw
    filters, keep = FILTER_CASES[case]
    with SearchEngine.open(index_dir, model=StubEmbedder()) as engine:
        assert set(engine.info().factories.values()) == {"HNSW32"}
        recalls = []
        for q in _queries(20):
            hits = engine.search_vector(q, k=10, filters=filters)
            assert all(keep(h.path) for h in hits)
            ref = set(_reference(truth, q, 10, keep)[0])
            recalls.append(len(ref & {h.path for h in hits}) / len(ref))
    assert np.mean(recalls) >= 0.95
    assert_consistent(index_dir)


def test_index_grows_from_flat_to_hnsw(tmp_path):
    """Auto factory: exact below the limit, HNSW once a commit finds more vectors."""
    assert FLAT_LIMIT > 150  # the default limit would keep this index exact
    index_dir = tmp_path / "index"
    truth = {}
    rng = np.random.default_rng(0)
    config = WriterConfig(flat_limit=100, commit_every=10**9)
    with IndexWriter.open(index_dir, STUB_INFO, config=config) as writer:
        for i in range(150):
            v = rng.standard_normal(DIM).astype(np.float32)
            v /= np.linalg.norm(v)
            work = Work(FileEntry(f"/g/{i}", "image", 1, 1.0), str(i))
            writer.add_file(Decoded(work, []), [Segment(None)], Encoded(v[None], None))
            truth[f"/g/{i}"] = v
    with SearchEngine.open(index_dir, model=StubEmbedder()) as engine:
        assert engine.info().factories == {"image": "HNSW32"}
        q = _queries(1)[0]
        assert engine.search_vector(q, k=1)[0].path == _reference(truth, q, 1)[0][0]
    assert_consistent(index_dir)


# ---- real queries on a tiny media index -------------------------------------------------


def _media_truth(media: Path, stub: StubEmbedder) -> dict[str, np.ndarray]:
    from engine.media import load_audio, load_image, load_text

    truth = {}
    for path in sorted(media.rglob("*")):
        if path.suffix == ".png":
            truth[str(path)] = stub.embed_images([load_image(path)])[0]
        elif path.suffix == ".wav":
            truth[str(path)] = stub.embed_speech([load_audio(path)]).vectors[0]
        elif path.suffix in (".txt", ".md"):
            text = "\n".join(" ".join(p.split()) for p in load_text(path).split("\n\n"))
            truth[str(path)] = stub.embed_text([text])[0]
    return truth


@pytest.mark.parametrize(
    "query",
    [{"text": "dog on the beach"}, {"image": "photos/img1.png"}, {"speech": "audio/low.wav"}],
)
def test_queries_of_each_modality_match_brute_force(built, media, stub, query):
    truth = _media_truth(media, stub)
    ((kind, value),) = query.items()
    arg = value if kind == "text" else media / value
    with SearchEngine.open(built, model=stub) as engine:
        hits = engine.search(**{kind: arg}, k=5)
        q = engine.embed_query(**{kind: arg})
    paths, scores = _reference(truth, q, 5)
    assert [h.path for h in hits] == paths
    np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-5, atol=1e-5)


def test_hits_carry_segments_transcripts_and_snippets(built, media, stub):
    with SearchEngine.open(built, model=stub) as engine:
        speech = engine.search(speech=media / "audio/high.wav", to="speech", k=1)[0]
        note = engine.search("carrots soup", to=["text"], k=1)[0]
    assert speech.path.endswith("high.wav") and (speech.start, speech.end) == (0.0, 1.5)
    assert speech.text == "1.5 seconds"
    assert note.path.endswith("recipe.md") and "carrots" in note.text
    assert note.to_dict()["modality"] == "text"


def test_added_filters_accept_datetimes(built, stub):
    from datetime import datetime, timedelta

    with SearchEngine.open(built, model=stub) as engine:
        later = datetime.now() + timedelta(hours=1)
        assert engine.search("dog", added_since=later) == []
        assert len(engine.search("dog", added_before=later, k=50)) == 7


def test_model_is_loaded_from_the_index_when_not_given(built):
    with SearchEngine.open(built) as engine:  # recorded source: conftest:make_stub
        hit = engine.search("a dog running on the sunny beach near the sea", k=1)[0]
        assert hit.path.endswith("beach.txt") and hit.score == pytest.approx(1.0)


def test_query_errors(built, media, stub, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with SearchEngine.open(built, model=stub) as engine:
        with pytest.raises(QueryError, match="empty text query"):
            engine.search("   ")
        with pytest.raises(QueryError, match=r"give exactly one query .*\['text', 'image'\]"):
            engine.search("dog", image=media / "photos/img0.png")
        with pytest.raises(QueryError, match=r"give exactly one query .*\[\]"):
            engine.search()
        with pytest.raises(QueryError, match=r"cannot read query image .*broken.png"):
            engine.search(image=bad)
        with pytest.raises(
            QueryError, match=r"cannot read query speech .*nope.wav: file not found"
        ):
            engine.search(speech=tmp_path / "nope.wav")
        with pytest.raises(QueryError, match="unknown modality 'video'"):
            engine.search("dog", to="video")
        with pytest.raises(QueryError, match="k must be at least 1"):
            engine.search("dog", k=0)
        with pytest.raises(QueryError, match="cannot load embedder 'nomodule:x'"):
            load_embedder("nomodule:x")


def test_silent_and_overlong_speech_queries(built, stub, tmp_path, monkeypatch):
    """A silent clip has nothing to search with, and an hours-long one would take minutes:
    both are refused up front instead of returning meaningless hits or hanging."""
    sf.write(tmp_path / "silence.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    monkeypatch.setattr("engine.search.QUERY_MAX_SECONDS", 2.0)
    write_wav(tmp_path / "long.wav", 3.0)
    with SearchEngine.open(built, model=stub) as engine:
        with pytest.raises(QueryError, match="silence.wav is silent"):
            engine.search(speech=tmp_path / "silence.wav")
        with pytest.raises(QueryError, match=r"long.wav: audio is 3 s long, over 2 s"):
            engine.search(speech=tmp_path / "long.wav")


def test_modality_without_items_is_a_query_error(tmp_path, stub):
    folder = tmp_path / "only-images"
    write_png(folder / "a.png", 1)
    index_folders([folder], tmp_path / "index", stub)
    with SearchEngine.open(tmp_path / "index", model=stub) as engine:
        with pytest.raises(
            QueryError, match=r"has no speech items; it has image \(use --to image\)"
        ):
            engine.search("dog", to=("image", "speech"))
        assert len(engine.search("dog")) == 1


def test_empty_and_missing_index_are_query_errors(tmp_path, stub):
    with pytest.raises(QueryError, match=r"no xmodal index at .*nowhere"):
        SearchEngine.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    index_folders([tmp_path / "empty"], tmp_path / "index", stub)
    assert_consistent(tmp_path / "index")
    engine = SearchEngine.open(tmp_path / "index", model=stub)
    with pytest.raises(QueryError, match="has no items; add some with: xmodal index"):
        engine.search("dog")
    engine.close()


def test_other_model_is_refused_with_rebuild_hint(built):
    other = StubEmbedder(fingerprint="other-v2", name="other")
    with pytest.raises(
        IndexStateError, match=r"built with model 'stub'.*--model conftest:make_stub.*--rebuild"
    ):
        SearchEngine.open(built, model=other)


def test_missing_vector_file_is_an_index_state_error(built):
    for path in built.glob("*.faiss"):
        path.unlink()
    with pytest.raises(IndexStateError, match=r"vector file .* is missing; rebuild"):
        SearchEngine.open(built)


# ---- near-duplicates and info -----------------------------------------------------------


def test_dupes_groups_near_duplicate_images_and_identical_recordings(tmp_path, stub):
    folder = tmp_path / "media"
    write_png(folder / "cat.png", 5)
    write_png(folder / "cat-edited.png", 5, noise=4.0)
    write_png(folder / "dog.png", 9)
    write_wav(folder / "a.wav", 1.0)
    shutil.copy(folder / "a.wav", folder / "a-copy.wav")
    write_wav(folder / "b.wav", 1.0, freq=900.0, seed=3)
    index_folders([folder], tmp_path / "index", stub)
    with SearchEngine.open(tmp_path / "index") as engine:
        groups = engine.dupes(0.98)
        with pytest.raises(QueryError, match=r"threshold must be in \(0, 1\], got 1.5"):
            engine.dupes(1.5)
    by_modality = {g.modality: g for g in groups}
    assert len(groups) == 2
    image = by_modality["image"]
    assert [Path(p).name for p in image.paths] == ["cat-edited.png", "cat.png"]
    assert 0.98 <= image.score < 1.0 and not image.identical
    speech = by_modality["speech"]
    assert [Path(p).name for p in speech.paths] == ["a-copy.wav", "a.wav"] and speech.identical


def test_info_counts_model_and_types(built):
    with SearchEngine.open(built) as engine:
        info = engine.info()
    assert info.items == {"image": 3, "speech": 2, "text": 2}
    assert info.files == info.items
    assert info.model_name == "stub" and info.dim == 32
    assert info.factories == {"image": "Flat", "speech": "Flat", "text": "Flat"}
    assert info.size_bytes > 0 and info.errors == 0
    assert check_index(built) == []


# ---- CLI --------------------------------------------------------------------------------


def test_cli_search_info_dupes(built, media):
    runner = CliRunner()
    out = runner.invoke(main, ["search", "--index", str(built), "--text", "dog on the beach",
                               "-k", "2", "--to", "text,image", "--json"])  # fmt: skip
    assert out.exit_code == 0, out.output
    hits = json.loads(out.output)
    assert len(hits) == 2 and hits[0]["path"].endswith("beach.txt")
    out = runner.invoke(main, ["search", "--index", str(built), "--speech",
                               str(media / "audio/low.wav"), "--to", "speech"])  # fmt: skip
    assert out.exit_code == 0 and "low.wav  [0.0-1.0 s]" in out.output
    out = runner.invoke(main, ["info", "--index", str(built), "--json"])
    assert json.loads(out.output)["items"]["image"] == 3
    out = runner.invoke(main, ["info", "--index", str(built)])
    assert "image:   3 files, 3 vectors, FAISS Flat" in out.output
    out = runner.invoke(main, ["dupes", "--index", str(built), "--json"])
    assert out.exit_code == 0 and json.loads(out.output) == []


def test_cli_query_errors_exit_2_with_a_message(built):
    runner = CliRunner()
    out = runner.invoke(main, ["search", "--index", str(built), "--text", " "])
    assert out.exit_code == 2 and "error: empty text query" in out.output
    out = runner.invoke(main, ["search", "--index", str(built), "--text", "x", "--to", "video"])
    assert out.exit_code == 2 and "unknown modality 'video'" in out.output
