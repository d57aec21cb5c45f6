"""Manifests: TSV files pairing images, captions and (optionally) spoken captions.

A manifest has a header with the columns `image` and `caption`, and optionally `audio`; other
columns are ignored. Paths are relative to the manifest's folder (absolute paths also work);
`audio` may be empty. Reading never stops at a bad row: each problem is reported with its line
number and reason, and the good rows stay usable.

- a missing or unreadable image, or an empty caption, drops the row;
- a missing or unreadable audio keeps the row without its audio.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import MediaError, XmodalError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "caption")
OPTIONAL_COLUMNS = ("audio",)
ENCODING = "utf-8"


@dataclass(frozen=True)
class ManifestRow:
    """One usable pairing of an image, its caption and optionally the caption spoken."""

    line: int  # line number in the TSV (the header is line 1)
    image: Path  # resolved against the manifest's folder
    caption: str  # stripped, non-empty
    audio: Path | None = None  # None where the row has no (usable) audio


@dataclass(frozen=True)
class ManifestProblem:
    """Why a row, or part of it, could not be used."""

    line: int  # line number in the TSV (the header is line 1)
    column: str  # "image", "caption", "audio", or "row" for a malformed line
    reason: str  # what is wrong, e.g. "file not found"
    path: Path | None = None  # the offending file, where there is one

    def __str__(self) -> str:
        where = f" {self.path}" if self.path is not None else ""
        return f"line {self.line}: {self.column}{where}: {self.reason}"


@dataclass(frozen=True)
class Manifest:
    """The usable rows of a manifest and the problems found in the rest."""

    path: Path  # the TSV file that was read
    rows: tuple[ManifestRow, ...]  # usable rows, in file order
    problems: tuple[ManifestProblem, ...] = ()  # one per dropped row or dropped audio
    has_audio_column: bool = False  # whether the header has an `audio` column

    @property
    def images(self) -> tuple[Path, ...]:
        """Distinct images, in order of first appearance."""
        return tuple(dict.fromkeys(row.image for row in self.rows))

    @property
    def audios(self) -> tuple[Path, ...]:
        """Distinct non-empty audio files, in order of first appearance."""
        return tuple(dict.fromkeys(row.audio for row in self.rows if row.audio is not None))

    def __len__(self) -> int:
        return len(self.rows)


def read_manifest(path: str | Path, *, check_media: bool = False) -> Manifest:
    """Read and validate a manifest TSV.

    Every image and audio file must exist and be readable; with `check_media`, each is also
    decoded (`engine.media.load_image` / `load_audio`), which catches corrupt files at the cost
    of reading them all. Raises `MediaError` if the manifest itself cannot be read and
    `XmodalError` if its header lacks a required column; bad rows become `Manifest.problems`.
    """
    path = Path(path)
    header, lines = _read_tsv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise XmodalError(
            f"{path}: manifest header lacks column(s) {missing}; found {header}, "
            f"expected tab-separated {list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)} "
            "(audio optional)"
        )
    folder = path.absolute().parent
    rows: list[ManifestRow] = []
    problems: list[ManifestProblem] = []
    for line_no, fields in lines:
        row, row_problems = _parse_row(line_no, fields, header, folder, check_media)
        problems.extend(row_problems)
        if row is not None:
            rows.append(row)
    for problem in problems:
        log.debug("%s: %s", path, problem)
    return Manifest(path, tuple(rows), tuple(problems), has_audio_column="audio" in header)


def unquote(field: str) -> str:
    """A field quoted whole by a CSV writer (`"…"`, inner quotes doubled: what Python's csv
    module or pandas write for a caption holding a quote) → its text; any other field as it is.
    Manifests are read one row a line without quoting, so a caption may hold a lone `"`; only a
    field quoted whole, with every inner quote doubled, is undone."""
    text = field.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1].replace('""', ""):
        return text[1:-1].replace('""', '"')
    return field


def _read_tsv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        with path.open(encoding=f"{ENCODING}-sig", newline="") as fh:
            records = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    except FileNotFoundError as exc:
        raise MediaError(path, "manifest not found") from exc
    except IsADirectoryError as exc:
        raise MediaError(path, "is a directory, expected a manifest .tsv file") from exc
    except PermissionError as exc:
        raise MediaError(path, "permission denied") from exc
    except UnicodeDecodeError as exc:
        raise MediaError(path, f"manifest is not UTF-8 text: {exc}") from exc
    if not records or not any(field.strip() for field in records[0]):
        raise XmodalError(
            f"{path}: manifest is empty; the first line must be a tab-separated header "
            f"with {list(REQUIRED_COLUMNS)}"
        )
    header = [field.strip() for field in records[0]]
    # csv counts a line per record; QUOTE_NONE means one record per physical line
    lines = [
        (no, rec) for no, rec in enumerate(records[1:], start=2) if any(f.strip() for f in rec)
    ]
    return header, lines


def _parse_row(
    line: int, fields: list[str], header: list[str], folder: Path, check_media: bool
) -> tuple[ManifestRow | None, list[ManifestProblem]]:
    if len(fields) > len(header):
        reason = f"{len(fields)} fields for {len(header)} columns (a tab inside a caption?)"
        return None, [ManifestProblem(line, "row", reason)]
    values = dict(zip(header, [unquote(f).strip() for f in fields], strict=False))
    image_value, caption = values.get("image", ""), values.get("caption", "")
    if not image_value:
        return None, [ManifestProblem(line, "image", "empty image path")]
    if not caption:
        return None, [ManifestProblem(line, "caption", "empty caption")]
    image = _join(folder, image_value)
    reason = _media_problem(image, "image", check_media)
    if reason is not None:
        return None, [ManifestProblem(line, "image", reason, image)]
    audio_value = values.get("audio", "")
    if not audio_value:
        return ManifestRow(line, image, caption), []
    audio = _join(folder, audio_value)
    reason = _media_problem(audio, "audio", check_media)
    if reason is not None:
        return ManifestRow(line, image, caption), [ManifestProblem(line, "audio", reason, audio)]
    return ManifestRow(line, image, caption, audio), []


def _join(folder: Path, value: str) -> Path:
    # normpath folds "a/../b" so reports show plain paths (manifests often point at "../")
    return Path(os.path.normpath(folder / value))


def _media_problem(path: Path, kind: str, check_media: bool) -> str | None:
    """Why `path` is not usable as `kind` media, or None if it is."""
    if not path.exists():
        return "file not found"
    if not path.is_file():
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    if not check_media:
        return None
    from engine.media import load_audio, load_image

    try:
        if kind == "image":
            load_image(path)
        else:
            load_audio(path)
    except MediaError as exc:
        return exc.reason
    return None


def write_manifest(rows: Iterable[ManifestRow], path: str | Path) -> int:
    """Write rows as a manifest TSV whose paths are relative to its folder; returns the count.

    The `audio` column is written when any row has audio. Tabs and newlines in captions become
    spaces, since the format has no quoting. The file is replaced atomically.
    """
    path = Path(path)
    rows = list(rows)
    with_audio = any(row.audio is not None for row in rows)
    header = list(REQUIRED_COLUMNS) + (["audio"] if with_audio else [])
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", encoding=ENCODING, newline="") as fh:
        fh.write("\t".join(header) + "\n")
        for row in rows:
            fields = [_relative(row.image, path.parent), _one_line(row.caption)]
            if with_audio:
                fields.append("" if row.audio is None else _relative(row.audio, path.parent))
            fh.write("\t".join(fields) + "\n")
    os.replace(tmp, path)
    return len(rows)


def _relative(target: Path, folder: Path) -> str:
    return Path(os.path.relpath(Path(target).absolute(), folder.absolute())).as_posix()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def convert_flickr8k(
    source: str | Path, out: str | Path, *, max_images: int | None = None
) -> Manifest:
    """Turn a Flickr8k split TSV (`image`, `caption_idx`, `caption`) into an xmodal manifest.

    (The split TSV already reads as a manifest, its extra column ignored; converting moves it.)

    `source` is e.g. `flickr8k/dev.tsv`, whose image paths are relative to its folder; `out`
    is the manifest to write, anywhere: paths are rewritten relative to `out`'s folder. With
    `max_images`, only the first that many distinct images (all their captions) are kept, for
    quick runs. Rows that reference missing files are reported and left out. Returns the
    written manifest, read back.
    """
    source_manifest = read_manifest(source)
    for problem in source_manifest.problems:
        log.warning("%s: %s", source, problem)
    rows = source_manifest.rows
    if max_images is not None:
        keep = set(source_manifest.images[:max_images])
        rows = tuple(row for row in rows if row.image in keep)
    write_manifest(rows, out)
    return read_manifest(out)
