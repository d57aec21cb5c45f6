"""scripts/short_phrases.py: short, distinct phrases cut from captions, the same for a seed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))

from short_phrases import FUNCTION_WORDS, short_phrases  # noqa: E402

ROWS = [
    {"image": f"p{i}.jpg", "caption": f"A black dog number {i} runs across the green grass ."}
    for i in range(200)
] + [{"image": "x.jpg", "caption": " . "}]


def test_phrases_are_short_distinct_cuts_of_their_own_caption():
    pairs = short_phrases(ROWS, count=50, seed=3)
    assert len(pairs) == 50
    captions = {r["image"]: r["caption"] for r in ROWS}
    lengths = set()
    for image, phrase in pairs:
        words = phrase.split()
        lengths.add(len(words))
        assert 1 <= len(words) <= 4 and words[-1].lower() not in FUNCTION_WORDS
        assert phrase in captions[image]  # a contiguous cut of its own caption
    assert lengths == {1, 2, 3, 4}
    assert len({p.lower() for _, p in pairs}) == 50
    assert short_phrases(ROWS, count=50, seed=3) == pairs
    assert short_phrases(ROWS, count=50, seed=4) != pairs
    assert len(short_phrases(ROWS[-1:], count=5, seed=0)) == 0  # no words, no phrase
