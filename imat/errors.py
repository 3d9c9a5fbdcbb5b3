"""The one error family of imat.

Every error a user can cause (a bad file, a bad option, a model that does not
match an index) is an ImatError whose message names the file, row or option at
fault and says what to do. The CLI prints it as one line; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class ImatError(Exception):
    """Base class: a user-facing failure with a clear, one-line message."""


class DataError(ImatError):
    """A dataset file (train.csv, label_descriptions.json, a prepared dataset) is missing or malformed."""


class ImageDecodeError(DataError):
    """An image file is corrupt, truncated, empty, too large or not an image."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(ImatError):
    """An option or configuration value is invalid."""


class ModelError(ImatError):
    """A model file, checkpoint or weight file is missing, corrupt or incompatible."""


class IndexFileError(ImatError):
    """An index directory is missing, corrupt, or was built by a different model."""
