"""Exceptions raised by comp-vlm. All derive from :class:`CompVLMError` so callers (and the CLI) can catch one type."""

from __future__ import annotations


class CompVLMError(Exception):
    """Base class of every error comp-vlm raises on bad input or state."""


class UnsupportedModelError(CompVLMError, TypeError):
    """The model's class has no registered adapter."""


class RecipeError(CompVLMError, ValueError):
    """A pruning recipe is malformed, corrupt, or does not match the model it is applied to."""


class CheckpointError(CompVLMError, OSError):
    """A saved model directory is missing files or holds corrupt ones."""


class ConfigError(CompVLMError, ValueError):
    """An option or argument is outside its valid range."""


class NonFiniteError(CompVLMError, ValueError):
    """A loss or an importance statistic became NaN/inf (the message names which)."""


class DataError(CompVLMError, ValueError):
    """A dataset file or folder is missing, malformed or inconsistent, or a source package is not installed (the
    message names the file and the entry, or the package)."""


class OutputError(CompVLMError, OSError):
    """An output directory that comp-vlm must not or cannot write (foreign files, the model or current directory,
    an earlier output without overwrite, no write permission)."""
