"""Give a model bundle the mean of other bundles' Whisper adapters (a uniform "soup").

    .venv/bin/python scripts/whisper_soup.py BUNDLE FROM_BUNDLE FROM_BUNDLE [...]

Each FROM_BUNDLE carries an adapter trained by `xmodal tune-whisper` from the packaged Whisper
weights. BUNDLE's adapter becomes the mean of their updates, exactly (`WhisperAdapter.mean`:
the factors stacked, so the rank is the sum of theirs); its config then names an adapter.
BUNDLE may be one of the FROM_BUNDLEs. Rebuild indexes that hold speech: the fingerprint
changes. Candidate F of round four (model card, "Whisper adapter (v5)") was the soup of v6's
adapter and E's; it was not shipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ModelConfig  # noqa: E402
from engine.errors import ModelError  # noqa: E402
from engine.model import bundle_fingerprint  # noqa: E402
from engine.speech import WhisperAdapter  # noqa: E402
from trainer.whisper_tune import give_adapter  # noqa: E402


def soup(bundle: Path, sources: list[Path]) -> WhisperAdapter:
    """Write the mean of `sources`' adapters into `bundle`; returns it."""
    adapters = []
    for source in sources:
        if not ModelConfig.load(source).speech.adapter:
            raise ModelError(f"{source}: its config names no Whisper adapter")
        adapters.append(WhisperAdapter.load(source))
    mean = WhisperAdapter.mean(adapters)
    give_adapter(bundle, mean)
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="the bundle to give the mean adapter")
    parser.add_argument("sources", type=Path, nargs="+", help="bundles whose adapters to average")
    args = parser.parse_args()
    if len(args.sources) < 2:
        parser.error("give at least two bundles to average")
    try:
        mean = soup(args.bundle, args.sources)
    except ModelError as exc:
        parser.error(str(exc))
    rank = next(iter(mean.factors.values()))[0].shape[0]
    print(
        f"{args.bundle}: mean of {len(args.sources)} adapters, rank {rank}; fingerprint now "
        f"{bundle_fingerprint(args.bundle)}"
    )


if __name__ == "__main__":
    main()
