"""Model configs: JSON round trip, and clear errors for bad configs."""

import json

import pytest

from engine.config import (
    HeadConfig,
    ModelConfig,
    SpeechHeadConfig,
    SpeechTowerConfig,
    TextTowerConfig,
)
from engine.errors import ModelError


def test_round_trip(tmp_path):
    cfg = ModelConfig(
        name="t",
        text=TextTowerConfig(head=HeadConfig(in_dim=384, out_dim=384, residual=True)),
        speech=SpeechTowerConfig(branch="fused", head=SpeechHeadConfig()),
    )
    cfg.save(tmp_path)
    assert ModelConfig.load(tmp_path) == cfg


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"text": {"tower": "bert"}}, "unknown text tower"),
        ({"speech": {"branch": "fused"}}, "needs a speech head"),
        ({"speech": {"branch": "psychic"}}, "unknown speech branch"),
        ({"speech": {"beam_size": 0}}, "beam_size"),
        ({"speech": {"beam_size": 2, "hypotheses": 3}}, "hypotheses must be 1..beam_size"),
        ({"speech": {"weighting": "loudest"}}, "speech.weighting must be one of"),
        ({"version": 99}, "not supported"),
        ({"image": {"head": {"in_dim": 3}}}, "malformed"),
        ({"image": {"heads": 0}}, "image.heads must be 1..16"),
        ({"image": {"heads": 17}}, "image.heads must be 1..16"),
    ],
)
def test_bad_configs(change, match):
    raw = {"name": "t", **change}
    with pytest.raises(ModelError, match=match):
        ModelConfig.from_dict(raw)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"dim": 3}))
    with pytest.raises(ModelError, match="malformed"):
        ModelConfig.load(tmp_path)
