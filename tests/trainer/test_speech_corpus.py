"""The speech corpus: voicing a tiny caption manifest with the installed TTS engines."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import soundfile as sf

from trainer import speech_corpus as sc

CAPTIONS = [
    ("img/dog.jpg", "A black dog runs through the grass ."),
    ("img/beach.jpg", "Two children play on the beach ."),
    # shell metacharacters must be spoken, never run
    ("img/sign.jpg", 'A sign says " $(touch pwned) `id` ; rm -rf x " .'),
]
PROGRAMS = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "text2wave"}
MISSING = [p for p in ["sox", *PROGRAMS.values()] if shutil.which(p) is None]
needs_tts = pytest.mark.skipif(bool(MISSING), reason=f"TTS programs not installed: {MISSING}")


def write_manifest(folder, rows=CAPTIONS):
    path = folder / "captions.tsv"
    path.write_text("image\tcaption\n" + "".join(f"{i}\t{c}\n" for i, c in rows))
    return path


def read_tsv(path):
    header, *lines = path.read_text().splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One voicing run shared by the tests, drawing from all allowed voices."""
    folder = tmp_path_factory.mktemp("corpus")
    manifest = write_manifest(folder)
    out = folder / "speech"
    report = sc.main(manifest, out, seed=3, workers=2)
    return manifest, out, report


@needs_tts
def test_clips_are_16khz_mono_speech(corpus):
    _, out, report = corpus
    assert report.clips == report.written == 3 and report.failed == 0
    rows = read_tsv(out / "manifest.tsv")
    assert [r["caption"] for r in rows] == [c for _, c in CAPTIONS]
    for row in rows:
        info = sf.info(str(out / row["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
        samples, _ = sf.read(str(out / row["audio"]), dtype="float32")
        assert 0.5 < len(samples) / 16_000 < 15
        assert np.sqrt(np.mean(samples**2)) > 0.01, "clip is silent"
        assert np.abs(samples).max() <= 1.0


@needs_tts
def test_manifest_columns_and_rebased_paths(corpus):
    _, out, _ = corpus
    header = (out / "manifest.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["image", "caption", "audio", "voice", "speed", "pitch", "snr_db"]
    for row in read_tsv(out / "manifest.tsv"):
        assert row["image"].startswith("../img/")  # resolves from the speech manifest's folder
        assert row["voice"].split(":")[0] in sc.ALLOWED_VOICES
        assert sc.SPEED_RANGE[0] <= float(row["speed"]) <= sc.SPEED_RANGE[1]
        snr = float(row["snr_db"])
        assert math.isinf(snr) or sc.SNR_RANGE[0] <= snr <= sc.SNR_RANGE[1]
    assert not (out.parent / "pwned").exists() and not (out / "pwned").exists()


@needs_tts
def test_rerun_skips_written_clips_and_keeps_assignment(corpus):
    manifest, out, first = corpus
    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()}
    again = sc.main(manifest, out, seed=3, workers=1)
    assert (again.written, again.skipped, again.voices) == (0, 3, first.voices)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()} == before


@needs_tts
@pytest.mark.parametrize("voice", ["espeak-ng", "flite", "festival"])
def test_each_engine_speaks(tmp_path, voice):
    manifest = write_manifest(tmp_path, CAPTIONS[:1])
    report = sc.main(manifest, tmp_path / "speech", voices=[voice], workers=1)
    (row,) = read_tsv(tmp_path / "speech" / "manifest.tsv")
    assert report.written == 1 and row["voice"].startswith(f"{voice}:")
    samples, rate = sf.read(str(tmp_path / "speech" / row["audio"]), dtype="float32")
    assert rate == 16_000 and len(samples) / rate > 1.0  # a 7-word caption, not a blip
    assert np.sqrt(np.mean(samples**2)) > 0.01


@needs_tts
def test_resume_voices_only_missing_clip(tmp_path):
    manifest = write_manifest(tmp_path, CAPTIONS[:2])
    out = tmp_path / "speech"
    sc.main(manifest, out, seed=1, voices=["flite:kal16", "espeak-ng:en-us+m3"], workers=1)
    rows = read_tsv(out / "manifest.tsv")
    (out / rows[1]["audio"]).unlink()
    report = sc.main(manifest, out, seed=1, voices=["flite:kal16", "espeak-ng:en-us+m3"], workers=1)
    assert (report.written, report.skipped) == (1, 1)
    assert read_tsv(out / "manifest.tsv") == rows
    assert not list((out / "clips").glob(".*")), "temporary files left behind"


def test_voice_assignment_is_seeded_per_row():
    pool = sc.parse_voices(None)
    plan = [sc.plan_clip(i, c, seed=7, pool=pool, out_image=i) for i, c in CAPTIONS]
    assert plan == [sc.plan_clip(i, c, seed=7, pool=pool, out_image=i) for i, c in CAPTIONS]
    # a row's draw does not depend on the rows around it
    assert sc.plan_clip(*CAPTIONS[2], seed=7, pool=pool, out_image=CAPTIONS[2][0]) == plan[2]
    many = [sc.plan_clip(f"{n}.jpg", "a dog", seed=7, pool=pool, out_image="") for n in range(300)]
    engines = {c.voice.split(":")[0] for c in many}
    assert engines == set(sc.ALLOWED_VOICES)
    assert any(math.isinf(c.snr_db) for c in many) and any(math.isfinite(c.snr_db) for c in many)
    other_seed = [
        sc.plan_clip(f"{n}.jpg", "a dog", seed=8, pool=pool, out_image="") for n in range(300)
    ]
    assert [c.voice for c in other_seed] != [c.voice for c in many]
    # the image path is keyed as the manifest writes it (documented): another spelling, another draw
    relative = sc.plan_clip("images/a.jpg", "a dog", seed=7, pool=pool, out_image="")
    absolute = sc.plan_clip("/data/images/a.jpg", "a dog", seed=7, pool=pool, out_image="")
    assert relative.noise_seed != absolute.noise_seed


def test_select_rows_one_per_image_limit_and_duplicates():
    rows = [("a.jpg", "x"), ("a.jpg", "y"), ("b.jpg", "z"), ("b.jpg", "z"), ("c.jpg", "  ")]
    assert sc.select_rows(rows, limit=None, one_per_image=False) == rows[:3]
    assert sc.select_rows(rows, limit=None, one_per_image=True) == [("a.jpg", "x"), ("b.jpg", "z")]
    assert sc.select_rows(rows, limit=1, one_per_image=True) == [("a.jpg", "x")]


def test_colored_noise_has_unit_rms():
    rng = np.random.default_rng(0)
    for kind in sc.NOISE_KINDS:
        noise = sc.colored_noise(16_000, kind, rng)
        assert noise.dtype == np.float32 and np.isclose(np.sqrt(np.mean(noise**2)), 1, atol=1e-3)


def test_unknown_voice_is_refused():
    with pytest.raises(sc.SpeechCorpusError, match="not allowed; allowed"):
        sc.parse_voices(["flite:slt"])
    with pytest.raises(sc.SpeechCorpusError, match="unknown TTS engine 'piper'"):
        sc.parse_voices(["piper"])
    assert sc.parse_voices("flite:awb,festival") == {
        "flite": ("awb",),
        "festival": ("kal_diphone", "ked_diphone"),
    }


def test_missing_engine_names_apt_package(monkeypatch):
    monkeypatch.setattr(sc.shutil, "which", lambda name: None if name == "text2wave" else "/bin/x")
    with pytest.raises(sc.SpeechCorpusError, match="apt-get install festival"):
        sc.check_engines({"festival": ("kal_diphone",)})


def test_manifest_without_caption_column_is_refused(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("image\ttext\na.jpg\thello\n")
    with pytest.raises(sc.SpeechCorpusError, match=r"header lacks \['caption'\]"):
        sc.main(path, tmp_path / "out")


@needs_tts
def test_other_seed_in_same_folder_is_refused(corpus):
    manifest, out, _ = corpus
    with pytest.raises(sc.SpeechCorpusError, match="made with other settings"):
        sc.main(manifest, out, seed=4)
