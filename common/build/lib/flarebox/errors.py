"""The one exception type for a case that cannot be processed, and for a bad configuration."""

from __future__ import annotations


class CaseError(Exception):
    """A single input case cannot be processed; carries the file and a one-line reason."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ConfigError(Exception):
    """A configuration or model folder is unusable; raised at start, before any case is touched."""
