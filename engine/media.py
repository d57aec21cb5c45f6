"""Decoding media files into what the encoders take: RGB images and 16 kHz mono waveforms.

Every failure is a `MediaError` naming the file and the reason, so a caller can skip the file
and report it instead of crashing.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from engine.errors import MediaError

SAMPLE_RATE = 16_000  # Hz, what Whisper expects
MAX_IMAGE_PIXELS = 64_000_000  # a larger image is treated as a decompression bomb
ORIENTATION_TAG = 0x0112  # EXIF orientation; 5–8 mean the stored image is turned by 90°
MAX_AUDIO_SECONDS = 4 * 3600.0  # longer recordings are refused rather than read into memory
FFMPEG_TIMEOUT = 600  # s, for decoding one file through ffmpeg

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3"})
FFMPEG_AUDIO_EXTENSIONS = frozenset({".m4a", ".aac", ".opus", ".wma", ".aiff", ".aif"})
TEXT_EXTENSIONS = frozenset({".txt", ".md"})


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file as an RGB PIL image, upright per its EXIF orientation.

    Animated images give their first frame. Raises `MediaError` for a missing, unreadable,
    truncated or corrupt file, and for one over `MAX_IMAGE_PIXELS` (a decompression bomb).
    """
    return open_image(path)[0]


def open_image(
    path: str | Path, *, min_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """`load_image`, plus the file's own upright `(width, height)`.

    With `min_side`, a JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8, done inside the
    decoder, several times faster) as long as both sides stay at least `min_side` pixels.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise MediaError(
                        path,
                        f"image is {img.width}x{img.height} pixels, over the limit of "
                        f"{MAX_IMAGE_PIXELS:,} (possible decompression bomb)",
                    )
                size = img.size
                if img.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):  # turned by 90°
                    size = size[::-1]
                img.seek(0)
                if min_side is not None and img.format == "JPEG":
                    img.draft("RGB", (min_side, min_side))
                img.load()
                upright = ImageOps.exif_transpose(img)
                return _to_rgb(upright), size
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(path, f"possible decompression bomb: {exc}") from exc
    except FileNotFoundError as exc:
        raise MediaError(path, "file not found") from exc
    except PermissionError as exc:
        raise MediaError(path, "permission denied") from exc
    except Image.UnidentifiedImageError as exc:
        raise MediaError(
            path, "not a recognized image format (corrupt or wrong extension?)"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(path, f"corrupt or truncated image: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparent areas composited on white, so alpha does not turn black."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def audio_duration(path: str | Path) -> float:
    """Length of an audio file in seconds, read from its header where possible."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate if info.samplerate else 0.0
    except Exception:  # noqa: BLE001 - any header failure means "decode to find out"
        return len(load_audio(path)) / SAMPLE_RATE


def load_audio(path: str | Path, *, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Decode an audio file as a `(samples,)` float32 waveform, mono, at `SAMPLE_RATE`.

    Any sample rate and channel count is accepted (channels are averaged). Formats libsndfile
    reads (wav, flac, ogg, mp3) are decoded directly, others through ffmpeg when installed.
    Raises `MediaError` for an unreadable or empty file or one longer than `max_seconds`.
    """
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "file not found")
    try:
        samples, rate = _read_soundfile(path, max_seconds)
    except MediaError:
        raise
    except PermissionError as exc:
        raise MediaError(path, "permission denied") from exc
    except Exception as exc:  # noqa: BLE001 - libsndfile raises several types
        if shutil.which("ffmpeg") is None:
            raise MediaError(
                path, f"cannot decode audio ({exc}); installing ffmpeg may help"
            ) from exc
        samples, rate = _read_ffmpeg(path), SAMPLE_RATE
    if samples.size == 0:
        raise MediaError(path, "audio has no samples")
    if samples.size / rate > max_seconds:
        raise MediaError(
            path, f"audio is {samples.size / rate:.0f} s long, over {max_seconds:.0f} s"
        )
    samples = np.nan_to_num(samples.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return resample(samples, rate)


def _read_soundfile(path: Path, max_seconds: float) -> tuple[np.ndarray, int]:
    import soundfile as sf

    info = sf.info(str(path))
    if info.samplerate and info.frames / info.samplerate > max_seconds:
        raise MediaError(
            path, f"audio is {info.frames / info.samplerate:.0f} s long, over {max_seconds:.0f} s"
        )
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1), int(rate)


def _read_ffmpeg(path: Path) -> np.ndarray:
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1",
           "-ar", str(SAMPLE_RATE), "-"]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=FFMPEG_TIMEOUT, check=True)
    except subprocess.TimeoutExpired as exc:
        raise MediaError(path, f"ffmpeg took over {FFMPEG_TIMEOUT} s") from exc
    except subprocess.CalledProcessError as exc:
        reason = exc.stderr.decode(errors="replace").strip().splitlines()
        raise MediaError(
            path, f"cannot decode audio: {reason[-1] if reason else 'ffmpeg failed'}"
        ) from exc
    return np.frombuffer(out.stdout, dtype=np.float32).copy()


def rms(samples: np.ndarray) -> float:
    """Root-mean-square level of a waveform (0.0 for an empty one), computed in float64."""
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """`(samples,)` float32 at `rate` Hz → float32 at `SAMPLE_RATE`."""
    return _resample(samples, rate, SAMPLE_RATE)


def at_speed(samples: np.ndarray, speed: float) -> np.ndarray:
    """A 16 kHz waveform played `speed` times as fast, float32: resampled, so its pitch moves
    with it and it lasts `1 / speed` as long. The ratio is `engine.config.speed_ratio(speed)`,
    the nearest fraction with a small denominator (0.9 = 9/10), which keeps torchaudio's filter
    short."""
    from engine.config import speed_ratio

    ratio = speed_ratio(speed)
    if ratio <= 0:
        raise ValueError(f"speed must be positive, not {speed}")
    if not samples.size:
        return np.ascontiguousarray(samples, dtype=np.float32)
    return _resample(samples, ratio.numerator, ratio.denominator)


def _resample(samples: np.ndarray, orig: int, new: int) -> np.ndarray:
    """float32 `samples` resampled by torchaudio from `orig` to `new` (a rate or a ratio)."""
    if orig == new:
        return np.ascontiguousarray(samples, dtype=np.float32)
    import torch
    import torchaudio.functional as F

    out = F.resample(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), orig, new)
    return out.numpy().astype(np.float32)


def load_text(path: str | Path, *, max_bytes: int = 10_000_000) -> str:
    """Read a text note as UTF-8 (undecodable bytes replaced). Raises `MediaError` if unreadable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise MediaError(path, f"text file is {size:,} bytes, over {max_bytes:,}")
        return path.read_bytes().decode("utf-8", errors="replace")
    except MediaError:
        raise
    except FileNotFoundError as exc:
        raise MediaError(path, "file not found") from exc
    except PermissionError as exc:
        raise MediaError(path, "permission denied") from exc
    except OSError as exc:
        raise MediaError(path, f"cannot read: {exc}") from exc
