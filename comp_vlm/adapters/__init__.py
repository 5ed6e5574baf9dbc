"""Model adapters, one file per family, registered by model class."""

from . import clip, llava  # noqa: F401
