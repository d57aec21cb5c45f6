"""Query banks for hubness correction (`engine.hubness`), built from a training manifest.

A bank says what typical queries look like to the model: its vectors of the manifest's
captions (for text and speech queries) and photos (for image queries). The bundle does not
carry those vectors one by one: each bank row is the mean of a k-means cluster of at least
`min_cluster` of them, weighted by the cluster's share, so no row stands for a single training
caption or photo. Build banks from the data the model was trained on, never from the split it
is evaluated on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engine.config import HubnessConfig
from engine.errors import XmodalError
from engine.graph import float32_only
from engine.hubness import HubBank
from trainer.manifest import read_manifest

log = logging.getLogger(__name__)

TEXT_BATCH = 256  # captions per embed_text call
IMAGE_BATCH = 64  # photos per embed_images call
KMEANS_ITERATIONS = 25


def bank_members(manifest: Path) -> tuple[list[str], list[Path]]:
    """Every caption of `manifest` and its distinct photos, by first appearance."""
    rows = read_manifest(manifest).rows
    if not rows:
        raise XmodalError(f"{manifest}: no usable rows to build query banks from")
    return [row.caption for row in rows], list(dict.fromkeys(row.image for row in rows))


def cluster(
    vectors: np.ndarray, k: int, *, min_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`(means, counts)`: k-means of `vectors` (at most `k` clusters) where every cluster holds
    at least `min_size` rows: clusters below it are dropped one by one, smallest first, and
    their rows go to the nearest remaining centroid. Means are not renormalized."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n < min_size:
        raise XmodalError(f"{n} vectors cannot fill one bank row of at least {min_size}")
    k = max(1, min(k, n // min_size))
    kmeans = faiss.Kmeans(dim, k, niter=KMEANS_ITERATIONS, seed=seed)
    kmeans.train(vectors)
    centroids = kmeans.centroids
    while True:
        nearest = (vectors @ centroids.T - 0.5 * (centroids**2).sum(1)).argmax(1)
        counts = np.bincount(nearest, minlength=len(centroids))
        small = np.flatnonzero(counts < min_size)
        if not len(small):
            break
        centroids = np.delete(centroids, small[np.argmin(counts[small])], axis=0)
    means = np.stack([vectors[nearest == j].mean(0) for j in range(len(centroids))])
    return means.astype(np.float32), counts


def build_bank(
    model,
    manifest: Path,
    cfg: HubnessConfig,
    *,
    seed: int = 0,
    image_vectors: Callable[[Sequence[Path]], np.ndarray] | None = None,
    progress: bool = False,
) -> HubBank:
    """Clustered banks of every caption and photo of `manifest` under `model`.

    Photos are decoded and embedded by the model unless `image_vectors` (paths → unit vectors,
    e.g. from cached backbone features) is given. `progress` shows bars while embedding.
    """
    from trainer.evaluate import embed_image_files, embed_texts

    captions, photos = bank_members(manifest)
    with float32_only():  # the same banks whatever CPU builds them (int8 text on VNNI CPUs)
        text = embed_texts(captions, model, batch_size=TEXT_BATCH, progress=progress)
    if image_vectors is None:
        images = embed_image_files(photos, model, batch_size=IMAGE_BATCH, progress=progress)
    else:
        images = image_vectors(photos)
    text_means, text_counts = cluster(text, cfg.text_clusters, min_size=cfg.min_cluster, seed=seed)
    image_means, image_counts = cluster(
        images, cfg.image_clusters, min_size=cfg.min_cluster, seed=seed
    )
    log.info(
        "hubness banks from %s: %d captions in %d clusters, %d photos in %d clusters",
        manifest, len(text), len(text_means), len(images), len(image_means),
    )  # fmt: skip
    return HubBank.build(
        text_means, image_means, tau=cfg.tau, beta=cfg.beta,
        text_weight=text_counts, image_weight=image_counts,
    )  # fmt: skip


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
