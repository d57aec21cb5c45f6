"""Rebuild data/demo: photos copied from named packages, speech, notes and README made here.

    .venv/bin/python scripts/make_demo.py                    # speech, queries, notes, README only
    .venv/bin/python scripts/make_demo.py --photos SRC       # + photos, from packages under SRC
    .venv/bin/python scripts/make_demo.py --photos SRC --fetch   # download + extract them first

Speech is synthesized with flite and espeak-ng (Debian packages `flite`, `espeak-ng`), resampled
to 16 kHz mono 16-bit; the same tools give the same files. Notes and README.md are written from
the tables below.

Photos come from four packages, each extracted into its own folder under SRC (`--fetch` runs
exactly these steps; it needs pip and, on Debian, apt-get and dpkg):

    pip download --no-deps --only-binary=:all: scikit-image==0.26.0   # then unzip the wheel
        into SRC/scikit-image               (files used: skimage/data/*)
    pip download --no-deps --only-binary=:all: scikit-learn==1.9.1    # then unzip the wheel
        into SRC/scikit-learn               (files used: sklearn/datasets/images/*)
    apt-get download lomiri-wallpapers-16.04=20.04.0-2
    dpkg -x lomiri-wallpapers-16.04_20.04.0-2_all.deb SRC/lomiri-wallpapers-16.04
    apt-get download lomiri-wallpapers-20.04=20.04.0-2
    dpkg -x lomiri-wallpapers-20.04_20.04.0-2_all.deb SRC/lomiri-wallpapers-20.04

Each source file is checked against the sha256 prefix recorded below, then resized to at most
640 px on the long side and saved as JPEG quality 85. Licenses are the ones each package states:
scikit-image in the docstrings of `skimage/data/_fetchers.py`, scikit-learn in
`sklearn/datasets/images/README.txt`, the lomiri wallpapers in
`/usr/share/doc/lomiri-wallpapers-*/copyright`.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.media import SAMPLE_RATE, load_audio  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
MAX_SIDE = 640
JPEG_QUALITY = 85
MIN_CLIP_S, MAX_CLIP_S = 2.0, 5.0

# name → (kind, what to fetch, folder inside the extracted package that holds the photos)
PACKAGES = {
    "scikit-image": ("pip", "scikit-image==0.26.0", "skimage/data"),
    "scikit-learn": ("pip", "scikit-learn==1.9.1", "sklearn/datasets/images"),
    "lomiri-wallpapers-16.04": (
        "deb",
        "lomiri-wallpapers-16.04=20.04.0-2",
        "usr/share/backgrounds",
    ),
    "lomiri-wallpapers-20.04": (
        "deb",
        "lomiri-wallpapers-20.04=20.04.0-2",
        "usr/share/backgrounds",
    ),
}
SK_LICENSE_NOTE = "stated in scikit-image's `skimage/data/_fetchers.py`"
LOMIRI_NOTE = "stated in `/usr/share/doc/lomiri-wallpapers-*/copyright`"
LICENSE_URLS = {
    "CC0-1.0": "https://creativecommons.org/publicdomain/zero/1.0/",
    "CC-BY-2.0": "https://creativecommons.org/licenses/by/2.0/",
    "CC-BY-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "CC-BY-SA-3.0": "https://creativecommons.org/licenses/by-sa/3.0/",
    "CC-BY-SA-4.0": "https://creativecommons.org/licenses/by-sa/4.0/",
}


@dataclass(frozen=True)
class Photo:
    name: str  # file under data/demo/images
    package: str  # key of PACKAGES
    original: str  # file name inside the package's photo folder
    sha256: str  # first 16 hex digits of the original's sha256
    author: str
    license: str
    shows: str


PHOTOS = [
    Photo(
        "cat.jpg",
        "scikit-image",
        "chelsea.png",
        "596aa1e7cb875eb7",
        "Stéfan van der Walt",
        "CC0-1.0",
        "Chelsea, a striped tabby cat, close-up of her face looking at the camera",
    ),
    Photo(
        "coffee.jpg",
        "scikit-image",
        "coffee.png",
        "cc02f8ca188b167c",
        "Rachel Michetti",
        "CC0-1.0",
        "a cup of espresso on a red saucer with a spoon, on a wooden table",
    ),
    Photo(
        "astronaut.jpg",
        "scikit-image",
        "astronaut.png",
        "88431cd9653ccd53",
        "NASA",
        "public domain",
        "astronaut Eileen Collins in an orange space suit, "
        "smiling, with a US flag and a model of the space shuttle",
    ),
    Photo(
        "rocket.jpg",
        "scikit-image",
        "rocket.jpg",
        "c2dd0de7c538df8d",
        "SpaceX",
        "public domain",
        "a Falcon 9 rocket standing on the launch pad at dusk "
        "between lightning towers (DSCOVR launch, 2015)",
    ),
    Photo(
        "photographer.jpg",
        "scikit-image",
        "camera.png",
        "b0793d2adda0fa6a",
        "Lav Varshney",
        "CC0-1.0",
        "a man looking through a camera on a tripod in a park, buildings behind (grayscale)",
    ),
    Photo(
        "temple.jpg",
        "scikit-learn",
        "china.jpg",
        "8378025ad2519d64",
        "danielbuechele (Flickr), retrieved by Robert Layton",
        "CC-BY-2.0",
        "a tall Chinese temple tower on a wooded hill above a lake",
    ),
    Photo(
        "dogs.jpg",
        "lomiri-wallpapers-16.04",
        "friends_by_Aitzol_Berasategi.jpg",
        "cc40e313c74e421e",
        "Aitzol Berasategi",
        "CC-BY-4.0",
        "two brown spaniel dogs looking out of the door of a wooden house",
    ),
    Photo(
        "mountains.jpg",
        "lomiri-wallpapers-16.04",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "414d0072b2f6f2c5",
        "Aitzol Berasategi",
        "CC-BY-4.0",
        "a grassy trail below rocky, snow-patched mountains (Picos de Europa) under a blue sky",
    ),
    Photo(
        "forest_stream.jpg",
        "lomiri-wallpapers-16.04",
        "life_by_Aitzol_Berasategi.jpg",
        "4c119350ead80201",
        "Aitzol Berasategi",
        "CC-BY-4.0",
        "a small stream with little waterfalls over rocks in a green forest",
    ),
    Photo(
        "sunset.jpg",
        "lomiri-wallpapers-16.04",
        "sunset_by_Aitzol_Berasategi.jpg",
        "474dab6a4b9f94dc",
        "Aitzol Berasategi",
        "CC-BY-4.0",
        "the sun setting over hills, seen from a mountain top with a stone summit marker",
    ),
    Photo(
        "dandelions.jpg",
        "lomiri-wallpapers-16.04",
        "seeding_by_Clements_Engelhardt.jpg",
        "a5634d1ab5e41a35",
        "Clemens Engelhardt",
        "CC0-1.0",
        "dandelion seed heads in a meadow against the low evening sun",
    ),
    Photo(
        "fig.jpg",
        "lomiri-wallpapers-16.04",
        "Picture_0B_by_freespace.jpg",
        "c8c0ab18e48d9e04",
        'Trevor "Freespace"',
        "CC-BY-4.0",
        "half a fresh fig in a red-orange bowl on grey concrete",
    ),
    Photo(
        "paintbrushes.jpg",
        "lomiri-wallpapers-16.04",
        "Picture_1A_by_freespace.jpg",
        "89e86af38d04daae",
        'Trevor "Freespace"',
        "CC-BY-4.0",
        "used paintbrushes with blue, green, pink and yellow paint, standing in a pot",
    ),
    Photo(
        "clock.jpg",
        "lomiri-wallpapers-16.04",
        "greentock_by_Peter_Nerlich.jpg",
        "e7b20e2db9dcd6e2",
        "Peter Nerlich",
        "CC-BY-SA-4.0",
        "a white wall clock with cut-out numbers, seen at an angle",
    ),
    Photo(
        "bird.jpg",
        "lomiri-wallpapers-20.04",
        "Kleiber_by_Lukas_Baubkus.jpg",
        "6572410c09f4492c",
        "Lukas Baubkus",
        "CC-BY-SA-3.0",
        "a nuthatch (small bird) head-down on a tree trunk",
    ),
]

# file → (engine, voice, text, about)
SPEECH = {
    "cat_face.wav": (
        "flite",
        "rms",
        "A striped cat is looking straight at the camera.",
        "`cat.jpg`",
    ),
    "coffee_cup.wav": (
        "flite",
        "awb",
        "A cup of coffee on a red saucer with a spoon.",
        "`coffee.jpg`",
    ),
    "rocket_pad.wav": (
        "espeak-ng",
        "en-us+m3",
        "A tall white rocket stands on the launch pad at night.",
        "`rocket.jpg`",
    ),
    "astronaut.wav": (
        "flite",
        "kal16",
        "An astronaut in an orange space suit is smiling.",
        "`astronaut.jpg`",
    ),
    "dogs_door.wav": (
        "espeak-ng",
        "en-us+f3",
        "Two brown dogs are looking out of the door of a wooden house.",
        "`dogs.jpg`",
    ),
    "bird_tree.wav": (
        "flite",
        "kal16",
        "A small bird is climbing down the trunk of a tree.",
        "`bird.jpg`",
    ),
    "mountain_trail.wav": (
        "flite",
        "awb",
        "A grassy trail leads up to rocky mountains with snow.",
        "`mountains.jpg`",
    ),
    "buy_beans.wav": (
        "espeak-ng",
        "en-gb+f2",
        "Remember to buy coffee beans on the way home.",
        "a note; `coffee.jpg`",
    ),
    "meeting.wav": (
        "flite",
        "rms",
        "The budget meeting has moved to Thursday afternoon.",
        "no photo",
    ),
    "dentist.wav": (
        "espeak-ng",
        "en-gb+m2",
        "Call the dentist tomorrow to change the appointment.",
        "no photo",
    ),
}
QUERIES = {
    "cat_query.wav": (
        "flite",
        "awb",
        "A striped cat with green eyes.",
        "expected top image: `cat.jpg` (a different voice from `speech/cat_face.wav`)",
    ),
}

NOTES = {
    "cat_care.md": (
        "# Cat care\n\n"
        "Feed the cat twice a day and keep fresh water in the bowl.\n"
        "Brush her striped fur on Sundays; she likes to sleep in the sun by the window.\n",
        "`cat.jpg`",
    ),
    "coffee_recipe.txt": (
        "Pour-over coffee: 15 g of freshly ground beans, 250 ml of water at 94 °C.\n"
        "Bloom for 30 seconds, then pour slowly. Serve in the red cup with a saucer.\n",
        "`coffee.jpg`",
    ),
    "space_history.md": (
        "# Crewed spaceflight\n\n"
        "Astronauts train for years before a launch.\n"
        "The rocket waits on the launch pad between its lightning towers; on launch day\n"
        "the crew wear orange pressure suits. In orbit, spacesuits keep them alive outside.\n",
        "`astronaut.jpg`, `rocket.jpg`",
    ),
    "hiking_trip.md": (
        "# Hiking weekend\n\n"
        "Start early: the trail climbs through the forest along a stream, then over open\n"
        "grass to the rocky peaks. Snow stays on the north side until June.\n"
        "Pack water, a jacket and a torch if we stay on the summit for the sunset.\n",
        "`mountains.jpg`, `forest_stream.jpg`, `sunset.jpg`",
    ),
    "bird_watching.txt": (
        "Bird log, Saturday morning: a nuthatch in the old oak, climbing down the trunk\n"
        "head first, the only bird that does that. Two blue tits at the feeder.\n"
        "Bring the binoculars and the small camera next time.\n",
        "`bird.jpg`",
    ),
    "book_club.md": (
        "# Book club\n\n"
        "Next meeting on the 14th at Anna's place, 7 pm.\n"
        "Finish chapters 5 to 9 and bring one question each for the discussion.\n",
        "no photo",
    ),
}


def clear_stale(folder: Path, keep: set[str], pattern: str) -> None:
    """Remove files matching pattern in folder that the tables no longer list."""
    for path in folder.glob(pattern):
        if path.name not in keep:
            path.unlink()


def sha256_prefix(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fetch(src: Path) -> None:
    """Download the packages in PACKAGES and extract each into src/NAME (pip, apt-get, dpkg)."""
    src.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, spec, _) in PACKAGES.items():
            dest = src / name
            dl = Path(tmp) / name
            dl.mkdir()
            if kind == "pip":
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--only-binary=:all:",
                        spec,
                        "-d",
                        str(dl),
                    ],
                    check=True,
                )
                (wheel,) = dl.glob("*.whl")
                with zipfile.ZipFile(wheel) as zf:
                    zf.extractall(dest)
            else:
                subprocess.run(["apt-get", "download", spec], cwd=dl, check=True)
                (deb,) = dl.glob("*.deb")
                subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)


def copy_photos(src: Path) -> None:
    """Resize each photo in PHOTOS from the packages extracted under src into data/demo/images."""
    out = DEMO / "images"
    out.mkdir(parents=True, exist_ok=True)
    clear_stale(out, {p.name for p in PHOTOS}, "*")
    for photo in PHOTOS:
        path = src / photo.package / PACKAGES[photo.package][2] / photo.original
        if sha256_prefix(path) != photo.sha256:
            raise SystemExit(f"{path}: not the file this demo was made from (sha256 differs)")
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        img.save(out / photo.name, "JPEG", quality=JPEG_QUALITY, optimize=True)


def speak_command(engine: str, voice: str, text: str, raw: str) -> list[str]:
    if engine == "flite":
        return ["flite", "-voice", voice, "-t", text, "-o", raw]
    return ["espeak-ng", "-v", voice, "-w", raw, text]


def speak(engine: str, voice: str, text: str, out: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(speak_command(engine, voice, text, str(raw)), check=True)
        samples = load_audio(raw)
    sf.write(out, samples, SAMPLE_RATE, subtype="PCM_16")
    return samples.size / SAMPLE_RATE


def make_speech() -> None:
    for folder, clips in (("speech", SPEECH), ("queries", QUERIES)):
        (DEMO / folder).mkdir(parents=True, exist_ok=True)
        clear_stale(DEMO / folder, set(clips), "*")
        for name, (engine, voice, text, _) in clips.items():
            seconds = speak(engine, voice, text, DEMO / folder / name)
            if folder == "speech" and not MIN_CLIP_S <= seconds <= MAX_CLIP_S:
                raise SystemExit(f"{name}: {seconds:.1f} s, outside {MIN_CLIP_S}-{MAX_CLIP_S} s")


def make_notes() -> None:
    (DEMO / "notes").mkdir(parents=True, exist_ok=True)
    clear_stale(DEMO / "notes", set(NOTES), "*")
    for name, (text, _) in NOTES.items():
        (DEMO / "notes" / name).write_text(text, encoding="utf-8")


def readme() -> str:
    lines = [
        "# Demo media",
        "",
        "Small media the project may redistribute, for `scripts/demo.sh`. This file is written by",
        "`scripts/make_demo.py`, which also rebuilds everything here (its docstring has the",
        "commands that extract the photos from their packages).",
        "",
        f"## images/: photographs, resized to ≤ {MAX_SIDE} px on the long side, JPEG quality "
        f"{JPEG_QUALITY}",
        "",
        "Each is a resized copy of the original (a modification): it keeps the original's",
        "license, and the CC BY-SA ones stay under CC BY-SA. Licenses as each package states them.",
        "",
        "| file | shows | source package | original file | author | license |",
        "|---|---|---|---|---|---|",
    ]
    for p in PHOTOS:
        kind, spec, folder = PACKAGES[p.package]
        pkg = (
            f"{spec.replace('==', ' ').replace('=', ' ')} ({'PyPI' if kind == 'pip' else 'Debian'})"
        )
        lic = (
            f"[{p.license}]({LICENSE_URLS[p.license]})" if p.license in LICENSE_URLS else p.license
        )
        lines.append(
            f"| `{p.name}` | {p.shows} | {pkg} | `{folder}/{p.original}` | {p.author} | {lic} |"
        )
    lines += [
        "",
        "Where each license is stated:",
        "",
        f"- scikit-image 0.26.0: {SK_LICENSE_NOTE} (docstrings of `chelsea()`, `coffee()`,",
        '  `astronaut()`, `rocket()`, `camera()`): chelsea and camera "CC0 by the photographer",',
        '  coffee "CC0 by the photographer", astronaut "No known copyright restrictions, released',
        '  into the public domain" (NASA Great Images), rocket "captured by SpaceX and released in',
        '  the public domain".',
        '- scikit-learn 1.9.1: `sklearn/datasets/images/README.txt`: china.jpg "Released under a',
        '  creative commons license" CC BY 2.0, "Attribution: Some rights reserved by',
        '  danielbuechele", original https://www.flickr.com/photos/danielbuechele/6061409035/.',
        "  (flower.jpg in the same folder is not used: its attribution line and its link name",
        "  different photographers.)",
        f"- lomiri-wallpapers 20.04.0-2 (binary packages lomiri-wallpapers-16.04 and -20.04): "
        f"{LOMIRI_NOTE},",
        "  one `Files:` stanza per photo with its author and license; upstream",
        "  https://gitlab.com/ubports/development/core/lomiri-wallpapers.",
        "",
        "## speech/, queries/: synthesized by the xmodal project, MIT",
        "",
        "16 kHz mono 16-bit WAV. Voices are flite's built-in ones and espeak-ng's (both Debian",
        "packages); the clips contain no recording of a person.",
        "",
        "| file | engine | voice | says | about |",
        "|---|---|---|---|---|",
    ]
    for folder, clips in (("speech", SPEECH), ("queries", QUERIES)):
        for name, (engine, voice, text, about) in clips.items():
            lines.append(f'| `{folder}/{name}` | {engine} | {voice} | "{text}" | {about} |')
    lines += [
        "",
        "Exact commands (`raw.wav` is then read, averaged to mono, resampled to 16 kHz with",
        "`engine.media.load_audio` and written as 16-bit PCM by `scripts/make_demo.py`):",
        "",
        "```bash",
    ]
    for folder, clips in (("speech", SPEECH), ("queries", QUERIES)):
        for name, (engine, voice, text, _) in clips.items():
            cmd = speak_command(engine, voice, f'"{text}"', "raw.wav")
            lines.append(f"{' '.join(cmd)}   # → {folder}/{name}")
    lines += [
        "```",
        "",
        "## notes/: written by the xmodal project, MIT",
        "",
        "| file | about |",
        "|---|---|",
    ]
    for name, (text, about) in NOTES.items():
        first = text.strip().splitlines()[0].lstrip("# ")
        lines.append(f"| `notes/{name}` | {first[:60]}{'…' if len(first) > 60 else ''} ({about}) |")
    lines += [
        "",
        "## this file",
        "",
        "`README.md`: written by `scripts/make_demo.py`, MIT.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--photos",
        type=Path,
        metavar="SRC",
        help="folder with the packages extracted as SRC/NAME (see --fetch)",
    )
    ap.add_argument(
        "--fetch",
        action="store_true",
        help="download and extract the photo packages into SRC first",
    )
    args = ap.parse_args()
    if args.fetch and not args.photos:
        ap.error("--fetch needs --photos SRC")
    if args.fetch:
        fetch(args.photos)
    if args.photos:
        copy_photos(args.photos)
    make_speech()
    make_notes()
    (DEMO / "README.md").write_text(readme(), encoding="utf-8")
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    print(f"data/demo: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
