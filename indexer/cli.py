"""`xmodal index`: build and maintain an index (registered through `xmodal.commands`).

`xmodal index FOLDER... --index DIR` is short for `xmodal index sync FOLDER... --index DIR`;
`xmodal index remove PATH... --index DIR` and `xmodal index errors --index DIR` are the other
subcommands. Only click is imported here, so `xmodal --help` stays fast.
"""

from __future__ import annotations

import json
import sys

import click

DEFAULT_SUBCOMMAND = "sync"
INDEX_HELP = "Index directory (created if missing)."


class _DefaultGroup(click.Group):
    """A group that runs `sync` when the first argument is not a subcommand name."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [DEFAULT_SUBCOMMAND, *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultGroup, context_settings={"show_default": True})
def index() -> None:
    """Index media folders for search: `xmodal index FOLDER... --index DIR`.

    \b
    xmodal index FOLDER... --index DIR     scan, embed, keep in sync (= index sync)
    xmodal index remove PATH... --index DIR
    xmodal index errors --index DIR        files skipped, with reasons

    Reruns are incremental: unchanged files are skipped, changed ones re-embedded, renamed
    ones keep their vectors, files gone from the folders are removed. A folder literally
    named "remove", "errors" or "sync" needs the explicit form: xmodal index sync ./remove.
    """


@index.command()
@click.argument("roots", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--index", "index_dir", type=click.Path(file_okay=False), required=True,
              help=INDEX_HELP)  # fmt: skip
@click.option(
    "--model",
    "model",
    default="default",
    help="Model: a name, a bundle directory, or module:attr of an Embedder.",
)
@click.option(
    "--rebuild",
    is_flag=True,
    help="Empty the index and re-embed everything (needed to change model).",
)
@click.option(
    "--factory",
    default=None,
    show_default="Flat, HNSW32 above 20,000 vectors",
    help='FAISS factory string for every modality, e.g. "Flat", "HNSW32", "IVF1024,PQ32".',
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    help="Segments per embedder call (text: 8 times as many; the text tower batches them by "
    "length).",
)
@click.option(
    "--commit-every",
    type=click.IntRange(min=1),
    default=2048,
    help="Vectors written between commits (a kill loses at most this much work).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    show_default="on when stderr is a terminal",
    help="Show a progress bar on stderr.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def sync(roots: tuple[str, ...], index_dir: str, model: str, rebuild: bool, factory: str | None,
         batch_size: int, commit_every: int, progress: bool | None, as_json: bool) -> None:  # fmt: skip
    """Scan ROOTS (folders or files) and bring the index in sync with them."""
    from engine.search import load_embedder, model_source
    from indexer.runner import index_folders
    from indexer.writer import WriterConfig

    summary = index_folders(
        roots, index_dir, load_embedder(model), model_source=model_source(model),
        rebuild=rebuild, batch_size=batch_size,
        writer_config=WriterConfig(factory=factory, commit_every=commit_every),
        progress=sys.stderr.isatty() if progress is None else progress,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    s = summary
    click.echo(f"{s.scanned} files: {s.added} added, {s.updated} updated, {s.renamed} renamed, "
               f"{s.unchanged} unchanged, {s.removed} removed, {s.failed} failed; "
               f"{s.items} vectors in {s.seconds:.1f} s ({s.items_per_s:.1f} items/s)")  # fmt: skip
    for path, reason in s.errors:
        click.echo(f"  skipped {path}: {reason}", err=True)


@index.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False),
              required=True, help="Index directory.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the removed paths as JSON.")
def remove(paths: tuple[str, ...], index_dir: str, as_json: bool) -> None:
    """Drop PATHS (files, or folders: everything under them) from the index.

    Files on disk are not touched; PATHS need not exist any more.
    """
    from indexer.runner import remove_paths

    removed = remove_paths(index_dir, paths)
    if as_json:
        click.echo(json.dumps(removed, indent=2))
        return
    click.echo(f"removed {len(removed)} files")


@index.command()
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False),
              required=True, help="Index directory.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the errors as JSON.")
def errors(index_dir: str, as_json: bool) -> None:
    """List the files indexing skipped, with the reason for each."""
    from engine.store import Store

    store = Store.open(index_dir)
    try:
        records = store.errors()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([{"path": e.path, "reason": e.reason, "time": e.time}
                               for e in records], indent=2))  # fmt: skip
        return
    if not records:
        click.echo("no errors", err=True)
    for e in records:
        click.echo(f"{e.path}: {e.reason}")
