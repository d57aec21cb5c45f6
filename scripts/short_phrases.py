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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path, help="TSV with image and caption columns")
    parser.add_argument("out", type=Path, help="manifest to write (image, caption)")
    parser.add_argument("--count", type=int, default=2000, help="phrases to write")
    parser.add_argument("--seed", type=int, default=13, help="seeds the order and the cuts")
    args = parser.parse_args()
    with args.manifest.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and not {"image", "caption"} <= set(rows[0]):
        parser.error(f"{args.manifest}: needs image and caption columns")
    pairs = short_phrases(rows, args.count, args.seed)
    with args.out.open("w") as f:
        f.write("image\tcaption\n")
        f.writelines(f"{image}\t{phrase}\n" for image, phrase in pairs)
    print(f"{args.out}: {len(pairs)} phrases")


if __name__ == "__main__":
    main()
