"""Hubness correction: penalties against hand-computed values, bundles that carry query banks,
and search that ranks by cosine minus penalty."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StubEmbedder

from engine.config import HeadConfig, HubnessConfig, ImageTowerConfig, ModelConfig
from engine.errors import ModelError, QueryError
from engine.hubness import HUBNESS_FILE, HubBank, penalty_column
from engine.model import AlignedModel, build_heads, bundle_fingerprint, load_model
from engine.search import SearchEngine
from indexer.runner import index_folders


def test_penalty_matches_hand_computation():
    # text bank: two queries along x, one along y; image bank: one query along y
    text = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    image = np.array([[0, 1]], np.float32)
    hub = HubBank.build(text, image, tau=0.5, beta=2.0)
    e2 = np.exp(2.0)
    # h_text(v) = 0.5 log mean exp(2 v·b); its center is h_text of the image bank's [0, 1]
    assert hub.center[0] == pytest.approx(0.5 * np.log((e2 + 2) / 3))
    # h_image(v) = v_y (one bank row); its center is the mean y of the text bank
    assert hub.center[1] == pytest.approx(1 / 3)
    x = np.array([[1, 0], [0, 1]], np.float32)
    got = hub.penalty(x, "speech")
    expect = np.array([[np.log((2 * e2 + 1) / (e2 + 2)), 2 * (0 - 1 / 3)], [0.0, 2 * (1 - 1 / 3)]])
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32
    # no penalty from the bank of the candidates' own modality
    np.testing.assert_allclose(hub.penalty(x, "text"), expect * [0, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hub.penalty(x, "image"), expect * [1, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(QueryError, match="unknown modality"):
        hub.penalty(x, "video")
    # a weighted row counts as that many equal rows
    weighted = HubBank.build(text[1:], image, tau=0.5, beta=2.0, text_weight=np.array([2, 1]))
    np.testing.assert_allclose(weighted.penalty(x, "speech"), got, rtol=1e-6)
    assert weighted.center == pytest.approx(hub.center)


def test_sharp_banks_stay_finite():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((50, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    hub = HubBank.build(bank, bank, tau=1e-3, beta=1.0)  # exp(1 / 1e-3) would overflow
    assert np.isfinite(hub.penalty(bank, "speech")).all()


def test_bank_checks_and_query_kinds():
    with pytest.raises(ModelError, match="alike"):
        HubBank.build(np.ones((2, 3)), np.ones((2, 4)), tau=0.1, beta=1)
    with pytest.raises(ModelError, match="non-empty"):
        HubBank.build(np.ones((0, 3)), np.ones((2, 3)), tau=0.1, beta=1)
    with pytest.raises(ModelError, match="positive weight"):
        HubBank.build(np.ones((2, 3)), np.ones((2, 3)), tau=0.1, beta=1, text_weight=[1, 0])
    with pytest.raises(ModelError, match="tau > 0"):
        HubBank.build(np.ones((1, 3)), np.ones((1, 3)), tau=0, beta=1)
    assert [penalty_column(k) for k in ("text", "speech", "image")] == [0, 0, 1]
    with pytest.raises(QueryError, match="unknown query kind"):
        penalty_column("video")
    with pytest.raises(ModelError, match="hubness needs"):
        ModelConfig(name="x", hubness=HubnessConfig(tau=-1))


def _small_config(hubness: HubnessConfig | None) -> ModelConfig:
    head = HeadConfig(in_dim=2560, out_dim=384, hidden_dim=16)
    return ModelConfig(name="hub", image=ImageTowerConfig(head=head), hubness=hubness)


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_bundle_with_banks_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = HubnessConfig(tau=0.1, beta=0.5)
    weights = np.arange(1, 21)
    hub = HubBank.build(
        _unit(20, 384, 1), _unit(12, 384, 2), tau=cfg.tau, beta=cfg.beta, text_weight=weights
    )
    heads = build_heads(_small_config(None), pretrained=False)
    plain = AlignedModel(_small_config(None), heads, fingerprint="t")
    plain.save(tmp_path / "plain")
    AlignedModel(_small_config(cfg), heads, fingerprint="t", hub=hub).save(tmp_path / "hub")

    loaded = load_model(tmp_path / "hub")
    x = _unit(5, 384, 3)
    np.testing.assert_array_equal(loaded.hub_penalty(x, "image"), hub.penalty(x, "image"))
    assert load_model(tmp_path / "plain").hub_penalty(x, "image") is None
    assert bundle_fingerprint(tmp_path / "hub") != bundle_fingerprint(tmp_path / "plain")
    mode = stat.S_IMODE((tmp_path / "hub" / HUBNESS_FILE).stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "hub" / "config.json").stat().st_mode)

    # saving without banks removes a stale file; a config naming banks that are gone is refused
    plain.save(tmp_path / "hub")
    assert not (tmp_path / "hub" / HUBNESS_FILE).exists()
    raw = json.loads((tmp_path / "hub" / "config.json").read_text())
    raw["hubness"] = {"tau": 0.1, "beta": 0.5}
    (tmp_path / "hub" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="hubness.safetensors is missing"):
        load_model(tmp_path / "hub")
    with pytest.raises(ModelError, match="must come together"):
        AlignedModel(_small_config(cfg), heads, fingerprint="t")


# ---- search --------------------------------------------------------------------------------


class HubStub(StubEmbedder):
    """The test stub with query banks: text queries see the bank `text_bank`."""

    def __init__(self, text_bank: np.ndarray, image_bank: np.ndarray, beta: float) -> None:
        super().__init__(fingerprint="stub-hub")
        self.hub = HubBank.build(text_bank, image_bank, tau=0.1, beta=beta)

    def hub_penalty(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        return self.hub.penalty(vectors, modality)


def _truth(media: Path, stub: StubEmbedder) -> dict[str, np.ndarray]:
    from engine.media import load_image

    return {str(p): stub.embed_images([load_image(p)])[0] for p in sorted(media.rglob("*.png"))}


@pytest.mark.parametrize("kind", ["text", "speech", "image"])
def test_search_ranks_by_cosine_minus_penalty(tmp_path, media, kind):
    """Text and speech queries see the photos' penalties against the text bank; image queries
    see none (the image bank is of the photos' own modality): plain cosines."""
    plain = StubEmbedder()
    images = _truth(media, plain)
    hub_vec = images[sorted(images)[0]]  # make the first photo a hub: every bank row is it
    bank = np.repeat(hub_vec[None], 4, axis=0)
    stub = HubStub(bank, bank, beta=3.0)
    index_folders([str(media)], tmp_path / "idx", stub, model_source="test")
    query = {"text": "dog on the beach", "image": media / "photos" / "img1.png",
             "speech": media / "audio" / "low.wav"}[kind]  # fmt: skip
    with SearchEngine.open(tmp_path / "idx", model=stub) as engine:
        hits = engine.search(**{kind: query}, to="image", k=len(images))
        q = engine.embed_query(**{kind: query})
        raw = engine.search_vector(q, to="image", k=len(images))  # no kind: plain cosines
    paths = sorted(images)
    cos = np.array([images[p] @ q for p in paths])
    pen = stub.hub_penalty(np.stack([images[p] for p in paths]), "image")[:, penalty_column(kind)]
    want = np.argsort(-(cos - pen), kind="stable")
    assert [h.path for h in hits] == [paths[i] for i in want]
    np.testing.assert_allclose([h.score for h in hits], (cos - pen)[want], atol=1e-5)
    assert [h.path for h in raw] == [paths[i] for i in np.argsort(-cos, kind="stable")]
    if kind == "image":
        assert not pen.any() and [h.path for h in hits] == [h.path for h in raw]
    else:
        assert hits[-1].path == paths[0] != raw[-1].path  # the hub fell to the bottom


def test_items_of_a_model_without_banks_keep_plain_cosines(built, stub):
    with SearchEngine.open(built, model=stub) as engine:
        q = engine.embed_query("dog on the beach")
        corrected = engine.search_vector(q, k=5, kind="text")
        plain = engine.search_vector(q, k=5)
    assert [(h.path, h.score) for h in corrected] == [(h.path, h.score) for h in plain]


def test_bank_file_is_readable_whatever_the_umask(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    os.chmod(tmp_path / "config.json", 0o644)
    HubBank.build(_unit(3, 4, 0), _unit(3, 4, 1), tau=0.1, beta=1).save(tmp_path)
    assert stat.S_IMODE((tmp_path / HUBNESS_FILE).stat().st_mode) == 0o644


def test_store_penalties_and_their_lookup(tmp_path, media):
    from engine.search import _lookup
    from engine.store import Store

    bank = _unit(4, StubEmbedder().dim, 5)
    index_folders([str(media)], tmp_path / "idx", HubStub(bank, bank, 1.0), model_source="t")
    store = Store.open(tmp_path / "idx")
    try:
        ids, values = store.penalties("image", "hub_text")
        rows = store.get(ids, ["hub_text"])
        assert list(ids) == sorted(ids) and len(ids) == 3
        np.testing.assert_allclose(values, [r["hub_text"] for r in rows], rtol=1e-6)
        assert not store.penalties("text", "hub_text")[1].any()  # own modality: no penalty
        with pytest.raises(QueryError, match="unknown penalty column"):
            store.penalties("image", "path")
    finally:
        store.close()
    got = _lookup(ids, values, np.array([ids[2], 10**9, ids[0]]))
    np.testing.assert_array_equal(got, [values[2], 0.0, values[0]])


def test_the_shipped_model_carries_centered_banks():
    model = load_model("default")
    hub, cfg = model.hub, model.config.hubness
    assert hub is not None and cfg.min_cluster >= 10
    assert 1 < len(hub.text) <= cfg.text_clusters and 1 < len(hub.image) <= cfg.image_clusters
    # the center makes a typical cross-modal candidate's penalty 0 on average
    photos = model.hub_penalty(hub.image, "image")
    assert np.exp(hub.image_log_weight) @ photos[:, 0] == pytest.approx(0.0, abs=1e-4)
    assert not photos[:, 1].any()  # photos get no penalty from the photo bank
