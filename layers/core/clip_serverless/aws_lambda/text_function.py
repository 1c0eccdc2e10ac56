"""The text tower of another Lambda function, reached through Lambda's ``Invoke`` API.

Why: a function plus its layers may hold 250 MiB unzipped, and ``compare`` cannot carry both int8
towers beside its packages. It carries the image tower and the tokenizer; its text embeddings come
from its cache tiers and, for the misses, from the ``embed_text`` function, which already has the text
tower loaded. ``Invoke`` is Lambda's data plane (bounded by concurrency, not by the ~15 requests/s of
the control-plane reads), so a burst of cold starts waits on nothing but the model.

The exchange is token ids in, raw vectors out, so a vector is bit for bit what ``embed_text`` computes
for the same ids, and the tokenizer (and the cache keys) stay with the caller::

    request  {"clip_text_tower": {"v": 1, "model": <Manifest.digest>, "ids": [[49406, ..., 49407], ...]}}
    answer   {"clip_text_tower": {"dim": 512, "count": 2, "vectors": <base64 of little-endian float32>}}
    error    {"clip_text_tower": {"error": {"status": 400, "message": "..."}}}

Both sides check the model digest: during a deploy the two functions move to their new versions one
after the other, and vectors of two different models must never be compared (503, retry).

:func:`serve` is the ``embed_text`` side (plain Python, no AWS); :class:`TextFunctionEncoder` the caller's
side, a drop-in for :class:`~clip_serverless.engine.encoder.TextEncoder`. boto3 is imported only there.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..types import Float32Array, Int64Array

if TYPE_CHECKING:
    from ..engine.model_dir import Manifest
    from ..service import TextTower

EVENT_KEY = "clip_text_tower"
PROTOCOL = 1
MAX_TOKEN_ID = 49407  # CLIP's end-of-text token, the largest id of its vocabulary
log = logging.getLogger("clip_serverless.aws_lambda.text_function")


class TextFunctionError(Exception):
    """The text function could not give the vectors. ``status`` is what the caller's client should see."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


# ---- the text function's side ---------------------------------------------------------------------
def is_request(event: object) -> bool:
    return isinstance(event, dict) and EVENT_KEY in event


def _error(status: int, message: str) -> dict[str, Any]:
    return {EVENT_KEY: {"error": {"status": status, "message": message}}}


def serve(event: Mapping[str, Any], encoder: TextTower, manifest: Manifest) -> dict[str, Any]:
    """Answer one request from another function: embed its token ids with the local text tower."""
    request = event.get(EVENT_KEY)
    if not isinstance(request, dict) or request.get("v") != PROTOCOL:
        return _error(400, f"unsupported text tower request (protocol {PROTOCOL} expected)")
    if request.get("model") != manifest.digest:
        return _error(503, f"this function serves model {manifest.model_id} ({manifest.digest[:12]}), the caller "
                           f"another ({str(request.get('model'))[:12]}): a deployment is in progress; retry")
    rows = request.get("ids")
    context = manifest.context_length
    if not isinstance(rows, list) or not rows:
        return _error(400, "ids must be a non-empty list of token id lists")
    if not all(isinstance(r, list) and 0 < len(r) <= context and all(type(t) is int for t in r) for r in rows):
        return _error(400, f"each row of ids must hold 1 to {context} integers")
    ids = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    if ids.min() < 0 or ids.max() > MAX_TOKEN_ID:
        return _error(400, f"token ids must be in [0, {MAX_TOKEN_ID}]")
    vectors = encoder.encode(ids, np.array([len(r) for r in rows], dtype=np.int64))
    data = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    return {EVENT_KEY: {"dim": int(vectors.shape[1]), "count": int(vectors.shape[0]),
                        "vectors": base64.b64encode(data).decode("ascii")}}


# ---- the caller's side ----------------------------------------------------------------------------
class TextFunctionEncoder:
    """``encode(ids, lengths)`` through another function's text tower (Lambda ``Invoke``).

    Failures become :class:`TextFunctionError` with the status the API should answer: throttled 503
    (with ``Retry-After``) after one jittered retry, no answer within ``timeout_s`` 504, the text
    function's own 4xx passed through, anything else 502. botocore's retries are off: a read timeout
    retried would double the wait, and the API's caller is the better judge of a retry.
    """

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
        """A new client and connection pool (after a SnapStart restore, connections are stale)."""
        with self._lock:
            self._client = self._new_client()

    def _new_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=self.connect_timeout_s, read_timeout=self.timeout_s,
                        retries={"total_max_attempts": 1}, tcp_keepalive=True)
        return boto3.session.Session().client("lambda", config=config)

    def encode(self, ids: Int64Array, lengths: npt.NDArray[np.integer] | None = None) -> Float32Array:
        n = ids.shape[0]
        if n == 0:
            return np.zeros((0, self.manifest.embed_dim), dtype=np.float32)
        if lengths is None:
            lengths = ids.argmax(axis=1) + 1  # EOT has the largest id in CLIP's vocabulary
        rows = [ids[i, : int(lengths[i])].tolist() for i in range(n)]
        payload = json.dumps({EVENT_KEY: {"v": PROTOCOL, "model": self.manifest.digest, "ids": rows}})
        answer = self._invoke(payload.encode())
        return self._vectors(answer, n)

    def _invoke(self, payload: bytes) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

        for attempt in (1, 2):
            try:
                response = self.client.invoke(FunctionName=self.function_name, Payload=payload)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code == "TooManyRequestsException" or code.endswith("ThrottlingException"):
                    if attempt == 1:
                        time.sleep(random.uniform(0.05, 0.25))  # noqa: S311 (jitter, not crypto)
                        continue
                    raise TextFunctionError(503, "The text embedding function is at its concurrency limit; "
                                                 "retry shortly.", retry_after=1) from None
                log.error("text function %s: %s", self.function_name, code or exc)
                raise TextFunctionError(502, f"The text embedding function could not be called ({code}).") from None
            except (ReadTimeoutError, ConnectTimeoutError):
                raise TextFunctionError(504, f"The text embedding function did not answer within "
                                             f"{self.timeout_s:g} s.") from None
            except BotoCoreError as exc:
                log.error("text function %s: %s", self.function_name, type(exc).__name__)
                raise TextFunctionError(502, "The text embedding function could not be reached.") from None
            body = response["Payload"].read()
            if response.get("FunctionError"):
                raise self._function_error(body)
            try:
                return json.loads(body)
            except ValueError:
                raise TextFunctionError(502, "The text embedding function gave an unreadable answer.") from None
        raise AssertionError("unreachable")

    def _function_error(self, body: bytes) -> TextFunctionError:
        try:
            error = json.loads(body)
        except ValueError:
            error = {}
        kind = str(error.get("errorType", "")) if isinstance(error, dict) else ""
        message = str(error.get("errorMessage", "")) if isinstance(error, dict) else ""
        # The detail stays in the log: it may hold paths or library internals.
        log.error("text function %s failed: %s %s", self.function_name, kind, message[:500])
        if "Timedout" in kind or "timed out" in message:
            return TextFunctionError(504, "The text embedding function timed out.")
        return TextFunctionError(502, f"The text embedding function failed ({kind or 'unhandled error'}).")

    def _vectors(self, answer: Any, n: int) -> Float32Array:
        reply = answer.get(EVENT_KEY) if isinstance(answer, dict) else None
        if not isinstance(reply, dict):
            raise TextFunctionError(502, "The text embedding function gave an unexpected answer.")
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raw = error.get("status")
            status = raw if isinstance(raw, int) and 400 <= raw < 600 else 502
            message = str(error.get("message", "text embedding failed"))
            raise TextFunctionError(status, f"Text embedding: {message}", retry_after=1 if status == 503 else None)
        dim = self.manifest.embed_dim
        try:
            data = base64.b64decode(reply["vectors"], validate=True)
            vectors = np.frombuffer(data, dtype="<f4").reshape(int(reply["count"]), int(reply["dim"]))
        except (KeyError, TypeError, ValueError):
            raise TextFunctionError(502, "The text embedding function gave a malformed answer.") from None
        if vectors.shape != (n, dim):
            raise TextFunctionError(502, f"The text embedding function answered {vectors.shape}, "
                                         f"expected ({n}, {dim}).")
        return vectors.astype(np.float32)
