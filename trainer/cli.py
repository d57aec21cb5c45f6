"""Trainer commands of the `xmodal` CLI: `eval`, `train`, `hubness`, `speech-corpus`,
`asr-captions` and `tune-whisper`.

Each command is a thin wrapper over a Python function with the same parameter names. They
register through the `xmodal.commands` entry points (setup.cfg), and `engine.cli` imports this
module for every `xmodal` call, so nothing heavy (numpy, torch, the model) is imported here at
module level: `xmodal --help` stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from engine.config import MAX_IMAGE_HEADS, SPEECH_BRANCHES, HubnessConfig

log = logging.getLogger(__name__)

SETTINGS = {"show_default": True}
MAX_LISTED_PROBLEMS = 20  # manifest problems printed one by one; the rest are counted
MANIFEST = click.Path(exists=True, dir_okay=False, path_type=Path)


def _warn_problems(manifest) -> None:
    problems = manifest.problems
    for problem in problems[:MAX_LISTED_PROBLEMS]:
        click.echo(f"warning: {manifest.path}: {problem}", err=True)
    if len(problems) > MAX_LISTED_PROBLEMS:
        click.echo(f"warning: ... and {len(problems) - MAX_LISTED_PROBLEMS} more", err=True)
    if problems:
        click.echo(
            f"warning: {len(problems)} problem(s) in {manifest.path}; evaluating the "
            f"{len(manifest.rows)} usable row(s)",
            err=True,
        )


@click.command("eval", context_settings=SETTINGS)
@click.argument("manifest", type=MANIFEST)
@click.option(
    "--model",
    default="default",
    help="Model bundle: a name (data/models, $XMODAL_MODELS) or a path.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write the results as JSON to this file.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, help="Items encoded per batch."
)
@click.option(
    "--speech-branch",
    "branches",
    type=click.Choice(SPEECH_BRANCHES),
    multiple=True,
    help="Score these speech branches side by side (repeatable); default: the model's own branch.",
)
@click.option(
    "--check-media/--no-check-media",
    default=True,
    help="Decode every file before encoding, so a corrupt one is reported and skipped.",
)
@click.option(
    "--hubness/--no-hubness",
    default=True,
    help="Score with the model's hubness correction, as search does (`xmodal hubness`); "
    "--no-hubness: plain cosines. Models without query banks always use plain cosines.",
)
def eval_command(
    manifest: Path,
    model: str,
    json_out: Path | None,
    batch_size: int,
    branches: tuple[str, ...],
    check_media: bool,
    hubness: bool,
) -> None:
    """Recall@1/5/10 of MODEL on MANIFEST in every direction its columns allow.

    MANIFEST is a TSV with header image, caption and optionally audio (paths relative to it).
    """
    from engine.model import load_model
    from trainer.evaluate import evaluate, format_table
    from trainer.manifest import read_manifest

    rows = read_manifest(manifest, check_media=check_media)
    _warn_problems(rows)
    embedder = load_model(model)
    results = evaluate(
        rows, embedder, batch_size=batch_size, branches=branches, progress=True, hubness=hubness
    )
    banks = getattr(embedder, "hub", None) is not None
    scoring = "hubness-corrected" if hubness and banks else "plain cosines"
    click.echo(f"{embedder.name} on {manifest} ({scoring})")
    click.echo(format_table(results))
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2) + "\n")
        click.echo(f"wrote {json_out}", err=True)


@click.command("train", context_settings=SETTINGS)
@click.argument("manifest", type=MANIFEST)
@click.option(
    "--dev",
    type=MANIFEST,
    default=None,
    help="Manifest the finished model is evaluated on (text↔image, from cached features).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/default"),
    help="Folder for checkpoints and the finished model bundle.",
)
@click.option(
    "--speech-manifest",
    "speech_manifests",
    type=MANIFEST,
    multiple=True,
    help="TSV with `audio` and `caption` columns to train the parallel speech head on; "
    "repeatable (synthesized captions, real recordings). None: a cascaded-only model.",
)
@click.option(
    "--extra-manifest",
    "extra_manifests",
    type=MANIFEST,
    multiple=True,
    help="More caption rows for the image stage, about MANIFEST's photos or others; repeatable "
    "(e.g. `xmodal asr-captions` output, so the text side learns Whisper's mistakes).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where frozen-backbone features are cached; default: under the user cache folder.",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=4, help="Passes over the training captions."
)
@click.option("--batch-size", type=click.IntRange(min=2), default=256, help="Pairs per step.")
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, help="Peak learning rate."
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    help="InfoNCE temperature τ.",
)
@click.option(
    "--speech-epochs",
    type=click.IntRange(min=1),
    default=15,
    help="Passes over the spoken captions.",
)
@click.option(
    "--tune-tail/--no-tune-tail",
    default=False,
    help="Also tune the image backbone's last two blocks and head conv (on cached trunk features).",
)
@click.option(
    "--crop-views",
    type=click.IntRange(min=0, max=16),
    default=0,
    help="Random-resized-crop views of each training photo (each cached once), besides the "
    "photo and its mirror image.",
)
@click.option(
    "--tail-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-4,
    help="Peak learning rate of the tuned image tail.",
)
@click.option(
    "--text-layers",
    type=click.IntRange(min=0, max=6),
    default=0,
    help="Also tune this many top MiniLM layers (on cached token states); 0 keeps it frozen.",
)
@click.option(
    "--text-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=2e-5,
    help="Peak learning rate of the tuned text layers.",
)
@click.option(
    "--image-heads",
    type=click.IntRange(min=1, max=MAX_IMAGE_HEADS),
    default=1,
    help="How many image heads to average: the image stage's own and N-1 more, trained from "
    "other seeds against its finished text side (an ensemble; cheap to train and to run).",
)
@click.option(
    "--hypotheses",
    type=click.IntRange(min=1, max=5),
    default=3,
    help="Whisper transcripts per clip (beam search's n-best) averaged into the cascaded speech "
    "vector; a setting of the bundle, not of training.",
)
@click.option(
    "--whisper-prompt",
    default=None,
    help="Text Whisper reads as said before each clip, steering its vocabulary (default: three "
    "short photo captions; '' for none); a setting of the bundle, not of training.",
)
@click.option(
    "--hubness/--no-hubness",
    default=True,
    help="Give the bundle query banks from MANIFEST for hubness correction, with "
    "`xmodal hubness`'s defaults; --no-hubness: search by plain cosines.",
)
@click.option("--name", default="xmodal", help="Model name recorded in the bundle.")
@click.option("--seed", type=int, default=0, help="Seeds data order, initialization and dropout.")
@click.option(
    "--resume/--no-resume", default=True, help="Continue from the last checkpoint in --out."
)
def train(
    manifest: Path,
    dev: Path | None,
    out_dir: Path,
    speech_manifests: tuple[Path, ...],
    extra_manifests: tuple[Path, ...],
    cache_dir: Path | None,
    epochs: int,
    batch_size: int,
    lr: float,
    temperature: float,
    speech_epochs: int,
    tune_tail: bool,
    crop_views: int,
    tail_lr: float,
    text_layers: int,
    text_lr: float,
    image_heads: int,
    hypotheses: int,
    whisper_prompt: str | None,
    hubness: bool,
    name: str,
    seed: int,
    resume: bool,
) -> None:
    """Align the image (and speech) heads to the text hub on MANIFEST; write a model bundle."""
    from trainer.train import main

    main(
        manifest,
        dev=dev,
        out_dir=out_dir,
        speech_manifests=speech_manifests,
        extra_manifests=extra_manifests,
        cache_dir=cache_dir,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        temperature=temperature,
        speech_epochs=speech_epochs,
        tune_tail=tune_tail,
        crop_views=crop_views,
        tail_lr=tail_lr,
        text_layers=text_layers,
        text_lr=text_lr,
        image_heads=image_heads,
        hypotheses=hypotheses,
        whisper_prompt=whisper_prompt,
        hubness=hubness,
        name=name,
        seed=seed,
        resume=resume,
    )


@click.command("hubness", context_settings=SETTINGS)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("manifest", type=MANIFEST)
@click.option(
    "--text-clusters",
    type=click.IntRange(min=1),
    default=HubnessConfig.text_clusters,
    help="Bank rows for text and speech queries: k-means clusters of MANIFEST's captions.",
)
@click.option(
    "--image-clusters",
    type=click.IntRange(min=1),
    default=HubnessConfig.image_clusters,
    help="Bank rows for image queries: k-means clusters of MANIFEST's photos.",
)
@click.option(
    "--min-cluster",
    type=click.IntRange(min=1),
    default=HubnessConfig.min_cluster,
    help="Captions or photos each bank row averages, at least (no row stands for one item).",
)
@click.option(
    "--tau",
    type=click.FloatRange(min=0, min_open=True),
    default=HubnessConfig.tau,
    help="Softness of the maximum over a bank.",
)
@click.option(
    "--beta",
    type=click.FloatRange(min=0),
    default=HubnessConfig.beta,
    help="Weight of the penalty subtracted from cosines (0: plain cosines).",
)
@click.option("--seed", type=int, default=0, help="Seeds the k-means clustering.")
def hubness(
    bundle: Path,
    manifest: Path,
    text_clusters: int,
    image_clusters: int,
    min_cluster: int,
    tau: float,
    beta: float,
    seed: int,
) -> None:
    """Give the model BUNDLE query banks from its training MANIFEST, for hubness correction.

    Search then scores a candidate by its cosine minus how close it sits to typical queries
    of another modality (a soft maximum over the banks), so items that are near every query
    stop crowding the top. Each bank row is the mean of a k-means cluster of the model's
    vectors of MANIFEST's captions or photos. Use training data, never the split you evaluate
    on. The bundle is changed in place (its weights are not): rebuild indexes built with it.
    """
    from engine.model import bundle_fingerprint, load_model
    from trainer.hubness import add_bank, write_bank

    model = load_model(bundle)
    cfg = HubnessConfig(text_clusters, image_clusters, min_cluster, tau=tau, beta=beta)
    add_bank(model, manifest, cfg, seed=seed, progress=True)
    write_bank(model, bundle)
    click.echo(
        f"{bundle}: banks of {len(model.hub.text)} caption and {len(model.hub.image)} photo "
        f"clusters (tau {tau}, beta {beta}); fingerprint now {bundle_fingerprint(bundle)}"
    )


@click.command("speech-corpus", context_settings=SETTINGS)
@click.argument("manifest", type=MANIFEST)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--seed",
    type=int,
    default=0,
    help="Seeds each row's voice, speed, pitch and noise, with the row's image path as "
    "MANIFEST writes it and its caption.",
)
@click.option(
    "--voice",
    "voices",
    multiple=True,
    help="ENGINE or ENGINE:VOICE to draw from, repeatable: espeak-ng[:LANG+VARIANT], "
    "flite[:kal16|awb|rms], festival[:kal_diphone|ked_diphone]. Default: every allowed voice.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Voice only the first N rows."
)
@click.option("--one-per-image", is_flag=True, help="Voice only the first caption of each image.")
@click.option(
    "--workers", type=click.IntRange(min=1), default=2, help="Parallel synthesis processes."
)
def speech_corpus(
    manifest: Path,
    out_dir: Path,
    seed: int,
    voices: tuple[str, ...],
    limit: int | None,
    one_per_image: bool,
    workers: int,
) -> None:
    """Voice the captions of MANIFEST into OUT_DIR (clips/ and manifest.tsv); resumable."""
    from trainer.speech_corpus import main

    report = main(
        manifest,
        out_dir,
        seed=seed,
        voices=list(voices) or None,
        limit=limit,
        one_per_image=one_per_image,
        workers=workers,
    )
    click.echo(
        f"{report.manifest}: {report.clips} clips ({report.written} new, {report.skipped} "
        f"already there, {report.failed} failed); voices: {report.voices}"
    )


@click.command("asr-captions", context_settings=SETTINGS)
@click.argument("manifest", type=MANIFEST)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", default="default", help="Model bundle whose Whisper settings are used.")
def asr_captions(manifest: Path, out: Path, model: str) -> None:
    """Write OUT: MANIFEST's spoken captions as Whisper hears them (image, transcript, audio).

    Give OUT to `xmodal train --extra-manifest` so the text side learns Whisper's mistakes.
    """
    from trainer.asr import asr_captions as run

    report = run(manifest, out, model=model)
    click.echo(
        f"{report.manifest}: {report.rows} transcripts ({report.unheard} clips without speech, "
        f"{report.failed} unreadable)"
    )


@click.command("tune-whisper", context_settings=SETTINGS)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("manifest", type=MANIFEST, nargs=-1, required=True)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the clips' Whisper encoder states are cached (a rerun reuses them); default: "
    "under the user cache folder.",
)
@click.option("--rank", type=click.IntRange(min=1), default=16, help="Rank of each update.")
@click.option(
    "--epochs",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    help="Passes over the clips (fractions allowed).",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=5e-4,
    help="Peak learning rate (warm-up, then cosine decay).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, help="Clips per step.")
@click.option("--seed", type=int, default=0, help="Seeds the factors' start and the batches.")
@click.option(
    "--kl-weight",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Weight of a KL term that keeps the next-token distributions near the packaged "
    "decoder's (0: none).",
)
def tune_whisper(
    bundle: Path, manifest: tuple[Path, ...], cache_dir: Path | None, rank: int, epochs: float,
    lr: float, batch_size: int, seed: int, kl_weight: float,
) -> None:  # fmt: skip
    """Tune Whisper's decoder to the voiced captions of each MANIFEST (`xmodal speech-corpus`;
    several are read in turn) and give the model BUNDLE the result, a low-rank adapter, for the
    cascaded speech branch.

    Whisper base mishears the TTS voices that speech may be trained on; the adapter learns
    them. Use training captions only. The bundle is changed in place (its heads are not):
    rebuild indexes that hold speech.
    """
    from engine.model import bundle_fingerprint
    from engine.speech import cache_root
    from trainer.whisper_tune import TuneConfig
    from trainer.whisper_tune import tune_whisper as run

    cfg = TuneConfig(
        rank=rank, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, kl_weight=kl_weight
    )
    cache = cache_dir or cache_root() / "features"
    report = run(bundle, manifest, cache_dir=cache, cfg=cfg, progress=True)
    first, last = report.losses[0], sum(report.losses[-20:]) / len(report.losses[-20:])
    click.echo(
        f"{bundle}: Whisper adapter of rank {rank} from {report.clips} clips, "
        f"{len(report.losses)} steps, loss {first:.3f} -> {last:.3f}; fingerprint now "
        f"{bundle_fingerprint(bundle)}"
    )
