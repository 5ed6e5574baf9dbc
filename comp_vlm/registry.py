"""The one rule of comp-vlm's registries (tasks, task data, presets, dense builders, VQA collators): a key is
registered once, and a second registration is a ConfigError naming what was registered."""

from __future__ import annotations

from typing import Any, TypeVar

from .errors import ConfigError

V = TypeVar("V")


def register_once(table: dict[Any, V], key: Any, value: V, what: str) -> V:
    """Put ``value`` into ``table`` under ``key`` and return it; ``what`` names the entry in the error when ``key``
    is already there."""
    if key in table:
        raise ConfigError(f"{what} is already registered")
    table[key] = value
    return value
