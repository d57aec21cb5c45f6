"""`xmodal models`: the bundles `--model NAME` finds, and how each text path runs on this CPU."""

import json

import torch
from click.testing import CliRunner

from engine import cpu as cpu_module
from engine import text
from engine.cli import main
from engine.config import ModelConfig
from engine.graph import PRECISION_ENV
from engine.model import AlignedModel, build_heads


def test_models_lists_bundles_and_their_text_path_here(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tiny = ModelConfig(name="tiny")
    AlignedModel(tiny, build_heads(tiny), fingerprint="x").save(tmp_path / "tiny")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    monkeypatch.setenv("XMODAL_MODELS", str(tmp_path))
    for name in (PRECISION_ENV, "XMODAL_ONNX", "XMODAL_EAGER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(text, "bf16_graphs", lambda: False)
    monkeypatch.setattr("engine.model.bf16_graphs", lambda: False)
    runner = CliRunner()

    def listed(cpu: str, **env: str) -> dict:
        monkeypatch.setattr(text, "int8_cpu", lambda: cpu)
        monkeypatch.setattr(cpu_module, "int8_cpu", lambda: cpu)
        out = runner.invoke(main, ["models", "--json"], env=env)
        assert out.exit_code == 0, out.output
        return json.loads(out.output)

    about = listed("vnni")
    assert about["cpu"] == "x86 with VNNI"
    models = about["models"]
    assert {"default", "tiny", "broken"} <= set(models)
    assert "not valid JSON" in models["broken"]["error"]
    assert models["tiny"]["name"] == "tiny" and models["tiny"]["dim"] == 384
    assert models["default"]["text_path_here"] == "int8 (ONNX Runtime)"  # it has scales
    assert models["tiny"]["text_path_here"] == "float32"  # no scales: no int8 by default
    assert listed("x86")["models"]["default"]["text_path_here"] == "float32"
    assert listed("vnni", XMODAL_ONNX="0")["models"]["default"]["text_path_here"] == "float32"
    assert listed("vnni", XMODAL_PRECISION="fp32")["models"]["default"]["text_path_here"] == (
        "float32"
    )
    assert listed("x86", XMODAL_PRECISION="int8")["models"]["tiny"]["text_path_here"] == (
        "int8 (ONNX Runtime)"
    )
    plain = runner.invoke(main, ["models"])
    assert plain.exit_code == 0
    assert "tiny: tiny (fingerprint" in plain.output and "broken: unreadable:" in plain.output
    assert "text path on this CPU: float32" in plain.output
