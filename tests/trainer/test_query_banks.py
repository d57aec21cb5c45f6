"""Query banks built from a training manifest, and the `xmodal hubness` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import StubEmbedder, write_png

from engine.config import HeadConfig, HubnessConfig, ImageTowerConfig, ModelConfig
from engine.errors import XmodalError
from engine.hubness import HUBNESS_FILE
from engine.media import load_image
from engine.model import WEIGHTS_FILE, AlignedModel, build_heads, bundle_fingerprint, load_model
from trainer.cli import hubness
from trainer.hubness import add_bank, bank_members, cluster


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    lines = ["image\tcaption"]
    for i in range(6):
        write_png(tmp_path / "img" / f"p{i}.png", seed=i)
        lines += [f"img/p{i}.png\tphoto {i} caption {c}" for c in range(3)]
    (tmp_path / "m.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.tsv"


def test_bank_members_are_every_caption_and_each_photo_once(manifest):
    captions, photos = bank_members(manifest)
    assert len(captions) == 18 and captions[:2] == ["photo 0 caption 0", "photo 0 caption 1"]
    assert [p.name for p in photos] == [f"p{i}.png" for i in range(6)]


def test_clusters_hold_at_least_min_size_rows_and_average_them():
    rng = np.random.default_rng(0)
    # three tight groups of 30, 12 and 3 points: the 3 cannot make a cluster of 5
    centers = np.eye(8, dtype=np.float32)[:3]
    x = np.concatenate(
        [c + 0.01 * rng.standard_normal((n, 8)) for c, n in zip(centers, (30, 12, 3), strict=True)]
    )
    means, counts = cluster(x.astype(np.float32), 3, min_size=5, seed=0)
    assert counts.sum() == 45 and counts.min() >= 5 and len(means) == 2
    np.testing.assert_allclose(counts @ means / 45, x.mean(0), atol=1e-5)  # means of members
    assert len(cluster(x.astype(np.float32), 100, min_size=20, seed=0)[0]) <= 2  # k ≤ n // 20
    with pytest.raises(XmodalError, match="cannot fill one bank row"):
        cluster(x[:4].astype(np.float32), 2, min_size=5, seed=0)


def test_add_bank_clusters_the_models_vectors(manifest):
    class Model(StubEmbedder):
        hub = None
        config = ModelConfig(name="stub")

    model = Model()
    cfg = HubnessConfig(text_clusters=3, image_clusters=2, min_cluster=3, tau=0.1, beta=0.5)
    add_bank(model, manifest, cfg, seed=3)
    captions, photos = bank_members(manifest)
    text, images = model.embed_text(captions), model.embed_images([load_image(p) for p in photos])
    assert len(model.hub.text) <= 3 and len(model.hub.image) <= 2
    for rows, log_w, vectors in (
        (model.hub.text, model.hub.text_log_weight, text),
        (model.hub.image, model.hub.image_log_weight, images),
    ):
        assert np.exp(log_w).sum() == pytest.approx(1.0)
        np.testing.assert_allclose(np.exp(log_w) @ rows, vectors.mean(0), atol=2e-3)
    assert model.config.hubness == cfg


def test_hubness_command_adds_banks_to_a_bundle_in_place(manifest, tmp_path):
    torch.manual_seed(0)
    head = HeadConfig(in_dim=2560, out_dim=384, hidden_dim=16)
    cfg = ModelConfig(name="tiny", image=ImageTowerConfig(head=head))
    bundle = tmp_path / "bundle"
    AlignedModel(cfg, build_heads(cfg, pretrained=False), fingerprint="t").save(bundle)
    weights, before = (bundle / WEIGHTS_FILE).read_bytes(), bundle_fingerprint(bundle)

    args = [str(bundle), str(manifest), "--min-cluster", "3", "--beta", "0.3"]
    result = CliRunner().invoke(hubness, args)
    assert result.exit_code == 0, result.output
    assert "banks of" in result.output and "caption" in result.output
    assert (bundle / WEIGHTS_FILE).read_bytes() == weights  # the weights are untouched
    assert bundle_fingerprint(bundle) != before  # indexes built before must be rebuilt
    raw = json.loads((bundle / "config.json").read_text())
    assert raw["hubness"] == {"text_clusters": 256, "image_clusters": 128, "min_cluster": 3,
                              "beta": 0.3, "tau": 0.05}  # fmt: skip
    model = load_model(bundle)
    assert len(model.hub.text) <= 18 // 3 and len(model.hub.image) <= 6 // 3
    assert (bundle / HUBNESS_FILE).exists()
    x = model.hub.image[:2]
    penalty = model.hub_penalty(x, "image")
    assert np.isfinite(penalty).all() and not penalty[:, 1].any()

    result = CliRunner().invoke(hubness, [str(bundle), str(tmp_path / "missing.tsv")])
    assert result.exit_code == 2 and "does not exist" in result.output
