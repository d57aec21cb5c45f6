"""Voicing a caption manifest with offline TTS: the synthetic speech corpus for training and eval.

Each caption row gets one clip, spoken by a voice drawn from the allowed offline engines
(espeak-ng, flite, festival; see `ALLOWED_VOICES`), at a random speed and pitch, with colored
noise at a random SNR (some clips stay clean). Clips are 16 kHz mono 16-bit WAVs under
`OUT_DIR/clips/`, and `OUT_DIR/manifest.tsv` lists them with the columns `image`, `caption`,
`audio`, `voice`, `speed`, `pitch`, `snr_db` (paths relative to `OUT_DIR`).

Every random choice of a row comes from an RNG seeded by `(seed, image, caption)`, so a rerun
makes the same assignment, skips the clips already on disk and only voices the rest. `image` is
the path as the manifest writes it: the same captions in a manifest that names their photos
otherwise (absolute instead of relative paths) draw other voices. A clip is
written to a temporary file and renamed into place, so a killed run never leaves half a WAV.
Captions reach the engines through a text file, never through a shell.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from engine.errors import XmodalError
from engine.media import SAMPLE_RATE, rms
from trainer.manifest import unquote

logger = logging.getLogger(__name__)

# The voices the data README allows for training data; nothing else may be used.
ALLOWED_VOICES: dict[str, tuple[str, ...]] = {
    "espeak-ng": (),  # any variant; see ESPEAK_LANGUAGES and ESPEAK_VARIANTS for the default draw
    "flite": ("kal16", "awb", "rms"),
    "festival": ("kal_diphone", "ked_diphone"),
}
# English accents built into espeak-ng (the mbrola ones need extra packages, so they are left out).
ESPEAK_LANGUAGES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
                    "en-gb-x-gbclan", "en-gb-x-gbcwmd")  # fmt: skip
# Human-sounding variants; the novelty ones (whisper, croak, robots) are left out of the draw.
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
                   "klatt", "klatt2", "klatt3")  # fmt: skip
ESPEAK_BASE_RATE = 175  # words per minute, espeak-ng's default speed
# The Debian packages that provide each program or voice, for the error that says what to install.
APT_PACKAGES = {
    "espeak-ng": "espeak-ng",
    "flite": "flite",
    "text2wave": "festival",
    "sox": "sox",
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
}

SPEED_RANGE = (0.8, 1.3)  # × the engine's default speaking rate
PITCH_RANGE = (-3.0, 3.0)  # semitones, shifted with sox (duration kept)
SNR_RANGE = (10.0, 40.0)  # dB, speech RMS over noise RMS
CLEAN_FRACTION = 0.2  # share of clips left without noise
NOISE_KINDS = ("white", "pink", "brown")
PAD_RANGE = (0.05, 0.4)  # s of leading and trailing padding
PEAK_RANGE = (-6.0, -1.0)  # dBFS, the speech's peak level before noise
MIN_SPEECH_RMS = 1e-3  # below this (full scale = 1) a TTS output counts as silent
TTS_TIMEOUT = 60  # s, for one engine call
CLIPS_DIR = "clips"
MANIFEST_NAME = "manifest.tsv"
SETTINGS_NAME = "corpus.json"  # seed and voices of the run that made OUT_DIR
MANIFEST_COLUMNS = ("image", "caption", "audio", "voice", "speed", "pitch", "snr_db")


class SpeechCorpusError(XmodalError):
    """A TTS engine or voice is missing, or the options do not match an existing corpus."""


@dataclass(frozen=True)
class Clip:
    """Everything needed to make one clip; a pure function of the seed and the row."""

    image: str  # image path as written in the output manifest
    caption: str  # the text spoken
    audio: str  # WAV path relative to the output folder
    voice: str  # "engine:voice", e.g. "flite:awb" or "espeak-ng:en-gb+f3"
    speed: float  # × the engine's default speaking rate
    pitch: float  # semitones of pitch shift
    snr_db: float  # speech-to-noise ratio; inf for a clean clip
    noise: str  # one of NOISE_KINDS
    pad: tuple[float, float]  # s of padding before and after the speech
    peak_db: float  # dBFS peak of the speech before noise
    noise_seed: int  # seeds the noise samples


@dataclass(frozen=True)
class CorpusReport:
    """What a `main` run produced."""

    manifest: Path  # the speech manifest written
    clips: int  # rows in the speech manifest
    written: int  # clips synthesized by this run
    skipped: int  # clips already on disk from an earlier run
    failed: int  # rows left out because synthesis failed (logged as warnings)
    voices: dict[str, int]  # clips per voice in the manifest


def main(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    voices: Sequence[str] | None = None,
    limit: int | None = None,
    one_per_image: bool = False,
    workers: int = 2,
) -> CorpusReport:
    """Voice every caption of `manifest` and write `out_dir/manifest.tsv` beside the clips.

    Args:
        manifest: caption manifest, TSV with header `image`, `caption` (optional `audio`,
            ignored); image paths relative to the manifest's folder or absolute.
        out_dir: folder for `clips/*.wav` (16 kHz mono 16-bit) and `manifest.tsv` (columns
            `image`, `caption`, `audio`, `voice`, `speed`, `pitch`, `snr_db`; relative image
            paths are rewritten to resolve from `out_dir`).
        seed: seeds every per-row choice (voice, speed, pitch, noise); a rerun with the same
            seed and voices skips the clips already written.
        voices: voices to draw from, each `ENGINE` (all its voices) or `ENGINE:VOICE`, e.g.
            `["flite:awb", "festival", "espeak-ng:en-gb+f3"]`; engines are `espeak-ng`, `flite`,
            `festival`. Default: all allowed voices. The engine is drawn uniformly, then a
            voice within it.
        limit: voice only the first `limit` rows (after `one_per_image`); default all.
        one_per_image: voice only the first caption of each image.
        workers: parallel synthesis processes.

    Returns a `CorpusReport`. Raises `SpeechCorpusError` if an engine, voice or sox is missing
    (naming the apt package) or if `out_dir` was made with another seed or voice list.
    """
    from tqdm import tqdm

    manifest, out_dir = Path(manifest), Path(out_dir)
    pool = parse_voices(voices)
    rows = select_rows(read_captions(manifest), limit=limit, one_per_image=one_per_image)
    check_engines(pool)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CLIPS_DIR).mkdir(exist_ok=True)
    _check_settings(out_dir, seed=seed, pool=pool)

    clips = [
        plan_clip(image, caption, seed=seed, pool=pool,
                  out_image=_rebase(image, manifest.parent, out_dir))
        for image, caption in rows
    ]  # fmt: skip
    todo = [c for c in clips if not (out_dir / c.audio).exists()]
    failed: set[str] = set()
    with tqdm(total=len(clips), initial=len(clips) - len(todo), unit="clip", desc="voicing") as bar:
        for audio, error in _run_jobs(todo, out_dir, workers):
            if error is not None:
                failed.add(audio)
                logger.warning("could not voice %s: %s", audio, error)
            bar.update()
    done = [c for c in clips if c.audio not in failed]
    if clips and not done:
        raise SpeechCorpusError(
            f"every clip failed to synthesize; see the warnings above ({out_dir})"
        )
    out_manifest = out_dir / MANIFEST_NAME
    write_manifest(out_manifest, done)
    report = CorpusReport(
        manifest=out_manifest, clips=len(done), written=len(todo) - len(failed),
        skipped=len(clips) - len(todo), failed=len(failed),
        voices=dict(Counter(c.voice for c in done).most_common()),
    )  # fmt: skip
    logger.info("speech corpus: %s", report)
    return report


def read_captions(manifest: Path) -> list[tuple[str, str]]:
    """`(image, caption)` pairs of a caption manifest, paths exactly as written in it."""
    if not manifest.is_file():
        raise SpeechCorpusError(f"manifest not found: {manifest}")
    with manifest.open(newline="", encoding="utf-8-sig") as f:  # tolerate a BOM
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"image", "caption"} - set(reader.fieldnames or ())
        if missing:
            raise SpeechCorpusError(
                f"{manifest}: header lacks {sorted(missing)}; expected a TSV with columns "
                f"image, caption (optional audio), got {reader.fieldnames}"
            )
        return [(unquote(row["image"] or ""), unquote(row["caption"] or "")) for row in reader]


def select_rows(
    rows: list[tuple[str, str]], *, limit: int | None, one_per_image: bool
) -> list[tuple[str, str]]:
    """Drop empty captions and duplicate rows, optionally keep one caption per image, cap count."""
    seen_rows: set[tuple[str, str]] = set()
    seen_images: set[str] = set()
    kept = []
    for image, caption in rows:
        caption = " ".join(caption.split())
        if not caption or (image, caption) in seen_rows:
            continue
        if one_per_image and image in seen_images:
            continue
        seen_rows.add((image, caption))
        seen_images.add(image)
        kept.append((image, caption))
    dropped = len(rows) - len(kept)
    if dropped and not one_per_image:
        logger.warning("skipping %d empty or duplicate caption rows", dropped)
    return kept[:limit] if limit is not None else kept


def parse_voices(voices: Sequence[str] | None) -> dict[str, tuple[str, ...]]:
    """`ENGINE` / `ENGINE:VOICE` specs → `{engine: voices}`; an empty tuple means any espeak-ng
    variant from the default draw. Raises `SpeechCorpusError` for a voice that is not allowed."""
    if voices is None:
        return dict(ALLOWED_VOICES)
    if isinstance(voices, str):
        voices = [v for v in voices.split(",") if v.strip()]
    pool: dict[str, list[str]] = {}
    for spec in voices:
        engine, _, name = spec.strip().partition(":")
        if engine not in ALLOWED_VOICES:
            raise SpeechCorpusError(f"unknown TTS engine {engine!r} in {spec!r}; allowed: "
                                    f"{list(ALLOWED_VOICES)}")  # fmt: skip
        names = pool.setdefault(engine, [])
        if not name:
            names.extend(ALLOWED_VOICES[engine] or ["*"])
        elif engine != "espeak-ng" and name not in ALLOWED_VOICES[engine]:
            raise SpeechCorpusError(
                f"voice {spec!r} is not allowed; allowed: {allowed_voice_names()}"
            )
        else:
            names.append(name)
    if not pool:
        raise SpeechCorpusError(f"no voices given; allowed: {allowed_voice_names()}")
    # "*" (any espeak-ng variant) is stored as the empty tuple
    return {e: () if "*" in n else tuple(dict.fromkeys(n)) for e, n in pool.items()}


def allowed_voice_names() -> list[str]:
    """Every accepted voice spec, for help texts and errors."""
    names = []
    for engine, voices in ALLOWED_VOICES.items():
        names += [engine] + [f"{engine}:{v}" for v in voices]
    return names + ["espeak-ng:LANG[+VARIANT]"]


def check_engines(pool: dict[str, tuple[str, ...]]) -> None:
    """Raise `SpeechCorpusError` naming the apt package if a program or voice of `pool` is missing."""
    programs = ["sox"] + [{"festival": "text2wave"}.get(e, e) for e in pool]
    for program in programs:
        if shutil.which(program) is None:
            raise SpeechCorpusError(f"{program} not found; install it: apt-get install "
                                    f"{APT_PACKAGES[program]}")  # fmt: skip
    if "flite" in pool:
        listed = _run(["flite", "-lv"]).stdout.decode(errors="replace").split()
        for voice in pool["flite"]:
            if voice not in listed:
                raise SpeechCorpusError(f"flite voice {voice!r} not built in (flite -lv: {listed})")
    for voice in pool.get("festival", ()):
        with tempfile.TemporaryDirectory(prefix="xmodal-tts-") as tmp:
            try:
                _synthesize_raw(f"festival:{voice}", "test", 1.0, Path(tmp))
            except SpeechCorpusError as exc:
                raise SpeechCorpusError(f"festival voice {voice} does not work ({exc}); install it: "
                                        f"apt-get install {APT_PACKAGES[voice]}") from exc  # fmt: skip
    if "espeak-ng" in pool:
        _check_espeak_voices(pool["espeak-ng"])


def _check_espeak_voices(voices: tuple[str, ...]) -> None:
    """espeak-ng silently falls back to its default for an unknown variant, so look both up."""
    languages = {line.split()[1] for line in _espeak_list("--voices")}
    variants = {line.split()[4].removeprefix("!v/") for line in _espeak_list("--voices=variant")}
    wanted = voices or tuple(f"{lang}+{v}" for lang in ESPEAK_LANGUAGES for v in ESPEAK_VARIANTS)
    for voice in wanted:
        language, _, variant = voice.partition("+")
        if language not in languages or (variant and variant not in variants):
            raise SpeechCorpusError(
                f"espeak-ng voice {voice!r} not installed; see `espeak-ng --voices` for languages "
                f"and `espeak-ng --voices=variant` for variants (apt-get install espeak-ng-data)"
            )


def _espeak_list(option: str) -> list[str]:
    lines = _run(["espeak-ng", option]).stdout.decode(errors="replace").splitlines()[1:]
    return [line for line in lines if len(line.split()) >= 5]


def plan_clip(
    image: str, caption: str, *, seed: int, pool: dict[str, tuple[str, ...]], out_image: str
) -> Clip:
    """Draw a row's voice, speed, pitch and noise from an RNG seeded by `(seed, image, caption)`."""
    row_key = hashlib.sha256(f"{image}\0{caption}".encode()).hexdigest()
    digest = hashlib.sha256(f"{seed}\0{row_key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    engine = sorted(pool)[rng.integers(len(pool))]
    if engine == "espeak-ng" and not pool[engine]:
        variant = rng.choice(ESPEAK_VARIANTS)
        voice = f"{engine}:{rng.choice(ESPEAK_LANGUAGES)}+{variant}"
    else:
        voice = f"{engine}:{pool[engine][rng.integers(len(pool[engine]))]}"
    speed = round(float(rng.uniform(*SPEED_RANGE)), 3)
    pitch = round(float(rng.uniform(*PITCH_RANGE)), 2)
    snr_db = round(float(rng.uniform(*SNR_RANGE)), 1)
    if rng.random() < CLEAN_FRACTION:
        snr_db = math.inf
    return Clip(
        image=out_image, caption=caption,
        audio=f"{CLIPS_DIR}/{_safe_stem(image)}_{row_key[:12]}.wav", voice=voice,
        speed=speed, pitch=pitch, snr_db=snr_db, noise=str(rng.choice(NOISE_KINDS)),
        pad=(round(float(rng.uniform(*PAD_RANGE)), 3), round(float(rng.uniform(*PAD_RANGE)), 3)),
        peak_db=round(float(rng.uniform(*PEAK_RANGE)), 2),
        noise_seed=int.from_bytes(digest[8:16], "little"),
    )  # fmt: skip


def synthesize(clip: Clip, out_dir: Path) -> None:
    """Make `out_dir / clip.audio`: TTS → pitch shift and resample (sox) → pad, level, noise.

    The WAV appears atomically (temporary file, then `os.replace`). Raises `SpeechCorpusError`
    if an engine fails or produces silence.
    """
    import soundfile as sf

    with tempfile.TemporaryDirectory(prefix="xmodal-tts-") as tmp:
        raw = _synthesize_raw(clip.voice, clip.caption, clip.speed, Path(tmp))
        shifted = Path(tmp) / "shifted.wav"
        pitch = ["pitch", f"{clip.pitch * 100:.0f}"] if round(clip.pitch * 100) else []
        _run(["sox", "-q", str(raw), "-e", "floating-point", "-b", "32", "-c", "1",
              "-r", str(SAMPLE_RATE), str(shifted), *pitch])  # fmt: skip
        speech, rate = sf.read(str(shifted), dtype="float32")
    if rate != SAMPLE_RATE or speech.ndim != 1:
        raise SpeechCorpusError(
            f"sox gave {rate} Hz, shape {speech.shape}; expected mono {SAMPLE_RATE}"
        )
    if rms(speech) < MIN_SPEECH_RMS:
        raise SpeechCorpusError(f"{clip.voice} produced silence for {clip.caption!r}")
    _write_wav_atomic(out_dir / clip.audio, augment(speech, clip))


def augment(speech: np.ndarray, clip: Clip) -> np.ndarray:
    """`(n,)` float32 speech → `(m,)` float32 in [-1, 1]: padded, leveled, noise added at the
    clip's SNR (measured against the speech before padding)."""
    speech = speech * (10 ** (clip.peak_db / 20) / max(float(np.abs(speech).max()), 1e-9))
    before, after = (round(p * SAMPLE_RATE) for p in clip.pad)
    out = np.concatenate([np.zeros(before), speech, np.zeros(after)]).astype(np.float32)
    if math.isfinite(clip.snr_db):
        rng = np.random.default_rng(clip.noise_seed)
        noise_rms = rms(speech) / 10 ** (clip.snr_db / 20)
        out += noise_rms * colored_noise(len(out), clip.noise, rng)
    peak = float(np.abs(out).max())
    return out * (0.99 / peak) if peak > 0.99 else out


def colored_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """`(n,)` float32 noise of unit RMS with a flat (white), 1/f (pink) or 1/f² (brown) spectrum."""
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[kind]  # amplitude ∝ f^-exponent
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1] if n > 2 else 1.0  # no infinite DC gain
    noise = np.fft.irfft(spectrum / freqs**exponent, n)
    return (noise / max(rms(noise), 1e-12)).astype(np.float32)


def write_manifest(path: Path, clips: Sequence[Clip]) -> None:
    """Write the speech manifest TSV atomically; tabs and newlines never occur in fields."""
    lines = ["\t".join(MANIFEST_COLUMNS)]
    for c in clips:
        snr = "inf" if math.isinf(c.snr_db) else f"{c.snr_db:.1f}"
        fields = (c.image, c.caption, c.audio, c.voice, f"{c.speed:.3f}", f"{c.pitch:.2f}", snr)
        lines.append("\t".join(" ".join(f.split()) for f in fields))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _synthesize_raw(voice: str, text: str, speed: float, tmp: Path) -> Path:
    """Run one TTS engine on `text` into `tmp/raw.wav` (engine's own rate); returns its path."""
    engine, _, name = voice.partition(":")
    text_file, wav = tmp / "text.txt", tmp / "raw.wav"
    text_file.write_text(text + "\n", encoding="utf-8")
    if engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", name, "-s", str(round(ESPEAK_BASE_RATE * speed)),
               "-f", str(text_file), "-w", str(wav)]  # fmt: skip
    elif engine == "flite":
        cmd = ["flite", "-voice", name, "--setf", f"duration_stretch={1 / speed:.4f}",
               "-f", str(text_file), "-o", str(wav)]  # fmt: skip
    elif engine == "festival":
        # -eval takes a Scheme expression; only names and numbers we control go into it
        cmd = ["text2wave", "-eval", f"(voice_{name})",
               "-eval", f"(Parameter.set 'Duration_Stretch {1 / speed:.4f})",
               "-o", str(wav), str(text_file)]  # fmt: skip
    else:
        raise SpeechCorpusError(f"unknown TTS engine {engine!r}; allowed: {list(ALLOWED_VOICES)}")
    result = _run(cmd)
    stderr = result.stderr.decode(errors="replace").strip()
    if not wav.exists() or wav.stat().st_size <= 44:
        raise SpeechCorpusError(f"{voice} wrote no audio: {stderr or 'no message'}")
    if engine == "espeak-ng" and "does not exist" in stderr:
        raise SpeechCorpusError(f"espeak-ng voice {name!r} not found: {stderr}")
    return wav


def _run(cmd: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run a program with an argument list (never a shell); raise `SpeechCorpusError` on failure."""
    try:
        result = subprocess.run(
            cmd, capture_output=True, timeout=TTS_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise SpeechCorpusError(f"{cmd[0]} took over {TTS_TIMEOUT} s") from exc
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise SpeechCorpusError(f"{cmd[0]} failed (exit {result.returncode}): "
                                f"{reason[-1] if reason else 'no message'}")  # fmt: skip
    return result


def _run_jobs(clips: list[Clip], out_dir: Path, workers: int):
    """Yield `(audio, error or None)` per clip as they finish, in `workers` processes."""
    job = partial(_job, out_dir=out_dir)
    if workers <= 1 or len(clips) <= 1:
        yield from map(job, clips)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(job, clips, chunksize=4)


def _job(clip: Clip, *, out_dir: Path) -> tuple[str, str | None]:
    try:
        synthesize(clip, out_dir)
    except Exception as exc:  # noqa: BLE001 - one bad row must not stop the corpus
        return clip.audio, str(exc)
    return clip.audio, None


def _check_settings(out_dir: Path, *, seed: int, pool: dict[str, tuple[str, ...]]) -> None:
    """Refuse to resume into a folder made with another seed or voice list (mixed assignments)."""
    settings = {"seed": seed, "voices": {e: list(v) for e, v in sorted(pool.items())},
                "speed_range": SPEED_RANGE, "pitch_range": PITCH_RANGE, "snr_range": SNR_RANGE,
                "clean_fraction": CLEAN_FRACTION}  # fmt: skip
    settings = json.loads(json.dumps(settings))  # tuples → lists, to compare with the saved file
    path = out_dir / SETTINGS_NAME
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != settings:
            raise SpeechCorpusError(
                f"{out_dir} was made with other settings ({saved}); rerun with the same seed and "
                f"voices, or use a new output folder (asked for {settings})"
            )
        return
    path.write_text(json.dumps(settings, indent=1) + "\n")


def _write_wav_atomic(path: Path, samples: np.ndarray) -> None:
    import soundfile as sf

    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.wav")
    sf.write(str(tmp), samples, SAMPLE_RATE, subtype="PCM_16")
    os.replace(tmp, path)


def _rebase(image: str, manifest_dir: Path, out_dir: Path) -> str:
    """An image path relative to `manifest_dir` → one that resolves from `out_dir`."""
    if not image or os.path.isabs(image):
        return image
    return os.path.relpath(os.path.abspath(manifest_dir / image), os.path.abspath(out_dir))


def _safe_stem(image: str) -> str:
    stem = Path(image).stem or "clip"
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)[:60]
