"""Frozen-backbone features, computed once and cached on disk so training reruns are cheap.

A cache file is named by a hash of what went into it (the list of inputs, the backbone, the
augmentation view), so a changed manifest or backbone never reads stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from engine.errors import MediaError
from engine.media import load_image

log = logging.getLogger(__name__)

IMAGE_VIEWS = ("orig", "flip")  # train-time augmentation views of each photo, besides crops
CROP_SCALE = (0.5, 1.0)  # share of the photo's area a random crop keeps
CROP_RATIO = (3 / 4, 4 / 3)  # its width / height
CROP_SIDE = 224  # pixels; a crop is resized straight to the backbone's input square


def crop_views(n: int) -> tuple[str, ...]:
    """Names of `n` random-resized-crop views ("crop0", ...): each photo gets its own crop per
    view, drawn from the photo's path and the view name, so caches and reruns agree."""
    return tuple(f"crop{i}" for i in range(n))


def cache_key(kind: str, items: Sequence[str], **params: object) -> str:
    h = hashlib.sha256(json.dumps([kind, list(items), params], sort_keys=True).encode())
    return f"{kind}-{h.hexdigest()[:16]}"


def _cached(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    if path.exists():
        return np.load(path)
    arr = compute()
    _save_npy(path, arr)
    return arr


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """Write `arr` to `path` atomically, so a killed run never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _cached_ragged(
    cache_dir: Path,
    key: str,
    compute: Callable[[], list[np.ndarray]],
    *,
    width: int,
    mmap: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-item `(rows_i, width)` arrays, cached as one `(total, width)` array and `(n + 1,)`
    int64 offsets, item i owning rows `offsets[i]:offsets[i + 1]`. `compute` runs on a miss."""
    states_path, offsets_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.offsets.npy"
    if states_path.exists() and offsets_path.exists():
        return np.load(states_path, mmap_mode="r" if mmap else None), np.load(offsets_path)
    per_item = compute()
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in per_item])]).astype(np.int64)
    states = np.concatenate(per_item) if per_item else np.zeros((0, width), np.float16)
    _save_npy(states_path, states)
    _save_npy(offsets_path, offsets)
    return states, offsets


def _view(img: Image.Image, view: str, path: str = "") -> Image.Image:
    if view == "orig":
        return img
    if view == "flip":
        return ImageOps.mirror(img)
    if _is_crop(view):
        return _random_resized_crop(img, f"{path}\0{view}")
    raise ValueError(f"unknown view {view!r}; available: {IMAGE_VIEWS} or crop0, crop1, ...")


def _is_crop(view: str) -> bool:
    """Whether `view` names one of `crop_views`."""
    return view.startswith("crop") and view[4:].isdigit()


def _view_params(view: str) -> dict[str, object]:
    """What a view's pixels depend on beyond its name, for cache keys (crops: their ranges)."""
    return {"crop": [CROP_SCALE, CROP_RATIO, CROP_SIDE]} if _is_crop(view) else {}


def _random_resized_crop(img: Image.Image, seed_text: str) -> Image.Image:
    """A crop of `CROP_SCALE` of the area at a `CROP_RATIO` aspect, flipped half the time, resized
    to `CROP_SIDE` square (torchvision's RandomResizedCrop, milder); seeded by `seed_text`."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8]))
    w, h = img.size
    area = w * h * rng.uniform(*CROP_SCALE)
    ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])))
    cw = int(round(min(w, np.sqrt(area * ratio))))
    ch = int(round(min(h, np.sqrt(area / ratio))))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    box = (left, top, left + cw, top + ch)
    out = img.resize((CROP_SIDE, CROP_SIDE), Image.Resampling.BICUBIC, box=box)
    return ImageOps.mirror(out) if rng.random() < 0.5 else out


def image_trunks(
    paths: Sequence[str], cache_dir: Path, *, view: str = "orig", batch_size: int = 32
) -> np.ndarray:
    """`(n, 192, 7, 7)` float16 EfficientNet-Lite0 trunk outputs (`ImageBackbone.trunk`), cached:
    the frozen part of the image tower, on which the tail can be tuned cheaply.

    An unreadable image gets a zero row and a warning, so one bad file does not stop training.
    """
    from engine.vision import TRUNK_BLOCKS, TRUNK_CHANNELS

    side = 224 // 32
    key = cache_key("trunk", paths, backbone="efficientnet-lite0", view=view, size=224,
                    blocks=TRUNK_BLOCKS, **_view_params(view))  # fmt: skip

    def compute() -> np.ndarray:
        from engine.vision import ImageBackbone, preprocess

        backbone = ImageBackbone()
        out = np.zeros((len(paths), TRUNK_CHANNELS, side, side), dtype=np.float16)
        with torch.inference_mode():
            for start in tqdm(range(0, len(paths), batch_size), desc=f"image trunks ({view})"):
                imgs, rows = [], []
                for i, p in enumerate(paths[start : start + batch_size], start):
                    try:
                        imgs.append(_view(load_image(p), view, p))
                        rows.append(i)
                    except MediaError as exc:
                        log.warning("skipping %s", exc)
                if imgs:
                    x = preprocess(imgs, size=224)
                    out[rows] = backbone.trunk(x).float().numpy().astype(np.float16)
        return out

    return _cached(cache_dir / f"{key}.npy", compute)


def image_features(
    paths: Sequence[str],
    cache_dir: Path,
    *,
    view: str = "orig",
    tail: torch.nn.Module | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """`(n, 2560)` float16 pooled EfficientNet-Lite0 features: the cached trunk, then the tail.

    Without `tail` the packaged (frozen) tail runs and the result is cached; a tuned `tail`
    (`engine.vision.ImageTail`) is run on the cached trunks every call. Unreadable images get a
    zero row (see `image_trunks`).
    """
    from engine.vision import FEATURE_CHANNELS, ImageBackbone, pool

    trunks = image_trunks(paths, cache_dir, view=view)

    def compute() -> np.ndarray:
        run = tail if tail is not None else ImageBackbone().tail_net
        out = np.zeros((len(paths), 2 * FEATURE_CHANNELS), dtype=np.float16)
        with torch.inference_mode():
            for start in range(0, len(paths), batch_size):
                x = torch.from_numpy(trunks[start : start + batch_size].astype(np.float32))
                out[start : start + len(x)] = pool(run(x)).numpy().astype(np.float16)
        out[~trunks.reshape(len(trunks), -1).any(axis=1)] = 0
        return out

    if tail is not None:
        return compute()
    key = cache_key("image", paths, backbone="efficientnet-lite0", view=view, size=224, trunk=1,
                    **_view_params(view))  # fmt: skip
    return _cached(cache_dir / f"{key}.npy", compute)


def text_embeddings(texts: Sequence[str], cache_dir: Path, *, tower: str = "minilm") -> np.ndarray:
    """`(n, 384)` float32 L2-normalized frozen text-tower embeddings, cached."""
    key = cache_key("text", texts, tower=tower)

    def compute() -> np.ndarray:
        from engine.text import load_text_tower

        model = load_text_tower(tower)
        chunks = []
        step = 1024
        for start in tqdm(range(0, len(texts), step), desc=f"text embeddings ({tower})"):
            chunks.append(model.encode(list(texts[start : start + step])))
        return np.concatenate(chunks) if chunks else np.zeros((0, model.dim), np.float32)

    return _cached(cache_dir / f"{key}.npy", compute)


def text_hidden(
    texts: Sequence[str], cache_dir: Path, *, n_top: int, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM token states entering its last `n_top` layers, cached like `speech_states`:
    `(total, 384)` float16 rows and `(n + 1,)` offsets, text i owning `offsets[i]:offsets[i + 1]`
    (its real tokens only, [CLS] and [SEP] included)."""
    key = cache_key("text-hidden", texts, tower="minilm", n_top=n_top)

    def compute() -> list[np.ndarray]:
        from engine.text import MiniLMTower

        tower = MiniLMTower()
        per_text: list[np.ndarray] = []
        with torch.inference_mode():
            for start in tqdm(range(0, len(texts), batch_size), desc="text token states"):
                batch = tower.tokenize(texts[start : start + batch_size])
                hidden = tower.hidden_below(batch, n_top).numpy().astype(np.float16)
                for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
                    per_text.append(hidden[row, :n])
        return per_text

    return _cached_ragged(cache_dir, key, compute, width=384)


def speech_states(
    audio_paths: Sequence[str],
    cache_dir: Path,
    *,
    whisper: Callable[[], object],
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Whisper encoder states of each clip, cached: `(total, 512)` float16 rows and `(n + 1,)`
    offsets, clip i owning rows `offsets[i]:offsets[i + 1]` (only its valid states).

    `whisper` is called once, on a cache miss, to get an `engine.speech.Whisper`. Clips are
    encoded in order of length, so a batch pads little. An unreadable clip keeps one zero row.
    """
    from engine.media import load_audio

    key = cache_key("speech", audio_paths, encoder="whisper-base-ct2-int8", min_frames=1000)

    def compute() -> list[np.ndarray]:
        model = whisper()
        clips: list[np.ndarray] = []
        for p in tqdm(audio_paths, desc="decoding speech"):
            try:
                clips.append(load_audio(p))
            except MediaError as exc:
                log.warning("skipping %s", exc)
                clips.append(np.zeros(0, np.float32))
        per_clip: list[np.ndarray] = [np.zeros((1, 512), np.float16)] * len(clips)
        order = np.argsort([len(c) for c in clips])
        for start in tqdm(range(0, len(order), batch_size), desc="whisper encoder states"):
            idx = order[start : start + batch_size]
            enc = model.encode([clips[i] for i in idx])
            for row, i in enumerate(idx):
                if clips[i].size:
                    per_clip[i] = enc.states[row, : max(1, enc.lengths[row])].astype(np.float16)
        return per_clip

    return _cached_ragged(cache_dir, key, compute, width=512, mmap=True)
