"""Training the aligned model around the frozen text hub, on cached frozen-backbone features.

Stage 1 aligns the image head (and an optional residual text adapter) to the text tower with
symmetric InfoNCE; optionally more image heads are then trained against the finished text side
and averaged with the first (an ensemble). Stage 2 distills the parallel speech head from the
text side on spoken captions: `α·InfoNCE + β·(‖f_s − f_t‖² + λ·KL)`, the teacher frozen. A
slice of the training images is held out to pick the best epoch, so the dev split is only ever
measured.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.config import (
    HeadConfig,
    ImageTowerConfig,
    ModelConfig,
    SpeechHeadConfig,
    SpeechTowerConfig,
    TextTowerConfig,
)
from engine.errors import XmodalError
from engine.graph import float32_only
from engine.heads import HeadEnsemble, lengths_to_mask
from engine.model import (
    AlignedModel,
    build_heads,
    bundle_fingerprint,
    load_model,
    round_to_half,
)
from engine.speech import CAPTION_PROMPT, cache_root
from engine.vision import pool
from trainer.evaluate import recall_at_k
from trainer.features import (
    IMAGE_VIEWS,
    crop_views,
    image_features,
    image_trunks,
    speech_states,
    text_embeddings,
    text_hidden,
)
from trainer.losses import DistillLoss, info_nce
from trainer.manifest import read_manifest, unquote

log = logging.getLogger(__name__)

STAGE_DATA = "manifests.json"  # beside a finished image stage: its manifests and photo views


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run; saved beside the bundle as train_config.json."""

    epochs: int = 4  # passes over the training captions for the image head
    batch_size: int = 256  # caption–image pairs per step
    lr: float = 1e-3  # peak learning rate (one-cycle schedule)
    weight_decay: float = 0.05  # AdamW weight decay
    temperature: float = 0.05  # initial InfoNCE temperature τ (learned afterwards)
    hidden_dim: int = 2048  # image head width
    dropout: float = 0.5  # image head dropout
    text_adapter: bool = True  # train a residual adapter on the text side too
    val_images: int = 300  # training images held out to pick the best epoch
    speech_epochs: int = 15  # passes over the spoken captions for the speech head
    speech_batch_size: int = 128  # clips per step
    speech_lr: float = 5e-4  # peak learning rate of the speech head
    alpha: float = 1.0  # weight of the contrastive term in the distillation loss
    beta: float = 1.0  # weight of the KD (alignment) term
    lam: float = 1.0  # λ, weight of the KL inside the alignment term
    fuse_weight: float = 0.3  # share of the parallel branch in the fused speech vector
    hypotheses: int = 3  # Whisper n-best transcripts the cascaded branch averages (bundle setting)
    whisper_prompt: str = CAPTION_PROMPT  # text Whisper reads before each clip (bundle setting)
    crop_views: int = 0  # random-resized-crop views of each photo besides orig and flip
    tune_tail: bool = False  # also tune the image backbone's tail (last 2 blocks + head conv)
    tail_lr: float = 1e-4  # peak learning rate of the tuned tail
    text_layers: int = 0  # also tune this many top MiniLM layers (0 = frozen text tower)
    text_lr: float = 2e-5  # peak learning rate of the tuned text layers
    image_heads: int = 1  # image heads averaged (the stage's own + more against its text side)
    hubness: bool = True  # give the bundle query banks for hubness correction (trainer.hubness)
    seed: int = 0  # seeds data order, initialisation and dropout


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _one_cycle(opt: torch.optim.Optimizer, lr: float | list[float], steps: int):
    """One-cycle schedule: 10 % warm-up (at least 2 steps, which short runs need), then decay."""
    steps = max(steps, 3)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, lr, total_steps=steps, pct_start=max(0.1, 2 / steps)
    )


class _Standardize(torch.nn.Module):
    """Feature standardization folded into the image head's first layer at save time."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def fold_standardization(head: torch.nn.Module, std: _Standardize) -> None:
    """Rewrite the first linear layer so that head(x) == head_before(standardize(x))."""
    first = head.net[0]
    with torch.no_grad():
        w = first.weight / std.std
        first.bias -= (w * std.mean).sum(1)
        first.weight.copy_(w)


# -- image stage --------------------------------------------------------------------------------


@dataclass
class ImageData:
    images: list[str]
    captions: list[str]
    caption_image: torch.Tensor  # (n_captions,) index into images
    image_feats: torch.Tensor  # (views, n_images, 2560)
    text_vecs: torch.Tensor  # (n_captions, 384)
    trunks: torch.Tensor | None = None  # (views, n_images, 192, 7, 7) float16, to tune the tail
    text_hidden: tuple[np.ndarray, np.ndarray] | None = None  # token states, to tune text layers


def load_image_data(
    manifest_path: Path,
    cache_dir: Path,
    *,
    views: tuple[str, ...],
    trunks: bool = False,
    text_layers: int = 0,
    extra: tuple[Path, ...] = (),
) -> ImageData:
    """The caption–image pairs of `manifest_path` and of the `extra` manifests (more captions,
    e.g. transcripts from `xmodal asr-captions`), with cached features. Images are ordered by
    first appearance, so extra rows about the same photos keep the feature caches valid."""
    rows = []
    for path in (manifest_path, *extra):
        manifest = read_manifest(path)
        for problem in manifest.problems[:20]:
            log.warning("%s: %s", path, problem)
        rows += manifest.rows
    images = list(dict.fromkeys(str(row.image) for row in rows))
    index = {p: i for i, p in enumerate(images)}
    captions = [row.caption for row in rows]
    feats = np.stack([image_features(images, cache_dir, view=v) for v in views]).astype(np.float32)
    return ImageData(
        images=images,
        captions=captions,
        caption_image=torch.tensor([index[str(row.image)] for row in rows]),
        image_feats=torch.from_numpy(feats),
        text_vecs=torch.from_numpy(text_embeddings(captions, cache_dir)),
        trunks=torch.from_numpy(np.stack([image_trunks(images, cache_dir, view=v) for v in views]))
        if trunks
        else None,
        text_hidden=text_hidden(captions, cache_dir, n_top=text_layers) if text_layers else None,
    )


def image_recall(model_fns, data: ImageData, image_ids: list[int]) -> dict[str, dict]:
    """text→image and image→text recall among `image_ids` (the captions of those images)."""
    img_fn, txt_fn = model_fns
    pos = {img: k for k, img in enumerate(image_ids)}
    caps = [c for c in range(len(data.captions)) if int(data.caption_image[c]) in pos]
    with torch.no_grad():
        zi = img_fn(image_ids).numpy()
        zt = txt_fn(torch.as_tensor(caps, dtype=torch.long)).numpy()
    cap_img = [pos[int(data.caption_image[c])] for c in caps]
    t2i = recall_at_k(zt, zi, [{i} for i in cap_img])
    i2t_rel = [set() for _ in image_ids]
    for k, i in enumerate(cap_img):
        i2t_rel[i].add(k)
    i2t = recall_at_k(zi, zt, i2t_rel)
    return {"text->image": t2i, "image->text": i2t}


def text_side(
    data: ImageData,
    caps: torch.Tensor,
    *,
    text_top: torch.nn.Module | None,
    text_head: torch.nn.Module | None,
) -> torch.Tensor:
    """Text vectors `(n, 384)` of caption ids, as the bundle will compute them: the text tower
    (through tuned top layers over cached token states, if any), then the adapter; normalized."""
    if text_top is None:
        t = data.text_vecs[caps]
    else:
        from engine.text import MiniLMTower

        x, lens = _pad_states(*data.text_hidden, caps.numpy())
        t = F.normalize(MiniLMTower.run_top(text_top, x, lengths_to_mask(lens, x.shape[1])), dim=-1)
    return F.normalize(text_head(t) if text_head is not None else t, dim=-1)


def held_out_images(n_images: int, cfg: TrainConfig, seed: int | None = None) -> list[int]:
    """The training images held out to pick the epoch (drawn with `seed`, default `cfg.seed`)."""
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    return sorted(
        rng.choice(n_images, size=min(cfg.val_images, n_images // 5), replace=False).tolist()
    )


def train_image_stage(
    data: ImageData, cfg: TrainConfig, model_cfg: ModelConfig, *, val_seed: int | None = None
):
    """Train the image head (and text adapter); returns the best epoch's heads and the history.

    The image head comes back with the feature standardization folded into its first layer.
    The held-out images are drawn with `val_seed` (default: `cfg.seed`).
    """
    heads = {k: h for k, h in build_heads(model_cfg).items() if k != "speech"}
    image_head, text_head, tail = heads["image"], heads.get("text"), heads.get("image_tail")
    text_top = heads.get("text_top")
    if tail is not None and data.trunks is None:
        raise XmodalError("tuning the image tail needs the trunk features (load_image_data)")
    if text_top is not None and data.text_hidden is None:
        raise XmodalError("tuning text layers needs the cached token states (load_image_data)")
    feats = data.image_feats
    std = _Standardize(feats[0].mean(0), feats[0].std(0) + 1e-3)
    val_ids = held_out_images(feats.shape[1], cfg, val_seed)
    val_set = set(val_ids)
    train_caps = torch.tensor(
        [c for c in range(len(data.captions)) if int(data.caption_image[c]) not in val_set]
    )
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))
    params = list(image_head.parameters()) + [log_scale]
    params += list(text_head.parameters()) if text_head is not None else []
    groups = [{"params": params, "lr": cfg.lr}]
    if tail is not None:
        tail.eval().requires_grad_(True)  # weights learn, BatchNorm statistics stay frozen
        groups.append({"params": list(tail.parameters()), "lr": cfg.tail_lr})
    if text_top is not None:
        text_top.eval().requires_grad_(True)  # no dropout: the low learning rate regularizes
        groups.append({"params": list(text_top.parameters()), "lr": cfg.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_caps) // cfg.batch_size
    sched = _one_cycle(opt, [g["lr"] for g in groups], cfg.epochs * steps_per_epoch)

    def features(view, imgs):
        if tail is None:
            return feats[view, imgs]
        return pool(tail(data.trunks[view, imgs].float()))

    def img_fn(image_ids):
        return F.normalize(image_head(std(features(0, torch.as_tensor(image_ids)))), dim=-1)

    def txt_fn(caps):
        return text_side(data, caps, text_top=text_top, text_head=text_head)

    best, best_score, history = None, -1.0, []
    for epoch in range(cfg.epochs):
        image_head.train()
        text_head is not None and text_head.train()
        perm = train_caps[torch.randperm(len(train_caps))]
        total = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"image head epoch {epoch + 1}/{cfg.epochs}")
        for b in bar:
            caps = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            imgs = data.caption_image[caps]
            view = torch.randint(0, feats.shape[0], (len(caps),))
            zi = F.normalize(image_head(std(features(view, imgs))), dim=-1)
            terms = info_nce(
                txt_fn(caps), zi,
                temperature=1 / log_scale.exp().clamp(max=100), group_ids=imgs,
            )  # fmt: skip
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            sched.step()
            total += terms["loss"].item()
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
        image_head.eval()
        text_head is not None and text_head.eval()
        val = image_recall((img_fn, txt_fn), data, val_ids)
        score = val["text->image"]["R@1"] + val["image->text"]["R@1"]
        history.append(
            {
                "epoch": epoch + 1,
                "loss": total / max(steps_per_epoch, 1),
                "val": val,
                "temperature": 1 / log_scale.exp().item(),
            }
        )
        log.info("epoch %d held-out val: t→i R@1 %.1f, i→t R@1 %.1f", epoch + 1,
                 val["text->image"]["R@1"], val["image->text"]["R@1"])  # fmt: skip
        if score > best_score:
            best_score = score
            best = {k: {n: v.clone() for n, v in h.state_dict().items()} for k, h in heads.items()}
    for k, h in heads.items():
        h.load_state_dict(best[k])
        h.eval().requires_grad_(False)
    fold_standardization(image_head, std)
    return heads, history


def ensemble_image_heads(
    data: ImageData, heads: dict[str, torch.nn.Module], cfg: TrainConfig, model_cfg: ModelConfig
) -> tuple[HeadEnsemble, dict[str, list]]:
    """The finished stage's image head and `cfg.image_heads - 1` more, averaged.

    Each new head is trained from its own seed on the stage's image features (through its tuned
    tail) against its text vectors (through its tuned text side), both fixed now, so the space
    the text and speech towers map into does not move. Returns the ensemble and a history: each
    new head's epochs, and the held-out recall of the first k heads averaged, for every k (the
    held-out images are the stage's, so no head has seen them).
    """
    tail, text_top, text_head = heads.get("image_tail"), heads.get("text_top"), heads.get("text")
    step = 512
    with torch.no_grad():
        if tail is None:
            feats = data.image_feats
        else:
            n = data.trunks.shape[1]
            feats = torch.stack(
                [
                    torch.cat([pool(tail(t[i : i + step].float())) for i in range(0, n, step)])
                    for t in data.trunks
                ]
            )
        caps = torch.arange(len(data.captions))
        text = torch.cat(
            [
                text_side(data, caps[i : i + step], text_top=text_top, text_head=text_head)
                for i in range(0, len(caps), step)
            ]
        )
    fixed = ImageData(data.images, data.captions, data.caption_image, feats, text)
    member_cfg = dataclasses.replace(
        model_cfg,
        text=TextTowerConfig(tower=model_cfg.text.tower),
        image=dataclasses.replace(model_cfg.image, tuned_tail=False, heads=1),
    )
    ensemble = HeadEnsemble(model_cfg.image.head, 1).eval()  # grows by one head at a time
    ensemble.members[0].load_state_dict(heads["image"].state_dict())
    val_ids = held_out_images(feats.shape[1], cfg)
    history: dict[str, list] = {"heads": [], "ensemble_val": []}

    def held_out() -> dict[str, dict]:
        def img_fn(image_ids):
            return F.normalize(ensemble(feats[0, torch.as_tensor(image_ids)]), dim=-1)

        val = image_recall((img_fn, lambda caps: text[caps]), fixed, val_ids)
        k = len(ensemble.members)
        log.info("%d image heads, held-out: t→i R@1 %.1f, i→t R@1 %.1f", k,
                 val["text->image"]["R@1"], val["image->text"]["R@1"])  # fmt: skip
        return {"heads": k, **val}

    history["ensemble_val"].append(held_out())
    for m in range(1, cfg.image_heads):
        log.info("image head %d of %d", m + 1, cfg.image_heads)
        seed_everything(cfg.seed + m)
        member_train = dataclasses.replace(cfg, seed=cfg.seed + m)
        member, epochs = train_image_stage(fixed, member_train, member_cfg, val_seed=cfg.seed)
        ensemble.members.append(member["image"])
        history["heads"].append(epochs)
        history["ensemble_val"].append(held_out())
    return ensemble.requires_grad_(False), history


# -- speech stage -------------------------------------------------------------------------------


def read_speech_pairs(path: Path) -> tuple[list[str], list[str]]:
    """(audio paths, captions) of a TSV with `audio` and `caption` columns; `image` optional."""
    folder = path.parent
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not {"audio", "caption"} <= set(reader.fieldnames or ()):
            raise XmodalError(f"{path}: a speech manifest needs the columns 'audio' and 'caption'")
        rows = [
            (unquote(r["audio"]), unquote(r["caption"]))
            for r in reader
            if r.get("audio") and r.get("caption")
        ]
    audios = [str((folder / a).resolve()) for a, _ in rows]
    return audios, [c for _, c in rows]


def train_speech_stage(
    audios: list[str], captions: list[str], model: AlignedModel, cfg: TrainConfig, cache_dir: Path
) -> list[dict]:
    """Distill `model.heads["speech"]` from the model's own text vectors of the captions."""
    states, offsets = speech_states(audios, cache_dir, whisper=lambda: model.whisper)
    with float32_only():  # float32 targets, also under XMODAL_PRECISION=int8
        teacher = torch.from_numpy(model.embed_text(captions))
    head = model.heads["speech"]
    head.train().requires_grad_(True)
    loss_fn = DistillLoss(cfg.alpha, cfg.beta, temperature=cfg.temperature, lam=cfg.lam)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.speech_lr, weight_decay=0.01)
    steps_per_epoch = max(1, len(audios) // cfg.speech_batch_size)
    sched = _one_cycle(opt, cfg.speech_lr, cfg.speech_epochs * steps_per_epoch)
    history = []
    for epoch in range(cfg.speech_epochs):
        perm = np.random.permutation(len(audios))
        total = 0.0
        bar = tqdm(
            range(steps_per_epoch), desc=f"speech head epoch {epoch + 1}/{cfg.speech_epochs}"
        )
        for b in bar:
            idx = perm[b * cfg.speech_batch_size : (b + 1) * cfg.speech_batch_size]
            x, lens = _pad_states(states, offsets, idx)
            student = head(x, lengths_to_mask(lens, x.shape[1]))
            groups = [captions[i] for i in idx]
            terms = loss_fn(student, teacher[idx], group_ids=groups)
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            sched.step()
            total += terms["loss"].item()
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
        history.append({"epoch": epoch + 1, "loss": total / steps_per_epoch})
    head.eval().requires_grad_(False)
    return history


def _pad_states(
    states: np.ndarray, offsets: np.ndarray, idx: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    lens = np.array([offsets[i + 1] - offsets[i] for i in idx])
    x = np.zeros((len(idx), max(int(lens.max()), 1), states.shape[1]), dtype=np.float32)
    for row, i in enumerate(idx):
        x[row, : lens[row]] = states[offsets[i] : offsets[i + 1]]
    return torch.from_numpy(x), torch.from_numpy(lens)


# -- entry point --------------------------------------------------------------------------------


def model_config(cfg: TrainConfig, *, name: str, with_speech: bool) -> ModelConfig:
    text_head = HeadConfig(
        in_dim=384, out_dim=384, hidden_dim=1024, layers=2, dropout=0.1, residual=True
    )
    return ModelConfig(
        name=name,
        text=TextTowerConfig(
            head=text_head if cfg.text_adapter else None, tuned_layers=cfg.text_layers
        ),
        image=ImageTowerConfig(
            head=HeadConfig(
                in_dim=2560, out_dim=384, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout
            ),
            tuned_tail=cfg.tune_tail,
            heads=cfg.image_heads,
        ),
        speech=SpeechTowerConfig(
            branch="fused" if with_speech else "cascaded",
            fuse_weight=cfg.fuse_weight,
            head=SpeechHeadConfig() if with_speech else None,
            hypotheses=cfg.hypotheses,
            prompt=cfg.whisper_prompt,
        ),
    )


def _stage_matches(stage_dir: Path, mcfg: ModelConfig, data: object = None) -> bool:
    """Whether a finished image stage in `stage_dir` has the heads this run would train (and,
    given `data`, the JSON description of its training data, was trained on that data)."""
    if not (stage_dir / "heads.safetensors").exists():
        return False
    saved = ModelConfig.load(stage_dir)
    if (saved.image, saved.text) != (mcfg.image, mcfg.text):
        log.warning(
            "%s was trained with other head settings; training the image stage again", stage_dir
        )
        return False
    data_file = stage_dir / STAGE_DATA
    if data is not None and (not data_file.exists() or json.loads(data_file.read_text()) != data):
        log.warning("%s was trained on other data; training the image stage again", stage_dir)
        return False
    return True


def main(
    manifest: Path,
    *,
    out_dir: Path,
    dev: Path | None = None,
    speech_manifests: tuple[Path, ...] = (),
    extra_manifests: tuple[Path, ...] = (),
    cache_dir: Path | None = None,
    name: str = "xmodal",
    resume: bool = True,
    **overrides,
) -> Path:
    """Train on `manifest` (and spoken captions), write a bundle to `out_dir`, return its path.

    `speech_manifests` are TSVs with `audio` and `caption` columns (synthesized captions, real
    recordings) for the parallel speech head; without any, the model is cascaded-only.
    `extra_manifests` add caption rows to the image stage (e.g. `xmodal asr-captions` output).
    `overrides` set `TrainConfig` fields (e.g. `epochs=3`). With `dev`, the finished model is
    evaluated there and the table is written to `out_dir/dev_eval.json`. With `resume`, a
    finished image stage in `out_dir/image_stage` is reused (the features are cached anyway).
    Trained weights are rounded to float16 precision after each stage (`round_to_half`), so the
    bundle stores them in half the bytes and evaluation sees exactly what is shipped.
    """
    cfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    seed_everything(cfg.seed)
    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "features"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with_speech = bool(speech_manifests)
    mcfg = model_config(cfg, name=name, with_speech=with_speech)
    stage_mcfg = dataclasses.replace(mcfg, image=dataclasses.replace(mcfg.image, heads=1))
    stage_dir = out_dir / "image_stage"
    views = (*IMAGE_VIEWS, *crop_views(cfg.crop_views))
    manifests = [str(Path(p).resolve()) for p in (manifest, *extra_manifests)]
    stage_data = {"manifests": manifests, "views": list(views)}

    def image_data() -> ImageData:
        return load_image_data(
            Path(manifest), cache_dir, views=views, trunks=cfg.tune_tail,
            text_layers=cfg.text_layers, extra=tuple(Path(p) for p in extra_manifests),
        )  # fmt: skip

    data = None
    if resume and _stage_matches(stage_dir, stage_mcfg, stage_data):
        log.info("resuming: image stage loaded from %s", stage_dir)
        heads = dict(load_model(stage_dir).heads)
        history = json.loads((stage_dir / "history.json").read_text())
    else:
        data = image_data()
        heads, history = train_image_stage(data, cfg, stage_mcfg)
        round_to_half(heads)  # half the bundle's bytes; the speech stage learns on these
        stage_cfg = dataclasses.replace(stage_mcfg, speech=SpeechTowerConfig())
        AlignedModel(stage_cfg, heads, fingerprint="stage").save(stage_dir)
        (stage_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        (stage_dir / STAGE_DATA).write_text(json.dumps(stage_data, indent=2) + "\n")
    ensemble_history: dict[str, list] = {}
    if cfg.image_heads > 1:
        heads["image"], ensemble_history = ensemble_image_heads(
            image_data() if data is None else data, heads, cfg, mcfg
        )
        round_to_half({"image": heads["image"]})
    if with_speech:
        heads["speech"] = build_heads(mcfg)["speech"]
    model = AlignedModel(mcfg, heads, fingerprint="training")
    speech_history: list[dict] = []
    if with_speech:
        audios, captions = [], []
        for path in speech_manifests:
            a, c = read_speech_pairs(Path(path))
            audios += a
            captions += c
        speech_history = train_speech_stage(audios, captions, model, cfg, cache_dir)
        round_to_half({"speech": heads["speech"]})
    if cfg.hubness:
        _add_hub_bank(model, Path(manifest), cfg, cache_dir)
    model.save(out_dir)
    (out_dir / "train_config.json").write_text(
        json.dumps(
            {
                "config": dataclasses.asdict(cfg),
                "image_history": history,
                "ensemble_history": ensemble_history,
                "speech_history": speech_history,
            },
            indent=2,
        )
        + "\n"  # fmt: skip
    )
    log.info("wrote %s (fingerprint %s)", out_dir, bundle_fingerprint(out_dir))
    if dev is not None:
        from trainer.evaluate import format_table

        results = evaluate_bundle(out_dir, Path(dev), cache_dir)
        (out_dir / "dev_eval.json").write_text(json.dumps(results, indent=2) + "\n")
        log.info("dev:\n%s", format_table(results))
    return out_dir


def _add_hub_bank(model: AlignedModel, manifest: Path, cfg: TrainConfig, cache_dir: Path) -> None:
    """Query banks for hubness correction from the training manifest (`trainer.hubness`);
    photos through their cached backbone features."""
    from engine.config import HubnessConfig
    from trainer.hubness import add_bank

    def cached(paths) -> np.ndarray:
        return cached_image_vectors(model, paths, cache_dir)

    add_bank(model, manifest, HubnessConfig(), seed=cfg.seed, image_vectors=cached)


def cached_image_vectors(model: AlignedModel, paths, cache_dir: Path) -> np.ndarray:
    """The model's `(n, dim)` vectors of photos, from their cached backbone features (the
    original view) through the model's tuned tail, if any, and image head."""
    tail = model.heads.get("image_tail")
    feats = image_features([str(p) for p in paths], cache_dir, view="orig", tail=tail)
    return model.embed_image_features(feats.astype(np.float32))


def evaluate_bundle(bundle: Path, dev: Path, cache_dir: Path) -> dict:
    """Image–text recall of a bundle on a manifest, through cached backbone features."""
    from trainer.evaluate import build_eval_set, evaluate

    model = load_model(bundle)
    manifest = read_manifest(dev)
    es = build_eval_set(manifest)
    text = model.embed_text(list(es.texts))
    return evaluate(
        manifest,
        model,
        text_vectors=text,
        image_vectors=cached_image_vectors(model, es.images, cache_dir),
    )
