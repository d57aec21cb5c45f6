"""Manifest reading, validation, writing and the Flickr8k converter, on tiny made-up files."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import MediaError, XmodalError
from trainer.manifest import (
    ManifestRow,
    convert_flickr8k,
    read_manifest,
    write_manifest,
)


def _png(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _wav(path: Path, seconds: float = 0.1, rate: int = 16_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def _tsv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def media(tmp_path: Path) -> Path:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", (0, 0, 255))
    _wav(tmp_path / "wav" / "a0.wav")
    _wav(tmp_path / "wav" / "b0.wav")
    return tmp_path


def test_reads_rows_with_paths_relative_to_the_manifest(media: Path):
    path = _tsv(
        media / "m.tsv",
        [
            "image\tcaption\taudio",
            "img/a.png\tA red square .\twav/a0.wav",
            'img/a.png\tA "red" thing\t',
            "img/b.png\tA blue square .\twav/b0.wav",
        ],
    )
    manifest = read_manifest(path)
    assert manifest.problems == ()
    assert manifest.has_audio_column
    assert [r.line for r in manifest.rows] == [2, 3, 4]
    assert manifest.rows[0] == ManifestRow(
        2, media / "img" / "a.png", "A red square .", media / "wav" / "a0.wav"
    )
    assert manifest.rows[1].caption == 'A "red" thing'  # no quoting: quotes are text
    assert manifest.rows[1].audio is None
    assert manifest.images == (media / "img" / "a.png", media / "img" / "b.png")
    assert manifest.audios == (media / "wav" / "a0.wav", media / "wav" / "b0.wav")
    assert len(manifest) == 3


def test_audio_column_is_optional_and_extra_columns_are_ignored(media: Path):
    path = _tsv(media / "m.tsv", ["image\tcaption_idx\tcaption", "img/a.png\t0\tA red square ."])
    manifest = read_manifest(path)
    assert not manifest.has_audio_column
    assert manifest.rows == (ManifestRow(2, media / "img" / "a.png", "A red square ."),)


def test_a_relative_manifest_path_gives_absolute_rows(media: Path, monkeypatch: pytest.MonkeyPatch):
    _tsv(media / "m.tsv", ["image\tcaption", "img/a.png\tA red square ."])
    monkeypatch.chdir(media)
    row = read_manifest("m.tsv").rows[0]
    assert row.image.is_absolute() and row.image.exists()


def test_bad_rows_are_reported_with_line_numbers_and_the_rest_is_kept(media: Path):
    (media / "img" / "folder.png").mkdir()
    path = _tsv(
        media / "m.tsv",
        [
            "image\tcaption\taudio",
            "img/a.png\tok one\twav/a0.wav",
            "img/missing.png\tno image\twav/a0.wav",
            "img/b.png\tmissing audio\twav/gone.wav",
            "",
            "img/b.png\t\twav/b0.wav",
            "\tno image path\t",
            "img/b.png\ttoo\tmany\tfields",
            "img/folder.png\ta directory\t",
            "img/b.png\tok two",
        ],
    )
    manifest = read_manifest(path)
    assert [(r.line, r.caption, r.audio) for r in manifest.rows] == [
        (2, "ok one", media / "wav" / "a0.wav"),
        (4, "missing audio", None),
        (10, "ok two", None),
    ]
    got = {(p.line, p.column, p.reason) for p in manifest.problems}
    assert got == {
        (3, "image", "file not found"),
        (4, "audio", "file not found"),
        (6, "caption", "empty caption"),
        (7, "image", "empty image path"),
        (8, "row", "4 fields for 3 columns (a tab inside a caption?)"),
        (9, "image", "not a regular file"),
    }
    first = manifest.problems[0]
    assert first.path == media / "img" / "missing.png"
    assert str(first) == f"line 3: image {media / 'img' / 'missing.png'}: file not found"


def test_check_media_reports_corrupt_files(media: Path):
    (media / "img" / "bad.png").write_bytes(b"not a png at all")
    (media / "wav" / "bad.wav").write_bytes(b"RIFF....garbage")
    path = _tsv(
        media / "m.tsv",
        [
            "image\tcaption\taudio",
            "img/bad.png\tcorrupt image\t",
            "img/a.png\tcorrupt audio\twav/bad.wav",
            "img/b.png\tfine\twav/b0.wav",
        ],
    )
    quick = read_manifest(path)
    assert len(quick.rows) == 3 and quick.problems == ()
    checked = read_manifest(path, check_media=True)
    assert [(r.caption, r.audio) for r in checked.rows] == [
        ("corrupt audio", None),
        ("fine", media / "wav" / "b0.wav"),
    ]
    assert [(p.line, p.column) for p in checked.problems] == [(2, "image"), (3, "audio")]
    assert "image format" in checked.problems[0].reason


def test_missing_manifest_is_a_media_error(tmp_path: Path):
    with pytest.raises(MediaError, match="manifest not found"):
        read_manifest(tmp_path / "nope.tsv")


def test_a_directory_is_not_a_manifest(tmp_path: Path):
    with pytest.raises(MediaError, match="is a directory"):
        read_manifest(tmp_path)


def test_missing_header_column_is_an_error_that_names_it(tmp_path: Path):
    path = _tsv(tmp_path / "m.tsv", ["image\ttext", "a.png\thello"])
    with pytest.raises(XmodalError, match=r"lacks column\(s\) \['caption'\]"):
        read_manifest(path)


def test_empty_manifest_is_an_error(tmp_path: Path):
    (tmp_path / "m.tsv").write_text("")
    with pytest.raises(XmodalError, match="manifest is empty"):
        read_manifest(tmp_path / "m.tsv")


def test_non_utf8_manifest_is_a_media_error(tmp_path: Path):
    (tmp_path / "m.tsv").write_bytes(b"image\tcaption\nx.png\t\xff\xfe caf\xe9\n")
    with pytest.raises(MediaError, match="not UTF-8"):
        read_manifest(tmp_path / "m.tsv")


def test_header_only_manifest_has_no_rows(tmp_path: Path):
    manifest = read_manifest(_tsv(tmp_path / "m.tsv", ["image\tcaption\taudio"]))
    assert manifest.rows == () and manifest.problems == () and manifest.images == ()


def test_write_then_read_round_trips_from_another_folder(media: Path):
    rows = [
        ManifestRow(2, media / "img" / "a.png", "tab\there and\nnewline", media / "wav" / "a0.wav"),
        ManifestRow(3, media / "img" / "b.png", "no audio"),
    ]
    out = media / "deep" / "er" / "out.tsv"
    assert write_manifest(rows, out) == 2
    text = out.read_text().splitlines()
    assert text[0] == "image\tcaption\taudio"
    assert text[1] == "../../img/a.png\ttab here and newline\t../../wav/a0.wav"
    assert text[2] == "../../img/b.png\tno audio\t"
    back = read_manifest(out)
    assert back.problems == ()
    assert [(r.image.resolve(), r.caption, r.audio) for r in back.rows] == [
        ((media / "img" / "a.png").resolve(), "tab here and newline", back.rows[0].audio),
        ((media / "img" / "b.png").resolve(), "no audio", None),
    ]
    assert back.rows[0].audio.resolve() == (media / "wav" / "a0.wav").resolve()


def test_write_without_audio_has_no_audio_column(media: Path):
    write_manifest([ManifestRow(2, media / "img" / "a.png", "x")], media / "o.tsv")
    assert (media / "o.tsv").read_text() == "image\tcaption\nimg/a.png\tx\n"


def _flickr_fixture(root: Path) -> Path:
    for name in ("1_a.jpg", "2_b.jpg", "3_c.jpg"):
        _png(root / "images" / name)
    lines = ["image\tcaption_idx\tcaption"]
    for name in ("1_a.jpg", "2_b.jpg", "3_c.jpg", "4_missing.jpg"):
        lines += [f"images/{name}\t{i}\tcaption {i} of {name} ." for i in range(2)]
    return _tsv(root / "dev.tsv", lines)


def test_convert_flickr8k_rewrites_paths_and_reports_missing_images(tmp_path: Path):
    source = _flickr_fixture(tmp_path / "flickr8k")
    out = tmp_path / "manifests" / "dev.tsv"
    manifest = convert_flickr8k(source, out)
    assert out.read_text().splitlines()[:2] == [
        "image\tcaption",
        "../flickr8k/images/1_a.jpg\tcaption 0 of 1_a.jpg .",
    ]
    assert len(manifest.rows) == 6 and manifest.problems == ()
    assert len(manifest.images) == 3
    assert manifest.rows[-1].caption == "caption 1 of 3_c.jpg ."


def test_convert_flickr8k_can_keep_the_first_images(tmp_path: Path):
    source = _flickr_fixture(tmp_path / "flickr8k")
    manifest = convert_flickr8k(source, tmp_path / "small.tsv", max_images=2)
    assert [r.image.name for r in manifest.rows] == ["1_a.jpg", "1_a.jpg", "2_b.jpg", "2_b.jpg"]


def test_fields_quoted_by_a_csv_writer_read_as_their_text(media: Path):
    import csv

    from trainer.manifest import unquote
    from trainer.speech_corpus import read_captions

    path = media / "quoted.tsv"
    with path.open("w", newline="", encoding="utf-8") as fh:  # Python's (and pandas') quoting
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerow(["img/a.png", 'A sign that says " HELL " .'])
        writer.writerow(["img/b.png", '"Stop" says the sign'])
    with path.open("a", encoding="utf-8") as fh:  # written by hand: a lone quote stays
        fh.write('img/b.png\tA man says " hi\n')
    rows = read_manifest(path).rows
    assert [r.caption for r in rows] == [
        'A sign that says " HELL " .',
        '"Stop" says the sign',
        'A man says " hi',
    ]
    assert [c for _, c in read_captions(path)] == [r.caption for r in rows]
    assert unquote('"a ""b"" c"') == 'a "b" c' and unquote('"a" and "b"') == '"a" and "b"'
    assert unquote("plain") == "plain" and unquote('"') == '"'
