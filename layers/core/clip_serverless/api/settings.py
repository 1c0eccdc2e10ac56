"""Configuration from the environment, read once per process and validated with clear messages."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..aws_lambda.secrets import ApiKey
from ..envparse import SettingsError as SettingsError  # re-exported: raised by Settings.from_env
from ..envparse import env_bool, env_float, env_int
from .url_fetch import UrlPolicy

DEMO_MODEL_DIR = Path(__file__).resolve().parents[4] / "models" / "clip-tiny"

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


# One parsing style for every variable (envparse): a bad value stops start-up, naming the variable.
_int, _float, _bool = env_int, env_float, env_bool


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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # the body as a Lambda event would carry it (see above)
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # bounds the texts per embed_text call
    max_image_pixels: int = 64_000_000
    # The key holder, not the key: SnapStart's after-restore hook re-reads it (snapstart.py). Default: open.
    api_key_holder: ApiKey = field(default_factory=ApiKey, repr=False, compare=False)
    url: UrlSettings = field(default_factory=UrlSettings)
    # Another Lambda function that embeds text (compare on AWS: embed_text's alias); None: the local tower.
    text_function: str | None = None
    text_function_timeout: float = 10.0  # seconds to wait for its answer (it may be cold: init included)

    @classmethod
    def from_env(cls) -> Settings:
        model_dir = os.environ.get("CLIP_MODEL_DIR", "").strip()
        return cls(
            model_dir=Path(model_dir) if model_dir else DEMO_MODEL_DIR,
            max_batch_size=_int("CLIP_MAX_BATCH_SIZE", 8),
            text_batch_size=_int("CLIP_TEXT_BATCH_SIZE", 32),
            truncate_text=_bool("CLIP_TRUNCATE_TEXT", True),
            max_body_bytes=_int("CLIP_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            max_response_bytes=_int("CLIP_MAX_RESPONSE_BYTES", DEFAULT_MAX_RESPONSE_BYTES),
            max_image_pixels=_int("CLIP_MAX_IMAGE_PIXELS", 64_000_000),
            api_key_holder=ApiKey.from_env(),  # CLIP_API_KEY, else Secrets Manager / SSM (secrets.py)
            url=UrlSettings.from_env(),
            text_function=os.environ.get("CLIP_TEXT_FUNCTION", "").strip() or None,
            text_function_timeout=_float("CLIP_TEXT_FUNCTION_TIMEOUT", 10.0),
        )

    @property
    def api_key(self) -> str | None:
        """The key callers must present (None: the API is open), read per request so a renewal takes effect.
        Raises ApiKeyUnavailable (a 500, never an open API) after a failed re-read."""
        return self.api_key_holder.get()
