"""Query banks for hubness correction (`engine.hubness`), drawn from a training manifest.

A bank holds what typical queries look like to the model: the vectors of seeded samples of the
manifest's captions (text and speech queries) and photos (image queries). Draw them from the
data the model was trained on, never from the split it is evaluated on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engine.config import HubnessConfig
from engine.errors import XmodalError
from engine.hubness import HubBank
from trainer.manifest import read_manifest

log = logging.getLogger(__name__)

TEXT_BATCH = 256  # captions per embed_text call
IMAGE_BATCH = 64  # photos per embed_images call


def sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `min(size, n)` of `range(n)`, drawn without replacement."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def bank_members(manifest: Path, size: int, seed: int) -> tuple[list[str], list[Path]]:
    """The captions and the photos (distinct, by first appearance) that go into the banks."""
    rows = read_manifest(manifest).rows
    if not rows:
        raise XmodalError(f"{manifest}: no usable rows to draw query banks from")
    captions = [row.caption for row in rows]
    photos = list(dict.fromkeys(row.image for row in rows))
    return (
        [captions[i] for i in sample(len(captions), size, seed)],
        [photos[i] for i in sample(len(photos), size, seed)],
    )


def build_bank(
    model,
    manifest: Path,
    cfg: HubnessConfig,
    *,
    seed: int = 0,
    image_vectors: Callable[[Sequence[Path]], np.ndarray] | None = None,
) -> HubBank:
    """Banks of `cfg.bank` caption and photo vectors of `manifest` under `model`.

    Photos are decoded and embedded by the model unless `image_vectors` (paths → unit vectors,
    e.g. from cached backbone features) is given.
    """
    from engine.media import load_image

    captions, photos = bank_members(manifest, cfg.bank, seed)
    text = np.concatenate(
        [
            model.embed_text(captions[s : s + TEXT_BATCH])
            for s in range(0, len(captions), TEXT_BATCH)
        ]
    )
    if image_vectors is None:

        def image_vectors(paths: Sequence[Path]) -> np.ndarray:
            return np.concatenate(
                [
                    model.embed_images([load_image(p) for p in paths[s : s + IMAGE_BATCH]])
                    for s in range(0, len(paths), IMAGE_BATCH)
                ]
            )

    images = image_vectors(photos)
    log.info("hubness banks: %d captions, %d photos of %s", len(text), len(images), manifest)
    return HubBank.build(text, images, tau=cfg.tau, beta=cfg.beta)


def add_bank(model, manifest: Path, cfg: HubnessConfig, *, seed: int = 0, **kwargs) -> None:
    """Give `model` (an `AlignedModel`) banks from `manifest`: sets `model.hub` and the
    config's `hubness` (replacing any it had); `model.save` writes them."""
    hub = build_bank(model, manifest, cfg, seed=seed, **kwargs)
    model.config = dataclasses.replace(model.config, hubness=cfg)
    model.hub = hub


def write_bank(model, bundle_dir: Path) -> None:
    """Write `model`'s banks and config into an existing bundle, leaving its weights as they
    are. The banks go first: until the config names them, loaders ignore the file."""
    model.hub.save(bundle_dir)
    model.config.save(bundle_dir)
