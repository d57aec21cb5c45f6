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
        ({"speech": {"speeds": [0.9, 1.0]}}, "speech.speeds must start with 1.0"),
        ({"speech": {"speeds": [1.0, 0.9, 0.9]}}, "different once run as fractions"),
        ({"speech": {"speeds": [1.0, 1.02]}}, "different once run as fractions"),  # 1/1 again
        ({"speech": {"speeds": [1.0, 0.9, 0.9001]}}, "different once run as fractions"),
        ({"speech": {"speeds": [1.0, 3.0]}}, r"speeds in 0.5..2.0"),
        ({"speech": {"speeds": [1.0, 0.8, 0.9, 1.1, 1.2]}}, "at most 4 speeds"),
        ({"speech": {"speeds": ["fast"]}}, "must be a list of numbers"),
        ({"speech": {"speeds": ["1", "0.9"]}}, "must be a list of numbers"),
        ({"speech": {"speeds": [True, 0.9]}}, "must be a list of numbers"),
        ({"speech": {"speeds": "1"}}, "must be a list of numbers"),
        ({"speech": {"speeds": {"1": 0}}}, "must be a list of numbers"),
        ({"speech": {"speeds": 0.9}}, "must be a list of numbers"),
    ],
)
def test_bad_configs(change, match):
    raw = {"name": "t", **change}
    with pytest.raises(ModelError, match=match):
        ModelConfig.from_dict(raw)


def test_speeds_read_from_json_and_default_to_the_clip_as_it_is(tmp_path):
    cfg = ModelConfig.from_dict({"name": "t", "speech": {"speeds": [1, 0.9]}})
    assert cfg.speech.speeds == (1.0, 0.9)
    cfg.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["speech"]["speeds"] == [1.0, 0.9]
    assert ModelConfig.load(tmp_path) == cfg
    old = ModelConfig.from_dict({"name": "t"})  # bundles before v8
    assert old.speech.speeds == (1.0,)
    old.save(tmp_path)  # written as they were, so re-saving one keeps its fingerprint
    assert "speeds" not in json.loads((tmp_path / "config.json").read_text())["speech"]


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"dim": 3}))
    with pytest.raises(ModelError, match="malformed"):
        ModelConfig.load(tmp_path)


def test_unknown_settings_are_clear_errors_before_any_work(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from engine.cli import main
    from engine.config import check_settings, precision_setting, threads_setting
    from engine.errors import SettingError

    monkeypatch.delenv("XMODAL_PRECISION", raising=False)
    monkeypatch.delenv("XMODAL_THREADS", raising=False)
    check_settings()
    assert precision_setting() == "auto" and threads_setting() == 0
    monkeypatch.setenv("XMODAL_PRECISION", " INT8 ")
    monkeypatch.setenv("XMODAL_THREADS", "3")
    assert precision_setting() == "int8" and threads_setting() == 3
    monkeypatch.setenv("XMODAL_PRECISION", "int4")
    with pytest.raises(
        SettingError, match="XMODAL_PRECISION must be one of auto, fp32, bf16, int8"
    ):
        check_settings()
    monkeypatch.setenv("XMODAL_PRECISION", "fp32")
    monkeypatch.setenv("XMODAL_THREADS", "two")
    with pytest.raises(SettingError, match="XMODAL_THREADS must be a whole number"):
        check_settings()
    # the command line stops at once with one line, before it looks at its arguments' work
    out = CliRunner().invoke(main, ["search", "--index", str(tmp_path), "--text", "a dog"])
    assert out.exit_code == 2 and "error: XMODAL_THREADS must be a whole number" in out.output
    assert "Traceback" not in out.output
