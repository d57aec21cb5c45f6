"""Query banks drawn from a training manifest, and the `xmodal hubness` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import StubEmbedder, write_png

from engine.config import HeadConfig, HubnessConfig, ImageTowerConfig, ModelConfig
from engine.hubness import HUBNESS_FILE
from engine.media import load_image
from engine.model import WEIGHTS_FILE, AlignedModel, build_heads, bundle_fingerprint, load_model
from trainer.cli import hubness
from trainer.hubness import add_bank, bank_members


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    lines = ["image\tcaption"]
    for i in range(6):
        write_png(tmp_path / "img" / f"p{i}.png", seed=i)
        lines += [f"img/p{i}.png\tphoto {i} caption {c}" for c in range(3)]
    (tmp_path / "m.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.tsv"


def test_bank_members_are_a_seeded_sample_of_captions_and_distinct_photos(manifest):
    captions, photos = bank_members(manifest, 4, seed=0)
    assert len(captions) == 4 and len(set(captions)) == 4
    assert len(photos) == 4 and len(set(photos)) == 4 and all(p.exists() for p in photos)
    assert bank_members(manifest, 4, seed=0) == (captions, photos)
    assert bank_members(manifest, 4, seed=1) != (captions, photos)
    every_caption, every_photo = bank_members(manifest, 100, seed=0)
    assert len(every_caption) == 18 and [p.name for p in every_photo] == [
        f"p{i}.png" for i in range(6)
    ]  # all of them, in manifest order


def test_add_bank_embeds_the_members_with_the_model(manifest):
    class Model(StubEmbedder):
        hub = None
        config = ModelConfig(name="stub")

    model = Model()
    add_bank(model, manifest, HubnessConfig(bank=5, tau=0.1, beta=0.5), seed=3)
    captions, photos = bank_members(manifest, 5, seed=3)
    np.testing.assert_allclose(model.hub.text, model.embed_text(captions), atol=1e-3)
    images = model.embed_images([load_image(p) for p in photos])
    np.testing.assert_allclose(model.hub.image, images, atol=1e-3)
    assert model.config.hubness == HubnessConfig(bank=5, tau=0.1, beta=0.5)


def test_hubness_command_adds_banks_to_a_bundle_in_place(manifest, tmp_path):
    torch.manual_seed(0)
    head = HeadConfig(in_dim=2560, out_dim=384, hidden_dim=16)
    cfg = ModelConfig(name="tiny", image=ImageTowerConfig(head=head))
    bundle = tmp_path / "bundle"
    AlignedModel(cfg, build_heads(cfg, pretrained=False), fingerprint="t").save(bundle)
    weights, before = (bundle / WEIGHTS_FILE).read_bytes(), bundle_fingerprint(bundle)

    args = [str(bundle), str(manifest), "--bank", "4", "--beta", "0.3"]
    result = CliRunner().invoke(hubness, args)
    assert result.exit_code == 0, result.output
    assert "banks of 4 captions and 4 photos" in result.output
    assert (bundle / WEIGHTS_FILE).read_bytes() == weights  # the weights are untouched
    assert bundle_fingerprint(bundle) != before  # indexes built before must be rebuilt
    raw = json.loads((bundle / "config.json").read_text())
    assert raw["hubness"] == {"bank": 4, "beta": 0.3, "tau": 0.05}
    model = load_model(bundle)
    assert model.hub.text.shape == (4, 384) and (bundle / HUBNESS_FILE).exists()
    x = model.hub.image[:2]  # typical photos: small penalties, both columns
    penalty = model.hub_penalty(x, "image")
    assert penalty.shape == (2, 2) and np.isfinite(penalty).all() and not penalty[:, 1].any()

    result = CliRunner().invoke(hubness, [str(bundle), str(tmp_path / "missing.tsv")])
    assert result.exit_code == 2 and "does not exist" in result.output
