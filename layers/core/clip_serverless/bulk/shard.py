"""One shard: a batch's entries -> vectors, metadata and errors, then the done record. What a Map child runs.

Images: each object is fetched (a bounded window of concurrent GETs, so memory stays bounded however large
the batch), hashed, decoded and preprocessed on worker threads, and embedded in plan order, one image per
ONNX Runtime run, exactly as ``embed_image`` embeds one image: the same ``decode_image``,
``preprocess_batch`` and ``ImageEncoder`` with the same settings, so a vector is bit-for-bit what the API
returns for the same bytes. Texts go through ``ClipService.embed_texts``, as ``embed_text`` does.

An entry that cannot be embedded goes to the errors file with one of :data:`REASONS`; a fault of S3 itself
(throttling, 5xx after every retry) fails the invocation instead, and the state machine retries the shard.

Writes are whole-object PUTs of deterministic bytes, the done record last; files a shard does not produce
(no rows, no errors) are deleted, so a shard recomputed over an older run's output leaves nothing stale.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine import ImageDecodeError
from ..types import Float32Array
from .layout import JobSpec
from .plan import read_batch
from .s3io import FORBIDDEN, MISSING, TransientS3Error, error_code, get_json, put_bytes, put_json, transient_or

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from ..cache.config import S3Config
    from ..cache.keys import ModelIdentity
    from ..service import ClipService

REASONS = ("empty", "too_large", "not_an_image", "unreadable", "vanished")
FETCH_WORKERS = 8
WINDOW = 2 * FETCH_WORKERS  # objects fetched or decoded ahead of the encoder, at most
# Decodes at once: a 64-megapixel photo (CLIP_MAX_IMAGE_PIXELS) takes ~256 MB decoded, so eight at once would
# not fit 1769 MB beside the model; on one vCPU more than one gains nothing anyway.
DECODERS = 2
READ_ATTEMPTS = 3  # a body read cut off mid-stream (botocore's retries end when the headers arrive)


@dataclass
class Loaded:
    """One entry after fetching and preprocessing: pixels to embed, or the reason it cannot be."""

    entry: dict[str, Any]
    pixels: Float32Array | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    detail: str = ""
    cache_key: str | None = None


@dataclass
class Outcome:
    """What a shard produced, in plan order."""

    vectors: list[Float32Array] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    cache_entries: list[tuple[str, Float32Array]] = field(default_factory=list)


def decode_reason(error: ImageDecodeError) -> str:
    """The errors file's reason for an image the decoder refused (its messages are the API's 400s)."""
    message = str(error)
    if message.startswith("Image data is empty"):
        return "empty"
    if message.startswith("Image is too large"):
        return "too_large"
    if message.startswith("Data is not an image"):
        return "not_an_image"
    return "unreadable"  # truncated, corrupt, no pixels


class ShardRunner:
    """Runs shards with one model (``service``) and one S3 client; thread-safe, so a local driver may run
    several shards at once."""

    def __init__(self, service: ClipService, s3: S3Client, *, cache: S3Config | None = None,
                 cache_s3: S3Client | None = None) -> None:
        self.service = service
        self.s3 = s3
        self.cache = cache
        self.cache_s3 = cache_s3 or s3
        self.manifest = service.manifest
        self._decoders = threading.BoundedSemaphore(DECODERS)

    # -- the shard ---------------------------------------------------------------------------------
    def run(self, spec: JobSpec, shard: str, batch_key: str) -> dict[str, Any]:
        """Embed one shard unless its done record says it is finished with this model and dtype."""
        start = time.perf_counter()
        layout, bucket = spec.layout, spec.dst.bucket
        done = get_json(self.s3, bucket, layout.done_key(shard))
        if self._finished(done, spec, batch_key):
            return {"shard": shard, "skipped": True, "embedded": done["embedded"], "errors": done["errors"]}
        if spec.cache and self.cache is None:
            from .layout import JobError

            raise JobError("cache: the function has no embedding cache (CLIP_CACHE_BUCKET is not set)")
        entries = read_batch(self.s3, bucket, batch_key)
        outcome = self._images(spec, entries) if spec.modality == "image" else self._texts(entries)
        assert len(outcome.rows) + len(outcome.errors) == len(entries), "an entry was lost"
        files = self._write(spec, shard, outcome)
        cached = self._write_cache(outcome.cache_entries) if spec.cache else 0
        record = {
            "shard": shard, "batch": batch_key, "count": len(entries), "embedded": len(outcome.rows),
            "errors": len(outcome.errors),
            "errors_by_reason": dict(sorted(Counter(e["reason"] for e in outcome.errors).items())),
            "model_id": self.manifest.model_id, "model_digest": self.manifest.digest,
            "precision": self.manifest.precision, "embed_dim": self.manifest.embed_dim, "dtype": spec.dtype,
            "image_decode": self._image_decode(spec), "files": files, "cache_writes": cached,
            "seconds": round(time.perf_counter() - start, 3),
        }
        put_json(self.s3, bucket, layout.done_key(shard), record)
        return {"shard": shard, "skipped": False, "embedded": record["embedded"], "errors": record["errors"]}

    def _image_decode(self, spec: JobSpec) -> str | None:
        """How images were decoded (CLIP_IMAGE_DECODE): part of what a shard's vectors are; None for texts."""
        return self.service.image_decode if spec.modality == "image" else None

    def _finished(self, done: Any, spec: JobSpec, batch_key: str) -> bool:
        if not isinstance(done, dict):
            return False
        return (done.get("model_digest") == self.manifest.digest
                and done.get("dtype") == spec.dtype and done.get("batch") == batch_key
                and spec.recorded_decode(done) == self._image_decode(spec)
                and isinstance(done.get("embedded"), int) and isinstance(done.get("errors"), int))

    # -- images ------------------------------------------------------------------------------------
    def _images(self, spec: JobSpec, entries: list[dict[str, Any]]) -> Outcome:
        outcome = Outcome()
        encoder = self.service.image_encoder
        identity = self._identity() if spec.cache else None
        with ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="bulk-fetch") as pool:
            for loaded in _ordered(pool, lambda e: self._load_image(spec, e, identity), entries):
                if loaded.pixels is None:
                    outcome.errors.append({**_error_fields(loaded.entry), "reason": loaded.reason,
                                           "detail": loaded.detail})
                    continue
                vector = encoder.encode(loaded.pixels)[0]
                outcome.vectors.append(vector)
                outcome.rows.append(loaded.meta)
                if loaded.cache_key is not None:
                    outcome.cache_entries.append((loaded.cache_key, vector))
        return outcome

    def _load_image(self, spec: JobSpec, entry: dict[str, Any], identity: ModelIdentity | None) -> Loaded:
        from ..engine.preprocessing import decode_image, preprocess_batch

        key, size = entry["key"], entry.get("size")
        if size == 0:
            return Loaded(entry, reason="empty", detail="the object is empty")
        if isinstance(size, int) and size > spec.max_object_bytes:
            return Loaded(entry, reason="too_large", detail=f"{size} bytes, over max_object_bytes "
                                                            f"{spec.max_object_bytes}")
        fetched = self._fetch(spec, key, spec.max_object_bytes)
        if isinstance(fetched, Loaded):
            fetched.entry = entry
            return fetched
        data, etag = fetched
        seen = {**entry, "size": len(data), "etag": etag}  # what was embedded, should it differ from the listing
        if not data:
            return Loaded(seen, reason="empty", detail="the object is empty")
        if len(data) > spec.max_object_bytes:
            return Loaded(seen, reason="too_large", detail=f"over max_object_bytes {spec.max_object_bytes}")
        m = self.manifest
        try:
            with self._decoders:
                image = decode_image(data, max_pixels=self.service.max_image_pixels,
                                     draft=self.service.image_decode == "draft", draft_size=m.image_size)
                pixels = preprocess_batch([image], m.image_size, m.mean, m.std)
                del image
        except ImageDecodeError as exc:
            return Loaded(seen, reason=decode_reason(exc), detail=str(exc))
        meta = {"key": key, "image_path": f"s3://{spec.src.bucket}/{key}", "size": len(data), "etag": etag,
                "sha256": hashlib.sha256(data).hexdigest()}
        cache_key = None
        if identity is not None:
            from ..cache.keys import image_key

            cache_key = image_key(identity, data)
        return Loaded(seen, pixels=pixels, meta=meta, cache_key=cache_key)

    def _fetch(self, spec: JobSpec, key: str, limit: int) -> tuple[bytes, str | None] | Loaded:
        """The object's bytes (at most ``limit`` + 1) and ETag, or a Loaded carrying why it cannot be read."""
        last: BaseException | None = None
        for _ in range(READ_ATTEMPTS):
            try:
                response = self.s3.get_object(Bucket=spec.src.bucket, Key=key)
                body = response["Body"]
                try:
                    data = body.read(limit + 1)
                finally:
                    body.close()
                return data, response.get("ETag")
            except Exception as exc:
                code = error_code(exc)
                if code in MISSING:
                    return Loaded({}, reason="vanished", detail="deleted since it was listed")
                if code in FORBIDDEN:
                    return Loaded({}, reason="unreadable", detail=f"S3 answered {code}")
                if code is not None and code not in ("SlowDown", "InternalError", "ServiceUnavailable",
                                                     "RequestTimeout", "503", "500"):
                    return Loaded({}, reason="unreadable", detail=f"S3 answered {code}")
                last = exc
        raise TransientS3Error(f"GET s3://{spec.src.bucket}/{key}: {error_code(last) if last else ''} "
                               f"{type(last).__name__}: {str(last)[:200]}")

    # -- texts -------------------------------------------------------------------------------------
    def _texts(self, entries: list[dict[str, Any]]) -> Outcome:
        outcome = Outcome()
        good = [e for e in entries if not e.get("problem")]
        embedded = self.service.embed_texts([e["caption"] for e in good], use_cache=False) if good else None
        truncated = set(embedded.truncated) if embedded is not None else set()
        vectors = iter(embedded.vectors if embedded is not None else ())
        position = 0
        for entry in entries:
            problem = entry.get("problem")
            base = {"row": entry["row"], **({"id": entry["id"]} if "id" in entry else {})}
            if problem:
                reason = "empty" if "empty" in problem else "unreadable"
                outcome.errors.append({**base, "reason": reason, "detail": problem})
                continue
            outcome.vectors.append(next(vectors))
            outcome.rows.append({**base, "caption": entry["caption"], "truncated": position in truncated})
            position += 1
        return outcome

    # -- output ------------------------------------------------------------------------------------
    def _write(self, spec: JobSpec, shard: str, outcome: Outcome) -> dict[str, str | None]:
        layout, bucket = spec.layout, spec.dst.bucket
        files: dict[str, str | None] = {"emb": None, "metadata": None, "errors": None}
        if outcome.rows:
            matrix = np.stack(outcome.vectors).astype(spec.dtype)
            buffer = io.BytesIO()
            np.save(buffer, matrix, allow_pickle=False)
            emb, metadata = layout.emb_key(shard), layout.metadata_key(shard)
            put_bytes(self.s3, bucket, emb, buffer.getvalue(), "application/octet-stream")
            put_bytes(self.s3, bucket, metadata, _jsonl(outcome.rows), "application/x-ndjson")
            files["emb"], files["metadata"] = emb, metadata
        if outcome.errors:
            errors = layout.errors_key(shard)
            put_bytes(self.s3, bucket, errors, _jsonl(outcome.errors), "application/x-ndjson")
            files["errors"] = errors
        stale = [k for k, present in ((layout.emb_key(shard), files["emb"]), (layout.metadata_key(shard),
                 files["metadata"]), (layout.errors_key(shard), files["errors"])) if present is None]
        for key in stale:  # a DELETE of a missing key succeeds, and costs nothing
            try:
                self.s3.delete_object(Bucket=bucket, Key=key)
            except Exception as exc:
                raise transient_or(exc, f"DELETE s3://{bucket}/{key}") from exc
        return files

    def _identity(self) -> ModelIdentity:
        from ..cache.keys import ModelIdentity

        return ModelIdentity.from_manifest(self.manifest, image_decode=self.service.image_decode)

    def _write_cache(self, entries: list[tuple[str, Float32Array]]) -> int:
        """Each vector as an embedding-cache entry, so the API's next call on the same bytes is a hit."""
        from ..cache import codec

        assert self.cache is not None
        bucket, prefix, model_id = self.cache.bucket, self.cache.prefix, self.manifest.model_id

        def put(item: tuple[str, Float32Array]) -> None:
            key, vector = item
            put_bytes(self.cache_s3, bucket, f"{prefix}{key}", codec.encode(key, model_id, vector),
                      "application/octet-stream")

        with ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="bulk-cache") as pool:
            list(pool.map(put, entries))
        return len(entries)


def _ordered(pool: ThreadPoolExecutor, load: Callable[[dict[str, Any]], Loaded],
             entries: list[dict[str, Any]]) -> Iterator[Loaded]:
    """``load`` over ``entries`` on the pool, at most ``WINDOW`` ahead, results in entry order."""
    pending: deque[Future[Loaded]] = deque()
    for entry in entries:
        pending.append(pool.submit(load, entry))
        if len(pending) >= WINDOW:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _error_fields(entry: dict[str, Any]) -> dict[str, Any]:
    return {"key": entry.get("key"), "size": entry.get("size"), "etag": entry.get("etag")}


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows).encode()
