"""Rebuild data/demo: photos from scikit-image's wheel, speech and notes made here.

    .venv/bin/python scripts/make_demo.py SKIMAGE_DATA_DIR

SKIMAGE_DATA_DIR is `skimage/data` from the scikit-image 0.26.0 wheel, e.g.
`pip download --no-deps scikit-image==0.26.0 && unzip scikit_image-*.whl 'skimage/data/*'`.
Speech is synthesized with flite and espeak-ng (Debian packages), resampled to 16 kHz mono.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import soundfile as sf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.media import SAMPLE_RATE, load_audio  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
PHOTOS = {  # skimage file → demo name
    "chelsea.png": "cat.jpg",
    "coffee.png": "coffee.jpg",
    "astronaut.png": "astronaut.jpg",
    "rocket.jpg": "rocket.jpg",
    "camera.png": "photographer.jpg",
}
SPEECH = {  # file → (engine, voice, text)
    "cat_resting.wav": ("flite", "rms", "A striped cat is resting and looking at the camera."),
    "coffee_cup.wav": ("flite", "awb", "A cup of coffee with milk foam on a saucer."),
    "rocket_launch.wav": (
        "espeak-ng",
        "en-us+m3",
        "A rocket is launching into the sky with fire and smoke.",
    ),
    "astronaut.wav": ("flite", "kal16", "An astronaut in a white space suit is smiling."),
    "buy_beans.wav": ("espeak-ng", "en-gb+f2", "Remember to buy coffee beans on the way home."),
    "meeting.wav": ("flite", "rms", "The budget meeting has moved to Thursday afternoon."),
}
QUERIES = {"cat_query.wav": ("flite", "awb", "A cat looking at the camera.")}
NOTES = {
    "cat_care.md": "# Cat care\n\nFeed the cat twice a day and keep fresh water in the bowl.\n"
    "Brush her striped fur on Sundays; she likes to sleep in the sun by the window.\n",
    "coffee_recipe.txt": "Pour-over coffee: 15 g of freshly ground beans, 250 ml of water at 94 °C.\n"
    "Bloom for 30 seconds, then pour slowly. Add warm milk foam for a flat white.\n",
    "space_history.md": "# Crewed spaceflight\n\nAstronauts train for years before a launch.\n"
    "A rocket carries the crew capsule to orbit; spacesuits keep them alive outside.\n",
    "garden.txt": "Plant the tomatoes in May and water the garden every evening in summer.\n",
}


def speak(engine: str, voice: str, text: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        if engine == "flite":
            subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(raw)], check=True)
        else:
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True)
        sf.write(out, load_audio(raw), SAMPLE_RATE, subtype="PCM_16")


def main(skimage_data: Path) -> None:
    for sub in ("images", "speech", "notes", "queries"):
        (DEMO / sub).mkdir(parents=True, exist_ok=True)
    for src, name in PHOTOS.items():
        img = Image.open(skimage_data / src).convert("RGB")
        img.thumbnail((512, 512))
        img.save(DEMO / "images" / name, quality=85)
    for folder, clips in (("speech", SPEECH), ("queries", QUERIES)):
        for name, (engine, voice, text) in clips.items():
            speak(engine, voice, text, DEMO / folder / name)
    for name, text in NOTES.items():
        (DEMO / "notes" / name).write_text(text)
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    print(f"data/demo: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
