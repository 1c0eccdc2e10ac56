"""OpenAI's embeddings API over CLIP: ``POST /v1/embeddings`` and ``GET /v1/models``, wire-compatible with
OpenAI's, so its ``openai`` client (and what is built on it) works with only a ``base_url``.

- ``input``: a string or a list of strings: texts by default, images with ``"modality": "image"`` (the
  convention of michaelfeil/infinity; the ``openai`` client sends it through ``extra_body``) as ``data:``
  URIs or https URLs, fetched under the URL policy of the CLIP routes. Lists of token ids are refused:
  OpenAI's ids (tiktoken) mean nothing to CLIP's tokenizer.
- Vectors are L2-normalised, as OpenAI's are (the CLIP routes give the raw projections); the cache holds
  the raw vectors, which are normalised after it. ``encoding_format`` ``base64`` is little-endian float32.
- ``model`` names the served model (``clip/ViT-B-32``) or its version (``ViT-B-32``), or is omitted;
  ``dimensions`` may only be the model's width: a CLIP vector cannot be shortened.
- Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``, with OpenAI's statuses: 400 for
  any invalid body (OpenAI has no 422), 401 without the right key (``Authorization: Bearer``, checked
  before the body is read), 404 ``model_not_found``. (A body over ``CLIP_MAX_BODY_BYTES`` is refused
  before routing, in the ``{"message"}`` shape.)

On AWS this endpoint's function holds the text tower; its image vectors come from the ``embed_image``
function through Lambda ``Invoke`` (``CLIP_IMAGE_FUNCTION``, :class:`~..aws_lambda.tower_function.ImageFunction`).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from ..aws_lambda.tower_function import ImageFunction, TowerFunction, TowerFunctionError
from ..engine.model_dir import MANIFEST_NAME
from ..service import ClipService, ImageDecodeError, OutOfTime, TextTooLong
from ..settings import MAX_FLOAT_CHARS, Settings
from ..types import Float32Array
from .auth import key_matches, query_or_header_key
from .body import JsonBodyRequest
from .deadline import deadline
from .dispatch import InlineOnLambda
from .endpoints import EndpointName, register
from .errors import ApiError, ErrorJSONResponse, ImageLoadError
from .images import ImageLoader
from .schemas import OpenAIEmbeddingRequest, OpenAIErrorResponse

log = logging.getLogger("clip_serverless.request")
KeyGetter = Callable[[], str | None]

MAX_INPUTS = 2048  # OpenAI's own limit on the length of an input list
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": OpenAIErrorResponse} for code in (400, 401, 404, 413)}
_IDS_REFUSED = ("'input' holds token ids: they come from OpenAI's tokenizer (tiktoken), which CLIP does not read. "
              "Send the texts as strings (LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False)).")


# -- errors in OpenAI's shape ------------------------------------------------------------------------------
class OpenAIError(ApiError):
    """An error with OpenAI's ``param`` and ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers)
        self.status_code = status
        self.param = param
        self.code = code


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return ErrorJSONResponse({"error": error}, status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return openai_error(400, "We could not parse the JSON body of your request: it is not valid JSON.")
    loc = [str(part) for part in first.get("loc", ())]
    if loc[:1] != ["body"] or len(loc) < 2:
        return openai_error(400, "The request body must be a JSON object (OpenAI's embeddings request).")
    param = loc[1]
    if first.get("type") == "missing":
        return openai_error(400, f"'{param}' is required.", param=param)
    if param == "input":
        return openai_error(400, "Invalid 'input': send a string or a list of strings.", param=param)
    return openai_error(400, f"Invalid '{param}': {first.get('msg', 'invalid value')}.", param=param)


def _as_openai_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, OpenAIError):
        return openai_error(exc.status_code, exc.message, param=exc.param, code=exc.code, headers=exc.headers)
    if isinstance(exc, ApiError):
        return openai_error(exc.status_code, exc.message, headers=exc.headers)
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):  # body.py's 400 for NaN/Infinity, Starlette's own
        return openai_error(exc.status_code, str(exc.detail), headers=exc.headers)
    if isinstance(exc, TowerFunctionError):  # the image function, on AWS
        retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return openai_error(exc.status, exc.message, param="input" if exc.status in (400, 413) else None,
                            headers=retry)
    # The detail goes to the log only: it may hold paths or library internals.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return openai_error(500, "Internal error.")


def openai_route_class(expected_key: KeyGetter) -> type[APIRoute]:
    """An ``APIRoute`` that checks the key first (query ``api_key`` or ``Authorization: Bearer``; OpenAI's
    bodies carry none), reads JSON strictly (body.py) and answers every error in OpenAI's shape.

    ``expected_key`` is read per request (``Settings.api_key``: a renewed key takes effect at once)."""

    class OpenAIRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handle = super().get_route_handler()

            async def route_handler(request: Request) -> Response:
                strict = JsonBodyRequest(request.scope, request.receive)
                try:
                    expected = expected_key()
                    if expected is not None:
                        presented = query_or_header_key(strict)
                        if presented is None:
                            raise OpenAIError(401, "You didn't provide an API key: send it in an Authorization "
                                                   "header (Authorization: Bearer YOUR_KEY).",
                                              headers={"WWW-Authenticate": "Bearer"})
                        if not key_matches(presented, expected):
                            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key",
                                              headers={"WWW-Authenticate": "Bearer"})
                    return await handle(strict)
                except Exception as exc:
                    return _as_openai_error(request, exc)

            return route_handler

    return OpenAIRoute


# -- the response's size on Lambda -------------------------------------------------------------------------
def worst_case_response_bytes(count: int, embed_dim: int, encoding: str, model_id: str) -> int:
    """The most ``count`` embeddings can weigh in Lambda's response payload, in OpenAI's shape: the body
    escaped as a JSON string, every float at ``MAX_FLOAT_CHARS``, the token counts at 12 digits, and the
    ``X-Clip-Truncated-Texts`` header when every text was cut."""
    row, outer = _escaped_sizes(embed_dim, encoding, model_id)
    return outer + count * (row - 2 + 1) + 2 * _index_digits(count) + count


@functools.cache
def _escaped_sizes(embed_dim: int, encoding: str, model_id: str) -> tuple[int, int]:
    """The escaped length of one row (its index left out) and of the body around the rows: built once, not
    once per count that ``max_inputs`` tries (every app's init runs it)."""
    if encoding == "base64":
        value = '"' + "A" * (4 * -(-4 * embed_dim // 3)) + '"'  # base64 of embed_dim float32
    else:
        value = "[" + ",".join(["0" * MAX_FLOAT_CHARS] * embed_dim) + "]"
    row = '{"object":"embedding","index":,"embedding":' + value + "}"
    outer = ('{"object":"list","data":[],"model":' + json.dumps(model_id) +
             ',"usage":{"prompt_tokens":' + "9" * 12 + ',"total_tokens":' + "9" * 12 + "}}")
    return len(json.dumps(row)), len(json.dumps(outer))


def _index_digits(count: int) -> int:
    """The digits of 0, 1, ..., count - 1 (each row's index, and each in the header)."""
    digits, low, width = 0, 0, 1
    while low < count:
        high = 10**width
        digits += (min(count, high) - low) * width
        low, width = high, width + 1
    return digits


def max_inputs(embed_dim: int, encoding: str, model_id: str, max_response_bytes: int) -> int:
    """The most texts whose answer fits ``max_response_bytes`` (at most OpenAI's 2048)."""
    low, high = 0, MAX_INPUTS + 1
    while high - low > 1:
        middle = (low + high) // 2
        if worst_case_response_bytes(middle, embed_dim, encoding, model_id) <= max_response_bytes:
            low = middle
        else:
            high = middle
    return low


def l2_normalised(vectors: Float32Array) -> Float32Array:
    """Rows scaled to unit length (in float64, returned as float32); a zero row stays zero."""
    wide = vectors.astype(np.float64)
    norms = np.linalg.norm(wide, axis=1, keepdims=True)
    return (wide / np.where(norms > 0, norms, 1.0)).astype(np.float32)


@dataclass
class _Result:
    vectors: Float32Array  # raw
    tokens: int = 0
    truncated: list[int] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)  # the X-Clip-Cache counts


class OpenAIRoutes:
    """The OpenAI-shaped routes, bound to one service and its settings."""

    def __init__(self, service: ClipService, settings: Settings, loader: ImageLoader | None = None,
                 image_function: ImageFunction | None = None) -> None:
        self.service = service
        self.settings = settings
        self.loader = loader or ImageLoader(settings.url)
        remote = settings.image_function
        if image_function is None and remote is not None:
            image_function = ImageFunction(remote.name, service.manifest, timeout_s=remote.timeout_s,
                                           max_images=settings.max_batch_size)
        self.image_function = image_function  # None: the local image tower
        manifest = service.manifest
        self.max_texts = {encoding: max_inputs(manifest.embed_dim, encoding, manifest.model_id,
                                               settings.max_response_bytes) for encoding in ("float", "base64")}
        written = service.model_dir.path / MANIFEST_NAME
        self.card = {"id": manifest.model_id, "object": "model", "created": int(written.stat().st_mtime),
                     "owned_by": "openai" if manifest.provenance.get("source") == "pretrained" else "clip-serverless"}

    @property
    def remote_towers(self) -> list[TowerFunction]:
        """Other functions' towers these routes call (Lambda clients to create at init, renew after a restore)."""
        return [self.image_function] if self.image_function is not None else []

    # -- endpoints ----------------------------------------------------------------------------------
    def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self.card]})

    def embeddings(self, request: Request, body: OpenAIEmbeddingRequest) -> JSONResponse:
        started = time.perf_counter()
        manifest = self.service.manifest
        if body.model is not None and body.model not in (manifest.model_id, manifest.version_id):
            raise OpenAIError(404, f"The model `{body.model[:200]}` does not exist or you do not have access to it: "
                                   f"this deployment serves `{manifest.model_id}` (or `{manifest.version_id}`).",
                              param="model", code="model_not_found")
        if body.dimensions is not None and body.dimensions != manifest.embed_dim:
            raise OpenAIError(400, f"This model's embeddings have {manifest.embed_dim} dimensions, and only "
                                   f"{manifest.embed_dim} may be asked for: a CLIP vector cannot be shortened.",
                              param="dimensions")
        inputs = _strings(body.input)
        encoding = body.encoding_format or "float"
        cache_control = request.headers.get("cache-control", "").lower()
        use_cache = not ("no-cache" in cache_control or "no-store" in cache_control)
        if body.modality == "image":
            _check_count(len(inputs), self.settings.max_batch_size, "images")
            result = self._embed_images(inputs, use_cache)
        else:
            _check_count(len(inputs), self.max_texts[encoding], "texts")
            result = self._embed_texts(inputs, use_cache, deadline(request))
        vectors = l2_normalised(result.vectors)
        data = [{"object": "embedding", "index": i, "embedding": _encoded(row, encoding)}
                for i, row in enumerate(vectors)]
        payload = {"object": "list", "data": data, "model": manifest.model_id,
                   "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}}
        return self._respond(payload, started, body.modality, len(inputs), result)

    # -- steps --------------------------------------------------------------------------------------
    def _embed_texts(self, texts: list[str], use_cache: bool, by: float | None) -> _Result:
        try:
            result = self.service.embed_texts(texts, use_cache=use_cache, deadline=by)
        except TextTooLong as exc:
            raise OpenAIError(400, str(exc), param="input") from None
        except OutOfTime as exc:
            raise OpenAIError(413, str(exc), param="input") from None
        return _Result(result.vectors, result.tokens, result.truncated, result.cache.counts())

    def _embed_images(self, inputs: list[str], use_cache: bool) -> _Result:
        for i, item in enumerate(inputs):
            if not item.startswith("data:") and not item.lower().startswith(("https://", "http://")):
                raise OpenAIError(400, f"input[{i}] is not an image: with \"modality\": \"image\", send data: URIs "
                                       "(data:image/png;base64,...) or https URLs.", param="input")
        try:
            blobs = self.loader.load_many(inputs)
            if self.image_function is not None:
                vectors, counts = self.image_function.embed(blobs, use_cache=use_cache)
                return _Result(vectors, cache=counts)
            try:
                result = self.service.embed_images(blobs, use_cache=use_cache)
            except ImageDecodeError as exc:
                raise ImageLoadError(str(exc)) from None
        except ImageLoadError as exc:
            raise OpenAIError(400, exc.message, param="input") from None
        return _Result(result.vectors, cache=result.cache.counts())

    def _respond(self, payload: dict[str, Any], started: float, modality: str, n: int, result: _Result
                 ) -> JSONResponse:
        elapsed = time.perf_counter() - started
        headers = {"X-Model-Id": self.service.manifest.model_id, "X-Processing-Time": f"{elapsed:.6f}"}
        if result.truncated:
            headers["X-Clip-Truncated-Texts"] = ",".join(map(str, result.truncated))
        if result.cache:
            headers["X-Clip-Cache"] = ";".join(f"{k}={v}" for k, v in result.cache.items())
        log.info(json.dumps({"endpoint": "embeddings", "modality": modality, "inputs": n,
                             "seconds": round(elapsed, 4), "truncated": len(result.truncated), "cache": result.cache}))
        return JSONResponse(payload, headers=headers)

    # -- registration -------------------------------------------------------------------------------
    def router(self, endpoints: Iterable[EndpointName]) -> APIRouter:
        router = APIRouter(responses=_ERRORS, route_class=openai_route_class(lambda: self.settings.api_key))
        return register(router, endpoints, "openai", InlineOnLambda(self))


def _strings(raw: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    """``input`` as a list of non-empty strings; 400 for token ids, an empty list or an empty string."""
    items = [raw] if isinstance(raw, str) else list(raw)
    if not items:
        raise OpenAIError(400, "'input' is an empty list: send at least one string.", param="input")
    if not all(isinstance(item, str) for item in items):
        raise OpenAIError(400, _IDS_REFUSED, param="input", code="token_ids_not_supported")
    texts = [item for item in items if isinstance(item, str)]
    empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        where = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise OpenAIError(400, f"'input' holds an empty string (index {where}): send non-empty strings.",
                          param="input")
    return texts


def _check_count(count: int, most: int, what: str) -> None:
    if count > most:
        raise OpenAIError(400, f"Too many inputs: at most {most} {what} per request, got {count}. Split the request.",
                          param="input")


def _encoded(row: Float32Array, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")
    return cast(list[float], row.tolist())
