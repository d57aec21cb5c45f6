"""Training smoke tests on tiny synthetic data: losses go down, retrieval is learned, the bundle
that comes out rebuilds from its config and gives the vectors training saw."""

import numpy as np
import torch

from engine.config import ModelConfig, SpeechHeadConfig, SpeechTowerConfig
from engine.graph import PRECISION_ENV
from engine.model import AlignedModel, load_model
from trainer import train as T


def _synthetic(n_images=120, caps_per_image=3, dim_in=2560, seed=0) -> T.ImageData:
    """Captions are noisy copies of a per-image 'meaning'; image features a fixed random
    projection of that meaning plus noise: learnable, but only by training."""
    g = torch.Generator().manual_seed(seed)
    # meanings live in a 16-d subspace, so ~100 training images are enough to learn the map
    basis = torch.randn(16, 384, generator=g)
    meaning = torch.nn.functional.normalize(torch.randn(n_images, 16, generator=g) @ basis, dim=-1)
    proj = torch.randn(384, dim_in, generator=g)
    feats = meaning @ proj + 0.2 * torch.randn(2, n_images, dim_in, generator=g)
    cap_img = torch.arange(n_images).repeat_interleave(caps_per_image)
    text = torch.nn.functional.normalize(
        meaning[cap_img] + 0.3 * torch.randn(len(cap_img), 384, generator=g), dim=-1
    )
    return T.ImageData(
        images=[f"img{i}" for i in range(n_images)],
        captions=[f"caption {c}" for c in range(len(cap_img))],
        caption_image=cap_img,
        image_feats=feats.float(),
        text_vecs=text.float(),
    )


def test_image_stage_learns_and_loss_goes_down():
    T.seed_everything(0)
    data = _synthetic()
    cfg = T.TrainConfig(epochs=4, batch_size=32, lr=2e-3, hidden_dim=256, val_images=24)
    mcfg = T.model_config(cfg, name="smoke", with_speech=False)
    heads, history = T.train_image_stage(data, cfg, mcfg)
    losses = [h["loss"] for h in history]
    assert losses[-1] < 0.7 * losses[0]
    best = max(h["val"]["text->image"]["R@1"] for h in history)
    assert best > 3 * 100 / 24  # far above chance among the 24 held-out images
    # folding the standardization into the head keeps held-out retrieval
    model = AlignedModel(mcfg, heads, fingerprint="t")
    imgs = model.embed_image_features(data.image_feats[0].numpy())
    assert imgs.shape == (120, 384) and np.all(np.isfinite(imgs))
    with torch.no_grad():
        txt = torch.nn.functional.normalize(heads["text"](data.text_vecs), dim=-1).numpy()
    # after folding, the bundle's image vectors still find their captions' images (train set)
    hits = (txt @ imgs.T).argmax(1) == data.caption_image.numpy()
    assert hits.mean() > 0.5


def test_speech_stage_distills_toward_teacher(monkeypatch, tmp_path):
    T.seed_everything(0)
    n, t_len = 64, 12
    g = torch.Generator().manual_seed(1)
    teacher = torch.nn.functional.normalize(torch.randn(n, 384, generator=g), dim=-1)
    lengths = torch.randint(4, t_len + 1, (n,), generator=g)
    states = [
        (teacher[i] @ torch.randn(384, 512, generator=g)).repeat(int(lengths[i]), 1)
        + 0.1 * torch.randn(int(lengths[i]), 512, generator=g)
        for i in range(n)
    ]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in states])])
    flat = torch.cat(states).numpy().astype(np.float16)
    monkeypatch.setattr(T, "speech_states", lambda *a, **k: (flat, offsets))
    cfg = T.TrainConfig(speech_epochs=12, speech_batch_size=16, speech_lr=2e-3)
    mcfg = ModelConfig(
        name="s", speech=SpeechTowerConfig(branch="parallel", head=SpeechHeadConfig())
    )
    from engine.model import build_heads

    model = AlignedModel(mcfg, build_heads(mcfg), fingerprint="t")
    captions = [f"c{i}" for i in range(n)]
    monkeypatch.setattr(
        model, "embed_text", lambda texts: teacher[[int(c[1:]) for c in texts]].numpy()
    )
    history = T.train_speech_stage([f"a{i}.wav" for i in range(n)], captions, model, cfg, tmp_path)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    x, lens = T._pad_states(flat, offsets, np.arange(n))
    student = model.embed_speech_states(x.numpy(), lens.numpy())
    assert (student @ teacher.numpy().T).argmax(1).tolist().count(0) < n  # not collapsed
    assert np.mean((student @ teacher.numpy().T).argmax(1) == np.arange(n)) > 0.5
    # the trained bundle round-trips to identical speech vectors
    model.save(tmp_path / "b")
    again = load_model(tmp_path / "b")
    np.testing.assert_array_equal(again.embed_speech_states(x.numpy(), lens.numpy()), student)


def test_resume_reuses_only_a_matching_image_stage(tmp_path):
    cfg = T.TrainConfig(hidden_dim=64)
    mcfg = T.model_config(cfg, name="r", with_speech=False)
    stage = tmp_path / "image_stage"
    assert not T._stage_matches(stage, mcfg)
    heads = {k: h for k, h in T.build_heads(mcfg).items()}
    AlignedModel(mcfg, heads, fingerprint="s").save(stage)
    assert T._stage_matches(stage, mcfg)
    other = T.model_config(T.TrainConfig(hidden_dim=128), name="r", with_speech=False)
    assert not T._stage_matches(stage, other)


def test_tuned_image_tail_trains_and_round_trips(tmp_path):
    """With `tune_tail` the backbone's last blocks learn on cached trunk features, and the bundle
    carries them: a loaded model embeds pixels through the tuned tail, not the packaged one."""
    from PIL import Image

    from engine.vision import ImageBackbone, pool

    T.seed_everything(0)
    n = 64
    data = _synthetic(n_images=n, dim_in=192)
    g = torch.Generator().manual_seed(2)
    # trunk maps: each image's 192-d signal spread over the 7x7 grid, plus noise
    trunks = data.image_feats[:, :, :, None, None] + 0.5 * torch.randn(2, n, 192, 7, 7, generator=g)
    backbone = ImageBackbone()
    with torch.no_grad():
        feats = torch.stack([pool(backbone.tail(v)) for v in trunks])
    data = T.ImageData(
        images=data.images, captions=data.captions, caption_image=data.caption_image,
        image_feats=feats, text_vecs=data.text_vecs, trunks=trunks.half(),
    )  # fmt: skip
    cfg = T.TrainConfig(
        epochs=3, batch_size=32, lr=2e-3, hidden_dim=128, val_images=12, tune_tail=True,
        tail_lr=1e-3,
    )  # fmt: skip
    mcfg = T.model_config(cfg, name="tail", with_speech=False)
    assert mcfg.image.tuned_tail
    heads, history = T.train_image_stage(data, cfg, mcfg)
    assert history[-1]["loss"] < history[0]["loss"]
    packaged = backbone.tail_net.state_dict()
    tuned = heads["image_tail"].state_dict()
    assert any(not torch.equal(packaged[k], tuned[k]) for k in packaged)
    assert all(not p.requires_grad for p in heads["image_tail"].parameters())

    AlignedModel(mcfg, heads, fingerprint="t").save(tmp_path / "b")
    loaded = load_model(tmp_path / "b")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8))
    x = loaded.preprocess([img])
    with torch.no_grad():
        expect = torch.nn.functional.normalize(
            heads["image"](pool(heads["image_tail"](backbone.trunk(x)))), dim=-1
        ).numpy()
        frozen = torch.nn.functional.normalize(heads["image"](backbone(x)), dim=-1).numpy()
    got = loaded.embed_images([img])
    np.testing.assert_allclose(got, expect, atol=1e-5)
    assert np.abs(got - frozen).max() > 1e-3


def test_tuned_text_layers_train_and_match_the_bundle(tmp_path):
    """With `text_layers` the top MiniLM layer learns on cached token states, and the bundle's
    text path (the full tower with the tuned layer swapped in) gives the vectors training saw."""
    from trainer.features import text_hidden

    T.seed_everything(0)
    data = _synthetic(n_images=48, caps_per_image=2)
    data.text_hidden = text_hidden(data.captions, tmp_path, n_top=1)
    cfg = T.TrainConfig(
        epochs=2, batch_size=16, lr=2e-3, hidden_dim=64, val_images=8, text_layers=1, text_lr=1e-3
    )
    mcfg = T.model_config(cfg, name="txt", with_speech=False)
    assert mcfg.text.tuned_layers == 1
    heads, history = T.train_image_stage(data, cfg, mcfg)
    assert np.isfinite(history[-1]["loss"])
    packaged = T.build_heads(mcfg)["text_top"].state_dict()
    tuned = heads["text_top"].state_dict()
    assert any(not torch.equal(packaged[k], tuned[k]) for k in packaged)

    caps = torch.arange(6)
    with torch.no_grad():
        trained = T.text_side(data, caps, text_top=heads["text_top"], text_head=heads["text"])
    AlignedModel(mcfg, heads, fingerprint="t").save(tmp_path / "b")
    loaded = load_model(tmp_path / "b")
    got = loaded.embed_text(data.captions[:6])
    np.testing.assert_allclose(got, trained.numpy(), atol=2e-3)  # cache is float16
    frozen = load_model(tmp_path / "b")
    frozen.heads.pop("text_top")  # same adapter, packaged layers: must differ
    assert np.abs(frozen.embed_text(data.captions[:6]) - got).max() > 1e-3


def test_bundles_carry_the_whisper_prompt(tmp_path):
    from engine.config import ModelConfig
    from engine.speech import CAPTION_PROMPT

    mcfg = T.model_config(T.TrainConfig(), name="p", with_speech=True)
    assert mcfg.speech.prompt == CAPTION_PROMPT
    none = T.model_config(T.TrainConfig(whisper_prompt=""), name="p", with_speech=True)
    assert none.speech.prompt == ""
    mcfg.save(tmp_path)
    assert ModelConfig.load(tmp_path).speech.prompt == CAPTION_PROMPT


def test_image_head_ensemble_trains_against_the_fixed_text_side(monkeypatch, tmp_path):
    """`image_heads` > 1: the stage's head plus heads trained from other seeds against the
    stage's finished text side (adapter included); the bundle averages their unit outputs."""
    T.seed_everything(0)
    data = _synthetic()
    cfg = T.TrainConfig(
        epochs=4, batch_size=32, lr=2e-3, hidden_dim=256, val_images=24, image_heads=3
    )
    mcfg = T.model_config(cfg, name="ens", with_speech=False)
    assert mcfg.image.heads == 3
    stage_cfg = T.model_config(T.TrainConfig(hidden_dim=256), name="ens", with_speech=False)
    heads, _ = T.train_image_stage(data, cfg, stage_cfg)
    stage_head = {k: v.clone() for k, v in heads["image"].state_dict().items()}
    text_before = {k: v.clone() for k, v in heads["text"].state_dict().items()}
    trained_on, train_stage = [], T.train_image_stage

    def spy(d, *args, **kwargs):
        trained_on.append(d)
        return train_stage(d, *args, **kwargs)

    monkeypatch.setattr(T, "train_image_stage", spy)
    ensemble, history = T.ensemble_image_heads(data, heads, cfg, mcfg)
    histories = history["heads"]
    assert [v["heads"] for v in history["ensemble_val"]] == [1, 2, 3]
    assert all(v["text->image"]["R@1"] > 3 * 100 / 24 for v in history["ensemble_val"])

    assert len(ensemble.members) == 3 and len(histories) == 2
    first = ensemble.members[0].state_dict()
    assert all(torch.equal(first[k], stage_head[k]) for k in stage_head)
    w = [m.net[0].weight for m in ensemble.members]
    assert not torch.equal(w[1], w[2]) and not torch.equal(w[0], w[1])  # other seeds
    assert all(torch.equal(heads["text"].state_dict()[k], v) for k, v in text_before.items())
    for history in histories:  # each new head learned the map: far above chance among 24
        assert max(h["val"]["text->image"]["R@1"] for h in history) > 3 * 100 / 24

    # the new heads were trained against the adapter's text vectors, not the raw ones
    with torch.no_grad():
        txt = T.text_side(
            data, torch.arange(len(data.captions)), text_top=None, text_head=heads["text"]
        )
    seen = [d.text_vecs for d in trained_on]
    assert len(seen) == 2 and all(torch.equal(t, txt) for t in seen)
    assert (txt - torch.nn.functional.normalize(data.text_vecs, dim=-1)).abs().max() > 1e-3

    heads["image"] = ensemble
    AlignedModel(mcfg, heads, fingerprint="t").save(tmp_path / "b")
    loaded = load_model(tmp_path / "b")
    assert loaded.config.image.heads == 3
    feats = data.image_feats[0, :10].numpy()
    with torch.no_grad():
        units = [
            torch.nn.functional.normalize(m(torch.from_numpy(feats)), dim=-1)
            for m in ensemble.members
        ]
    mean = torch.stack(units).mean(0)
    expect = torch.nn.functional.normalize(mean, dim=-1).numpy()
    monkeypatch.setenv(PRECISION_ENV, "fp32")  # the heads' own float32 (int8: test_heads.py)
    np.testing.assert_allclose(loaded.embed_image_features(feats), expect, atol=1e-6)


def test_train_main_builds_and_resumes_an_ensemble_bundle(monkeypatch, tmp_path):
    """`main` with `image_heads`: the image stage is saved with one head, the bundle with all of
    them; a rerun asking for another count reuses the stage and trains only the new heads."""
    import json

    import trainer.hubness as H

    data = _synthetic()
    monkeypatch.setattr(T, "load_image_data", lambda *a, **k: data)
    # the query banks: 40 captions and 30 photos, whose cached features are the synthetic ones
    members = ([f"a caption {i}" for i in range(40)], [f"img{i}" for i in range(30)])
    monkeypatch.setattr(H, "bank_members", lambda manifest: members)
    feats = {name: data.image_feats[0, i].numpy() for i, name in enumerate(data.images)}
    monkeypatch.setattr(
        T, "image_features", lambda paths, *a, **k: np.stack([feats[p] for p in paths])
    )
    calls = []
    train_stage = T.train_image_stage

    def spy(data, cfg, mcfg, **kwargs):
        calls.append(mcfg.image.tuned_tail or mcfg.text.head is not None)  # True: the stage
        return train_stage(data, cfg, mcfg, **kwargs)

    monkeypatch.setattr(T, "train_image_stage", spy)
    settings = dict(epochs=2, batch_size=32, hidden_dim=64, val_images=24, cache_dir=tmp_path)
    out = T.main(tmp_path / "m.tsv", out_dir=tmp_path / "run", image_heads=3, **settings)
    assert calls == [True, False, False]
    assert ModelConfig.load(out / "image_stage").image.heads == 1
    bundle = load_model(out)
    assert bundle.config.image.heads == 3 and len(bundle.heads["image"].members) == 3
    history = json.loads((out / "train_config.json").read_text())["ensemble_history"]
    assert [v["heads"] for v in history["ensemble_val"]] == [1, 2, 3]
    # the bundle carries query banks of the finished model's vectors: clusters of >= 10, whose
    # weighted means are the mean vectors of all captions and of all photos
    assert bundle.config.hubness.min_cluster == 10
    assert 1 <= len(bundle.hub.text) <= 4 and 1 <= len(bundle.hub.image) <= 3
    photos = bundle.embed_image_features(np.stack([feats[p] for p in members[1]]))
    for rows, log_w, vectors in (
        (bundle.hub.image, bundle.hub.image_log_weight, photos),
        (bundle.hub.text, bundle.hub.text_log_weight, bundle.embed_text(members[0])),
    ):
        np.testing.assert_allclose(np.exp(log_w) @ rows, vectors.mean(0), atol=2e-3)

    calls.clear()
    again = load_model(T.main(tmp_path / "m.tsv", out_dir=out, image_heads=2, **settings))
    assert calls == [False]  # the stage came from disk
    first, before = again.heads["image"].members[0], bundle.heads["image"].members[0]
    assert all(
        torch.equal(a, b) for a, b in zip(first.parameters(), before.parameters(), strict=True)
    )
