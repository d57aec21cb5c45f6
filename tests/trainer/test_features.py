"""Augmentation views of training photos: random-resized crops are seeded per photo and view."""

import numpy as np
import pytest
from PIL import Image

from trainer.features import CROP_SIDE, _view, crop_views


def _photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))


def test_crop_views_are_seeded_by_photo_and_view():
    img = _photo()
    assert crop_views(3) == ("crop0", "crop1", "crop2") and crop_views(0) == ()
    a = np.asarray(_view(img, "crop0", "a.jpg"))
    assert a.shape == (CROP_SIDE, CROP_SIDE, 3)
    np.testing.assert_array_equal(a, np.asarray(_view(img, "crop0", "a.jpg")))  # reruns agree
    assert not np.array_equal(a, np.asarray(_view(img, "crop1", "a.jpg")))  # views differ
    assert not np.array_equal(a, np.asarray(_view(img, "crop0", "b.jpg")))  # photos differ
    # a crop is a piece of the photo, not padding: no all-black border rows
    assert np.asarray(_view(img, "crop2", "a.jpg")).reshape(-1, 3).std(axis=0).min() > 20


def test_unknown_view():
    with pytest.raises(ValueError, match="unknown view 'rotate'"):
        _view(_photo(), "rotate")


def test_crop_caches_are_keyed_by_the_crop_ranges(tmp_path, monkeypatch):
    """Changing how crops are drawn must not read trunks cached for the old crops."""
    from trainer import features

    path = tmp_path / "photo.png"
    _photo().save(path)
    cache = tmp_path / "cache"
    first = features.image_trunks([str(path)], cache, view="crop0")
    features.image_trunks([str(path)], cache, view="orig")
    assert len(list(cache.glob("trunk-*.npy"))) == 2
    monkeypatch.setattr(features, "CROP_SCALE", (0.2, 0.3))
    second = features.image_trunks([str(path)], cache, view="crop0")
    assert len(list(cache.glob("trunk-*.npy"))) == 3  # a new cache, not the old crop's
    assert not np.array_equal(first, second)
