"""Errors that xmodal raises on purpose: each names what went wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path


class XmodalError(Exception):
    """Base class for every error xmodal raises for bad input or a bad state."""


class MediaError(XmodalError):
    """A media file could not be read or decoded; names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelError(XmodalError):
    """A model bundle is missing, malformed or cannot be built from its config."""


class IndexStateError(XmodalError):
    """An index directory is missing, inconsistent or was built by another model."""


class QueryError(XmodalError):
    """A query is empty, unreadable, or asks for something the index cannot answer."""


class SettingError(XmodalError, ValueError):
    """An `XMODAL_*` environment variable holds a value xmodal does not understand."""
