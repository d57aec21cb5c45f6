"""Decoding: real fixtures decode to the documented shapes; bad files give a MediaError."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from engine.errors import MediaError
from engine.media import SAMPLE_RATE, at_speed, load_audio, load_image, load_text, open_image

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_image_fixture_decodes_rgb():
    img = load_image(FIXTURES / "beach.png")
    assert img.mode == "RGB" and img.size == (96, 64)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_reduced_jpeg_decode_keeps_min_side_and_reports_the_file_size(tmp_path):
    rng = np.random.default_rng(0)
    # a smooth gradient plus a little noise: what a photo looks like to the DCT
    ramp = np.linspace(0, 255, 1200)[None, :, None] * np.ones((900, 1, 3))
    pixels = np.clip(ramp + rng.normal(0, 8, (900, 1200, 3)), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=90, exif=exif)
    full, full_size = open_image(tmp_path / "big.jpg")
    small, size = open_image(tmp_path / "big.jpg", min_side=256)
    assert full_size == size == (900, 1200) == full.size
    assert small.size == (450, 600)  # 1/2 scale: 1/4 would leave a side under 256
    assert open_image(tmp_path / "big.jpg", min_side=200)[0].size == (225, 300)
    # the reduced decode is the same picture: close to a resize of the full decode
    ref = np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32) - ref).mean() < 4.0
    png = tmp_path / "big.png"
    Image.fromarray(pixels).save(png)
    assert open_image(png, min_side=256)[0].size == (1200, 900)  # only JPEGs are reduced


def test_transparent_png_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "not a recognized image"), (b"\xff\xd8\xff\xe0garbage", "not a recognized|corrupt")],
)
def test_corrupt_image_names_file(tmp_path, content, match):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(MediaError, match=match) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_truncated_jpeg(tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.jpg")


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("engine.media.MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    with pytest.raises(MediaError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


def test_missing_files():
    with pytest.raises(MediaError, match="file not found"):
        load_image("/nonexistent/x.png")
    with pytest.raises(MediaError, match="file not found"):
        load_audio("/nonexistent/x.wav")


def test_audio_fixture_resampled_to_16k_mono():
    wav = load_audio(FIXTURES / "dog_on_beach.wav")
    info = sf.info(str(FIXTURES / "dog_on_beach.wav"))
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) / SAMPLE_RATE - info.duration) < 0.01
    assert np.abs(wav).max() > 0.05


def test_stereo_8k_becomes_mono_16k(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 8000)
    wav = load_audio(tmp_path / "s.wav")
    assert wav.shape == (16000,)
    assert np.abs(wav).max() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("speed", [0.9, 1.1])
def test_at_speed_plays_faster_or_slower(speed):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = at_speed(tone, speed)
    assert out.dtype == np.float32
    assert len(out) == pytest.approx(SAMPLE_RATE / speed, abs=2)
    peak = np.argmax(np.abs(np.fft.rfft(out))) * SAMPLE_RATE / len(out)  # Hz
    assert peak == pytest.approx(440 * speed, abs=2)  # the pitch moves with the speed
    np.testing.assert_array_equal(at_speed(tone, 1.0), tone)
    assert at_speed(np.zeros(0, np.float32), speed).shape == (0,)  # an empty clip stays empty
    assert len(at_speed(tone[:10], speed)) == pytest.approx(10 / speed, abs=1)  # tiny: still works


def test_empty_and_too_long_audio(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16000)
    with pytest.raises(MediaError, match="no samples|cannot decode"):
        load_audio(tmp_path / "empty.wav")
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 3, np.float32), 16000)
    with pytest.raises(MediaError, match="over 2 s"):
        load_audio(tmp_path / "long.wav", max_seconds=2)


def test_not_audio(tmp_path):
    (tmp_path / "x.wav").write_text("hello")
    with pytest.raises(MediaError, match="x.wav"):
        load_audio(tmp_path / "x.wav")


def test_text_note(tmp_path):
    (tmp_path / "n.txt").write_bytes(b"caf\xc3\xa9 \xff")
    assert load_text(tmp_path / "n.txt").startswith("café")
