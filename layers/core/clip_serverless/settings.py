"""Configuration: every environment variable the package reads, parsed and validated once, at start.

:meth:`Settings.from_env` runs once per process (the local server's start, a Lambda function's init). A bad
value raises :class:`SettingsError` naming the variable, so start-up stops with a message that says what to
fix: the local server prints it and exits with status 2, a Lambda function fails its init. Nothing else in
the package reads the environment for its configuration; each consumer receives its part:

- ``model_dir``: ``CLIP_MODEL_DIR`` (required), opened by ``api.app.build``;
- request limits, ``truncate_text``, ``text_batch_size``: ``CLIP_MAX_BATCH_SIZE``, ``CLIP_MAX_BODY_BYTES``,
  ``CLIP_MAX_RESPONSE_BYTES``, ``CLIP_TRUNCATE_TEXT``, ``CLIP_TEXT_BATCH_SIZE``: the routes, the body limit,
  ``ClipService``;
- ``api_key_holder``: ``CLIP_API_KEY``, ``CLIP_API_KEY_SECRET_ID``, ``CLIP_API_KEY_SSM_PARAMETER``
  (``aws_lambda.secrets``): the routes, and SnapStart's after-restore hook, which re-reads the store;
- ``url`` (:class:`UrlSettings`): ``CLIP_ALLOW_URL_INPUT``, ``CLIP_ALLOW_HTTP_URLS``, ``CLIP_URL_*``: the
  image loader;
- ``engine`` (:class:`EngineSettings`): ``CLIP_NUM_THREADS``, ``CLIP_ORT_SPINNING``, ``CLIP_ORT_CPU_MEM_ARENA``,
  ``CLIP_ORT_MEM_PATTERN`` (unset: the endpoint's default), ``CLIP_MAX_IMAGE_PIXELS``, ``CLIP_IMAGE_DECODE``:
  ``ClipService`` and its encoders;
- ``text_function`` (:class:`TextFunctionSettings`): ``CLIP_TEXT_FUNCTION``, ``CLIP_TEXT_FUNCTION_TIMEOUT``;
- ``image_function`` (:class:`ImageFunctionSettings`): ``CLIP_IMAGE_FUNCTION``, ``CLIP_IMAGE_FUNCTION_TIMEOUT``;
- ``cache`` (``CacheConfig``): ``CLIP_CACHE*``, parsed by ``cache.config``: the embedding cache;
- ``aws_lambda`` (:class:`LambdaSettings`): ``CLIP_PRELOAD``, ``CLIP_BASE_PATH``: ``aws_lambda.entry``;
- ``server`` (:class:`ServerSettings`): ``HOST``, ``PORT``: ``api.local``.

Defaults and meanings: README.md, "Configuration". The engine keeps working without any of this (library
use): its defaults are :class:`EngineSettings`'.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .api.url_fetch import UrlPolicy
from .aws_lambda.secrets import ApiKey
from .cache.config import CacheConfig
from .engine import IMAGE_DECODES
from .engine import EngineSettings as EngineSettings  # re-exported: a part of Settings
from .envparse import SettingsError as SettingsError  # re-exported: raised by Settings.from_env
from .envparse import env_bool, env_choice, env_float, env_int, env_str
from .types import Tower

Environ = Mapping[str, str]

# -- size limits: a synchronous Lambda invocation carries at most 6 MiB each way -------------------------
LAMBDA_PAYLOAD_BYTES = 6 * 1024 * 1024
# The request: the body travels inside the API Gateway event as a JSON string (each quote, backslash and
# line break escaped: BodyLimit counts them twice), next to the headers and query (HTTP and REST APIs allow
# 10 KiB of request line and headers; a REST (v1) event carries headers and query twice), requestContext
# (~1 KiB; more with an authorizer's context) and the event's own keys. 32 KiB covers them.
EVENT_ALLOWANCE_BYTES = 32 * 1024
DEFAULT_MAX_BODY_BYTES = LAMBDA_PAYLOAD_BYTES - EVENT_ALLOWANCE_BYTES  # 6,258,688
# The response: Mangum returns {"statusCode", "headers", "body", "isBase64Encoded"}, the JSON body as an
# escaped string. The allowance covers status, fixed headers and framing; the X-Clip-Truncated-Texts
# header, which grows with the number of texts, is counted by worst_case_response_bytes.
RESPONSE_ALLOWANCE_BYTES = 16 * 1024
DEFAULT_MAX_RESPONSE_BYTES = LAMBDA_PAYLOAD_BYTES - RESPONSE_ALLOWANCE_BYTES  # 6,275,072
# The longest float Python writes (repr, which Starlette's compact JSONResponse uses): sign, 17 digits,
# point, exponent, e.g. -2.2250738585072014e-308. A float32 embedding value takes at most 23.
MAX_FLOAT_CHARS = 24


def worst_case_response_bytes(count: int, embed_dim: int) -> int:
    """The most ``count`` embeddings of width ``embed_dim`` can weigh in Lambda's response payload.

    Counted: the body ``{"inference_id":null,"frame_id":null,"time":T,"embeddings":[[...],...]}`` escaped
    as a JSON string (the quotes of the keys), every float and ``time`` at ``MAX_FLOAT_CHARS``, and the
    ``X-Clip-Truncated-Texts`` value when every text was truncated (``0,1,...,count-1``)."""
    skeleton = '{"inference_id":null,"frame_id":null,"time":' + "0" * MAX_FLOAT_CHARS + ',"embeddings":[]}'
    rows = count * (embed_dim * (MAX_FLOAT_CHARS + 1) + 1) + max(count - 1, 0)  # [f,...,f] joined by commas
    digits, low, width = 0, 0, 1
    while low < count:  # the digits of 0..count-1
        high = 10**width
        digits += (min(count, high) - low) * width
        low, width = high, width + 1
    return len(json.dumps(skeleton)) + rows + digits + max(count - 1, 0)


def max_embeddings_per_response(embed_dim: int, max_response_bytes: int) -> int:
    """The most embeddings of width ``embed_dim`` whose response fits ``max_response_bytes`` in the worst case."""
    low, high = 0, max_response_bytes // (embed_dim * (MAX_FLOAT_CHARS + 1)) + 1  # high never fits
    while high - low > 1:
        middle = (low + high) // 2
        if worst_case_response_bytes(middle, embed_dim) <= max_response_bytes:
            low = middle
        else:
            high = middle
    return low


# -- the parts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UrlSettings:
    """Whether image URLs are accepted, and the limits of fetching them (the service's SSRF surface)."""

    enabled: bool = True
    policy: UrlPolicy = field(default_factory=UrlPolicy)

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> UrlSettings:
        return cls(
            enabled=env_bool("CLIP_ALLOW_URL_INPUT", True, environ),
            policy=UrlPolicy(
                allow_http=env_bool("CLIP_ALLOW_HTTP_URLS", False, environ),
                connect_timeout=env_float("CLIP_URL_CONNECT_TIMEOUT", 3.0, environ),
                read_timeout=env_float("CLIP_URL_READ_TIMEOUT", 10.0, environ),
                total_timeout=env_float("CLIP_URL_TOTAL_TIMEOUT", 15.0, environ),
                max_bytes=env_int("CLIP_URL_MAX_BYTES", 20 * 1024 * 1024, environ=environ),
                max_redirects=env_int("CLIP_URL_MAX_REDIRECTS", 3, minimum=0, environ=environ),
            ),
        )


def env_optional_bool(name: str, environ: Environ | None = None) -> bool | None:
    """``name`` as a bool, or None when it is unset (the endpoint's default applies)."""
    return env_bool(name, False, environ) if env_str(name, None, environ) else None


def engine_from_env(environ: Environ | None = None) -> EngineSettings:
    """:class:`EngineSettings` from ``CLIP_NUM_THREADS``, ``CLIP_ORT_SPINNING``, ``CLIP_ORT_CPU_MEM_ARENA``,
    ``CLIP_ORT_MEM_PATTERN`` (each unset: None, the endpoint's default, ``api.endpoints``),
    ``CLIP_MAX_IMAGE_PIXELS`` and ``CLIP_IMAGE_DECODE``."""
    threads = env_int("CLIP_NUM_THREADS", 1, environ=environ) if env_str("CLIP_NUM_THREADS", None, environ) else None
    default_pixels = EngineSettings().max_image_pixels
    return EngineSettings(threads=threads,
                          spinning=env_optional_bool("CLIP_ORT_SPINNING", environ),
                          cpu_mem_arena=env_optional_bool("CLIP_ORT_CPU_MEM_ARENA", environ),
                          mem_pattern=env_optional_bool("CLIP_ORT_MEM_PATTERN", environ),
                          max_image_pixels=env_int("CLIP_MAX_IMAGE_PIXELS", default_pixels, environ=environ),
                          image_decode=env_choice("CLIP_IMAGE_DECODE", IMAGE_DECODES, environ))


@dataclass(frozen=True)
class TextFunctionSettings:
    """Another Lambda function that embeds text (``compare`` on AWS: ``embed_text``'s alias), through Invoke."""

    name: str  # function name or alias ARN
    timeout_s: float = 10.0  # seconds to wait for its answer (it may be cold: init included), then 504

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> TextFunctionSettings | None:
        """None when ``CLIP_TEXT_FUNCTION`` is unset (the local text tower embeds); the timeout is checked anyway."""
        timeout_s = env_float("CLIP_TEXT_FUNCTION_TIMEOUT", 10.0, environ)
        name = env_str("CLIP_TEXT_FUNCTION", None, environ)
        return cls(name, timeout_s) if name else None


@dataclass(frozen=True)
class ImageFunctionSettings(TextFunctionSettings):
    """Another Lambda function that embeds images (``embeddings`` on AWS: ``embed_image``'s alias), through Invoke."""

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> ImageFunctionSettings | None:
        timeout_s = env_float("CLIP_IMAGE_FUNCTION_TIMEOUT", 15.0, environ)
        name = env_str("CLIP_IMAGE_FUNCTION", None, environ)
        return cls(name, timeout_s) if name else None


TOWERS: tuple[Tower, ...] = ("visual", "textual")


@dataclass(frozen=True)
class LambdaSettings:
    """What a Lambda function's entry does at init."""

    # CLIP_PRELOAD: the towers to load at init, among the function's own (None: all of them; (): none).
    preload: tuple[Tower, ...] | None = None
    base_path: str = "/"  # CLIP_BASE_PATH: an API Gateway stage or mapping prefix Mangum strips from paths
    # In a Lambda execution environment (the runtime sets AWS_LAMBDA_FUNCTION_NAME; so do the local runners),
    # where this process is the function's own: its entry may change process-wide state (gc.freeze).
    in_lambda: bool = False
    # The function's memory size (AWS_LAMBDA_FUNCTION_MEMORY_SIZE, set by the runtime): its CPU share follows.
    memory_mb: int | None = None

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> LambdaSettings:
        memory = env_str("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", None, environ)
        return cls(preload=_towers("CLIP_PRELOAD", environ),
                   base_path=env_str("CLIP_BASE_PATH", "/", environ) or "/",
                   in_lambda=bool(env_str("AWS_LAMBDA_FUNCTION_NAME", None, environ)),
                   memory_mb=env_int("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", 0, environ=environ) if memory else None)


def _towers(name: str, environ: Environ | None) -> tuple[Tower, ...] | None:
    """Unset: None; ``none``: (); else a comma-separated list of tower names, each one known."""
    raw = (env_str(name, "", environ) or "").lower()
    if not raw:
        return None
    if raw == "none":
        return ()
    names = [part.strip() for part in raw.split(",")]
    if not names or any(part not in TOWERS for part in names):
        raise SettingsError(f"{name} must be 'none' or a comma-separated list of {', '.join(TOWERS)}, got {raw!r}")
    return tuple(tower for tower in TOWERS if tower in names)


@dataclass(frozen=True)
class ServerSettings:
    """The local server's address (``make serve``, ``python -m clip_serverless.api.local``)."""

    host: str = "127.0.0.1"
    port: int = 9001

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> ServerSettings:
        port = env_int("PORT", 9001, minimum=0, environ=environ)  # 0: any free port
        if port > 65535:
            raise SettingsError(f"PORT must be at most 65535, got {port}")
        return cls(host=env_str("HOST", "127.0.0.1", environ) or "127.0.0.1", port=port)


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    max_batch_size: int = 8  # images per embed_image call, prompts per compare call (Roboflow's limit)
    text_batch_size: int = 32  # internal batching of long text lists
    truncate_text: bool = True  # False: over-long text is a 400 instead of being cut to 77 tokens
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # the body as a Lambda event would carry it (see above)
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # bounds the texts per embed_text call
    # The key holder, not the key: SnapStart's after-restore hook re-reads it (snapstart.py). Default: open.
    api_key_holder: ApiKey = field(default_factory=ApiKey, repr=False, compare=False)
    url: UrlSettings = field(default_factory=UrlSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    text_function: TextFunctionSettings | None = None  # None: the local text tower
    image_function: ImageFunctionSettings | None = None  # None: the local image tower
    cache: CacheConfig = field(default_factory=CacheConfig)
    aws_lambda: LambdaSettings = field(default_factory=LambdaSettings)
    server: ServerSettings = field(default_factory=ServerSettings)

    @classmethod
    def from_env(cls, environ: Environ | None = None, *, key_in_background: bool = False) -> Settings:
        """Every variable, read now from ``environ`` (default: this process's environment).

        Raises :class:`SettingsError` naming the first bad variable; reading the API key from its store
        comes last (after every cheap check) and raises ``ApiKeyUnavailable`` when it fails. With
        ``key_in_background`` (Lambda init) that read runs in a thread: ``api_key_holder.wait()`` raises
        its failure."""
        env = dict(os.environ) if environ is None else environ  # one snapshot for every part
        model_dir = env_str("CLIP_MODEL_DIR", None, env)
        if not model_dir:
            raise SettingsError("CLIP_MODEL_DIR is not set: it names the model directory to serve "
                                "(`make serve` sets models/clip-tiny, the demo model; the Lambda functions /opt/model)")
        return cls(
            model_dir=Path(model_dir),
            max_batch_size=env_int("CLIP_MAX_BATCH_SIZE", 8, environ=env),
            text_batch_size=env_int("CLIP_TEXT_BATCH_SIZE", 32, environ=env),
            truncate_text=env_bool("CLIP_TRUNCATE_TEXT", True, env),
            max_body_bytes=env_int("CLIP_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, environ=env),
            max_response_bytes=env_int("CLIP_MAX_RESPONSE_BYTES", DEFAULT_MAX_RESPONSE_BYTES, environ=env),
            url=UrlSettings.from_env(env),
            engine=engine_from_env(env),
            text_function=TextFunctionSettings.from_env(env),
            image_function=ImageFunctionSettings.from_env(env),
            cache=CacheConfig.from_env(env),
            aws_lambda=LambdaSettings.from_env(env),
            server=ServerSettings.from_env(env),
            # Last (arguments are evaluated in order): CLIP_API_KEY, else Secrets Manager or SSM (secrets.py),
            # which reads over the network; no read happens when another value is bad.
            api_key_holder=ApiKey.from_env(env, background=key_in_background),
        )

    @property
    def api_key(self) -> str | None:
        """The key callers must present (None: the API is open), read per request so a renewal takes effect.
        Raises ApiKeyUnavailable (a 500, never an open API) after a failed re-read."""
        return self.api_key_holder.get()
