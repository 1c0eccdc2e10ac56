"""Another Lambda function's CLIP tower, reached through Lambda's ``Invoke`` API: the text tower or the image one.

Why: a function plus its layers may hold 250 MiB unzipped, and no function carries both int8 towers
beside its packages. Each carries one; a function that needs the other modality asks a function that has
it loaded (``api/endpoints.py``: ``Invoked``): ``compare`` (image tower) asks ``embed_text`` for the text
vectors its cache lacks, ``embeddings`` (text tower) asks ``embed_image`` for image vectors. ``Invoke`` is
Lambda's data plane (bounded by concurrency, not by the ~15 requests/s of the control-plane reads), so a
burst of cold starts waits on nothing but the model.

**Text**: token ids in, raw vectors out, so a vector is bit for bit what ``embed_text`` computes for the
same ids, and the tokenizer (and the cache keys) stay with the caller::

    request  {"clip_text_tower": {"v": 1, "model": <Manifest.digest>, "ids": [[49406, ..., 49407], ...]}}
    answer   {"clip_text_tower": {"dim": 512, "count": 2, "vectors": <base64 of little-endian float32>}}

**Images**: the encoded image files as the caller received them (after base64 decoding or download), in;
raw vectors out. The image function decodes, embeds and caches them: image cache keys name the Pillow
that decodes, which the caller (a text function) does not have; the cache counts come back::

    request  {"clip_image_tower": {"v": 1, "model": <digest>, "images": [<base64 of a file>, ...], "cache": true}}
    answer   {"clip_image_tower": {"dim": 512, "count": 1, "vectors": <base64>, "cache": {"hits": 0, ...}}}

    error    {"clip_text_tower" | "clip_image_tower": {"error": {"status": 400, "message": "..."}}}

A synchronous Invoke carries at most 6 MB: images go in as many calls as that takes (and at most the
batch size per call); an image that alone is larger is a 413 (send it to ``/clip/embed_image`` instead).

Both sides check the model digest: during a deploy the functions move to their new versions one after
the other, and vectors of two different models must never be mixed (503, retry).

:func:`serve` and :func:`serve_images` are the lending function's side (plain Python, no AWS);
:class:`TextFunctionEncoder` (a drop-in for :class:`~clip_serverless.engine.encoder.TextEncoder`) and
:class:`ImageFunction` the caller's. botocore is imported only there.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from ..types import Float32Array, Int64Array

if TYPE_CHECKING:
    from ..engine.model_dir import Manifest
    from ..service import ClipService, TextTower

TEXT_KEY = EVENT_KEY = "clip_text_tower"
IMAGE_KEY = "clip_image_tower"
PROTOCOL = 1
MAX_TOKEN_ID = 49407  # CLIP's end-of-text token, the largest id of its vocabulary
# Lambda's synchronous Invoke takes at most 6 MiB of request payload; the JSON around the images is < 1 KiB.
MAX_INVOKE_PAYLOAD_BYTES = 6 * 1024 * 1024 - 4 * 1024
log = logging.getLogger("clip_serverless.aws_lambda.tower_function")


class TowerFunctionError(Exception):
    """The other function could not give the vectors. ``status`` is what the caller's client should see."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


TextFunctionError = TowerFunctionError  # its first name (compare's text vectors), which api/errors.py handles


# ---- the lending function's side ------------------------------------------------------------------
def is_request(event: object) -> bool:
    """A direct invocation for text vectors (not an API Gateway event)."""
    return isinstance(event, dict) and TEXT_KEY in event


def is_image_request(event: object) -> bool:
    """A direct invocation for image vectors."""
    return isinstance(event, dict) and IMAGE_KEY in event


def _error(key: str, status: int, message: str) -> dict[str, Any]:
    return {key: {"error": {"status": status, "message": message}}}


def _refusal(key: str, request: object, manifest: Manifest) -> dict[str, Any] | None:
    """The error answer for a request of another protocol or model, else None."""
    if not isinstance(request, dict) or request.get("v") != PROTOCOL:
        return _error(key, 400, f"unsupported {key.split('_')[1]} tower request (protocol {PROTOCOL} expected)")
    if request.get("model") != manifest.digest:
        other = str(request.get("model"))[:12]
        return _error(key, 503, f"this function serves model {manifest.model_id} ({manifest.digest[:12]}), the "
                                f"caller another ({other}): a deployment is in progress; retry")
    return None


def _vectors_answer(key: str, vectors: Float32Array, **extra: Any) -> dict[str, Any]:
    data = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    return {key: {"dim": int(vectors.shape[1]), "count": int(vectors.shape[0]),
                  "vectors": base64.b64encode(data).decode("ascii"), **extra}}


def serve(event: Mapping[str, Any], encoder: TextTower, manifest: Manifest) -> dict[str, Any]:
    """Answer one request from another function: embed its token ids with the local text tower."""
    request = event.get(TEXT_KEY)
    refused = _refusal(TEXT_KEY, request, manifest)
    if refused is not None:
        return refused
    assert isinstance(request, dict)
    rows = request.get("ids")
    context = manifest.context_length
    if not isinstance(rows, list) or not rows:
        return _error(TEXT_KEY, 400, "ids must be a non-empty list of token id lists")
    if not all(isinstance(r, list) and 0 < len(r) <= context and all(type(t) is int for t in r) for r in rows):
        return _error(TEXT_KEY, 400, f"each row of ids must hold 1 to {context} integers")
    ids = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    if ids.min() < 0 or ids.max() > MAX_TOKEN_ID:
        return _error(TEXT_KEY, 400, f"token ids must be in [0, {MAX_TOKEN_ID}]")
    return _vectors_answer(TEXT_KEY, encoder.encode(ids, np.array([len(r) for r in rows], dtype=np.int64)))


def serve_images(event: Mapping[str, Any], service: ClipService, *, max_images: int) -> dict[str, Any]:
    """Answer one request from another function: embed its image files with the local image tower, through
    the service (so with this function's cache), at most ``max_images`` of them."""
    from ..engine.preprocessing import ImageDecodeError  # this side decodes: Pillow is here

    request = event.get(IMAGE_KEY)
    refused = _refusal(IMAGE_KEY, request, service.manifest)
    if refused is not None:
        return refused
    assert isinstance(request, dict)
    images = request.get("images")
    if not isinstance(images, list) or not 0 < len(images) <= max_images:
        return _error(IMAGE_KEY, 400, f"images must be a list of 1 to {max_images} base64 strings")
    blobs = []
    for i, item in enumerate(images):
        try:
            data = base64.b64decode(item, validate=True) if isinstance(item, str) else b""
        except (binascii.Error, ValueError):
            data = b""
        if not data:
            return _error(IMAGE_KEY, 400, f"images[{i}] is not a non-empty base64 string")
        blobs.append(data)
    try:
        result = service.embed_images(blobs, use_cache=request.get("cache") is not False)
    except ImageDecodeError as exc:
        return _error(IMAGE_KEY, 400, f"Could not load input image. Cause: {exc}")
    return _vectors_answer(IMAGE_KEY, result.vectors, cache=result.cache.counts())  # the X-Clip-Cache counts


# ---- the caller's side ----------------------------------------------------------------------------
class TowerFunction:
    """Another function's tower through Lambda ``Invoke``: the client, the call and its failures.

    Failures become :class:`TowerFunctionError` with the status the API should answer: throttled 503
    (with ``Retry-After``) after one jittered retry, no answer within ``timeout_s`` 504, the other
    function's own 4xx passed through, anything else 502. botocore's retries are off: a read timeout
    retried would double the wait, and the API's caller is the better judge of a retry.
    """

    key: ClassVar[str]
    noun: ClassVar[str]  # "text" or "image", for messages

    def __init__(self, function_name: str, manifest: Manifest, *, timeout_s: float = 10.0,
                 connect_timeout_s: float = 2.0, client: Any = None) -> None:
        self.function_name = function_name
        self.manifest = manifest
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._client = client
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._client is not None

    def load(self) -> None:
        """Create the Lambda client now (at init): it costs ~30-60 ms the first time."""
        _ = self.client

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._new_client()
        return self._client

    def renew(self) -> None:
        """A new client and connection pool (after a SnapStart restore, connections are stale); a client
        not created yet stays so (its first call creates it)."""
        with self._lock:
            if self._client is not None:
                self._client = self._new_client()

    def _new_client(self) -> Any:
        from botocore.config import Config

        from ..aws_clients import client

        config = Config(connect_timeout=self.connect_timeout_s, read_timeout=self.timeout_s,
                        retries={"total_max_attempts": 1}, tcp_keepalive=True)
        return client("lambda", config=config)

    def _call(self, request: dict[str, Any], n: int) -> tuple[Float32Array, dict[str, Any]]:
        """The (n, D) vectors the other function answers ``request`` with, and its whole reply."""
        payload = json.dumps({self.key: {"v": PROTOCOL, "model": self.manifest.digest, **request}})
        answer = self._invoke(payload.encode())
        return self._vectors(answer, n)

    def _invoke(self, payload: bytes) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

        what = f"The {self.noun} embedding function"
        for attempt in (1, 2):
            try:
                response = self.client.invoke(FunctionName=self.function_name, Payload=payload)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code == "TooManyRequestsException" or code.endswith("ThrottlingException"):
                    if attempt == 1:
                        time.sleep(random.uniform(0.05, 0.25))  # noqa: S311 (jitter, not crypto)
                        continue
                    raise TowerFunctionError(503, f"{what} is at its concurrency limit; retry shortly.",
                                             retry_after=1) from None
                log.error("%s function %s: %s", self.noun, self.function_name, code or exc)
                raise TowerFunctionError(502, f"{what} could not be called ({code}).") from None
            except (ReadTimeoutError, ConnectTimeoutError):
                raise TowerFunctionError(504, f"{what} did not answer within {self.timeout_s:g} s.") from None
            except BotoCoreError as exc:
                log.error("%s function %s: %s", self.noun, self.function_name, type(exc).__name__)
                raise TowerFunctionError(502, f"{what} could not be reached.") from None
            body = response["Payload"].read()
            if response.get("FunctionError"):
                raise self._function_error(body)
            try:
                return json.loads(body)
            except ValueError:
                raise TowerFunctionError(502, f"{what} gave an unreadable answer.") from None
        raise AssertionError("unreachable")

    def _function_error(self, body: bytes) -> TowerFunctionError:
        try:
            error = json.loads(body)
        except ValueError:
            error = {}
        kind = str(error.get("errorType", "")) if isinstance(error, dict) else ""
        message = str(error.get("errorMessage", "")) if isinstance(error, dict) else ""
        # The detail stays in the log: it may hold paths or library internals.
        log.error("%s function %s failed: %s %s", self.noun, self.function_name, kind, message[:500])
        if "Timedout" in kind or "timed out" in message:
            return TowerFunctionError(504, f"The {self.noun} embedding function timed out.")
        return TowerFunctionError(502, f"The {self.noun} embedding function failed ({kind or 'unhandled error'}).")

    def _refused(self, status: int, message: str) -> TowerFunctionError:
        """The other function's own error answer, as the caller's."""
        return TowerFunctionError(status, f"{self.noun.capitalize()} embedding: {message}",
                                  retry_after=1 if status == 503 else None)

    def _vectors(self, answer: Any, n: int) -> tuple[Float32Array, dict[str, Any]]:
        what = f"The {self.noun} embedding function"
        reply = answer.get(self.key) if isinstance(answer, dict) else None
        if not isinstance(reply, dict):
            raise TowerFunctionError(502, f"{what} gave an unexpected answer.")
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raw = error.get("status")
            status = raw if isinstance(raw, int) and 400 <= raw < 600 else 502
            raise self._refused(status, str(error.get("message", f"{self.noun} embedding failed")))
        dim = self.manifest.embed_dim
        try:
            data = base64.b64decode(reply["vectors"], validate=True)
            vectors = np.frombuffer(data, dtype="<f4").reshape(int(reply["count"]), int(reply["dim"]))
        except (KeyError, TypeError, ValueError):
            raise TowerFunctionError(502, f"{what} gave a malformed answer.") from None
        if vectors.shape != (n, dim):
            raise TowerFunctionError(502, f"{what} answered {vectors.shape}, expected ({n}, {dim}).")
        return vectors.astype(np.float32), reply


class TextFunctionEncoder(TowerFunction):
    """``encode(ids, lengths)`` through another function's text tower: what ``ClipService`` calls its text tower."""

    key = TEXT_KEY
    noun = "text"

    def encode(self, ids: Int64Array, lengths: npt.NDArray[np.integer] | None = None) -> Float32Array:
        n = ids.shape[0]
        if n == 0:
            return np.zeros((0, self.manifest.embed_dim), dtype=np.float32)
        if lengths is None:
            lengths = ids.argmax(axis=1) + 1  # EOT has the largest id in CLIP's vocabulary
        rows = [ids[i, : int(lengths[i])].tolist() for i in range(n)]
        return self._call({"ids": rows}, n)[0]


class ImageFunction(TowerFunction):
    """Image files in, raw vectors out, through another function's image tower (and its cache)."""

    key = IMAGE_KEY
    noun = "image"

    def __init__(self, function_name: str, manifest: Manifest, *, max_images: int = 8,
                 max_payload_bytes: int = MAX_INVOKE_PAYLOAD_BYTES, **kwargs: Any) -> None:
        super().__init__(function_name, manifest, **kwargs)
        self.max_images = max_images
        self.max_payload_bytes = max_payload_bytes

    def _refused(self, status: int, message: str) -> TowerFunctionError:
        if status == 400:  # the caller's image is bad: its message, as the local tower would say it
            return TowerFunctionError(400, message)
        return super()._refused(status, message)

    def embed(self, blobs: Sequence[bytes], *, use_cache: bool = True) -> tuple[Float32Array, dict[str, Any]]:
        """The (N, D) raw vectors of N encoded images, in order, and the other function's cache counts
        (summed over its calls). Raises :class:`TowerFunctionError` (400 for a bad image, 413 for an image
        too large for one call)."""
        parts = [np.zeros((0, self.manifest.embed_dim), dtype=np.float32)]
        counts: dict[str, Any] = {}
        for chunk in self._chunks(blobs):
            images = [base64.b64encode(blobs[i]).decode("ascii") for i in chunk]
            vectors, reply = self._call({"images": images, "cache": use_cache}, len(chunk))
            parts.append(vectors)
            cache = reply.get("cache")
            for name, value in (cache.items() if isinstance(cache, dict) else ()):
                if isinstance(value, int) and not isinstance(value, bool):
                    counts[name] = counts.get(name, 0) + value
                elif name not in counts:
                    counts[name] = value
        return np.concatenate(parts, axis=0), counts

    def _chunks(self, blobs: Sequence[bytes]) -> list[list[int]]:
        """Indices of ``blobs`` per call: at most ``max_images``, at most ``max_payload_bytes`` of base64."""
        chunks: list[list[int]] = []
        size = 0
        for i, blob in enumerate(blobs):
            encoded = 4 * ((len(blob) + 2) // 3) + 3  # base64, its quotes and a comma
            if encoded > self.max_payload_bytes:
                raise TowerFunctionError(413, f"Image {i} is {len(blob)} bytes: too large to pass to the image "
                                              f"embedding function (at most {3 * self.max_payload_bytes // 4} "
                                              f"bytes per call, Lambda's 6 MB Invoke payload).")
            if not chunks or len(chunks[-1]) >= self.max_images or size + encoded > self.max_payload_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += encoded
        return chunks
