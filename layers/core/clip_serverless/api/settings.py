"""Configuration from the environment, read once per process and validated with clear messages."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .secrets import ApiKey
from .url_fetch import UrlPolicy

DEMO_MODEL_DIR = Path(__file__).resolve().parents[4] / "models" / "clip-tiny"


class SettingsError(ValueError):
    pass


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class UrlSettings:
    """Whether image URLs are accepted, and the limits of fetching them (the service's SSRF surface)."""

    enabled: bool = True
    policy: UrlPolicy = field(default_factory=UrlPolicy)

    @classmethod
    def from_env(cls) -> UrlSettings:
        return cls(
            enabled=_bool("CLIP_ALLOW_URL_INPUT", True),
            policy=UrlPolicy(
                allow_http=_bool("CLIP_ALLOW_HTTP_URLS", False),
                connect_timeout=_float("CLIP_URL_CONNECT_TIMEOUT", 3.0),
                read_timeout=_float("CLIP_URL_READ_TIMEOUT", 10.0),
                total_timeout=_float("CLIP_URL_TOTAL_TIMEOUT", 15.0),
                max_bytes=_int("CLIP_URL_MAX_BYTES", 20 * 1024 * 1024),
                max_redirects=_int("CLIP_URL_MAX_REDIRECTS", 3, minimum=0),
            ),
        )


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    max_batch_size: int = 8  # images per embed_image call, prompts per compare call (Roboflow's limit)
    text_batch_size: int = 32  # internal batching of long text lists
    truncate_text: bool = True  # False: over-long text is a 400 instead of being cut to 77 tokens
    max_body_bytes: int = 6 * 1024 * 1024  # Lambda's synchronous payload limit
    max_image_pixels: int = 64_000_000
    # The key holder, not the key: SnapStart's after-restore hook re-reads it (snapstart.py). Default: open.
    api_key_holder: ApiKey = field(default_factory=ApiKey, repr=False, compare=False)
    url: UrlSettings = field(default_factory=UrlSettings)

    @classmethod
    def from_env(cls) -> Settings:
        model_dir = os.environ.get("CLIP_MODEL_DIR", "").strip()
        return cls(
            model_dir=Path(model_dir) if model_dir else DEMO_MODEL_DIR,
            max_batch_size=_int("CLIP_MAX_BATCH_SIZE", 8),
            text_batch_size=_int("CLIP_TEXT_BATCH_SIZE", 32),
            truncate_text=_bool("CLIP_TRUNCATE_TEXT", True),
            max_body_bytes=_int("CLIP_MAX_BODY_BYTES", 6 * 1024 * 1024),
            max_image_pixels=_int("CLIP_MAX_IMAGE_PIXELS", 64_000_000),
            api_key_holder=ApiKey.from_env(),  # CLIP_API_KEY, else Secrets Manager / SSM (secrets.py)
            url=UrlSettings.from_env(),
        )

    @property
    def api_key(self) -> str | None:
        """The key callers must present (None: the API is open), read per request so a renewal takes effect.
        Raises ApiKeyUnavailable (a 500, never an open API) after a failed re-read."""
        return self.api_key_holder.get()
