"""Retrieval evaluation: recall@k in every direction a manifest allows.

Scoring is kept apart from encoding: `recall_at_k` is a pure function of vectors and relevance
sets, `build_eval_set` fixes the candidates and relevance of a manifest (and so the row order
of any precomputed vectors), and `evaluate` encodes only what it was not given.

Candidates are every distinct image, every distinct (image, caption) pair as a text, and every
distinct non-empty audio. Relevance goes through the caption text, since identical texts are
identical queries: a text is relevant to every image that some row pairs with that caption
text (normally just its own image), and an audio stands for its row's caption, so it is
relevant to the texts with that caption and to their images.

Candidates are ranked as search ranks them: by cosine, minus the model's hubness penalty
(`engine.hubness`) when it has query banks, unless scoring is asked for without it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from engine.embedder import l2_normalize
from engine.errors import XmodalError

if TYPE_CHECKING:
    from engine.embedder import Embedder
    from trainer.manifest import Manifest

log = logging.getLogger(__name__)

KS = (1, 5, 10)  # the recall cut-offs reported by default
MAX_BLOCK = 1 << 22  # similarity entries scored at once (16 MiB of float32)
DIRECTIONS = (
    "text->image",
    "image->text",
    "speech->image",
    "image->speech",
    "text->speech",
    "speech->text",
)

Result = dict[str, float | int]  # {"R@1": %, "R@5": %, "R@10": %, "queries": n, "candidates": m}
T = TypeVar("T")


def recall_at_k(
    query_vecs: np.ndarray,
    cand_vecs: np.ndarray,
    relevant: Sequence[set[int] | frozenset[int]],
    ks: Sequence[int] = KS,
    *,
    cand_penalty: np.ndarray | None = None,
) -> Result:
    """Recall@k in percent of `(n, d)` queries against `(m, d)` candidates, by inner product
    (minus `cand_penalty[j]` for candidate j, if given: hubness correction).

    Pass L2-normalized float32 rows so the inner product is the cosine. `relevant[i]` holds the
    candidate indices that count as a hit for query i (at least one). A query is a hit at k if
    a relevant candidate is among its k best. Ties are broken against the query: every
    non-relevant candidate scoring at least as high as the best relevant one ranks above it,
    so a collapsed model (all scores equal) scores 0, not 100. Exact; scored in row blocks of
    at most `MAX_BLOCK` entries, so memory stays small for any n.
    Returns `{"R@k": float for each k, "queries": n, "candidates": m}`.
    """
    queries, cands = _as_matrix(query_vecs, "query_vecs"), _as_matrix(cand_vecs, "cand_vecs")
    _check_recall_inputs(queries, cands, relevant, ks)
    if cand_penalty is not None:
        cand_penalty = np.asarray(cand_penalty, dtype=np.float32)
        if cand_penalty.shape != (len(cands),) or not np.isfinite(cand_penalty).all():
            raise ValueError(f"cand_penalty must be {len(cands)} finite values")
    ranks = best_relevant_ranks(queries, cands, relevant, cand_penalty)
    # hits * 100 / n, not 100 * mean: the nearest float to the percentage (82.4, not 82.39…)
    result: Result = {f"R@{k}": int(np.count_nonzero(ranks < k)) * 100 / len(ranks) for k in ks}
    result["queries"], result["candidates"] = len(queries), len(cands)
    return result


def best_relevant_ranks(
    queries: np.ndarray,
    cands: np.ndarray,
    relevant: Sequence[set[int] | frozenset[int]],
    cand_penalty: np.ndarray | None = None,
) -> np.ndarray:
    """`(n,)` int64: 0-based rank of each query's best relevant candidate, ties pessimistic;
    scores are inner products minus `cand_penalty` `(m,)` when given."""
    n, m = len(queries), len(cands)
    rows_per_block = max(1, MAX_BLOCK // max(m, 1))
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, rows_per_block):
        stop = min(start + rows_per_block, n)
        scores = queries[start:stop] @ cands.T
        if cand_penalty is not None:
            scores -= cand_penalty
        mask = _relevance_mask(relevant[start:stop], m)
        best = np.where(mask, scores, -np.inf).max(axis=1, keepdims=True)
        ranks[start:stop] = ((scores >= best) & ~mask).sum(axis=1)
    return ranks


def _relevance_mask(relevant: Sequence[set[int] | frozenset[int]], m: int) -> np.ndarray:
    mask = np.zeros((len(relevant), m), dtype=bool)
    rows = np.repeat(np.arange(len(relevant)), [len(r) for r in relevant])
    cols = np.fromiter((c for r in relevant for c in r), dtype=np.int64, count=len(rows))
    mask[rows, cols] = True
    return mask


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite values; the encoder produced bad vectors")
    return x


def _check_recall_inputs(
    queries: np.ndarray,
    cands: np.ndarray,
    relevant: Sequence[set[int] | frozenset[int]],
    ks: Sequence[int],
) -> None:
    if queries.shape[1] != cands.shape[1]:
        raise ValueError(f"queries are {queries.shape[1]}-d but candidates {cands.shape[1]}-d")
    if len(relevant) != len(queries):
        raise ValueError(f"{len(relevant)} relevance sets for {len(queries)} queries")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive cut-offs, got {tuple(ks)}")
    for i, rel in enumerate(relevant):
        if not rel:
            raise ValueError(f"query {i} has no relevant candidate; leave such queries out")
        if min(rel) < 0 or max(rel) >= len(cands):
            raise ValueError(f"query {i} names candidate(s) outside 0..{len(cands) - 1}: {rel}")


@dataclass(frozen=True)
class EvalSet:
    """Candidates of a manifest and which of them are relevant to which."""

    images: tuple[Path, ...]  # distinct images; image vectors follow this order
    texts: tuple[str, ...]  # caption of each distinct (image, caption); text vectors follow it
    audios: tuple[Path, ...]  # distinct non-empty audio; speech vectors follow this order
    text_images: tuple[frozenset[int], ...]  # per text: images it describes
    audio_texts: tuple[frozenset[int], ...]  # per audio: texts with its caption
    audio_images: tuple[frozenset[int], ...]  # per audio: images its caption describes

    def relevance(self, direction: str) -> tuple[list[int], list[frozenset[int]]]:
        """Query indices and their relevant candidate sets for one of `DIRECTIONS`.

        Images or texts that no audio speaks about are left out as queries toward speech.
        """
        forward = {
            "text->image": self.text_images,
            "speech->image": self.audio_images,
            "speech->text": self.audio_texts,
        }
        backward = {
            "image->text": (self.text_images, len(self.images)),
            "image->speech": (self.audio_images, len(self.images)),
            "text->speech": (self.audio_texts, len(self.texts)),
        }
        if direction in forward:
            sets = forward[direction]
            return list(range(len(sets))), list(sets)
        if direction not in backward:
            raise XmodalError(f"unknown direction {direction!r}; available: {DIRECTIONS}")
        inverted = _invert(*backward[direction])
        queries = [i for i, rel in enumerate(inverted) if rel]
        return queries, [inverted[i] for i in queries]


def _invert(sets: Sequence[frozenset[int]], size: int) -> list[frozenset[int]]:
    out: list[set[int]] = [set() for _ in range(size)]
    for i, targets in enumerate(sets):
        for t in targets:
            out[t].add(i)
    return [frozenset(s) for s in out]


def build_eval_set(manifest: Manifest) -> EvalSet:
    """Candidates and relevance of a manifest's usable rows (see the module docstring)."""
    images = manifest.images
    image_index = {path: i for i, path in enumerate(images)}
    pairs = list(dict.fromkeys((row.image, row.caption) for row in manifest.rows))
    images_of_caption: dict[str, set[int]] = defaultdict(set)
    texts_of_caption: dict[str, set[int]] = defaultdict(set)
    for t, (image, caption) in enumerate(pairs):
        images_of_caption[caption].add(image_index[image])
        texts_of_caption[caption].add(t)
    audios = manifest.audios
    captions_of_audio: dict[Path, set[str]] = defaultdict(set)
    for row in manifest.rows:
        if row.audio is not None:
            captions_of_audio[row.audio].add(row.caption)

    def union(lookup: Mapping[str, set[int]], captions: set[str]) -> frozenset[int]:
        return frozenset().union(*(lookup[c] for c in captions))

    return EvalSet(
        images=images,
        texts=tuple(caption for _, caption in pairs),
        audios=audios,
        text_images=tuple(frozenset(images_of_caption[c]) for _, c in pairs),
        audio_texts=tuple(union(texts_of_caption, captions_of_audio[a]) for a in audios),
        audio_images=tuple(union(images_of_caption, captions_of_audio[a]) for a in audios),
    )


def evaluate(
    manifest: Manifest,
    embedder: Embedder | None = None,
    *,
    text_vectors: np.ndarray | None = None,
    image_vectors: np.ndarray | None = None,
    speech_vectors: np.ndarray | None = None,
    speech_branches: Mapping[str, np.ndarray] | None = None,
    branches: Sequence[str] = (),
    batch_size: int = 32,
    ks: Sequence[int] = KS,
    progress: bool = False,
    hubness: bool = True,
) -> dict[str, Result]:
    """Recall@k for every direction the manifest allows, keyed like `"text->image"`.

    Vectors not given are encoded with `embedder` (texts, images decoded with
    `engine.media.load_image`, audio with `load_audio`, `batch_size` at a time); given vectors
    must follow the row order of `build_eval_set(manifest)`. Speech directions appear when the
    manifest has audio and speech vectors are given or an embedder can make them.
    `speech_branches` adds named speech vector sets, e.g. `{"parallel": (n_audio, d)}`, scored
    under keys like `"speech(parallel)->image"`; `branches` (e.g. `("cascaded", "parallel")`)
    has the embedder make such sets instead of its default speech vectors (see
    `embed_audio_branches`). Each value is `recall_at_k`'s dict. With `hubness`, candidates
    are ranked with the embedder's hubness penalty (`hub_penalty`), if it has one.
    """
    eval_set = build_eval_set(manifest)
    if not eval_set.texts:
        raise XmodalError(f"{manifest.path}: no usable rows to evaluate")
    if embedder is None and (text_vectors is None or image_vectors is None):
        raise XmodalError("evaluate needs an embedder, or both text_vectors and image_vectors")
    if text_vectors is None:
        text_vectors = embed_texts(
            eval_set.texts, embedder, batch_size=batch_size, progress=progress
        )
    if image_vectors is None:
        image_vectors = embed_image_files(
            eval_set.images, embedder, batch_size=batch_size, progress=progress
        )
    speech_sets: dict[str, np.ndarray] = {}
    can_embed_speech = bool(eval_set.audios) and embedder is not None
    if can_embed_speech and speech_vectors is None and not branches:
        speech_vectors = embed_audio_files(
            eval_set.audios, embedder, batch_size=batch_size, progress=progress
        )
    if eval_set.audios and speech_vectors is not None:
        speech_sets["speech"] = speech_vectors
    named = dict(speech_branches or {})
    if can_embed_speech and branches:
        todo = [b for b in branches if b not in named]
        named |= embed_audio_branches(
            eval_set.audios, embedder, todo, batch_size=batch_size, progress=progress
        )
    for name, vectors in named.items():
        speech_sets[f"speech({name})"] = vectors
    penalty = getattr(embedder, "hub_penalty", None) if hubness else None
    return score_eval_set(
        eval_set, text_vectors, image_vectors, speech_sets, ks=ks, penalty=penalty
    )


def score_eval_set(
    eval_set: EvalSet,
    text_vectors: np.ndarray,
    image_vectors: np.ndarray,
    speech_sets: Mapping[str, np.ndarray] | None = None,
    *,
    ks: Sequence[int] = KS,
    penalty: Callable[[np.ndarray, str], np.ndarray | None] | None = None,
) -> dict[str, Result]:
    """Score precomputed vectors; `speech_sets` maps a label ("speech", "speech(parallel)") to
    `(n_audio, d)` vectors. Rows are L2-normalized here. Directions with no query are left out.
    `penalty` maps candidate vectors and their modality to `(m, 2)` hubness penalties
    (`AlignedModel.hub_penalty`; None from it, or no `penalty`: plain cosines).
    """
    vectors = {
        "text": _checked(text_vectors, len(eval_set.texts), "text"),
        "image": _checked(image_vectors, len(eval_set.images), "image"),
    }
    penalties = {m: _penalties(penalty, v, m) for m, v in vectors.items()}
    results: dict[str, Result] = {}
    for direction in DIRECTIONS[:2]:
        results.update(_score_direction(eval_set, direction, vectors, penalties, ks))
    for label, speech in (speech_sets or {}).items():
        labelled = {**vectors, "speech": _checked(speech, len(eval_set.audios), label)}
        with_speech = {**penalties, "speech": _penalties(penalty, labelled["speech"], "speech")}
        for direction in DIRECTIONS[2:]:
            scored = _score_direction(eval_set, direction, labelled, with_speech, ks)
            results.update({key.replace("speech", label): res for key, res in scored.items()})
    return results


def _penalties(
    penalty: Callable[[np.ndarray, str], np.ndarray | None] | None,
    vectors: np.ndarray,
    modality: str,
) -> np.ndarray | None:
    return None if penalty is None or not len(vectors) else penalty(vectors, modality)


def _score_direction(
    eval_set: EvalSet,
    direction: str,
    vectors: Mapping[str, np.ndarray],
    penalties: Mapping[str, np.ndarray | None],
    ks: Sequence[int],
) -> dict[str, Result]:
    from engine.hubness import penalty_column

    queries, relevant = eval_set.relevance(direction)
    if not queries:
        return {}
    source, target = direction.split("->")
    cand_penalty = penalties.get(target)
    if cand_penalty is not None:
        cand_penalty = cand_penalty[:, penalty_column(source)]
    return {
        direction: recall_at_k(
            vectors[source][queries], vectors[target], relevant, ks, cand_penalty=cand_penalty
        )
    }


def _checked(vectors: np.ndarray, rows: int, label: str) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != rows:
        raise XmodalError(
            f"{label} vectors have shape {vectors.shape} but the manifest has {rows} {label} "
            "candidates; recompute them in the order of build_eval_set(manifest)"
        )
    return l2_normalize(vectors)


def embed_texts(
    texts: Sequence[str], embedder: Embedder, *, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """`(n, d)` float32 L2-normalized vectors of `texts`, `batch_size` at a time."""
    return _embed_batches(texts, embedder.embed_text, batch_size, progress, "texts")


def embed_image_files(
    paths: Sequence[Path], embedder: Embedder, *, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """`(n, d)` vectors of image files; a file that fails to decode raises `MediaError`."""
    from engine.media import load_image

    def embed(batch: Sequence[Path]) -> np.ndarray:
        return embedder.embed_images([load_image(p) for p in batch])

    return _embed_batches(paths, embed, batch_size, progress, "images")


def embed_audio_files(
    paths: Sequence[Path], embedder: Embedder, *, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """`(n, d)` speech vectors of audio files; a file that fails to decode raises `MediaError`."""
    from engine.media import load_audio

    def embed(batch: Sequence[Path]) -> np.ndarray:
        return embedder.embed_speech([load_audio(p) for p in batch]).vectors

    return _embed_batches(paths, embed, batch_size, progress, "speech")


def embed_audio_branches(
    paths: Sequence[Path],
    embedder: Embedder,
    branches: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """`{branch: (n, d)}` speech vectors of audio files for each named speech branch.

    For a model with a Whisper tower, `listen` and `combine_speech` (`AlignedModel`), each
    batch is decoded and encoded once and every branch is combined from the same states and
    transcripts; a batch with a clip over Whisper's 30 s window, or another
    embedder, goes through `embed_speech(clips, branch=...)` once per branch.
    """
    from engine.media import SAMPLE_RATE, load_audio

    if not paths or not branches:
        return {b: np.zeros((len(paths), embedder.dim), dtype=np.float32) for b in branches}
    window = 30 * SAMPLE_RATE  # Whisper's context, samples
    shared = all(hasattr(embedder, a) for a in ("listen", "combine_speech"))

    def embed(batch: Sequence[Path]) -> np.ndarray:
        clips = [load_audio(p) for p in batch]
        if shared and all(len(c) <= window for c in clips):
            encoded, heard = embedder.listen(clips)
            parts = [
                embedder.combine_speech(heard, encoded.states, encoded.lengths, b) for b in branches
            ]
        else:
            parts = [embedder.embed_speech(clips, branch=b).vectors for b in branches]
        return np.concatenate([l2_normalize(p) for p in parts], axis=1)

    stacked = _embed_batches(paths, embed, batch_size, progress, "speech")
    return dict(zip(branches, np.split(stacked, len(branches), axis=1), strict=True))


def _embed_batches(
    items: Sequence[T],
    embed: Callable[[Sequence[T]], np.ndarray],
    batch_size: int,
    progress: bool,
    what: str,
) -> np.ndarray:
    if batch_size < 1:
        raise XmodalError(f"batch_size must be at least 1, got {batch_size}")
    starts = range(0, len(items), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"encoding {what}", unit="batch", leave=False)
    parts = [np.asarray(embed(items[s : s + batch_size]), dtype=np.float32) for s in starts]
    log.info("encoded %d %s", len(items), what)
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def format_table(results: Mapping[str, Result]) -> str:
    """A fixed-width table of `evaluate`'s results, one direction per line."""
    if not results:
        return "(no direction to evaluate)"
    ks = [key for key in next(iter(results.values())) if key.startswith("R@")]
    width = max(len("direction"), *(len(name) for name in results))
    header = f"{'direction':<{width}}" + "".join(f"{k:>8}" for k in ks)
    header += f"{'queries':>9}{'candidates':>12}"
    lines = [header, "-" * len(header)]
    for name, res in results.items():
        line = f"{name:<{width}}" + "".join(f"{res[k]:>8.1f}" for k in ks)
        lines.append(line + f"{res['queries']:>9}{res['candidates']:>12}")
    return "\n".join(lines)
