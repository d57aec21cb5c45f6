"""The `xmodal` command line: a thin layer over the Python API.

Commands of `indexer/` and `trainer/` register through the `xmodal.commands` entry point group,
so `engine/` imports neither and keeps working when they are absent.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib.metadata import entry_points

import click

from engine.errors import XmodalError

log = logging.getLogger(__name__)


class _XmodalGroup(click.Group):
    """A group that turns `XmodalError`s into a one-line message and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except XmodalError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(
    cls=_XmodalGroup, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]}
)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """xmodal: search photos, speech and text with any of them, offline."""
    from engine.config import check_settings

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    check_settings()  # a mistyped XMODAL_* stops here, not after an hour of indexing


INDEX_DIR = click.Path(exists=True, file_okay=False, path_type=str)
MEDIA_FILE = click.Path(exists=True, dir_okay=False, path_type=str)
INDEX_HELP = "Index directory (made by `xmodal index`)."
MODEL_HELP = "Query model: a model name, a bundle directory, or module:attr of an Embedder."


def _to_modalities(_ctx: click.Context, _param: click.Parameter, value: str | None):
    if value is None:
        return None
    return tuple(m.strip() for m in value.split(",") if m.strip())


@main.command()
@click.option("--index", "index_dir", type=INDEX_DIR, required=True, help=INDEX_HELP)
@click.option("--text", "text", help="Search with this text.")
@click.option("--image", "image", type=MEDIA_FILE, help="Search with this image file.")
@click.option("--speech", "speech", type=MEDIA_FILE, help="Search with this audio file.")
@click.option(
    "--to",
    "to",
    callback=_to_modalities,
    show_default="every modality in the index",
    help="Comma list of modalities to return: image,speech,text.",
)
@click.option("-k", "--k", "k", type=click.IntRange(min=1), default=10, help="Number of hits.")
@click.option(
    "--path",
    "path",
    help='Only files whose absolute path matches this GLOB ("*" '
    'also matches "/"), e.g. "*/holiday/*".',
)
@click.option(
    "--added-since", type=click.DateTime(), help="Only items indexed at or after this time."
)
@click.option("--added-before", type=click.DateTime(), help="Only items indexed before this time.")
@click.option("--min-duration", type=float, help="Only recordings at least this many seconds long.")
@click.option("--max-duration", type=float, help="Only recordings at most this many seconds long.")
@click.option("--model", "model", show_default="the index's model", help=MODEL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the hits as JSON.")
def search(index_dir: str, model: str | None, as_json: bool, **query) -> None:
    """Find the items closest to one query (--text, --image or --speech).

    \b
    xmodal search --index my-index --text "a dog on a beach" --to image
    xmodal search --index my-index --speech question.wav -k 5 --json
    """
    from engine.search import SearchEngine

    with SearchEngine.open(index_dir, model=model) as engine:
        hits = engine.search(**query)
    if as_json:
        click.echo(json.dumps([h.to_dict() for h in hits], indent=2))
        return
    if not hits:
        click.echo("no hits", err=True)
    for hit in hits:
        click.echo(_format_hit(hit))


def _format_hit(hit) -> str:
    line = f"{hit.score:6.3f}  {hit.modality:<6}  {hit.path}"
    if hit.start is not None and hit.end is not None:
        line += f"  [{hit.start:.1f}-{hit.end:.1f} s]"
    elif hit.modality == "text":
        line += f"  #{hit.segment}"
    if hit.text:
        snippet = " ".join(hit.text.split())
        line += f'  "{snippet[:100]}{"..." if len(snippet) > 100 else ""}"'
    return line


@main.command()
@click.option("--index", "index_dir", type=INDEX_DIR, required=True, help=INDEX_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
def info(index_dir: str, as_json: bool) -> None:
    """Show what an index holds: counts by modality, model, index types, size on disk."""
    from engine.search import SearchEngine

    with SearchEngine.open(index_dir) as engine:
        about = engine.info()
    if as_json:
        click.echo(json.dumps(about.to_dict(), indent=2))
        return
    click.echo(f"index:   {about.index_dir} ({about.size_bytes / 1e6:.1f} MB)")
    click.echo(f"model:   {about.model_name} ({about.model_source}, fingerprint "
               f"{(about.model_fingerprint or '')[:12]}, dim {about.dim})")  # fmt: skip
    for modality in sorted(set(about.items) | set(about.factories)):
        click.echo(f"{modality + ':':<8} {about.files.get(modality, 0)} files, "
                   f"{about.items.get(modality, 0)} vectors, "
                   f"FAISS {about.factories.get(modality, '-')}")  # fmt: skip
    click.echo(f"errors:  {about.errors} skipped files (xmodal index errors --index {index_dir})")
    click.echo(f"folders: {', '.join(about.roots) or '-'}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON.")
def models(as_json: bool) -> None:
    """List the models `--model NAME` finds ($XMODAL_MODELS, then the shipped ones) and how
    each one's text path runs on this CPU."""
    from engine.cpu import int8_cpu
    from engine.model import describe_model, list_models

    found: dict[str, dict] = {}
    for name in list_models():
        try:
            found[name] = describe_model(name)
        except (XmodalError, OSError) as exc:  # one broken bundle does not hide the others
            found[name] = {"error": str(exc)}
    cpu = {"vnni": "x86 with VNNI", "x86": "x86 without VNNI", "other": "not x86"}[int8_cpu()]
    if as_json:
        click.echo(json.dumps({"cpu": cpu, "models": found}, indent=2))
        return
    for name, about in found.items():
        if "error" in about:
            click.echo(f"{name}: unreadable: {about['error']}")
            continue
        click.echo(f"{name}: {about['name']} (fingerprint {about['fingerprint'][:12]}, "
                   f"dim {about['dim']}, text tower {about['text_tower']}, speech indexed by "
                   f"the {about['speech_branch']} branch)")  # fmt: skip
        click.echo(f"  {about['path']}")
        click.echo(f"  text path on this CPU: {about['text_path_here']}")
    if not found:
        click.echo("no models found", err=True)
    click.echo(f"this CPU: {cpu} (XMODAL_PRECISION / XMODAL_ONNX change what runs: README)")


@main.command()
@click.option("--index", "index_dir", type=INDEX_DIR, required=True, help=INDEX_HELP)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.95,
    help="Cosine similarity at or above which two images are near-duplicates.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
def dupes(index_dir: str, threshold: float, as_json: bool) -> None:
    """List groups of near-duplicate images and of identical recordings and notes."""
    from engine.search import SearchEngine

    with SearchEngine.open(index_dir) as engine:
        groups = engine.dupes(threshold)
    if as_json:
        click.echo(json.dumps([g.to_dict() for g in groups], indent=2))
        return
    if not groups:
        click.echo("no duplicates", err=True)
    for group in groups:
        kind = "identical" if group.identical else f"similarity >= {group.score:.3f}"
        click.echo(f"{group.modality}, {len(group.paths)} files, {kind}:")
        for path in group.paths:
            click.echo(f"  {path}")


def _register_plugins(group: click.Group) -> None:
    for ep in entry_points(group="xmodal.commands"):
        try:
            group.add_command(ep.load(), name=ep.name)
        except Exception as exc:  # noqa: BLE001 - a missing optional package must not break the CLI
            log.debug("command %s unavailable: %s", ep.name, exc)


_register_plugins(main)
