"""CTranslate2 model files (engine.ct2) and the Whisper adapter's merge (engine.speech)."""

import struct
import time

import numpy as np
import pytest

from engine.ct2 import read_array, read_index, write_patched
from engine.errors import ModelError
from engine.speech import WhisperAdapter, prepare_whisper


def _write_model(path, variables, aliases=()):
    """A model.bin in CTranslate2's binary version 6 (ctranslate2/specs/model_spec.py)."""
    ids = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}

    def text(s):
        return struct.pack("H", len(s) + 1) + s.encode() + b"\0"

    out = struct.pack("I", 6) + text("TestSpec") + struct.pack("I", 1)
    out += struct.pack("I", len(variables))
    for name, value in variables.items():
        out += text(name) + struct.pack("B", value.ndim)
        out += b"".join(struct.pack("I", d) for d in value.shape)
        out += struct.pack("B", ids[value.dtype.name]) + struct.pack("I", value.nbytes)
        out += value.tobytes()
    out += struct.pack("I", len(aliases))
    for alias, name in aliases:
        out += text(alias) + text(name)
    path.write_bytes(out)


@pytest.fixture
def model_bin(tmp_path):
    rng = np.random.default_rng(0)
    variables = {
        "decoder/layer_0/ffn/linear_0/weight": rng.normal(size=(6, 4)).astype(np.float16),
        "decoder/layer_0/ffn/linear_0/bias": rng.normal(size=6).astype(np.float16),
        "decoder/num_heads": np.array(8, np.int16),
        "encoder/scale": rng.normal(size=(3,)).astype(np.float32),
    }
    path = tmp_path / "model.bin"
    _write_model(path, variables, [("decoder/projection/weight", "decoder/embeddings/weight")])
    return path, variables


def test_reads_every_variable(model_bin):
    path, variables = model_bin
    data = path.read_bytes()
    index = read_index(data)
    assert sorted(index) == sorted(variables)
    for name, value in variables.items():
        var = index[name]
        assert var.dtype == value.dtype.name and var.shape == value.shape
        np.testing.assert_array_equal(read_array(data, var), value)


def test_patch_replaces_only_what_it_names(model_bin, tmp_path):
    path, variables = model_bin
    name = "decoder/layer_0/ffn/linear_0/weight"
    new = np.arange(24, dtype=np.float32).reshape(6, 4)
    out = tmp_path / "patched.bin"
    write_patched(path.read_bytes(), out, {name: new})
    before, after = path.read_bytes(), out.read_bytes()
    assert len(before) == len(after)
    index = read_index(after)
    np.testing.assert_array_equal(read_array(after, index[name]), new.astype(np.float16))
    var = index[name]
    # every byte outside the patched variable is as it was
    assert before[: var.offset] == after[: var.offset]
    assert before[var.offset + var.nbytes :] == after[var.offset + var.nbytes :]
    assert not list(tmp_path.glob("*.tmp*"))


def test_patch_refuses_unknown_names_and_shapes(model_bin, tmp_path):
    path, _ = model_bin
    with pytest.raises(ModelError, match="no variable"):
        write_patched(path.read_bytes(), tmp_path / "x.bin", {"decoder/nope": np.zeros(1)})
    with pytest.raises(ModelError, match="shape"):
        bias = {"decoder/layer_0/ffn/linear_0/bias": np.zeros(5)}
        write_patched(path.read_bytes(), tmp_path / "x.bin", bias)
    assert not (tmp_path / "x.bin").exists()


def test_not_a_model_file(tmp_path):
    with pytest.raises(ModelError, match="binary version"):
        read_index(struct.pack("I", 5) + b"\0" * 16)
    with pytest.raises(ModelError, match="not a CTranslate2 model"):
        read_index(struct.pack("I", 6) + b"\1")


def _adapter(rank=2, seed=0, zero=False):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rank, 4)).astype(np.float32)
    b = np.zeros((6, rank), np.float32) if zero else rng.normal(size=(6, rank)).astype(np.float32)
    return WhisperAdapter({"decoder/layer_0/ffn/linear_0/weight": (a, b)})


def test_adapter_round_trip_and_fingerprint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    adapter = _adapter()
    adapter.save(tmp_path)
    again = WhisperAdapter.load(tmp_path)
    a, b = adapter.factors["decoder/layer_0/ffn/linear_0/weight"]
    a2, b2 = again.factors["decoder/layer_0/ffn/linear_0/weight"]
    np.testing.assert_array_equal(a2, a.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(b2, b.astype(np.float16).astype(np.float32))
    assert _adapter(seed=1).fingerprint != adapter.fingerprint
    assert _adapter().fingerprint == adapter.fingerprint


def test_mean_of_adapters_is_the_mean_update(tmp_path):
    name = "decoder/layer_0/ffn/linear_0/weight"
    one, two = _adapter(rank=2, seed=1), _adapter(rank=3, seed=2)
    mean = WhisperAdapter.mean([one, two])
    a, b = mean.factors[name]
    assert a.shape == (5, 4) and b.shape == (6, 5)  # ranks add up
    base = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    expected = base + 0.5 * (one.factors[name][1] @ one.factors[name][0])
    expected += 0.5 * (two.factors[name][1] @ two.factors[name][0])
    np.testing.assert_allclose(mean.merged(name, base), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        WhisperAdapter.mean([one]).merged(name, base), one.merged(name, base)
    )
    other = WhisperAdapter({"decoder/layer_1/ffn/linear_0/weight": one.factors[name]})
    with pytest.raises(ModelError, match="same weights"):
        WhisperAdapter.mean([one, other])
    with pytest.raises(ModelError, match="same weights"):
        WhisperAdapter.mean([])


def test_adapter_file_must_be_there(tmp_path):
    with pytest.raises(ModelError, match="whisper_adapter.safetensors"):
        WhisperAdapter.load(tmp_path)


def test_prepare_whisper_merges_the_adapter_once(monkeypatch, tmp_path, model_bin):
    """`prepare_whisper(adapter=...)` writes base + B @ A into its own cache folder, once; the
    packaged folder stays as it was."""
    import engine.speech as S

    path, variables = model_bin
    base = tmp_path / "base"
    base.mkdir()
    path.rename(base / "model.bin")
    for name in S.MODEL_FILES:
        (base / name).write_text(name)
    monkeypatch.setattr(S, "_joined_whisper", lambda: base)
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    adapter = _adapter()
    target = prepare_whisper(adapter=adapter)
    assert target != base and target.parent == tmp_path / "cache"
    assert adapter.fingerprint in target.name
    name = "decoder/layer_0/ffn/linear_0/weight"
    data = (target / "model.bin").read_bytes()
    a, b = adapter.factors[name]
    expect = (variables[name].astype(np.float32) + b @ a).astype(np.float16)
    np.testing.assert_array_equal(read_array(data, read_index(data)[name]), expect)
    assert all((target / n).read_text() == n for n in S.MODEL_FILES)
    stamp = (target / "model.bin").stat().st_mtime_ns
    assert prepare_whisper(adapter=adapter) == target  # reused, not rewritten
    assert (target / "model.bin").stat().st_mtime_ns == stamp
    # a zero update leaves the weights as packaged; no adapter gives the packaged folder
    zero = prepare_whisper(adapter=_adapter(zero=True))
    assert (zero / "model.bin").read_bytes() == (base / "model.bin").read_bytes()
    assert prepare_whisper() == base


def test_merged_copies_unused_for_long_are_removed_when_another_is_made(
    monkeypatch, tmp_path, model_bin
):
    import os

    import engine.speech as S

    path, _ = model_bin
    monkeypatch.setattr(S, "_joined_whisper", lambda: path.parent)
    for name in S.MODEL_FILES:
        (path.parent / name).write_text(name)
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    old, recent = (
        prepare_whisper(adapter=_adapter(seed=1)),
        prepare_whisper(adapter=_adapter(seed=2)),
    )
    other = tmp_path / "cache" / f"{S.ADAPTED_PREFIX}not-a-fingerprint"  # not ours: stays
    other.mkdir()
    long_ago = time.time() - (S.UNUSED_DAYS + 1) * 86400
    for folder in (old, recent, other):
        os.utime(folder, (long_ago, long_ago))
    assert prepare_whisper(adapter=_adapter(seed=2)) == recent  # a use: recent is fresh again
    new = prepare_whisper(adapter=_adapter(seed=3))
    assert new.exists() and recent.exists() and other.exists()
    assert not old.exists()


def test_a_users_whisper_folder_is_used_as_it_is(tmp_path, caplog):
    (tmp_path / "model.bin").write_bytes(b"")
    assert prepare_whisper(tmp_path, adapter=_adapter()) == tmp_path
    assert "not applied" in caplog.text


def test_an_adapter_that_does_not_fit_is_refused(monkeypatch, tmp_path, model_bin):
    import engine.speech as S

    path, _ = model_bin
    monkeypatch.setattr(S, "_joined_whisper", lambda: path.parent)
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    wide = WhisperAdapter(
        {"decoder/layer_0/ffn/linear_0/weight": (np.ones((2, 5), np.float32), np.ones((6, 2)))}
    )
    with pytest.raises(ModelError, match="does not fit"):
        prepare_whisper(adapter=wide)
    missing = WhisperAdapter({"decoder/nope/weight": (np.ones((2, 4)), np.ones((6, 2)))})
    with pytest.raises(ModelError, match="no such weight"):
        prepare_whisper(adapter=missing)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
