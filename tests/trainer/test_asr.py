"""`xmodal asr-captions` and training on extra caption manifests, with the packaged Whisper and
EfficientNet on the project's fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from engine.config import ModelConfig
from engine.model import AlignedModel, build_heads
from trainer import train as T
from trainer.asr import asr_captions
from trainer.cli import asr_captions as asr_command
from trainer.manifest import read_manifest

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny")
    out = tmp_path_factory.mktemp("bundle")
    AlignedModel(cfg, build_heads(cfg), fingerprint="x").save(out)
    return out


@pytest.fixture
def spoken(tmp_path) -> Path:
    for name in ("beach.png", "dog_on_beach.wav", "kids_football.wav"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    Image.new("RGB", (64, 48), (20, 120, 20)).save(tmp_path / "park.png")
    import soundfile

    soundfile.write(tmp_path / "silence.wav", np.zeros(16_000, np.float32), 16_000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav")
    lines = [
        "image\tcaption\taudio",
        "beach.png\tA brown dog is running on the beach.\tdog_on_beach.wav",
        "park.png\tTwo children are playing football in a park.\tkids_football.wav",
        "park.png\ta park with no recording\t",
        "beach.png\tnothing said\tsilence.wav",
        "park.png\ta broken recording\tbroken.wav",
    ]
    (tmp_path / "spoken.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "spoken.tsv"


def test_asr_captions_writes_what_whisper_heard(bundle, spoken, tmp_path):
    report = asr_captions(spoken, tmp_path / "out" / "asr.tsv", model=str(bundle))
    # a row without audio is skipped, the silent clip has no speech, the broken one is reported
    assert (report.rows, report.unheard, report.failed) == (2, 1, 1)
    rows = read_manifest(report.manifest).rows
    assert [r.image.name for r in rows] == ["beach.png", "park.png"]
    assert [r.audio.name for r in rows] == ["dog_on_beach.wav", "kids_football.wav"]
    assert "dog" in rows[0].caption.lower() and "beach" in rows[0].caption.lower()
    assert "football" in rows[1].caption.lower()


def test_asr_captions_command(bundle, spoken, tmp_path):
    out = tmp_path / "asr.tsv"
    result = CliRunner().invoke(asr_command, [str(spoken), str(out), "--model", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "2 transcripts (1 clips without speech, 1 unreadable)" in result.output
    assert len(read_manifest(out).rows) == 2


def test_extra_manifests_add_captions_and_keep_image_order(spoken, tmp_path):
    extra = tmp_path / "extra.tsv"
    extra.write_text(
        "image\tcaption\npark.png\ta grassy park\nnew.png\ta new photo\n", encoding="utf-8"
    )
    Image.new("RGB", (40, 40), (0, 0, 200)).save(tmp_path / "new.png")
    base = T.load_image_data(spoken, tmp_path / "cache", views=("orig",))
    both = T.load_image_data(spoken, tmp_path / "cache", views=("orig",), extra=(extra,))
    assert both.images[: len(base.images)] == base.images  # feature caches stay valid
    assert [Path(p).name for p in both.images] == ["beach.png", "park.png", "new.png"]
    assert both.captions == base.captions + ["a grassy park", "a new photo"]
    assert both.caption_image[len(base.captions) :].tolist() == [1, 2]
    torch.testing.assert_close(both.image_feats[:, :2], base.image_feats)


def test_resume_needs_the_same_manifests(tmp_path):
    mcfg = T.model_config(T.TrainConfig(hidden_dim=64), name="r", with_speech=False)
    stage = tmp_path / "image_stage"
    AlignedModel(mcfg, build_heads(mcfg), fingerprint="s").save(stage)
    assert T._stage_matches(stage, mcfg)  # no manifests asked about: config alone
    assert not T._stage_matches(stage, mcfg, ["train.tsv"])  # trained on unknown manifests
    (stage / T.STAGE_DATA).write_text('["train.tsv"]')
    assert T._stage_matches(stage, mcfg, ["train.tsv"])
    assert not T._stage_matches(stage, mcfg, ["train.tsv", "asr.tsv"])
    trained = {"manifests": ["train.tsv"], "views": ["orig", "flip", "crop0"]}
    (stage / T.STAGE_DATA).write_text(json.dumps(trained))
    assert T._stage_matches(stage, mcfg, trained)
    assert not T._stage_matches(stage, mcfg, {**trained, "views": ["orig", "flip"]})
