"""Model adapters, one file per family, registered by model class."""

from . import blip, clip, llava, siglip  # noqa: F401
