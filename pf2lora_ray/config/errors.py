"""The one error type of configuration, and the check that raises it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible; the message names the key."""


def check(ok: bool, key: str, msg: str) -> None:
    """Raise :class:`ConfigError` ``"<key>: <msg>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")
