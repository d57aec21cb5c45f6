"""scripts/short_phrases.py: short, distinct phrases cut from captions or drawn from a
vocabulary's words, the same for a seed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))

from short_phrases import (  # noqa: E402
    FIRST_WORD_ID,
    FUNCTION_WORDS,
    short_phrases,
    vocabulary_words,
    word_phrases,
)

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


def test_vocabulary_words_keep_the_first_whole_words_in_order_less_those_left_out():
    lines = ["[PAD]"] + ["x"] * (FIRST_WORD_ID - 1)  # special tokens and characters
    lines += ["the", "of", "##s", "a", "one", "1990", "dog", "can't", "two", "running", "sea"]
    assert vocabulary_words(lines, top=4, leave_out={"one", "two"}) == [
        "the", "of", "dog", "running",
    ]  # fmt: skip
    assert vocabulary_words(lines, top=100, leave_out=set())[-3:] == ["two", "running", "sea"]


def test_word_phrases_are_distinct_draws_of_one_to_four_listed_words():
    words = [f"w{i}" for i in range(30)]
    pairs = word_phrases(words, ["a.jpg", "b.jpg", "c.jpg"], count=200, seed=5)
    assert len(pairs) == 200 and len({p for _, p in pairs}) == 200
    assert {len(p.split()) for _, p in pairs} == {1, 2, 3, 4}
    assert all(set(p.split()) <= set(words) for _, p in pairs)
    assert [i for i, _ in pairs[:4]] == ["a.jpg", "b.jpg", "c.jpg", "a.jpg"]
    assert word_phrases(words, ["a.jpg"], count=200, seed=5) != word_phrases(
        words, ["a.jpg"], count=200, seed=6
    )
    assert len(word_phrases(["dog"], ["a.jpg"], count=9, seed=0)) == 4  # "dog" … "dog dog dog dog"
