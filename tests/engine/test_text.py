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
