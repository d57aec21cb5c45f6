"""Real-speech check on the Free Spoken Digit Dataset: does a spoken digit land nearest its word?

    .venv/bin/python scripts/eval_fsdd.py RECORDINGS_DIR [--model default] [--speakers theo]

For each recording `{digit}_{speaker}_{take}.wav` of the chosen speakers, each speech branch
(cascaded, parallel, fused) embeds the clip, and the clip counts as right when the nearest of
the ten digit words ("zero" … "nine", through the model's text side) is its digit. Prints the
accuracy per branch (chance: 10 %) and how often Whisper's transcript names the digit.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.media import load_audio  # noqa: E402
from engine.model import load_model  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def transcript_names_digit(text: str, digit: int) -> bool:
    tokens = re.findall(r"[a-z]+|\d", text.lower())
    return WORDS[digit] in tokens or str(digit) in tokens or (digit == 0 and "oh" in tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recordings", type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--speakers", default="theo", help="comma list of speakers to evaluate")
    args = ap.parse_args()
    speakers = set(args.speakers.split(","))
    files = sorted(p for p in args.recordings.glob("*.wav") if p.stem.split("_")[1] in speakers)
    digits = np.array([int(p.stem.split("_")[0]) for p in files])
    model = load_model(args.model)
    words = model.embed_text(WORDS)
    clips = [load_audio(p) for p in files]
    enc_all = []
    for start in range(0, len(clips), 16):
        batch = clips[start : start + 16]
        enc, heard = model.listen(batch)
        enc_all.append((heard, enc))
    print(f"{len(files)} recordings of {sorted(speakers)}, model {args.model}")
    heard = [h[0][0] if h else "" for hyps, _ in enc_all for h in hyps]
    asr = np.mean([transcript_names_digit(t, d) for t, d in zip(heard, digits, strict=True)])
    print(f"transcript names the digit: {100 * asr:.1f} %")
    branches = ("cascaded", "parallel", "fused") if "speech" in model.heads else ("cascaded",)
    for branch in branches:
        vecs = np.concatenate(
            [model.combine_speech(texts, enc.states, enc.lengths, branch) for texts, enc in enc_all]
        )
        acc = np.mean((vecs @ words.T).argmax(1) == digits)
        print(f"{branch:9} nearest digit word = spoken digit: {100 * acc:.1f} %")


if __name__ == "__main__":
    main()
