"""Short phrases cut from a manifest's captions, for voicing short spoken queries.

    .venv/bin/python scripts/short_phrases.py MANIFEST OUT.tsv [--count 2000] [--seed 13]

Whisper's adapter (`xmodal tune-whisper`) learns only what it hears. Trained on whole captions
it learns that an utterance is a ten-word caption, and a short one ("dog", "red car") then
comes out empty, as the caption prompt, or as a caption-like guess. This cuts `--count`
distinct phrases of 1–4 words (the length drawn evenly; one-word cuts are dropped most often,
so the model card's asr_train.tsv gave 345/523/539/593 of 1/2/3/4 words) at random places of the captions,
never ending on a function word ("a", "the", "of" …), and writes them as a manifest
(`image`, `caption`) to voice with `xmodal speech-corpus`. The rows are drawn in a seeded
order; each phrase keeps its caption's image. Nothing is written for a caption too short for
the length drawn, or for a phrase already taken.

With `--words VOCAB` the phrases are not cut from captions but drawn word by word, at random,
from the `--top` most frequent whole words of a WordPiece vocabulary in frequency order (the
text tower's `vocab.txt`, whose words start at id 1,996), leaving out `--leave-out` words. Cut
from captions, short phrases teach the adapter caption words to hear in a short clip ("Door"
for "four"); words from a general list teach it short utterances without that prior. The
manifest's rows then only lend each phrase an image, which `speech-corpus` carries along.

    .venv/bin/python scripts/short_phrases.py MANIFEST OUT.tsv --words VOCAB --seed 17 \\
        --leave-out zero,one,two,three,four,five,six,seven,eight,nine
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from pathlib import Path

WORD = re.compile(r"[A-Za-z0-9']+")
FUNCTION_WORDS = {
    "a", "an", "the", "in", "on", "of", "and", "with", "is", "are", "to", "at", "its", "his",
    "her", "their", "by", "for", "from", "into", "while", "as", "some", "one", "another",
    "near", "over", "through",
}  # fmt: skip


def short_phrases(rows: list[dict[str, str]], count: int, seed: int) -> list[tuple[str, str]]:
    """(image, phrase) pairs, at most `count`, from manifest rows (`image`, `caption`)."""
    rng = random.Random(seed)
    rows = list(rows)
    rng.shuffle(rows)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for row in rows:
        words = WORD.findall(row["caption"])
        if not words:
            continue
        n = rng.randint(1, 4)
        if len(words) < n:
            continue
        start = rng.randrange(0, len(words) - n + 1)
        span = words[start : start + n]
        if span[-1].lower() in FUNCTION_WORDS:
            continue
        phrase = " ".join(span)
        if phrase.lower() in seen:
            continue
        seen.add(phrase.lower())
        out.append((row["image"], phrase))
        if len(out) == count:
            break
    return out


# BERT's uncased vocabulary: "[PAD]", "[unused…]", single characters, then words by frequency
FIRST_WORD_ID = 1996
VOCAB_WORD = re.compile(r"[a-z]{2,}")


def vocabulary_words(lines: list[str], top: int, leave_out: set[str]) -> list[str]:
    """The first `top` whole words (two letters or more) of a WordPiece vocabulary's lines in
    id order, from `FIRST_WORD_ID` on, without the words of `leave_out`."""
    words = []
    for line in lines[FIRST_WORD_ID:]:
        word = line.strip()
        if VOCAB_WORD.fullmatch(word) and word not in leave_out:
            words.append(word)
            if len(words) == top:
                break
    return words


def word_phrases(
    words: list[str], images: list[str], count: int, seed: int
) -> list[tuple[str, str]]:
    """`count` distinct (image, phrase) pairs: 1–4 words drawn at random from `words` (the
    length drawn evenly), each lent the next image of `images` in turn."""
    if not words or not images:
        raise ValueError("needs words and images")
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _ in range(100 * count):
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        if phrase not in seen:
            seen.add(phrase)
            out.append((images[len(out) % len(images)], phrase))
            if len(out) == count:
                break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path, help="TSV with image and caption columns")
    parser.add_argument("out", type=Path, help="manifest to write (image, caption)")
    parser.add_argument("--count", type=int, default=2000, help="phrases to write")
    parser.add_argument("--seed", type=int, default=13, help="seeds the order and the cuts")
    parser.add_argument(
        "--words", type=Path, help="draw words from this vocabulary instead of cutting captions"
    )
    parser.add_argument("--top", type=int, default=6000, help="--words: most frequent words kept")
    parser.add_argument("--leave-out", default="", help="--words: comma-separated words to drop")
    args = parser.parse_args()
    with args.manifest.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and not {"image", "caption"} <= set(rows[0]):
        parser.error(f"{args.manifest}: needs image and caption columns")
    if not args.words and (args.leave_out or args.top != parser.get_default("top")):
        parser.error("--top and --leave-out go with --words")
    if args.words and not args.words.is_file():
        parser.error(f"{args.words}: no such vocabulary file")
    if args.words:
        leave_out = {w.strip().lower() for w in args.leave_out.split(",") if w.strip()}
        words = vocabulary_words(args.words.read_text().splitlines(), args.top, leave_out)
        images = [row["image"] for row in rows]
        random.Random(args.seed).shuffle(images)
        pairs = word_phrases(words, images, args.count, args.seed)
    else:
        pairs = short_phrases(rows, args.count, args.seed)
    with args.out.open("w") as f:
        f.write("image\tcaption\n")
        f.writelines(f"{image}\t{phrase}\n" for image, phrase in pairs)
    print(f"{args.out}: {len(pairs)} phrases")


if __name__ == "__main__":
    main()
