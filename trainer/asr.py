"""Captions as the cascaded branch hears them: a spoken-caption manifest → Whisper's transcripts.

The cascaded branch feeds Whisper's transcript to the text side, which was trained on written
captions only; a misheard word moves the query away from its photo. Training the image stage on
these transcripts as extra captions of the same photos (`xmodal train --extra-manifest`) lets
the text side learn the mistakes Whisper makes on the training voices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from engine.errors import MediaError
from engine.media import load_audio
from trainer.manifest import ManifestRow, read_manifest, write_manifest

log = logging.getLogger(__name__)

BATCH = 16  # clips per Whisper call


@dataclass(frozen=True)
class AsrReport:
    manifest: Path  # the manifest written
    rows: int  # rows written: clips with a transcript
    unheard: int  # clips Whisper heard no speech in (no row)
    failed: int  # clips that could not be read (no row)


def asr_captions(manifest: str | Path, out: str | Path, *, model: str = "default") -> AsrReport:
    """Write `out`: one row per audio of `manifest` with its image and, as the caption, the
    model's best Whisper transcript (the bundle's beam size). Rows without audio are skipped."""
    from engine.model import load_model

    source = read_manifest(manifest)
    for problem in source.problems[:20]:
        log.warning("%s: %s", manifest, problem)
    spoken = [row for row in source.rows if row.audio is not None]
    aligned = load_model(model)
    rows: list[ManifestRow] = []
    unheard = failed = 0
    for start in tqdm(range(0, len(spoken), BATCH), desc="transcribing", unit="batch"):
        batch, clips = [], []
        for row in spoken[start : start + BATCH]:
            try:
                clips.append(load_audio(row.audio))
                batch.append(row)
            except MediaError as exc:
                log.warning("skipping %s", exc)
                failed += 1
        if not clips:
            continue
        heard = aligned.scored_hypotheses(aligned.whisper.encode(clips))
        for row, hyps in zip(batch, heard, strict=True):
            if not hyps:
                unheard += 1
                continue
            rows.append(
                ManifestRow(line=row.line, image=row.image, caption=hyps[0][0], audio=row.audio)
            )
    write_manifest(rows, out)
    return AsrReport(manifest=Path(out), rows=len(rows), unheard=unheard, failed=failed)
