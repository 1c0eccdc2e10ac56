"""Reading environment variables, one style for every setting: a bad value raises :class:`SettingsError`
naming the variable, so start-up stops with a message that says what to fix.

A leaf module (standard library only): the settings module and every config that parses its own variables
use these helpers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable."""


def _raw(environ: Mapping[str, str] | None, name: str) -> str:
    return (os.environ if environ is None else environ).get(name, "").strip()


def env_str(name: str, default: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    return _raw(environ, name) or default


def env_int(name: str, default: int, minimum: int = 1, environ: Mapping[str, str] | None = None) -> int:
    raw = _raw(environ, name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    raw = _raw(environ, name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def env_choice(name: str, choices: tuple[str, ...], environ: Mapping[str, str] | None = None) -> str:
    """``name``, lower-cased, one of ``choices``; unset: the first choice."""
    raw = _raw(environ, name).lower()
    if not raw:
        return choices[0]
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    raw = _raw(environ, name).lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")
