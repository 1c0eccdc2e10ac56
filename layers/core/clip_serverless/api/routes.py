"""The CLIP routes (Roboflow Inference's API), registered per endpoint from the registry (endpoints.py), so a
Lambda function serves only its endpoint.

Request path: route -> parse (pydantic) -> auth -> load inputs (base64/URL, I/O at the edge) ->
service (cache, core) -> JSON response with exactly Roboflow's keys.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..cache.stats import CacheStats
from ..service import ClipService, Embeddings, ImageDecodeError, OutOfTime, TextTooLong
from ..settings import Settings, max_embeddings_per_response
from . import compare as cmp
from .auth import check_api_key
from .body import clip_route_class
from .deadline import deadline
from .dispatch import InlineOnLambda
from .endpoints import ENDPOINTS as ENDPOINTS  # re-exported: app.py and the tests read it here
from .endpoints import EndpointName, register
from .errors import BadRequest, ImageLoadError, NotFound, PayloadTooLarge
from .images import ImageLoader
from .schemas import (
    ClipCompareRequest,
    ClipImageEmbeddingRequest,
    ClipRequest,
    ClipTextEmbeddingRequest,
    ErrorResponse,
    ImageInput,
)

Endpoint = EndpointName  # an endpoint's name: a key of the registry (endpoints.py), whose ENDPOINTS lists them

log = logging.getLogger("clip_serverless.request")
# Runs compare's text side while the request's thread does the images (see ClipRoutes._embed_both).
_TEXT_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="compare-text")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413)
}


class ClipRoutes:
    """Binds the routes to one service and its settings."""

    def __init__(self, service: ClipService, settings: Settings, loader: ImageLoader | None = None) -> None:
        self.service = service
        self.settings = settings
        self.loader = loader or ImageLoader(settings.url)

    # -- shared steps -------------------------------------------------------------------------------
    def _prepare(self, request: Request, body: ClipRequest) -> bool:
        """Auth and model check; returns whether the cache may be used."""
        check_api_key(request, body.api_key, self.settings.api_key)
        version = body.clip_version_id
        deployed = self.service.manifest.version_id
        if version is not None and version != deployed:
            raise NotFound(f"CLIP version {version!r} is not deployed here; this deployment serves "
                           f"clip/{deployed} (clip_version_id {deployed!r}).")
        cache_control = request.headers.get("cache-control", "").lower()
        return not ("no-cache" in cache_control or "no-store" in cache_control)

    def _load_images(self, images: list[ImageInput | str]) -> list[bytes]:
        return self.loader.load_many(images)

    def _embed_images(self, blobs: list[bytes], use_cache: bool) -> Embeddings:
        try:
            return self.service.embed_images(blobs, use_cache=use_cache)
        except ImageDecodeError as exc:
            raise ImageLoadError(str(exc)) from None

    def _embed_texts(self, texts: list[str], use_cache: bool, by: float | None = None) -> Embeddings:
        try:
            return self.service.embed_texts(texts, use_cache=use_cache, deadline=by)
        except TextTooLong as exc:
            raise BadRequest(str(exc)) from None
        except OutOfTime as exc:
            raise PayloadTooLarge(str(exc)) from None

    def _embed_both(self, images: list[ImageInput | str], texts: list[str], use_cache: bool
                    ) -> tuple[Embeddings, Embeddings]:
        """Images here and texts at the same time when another function embeds them (compare on
        Lambda): the Invoke round trip overlaps the image download, decode and encode."""
        if not self.service.text_is_remote:
            return self._embed_images(self._load_images(images), use_cache), self._embed_texts(texts, use_cache)
        pending = _TEXT_POOL.submit(self._embed_texts, texts, use_cache)
        try:
            image_result = self._embed_images(self._load_images(images), use_cache)
        except BaseException:
            pending.cancel()
            raise
        return image_result, pending.result()

    def _respond(self, endpoint: Endpoint, payload: dict[str, Any], started: float, n: int,
                 results: list[Embeddings]) -> JSONResponse:
        elapsed = time.perf_counter() - started
        body = {"inference_id": None, "frame_id": None, "time": elapsed, **payload}
        if "similarity" in payload:
            body["parent_id"] = None
        headers = {"X-Model-Id": self.service.manifest.model_id, "X-Processing-Time": f"{elapsed:.6f}"}
        truncated = sorted({i for r in results for i in r.truncated})
        if truncated:
            headers["X-Clip-Truncated-Texts"] = ",".join(map(str, truncated))
        cache = CacheStats.merge(r.cache for r in results).counts()
        if cache:
            headers["X-Clip-Cache"] = ";".join(f"{k}={v}" for k, v in cache.items())
        log.info(json.dumps({"endpoint": endpoint, "inputs": n, "seconds": round(elapsed, 4),
                             "truncated": len(truncated), "cache": cache}))
        return JSONResponse(body, headers=headers)

    # -- endpoints ----------------------------------------------------------------------------------
    def embed_image(self, request: Request, body: ClipImageEmbeddingRequest) -> JSONResponse:
        use_cache = self._prepare(request, body)
        images = body.image if isinstance(body.image, list) else [body.image]
        self._check_count("image", len(images), "images that can be embedded at once")
        started = time.perf_counter()
        result = self._embed_images(self._load_images(list(images)), use_cache)
        return self._respond("embed_image", {"embeddings": result.vectors.tolist()}, started, len(images), [result])

    def embed_text(self, request: Request, body: ClipTextEmbeddingRequest) -> JSONResponse:
        use_cache = self._prepare(request, body)
        texts = body.text if isinstance(body.text, list) else [body.text]
        if not texts:
            raise BadRequest("text is an empty list; send at least one string.")
        # Refused before any work: Lambda cannot return more than 6 MB, and would fail only after the work.
        budget = self.settings.max_response_bytes
        most = max_embeddings_per_response(self.service.manifest.embed_dim, budget)
        if len(texts) > most:
            raise PayloadTooLarge(f"The maximum number of texts per call is {most} (their embeddings must fit in "
                                  f"a {budget}-byte response); got {len(texts)}. Split the request.")
        started = time.perf_counter()
        result = self._embed_texts(texts, use_cache, deadline(request))
        return self._respond("embed_text", {"embeddings": result.vectors.tolist()}, started, len(texts), [result])

    def compare(self, request: Request, body: ClipCompareRequest) -> JSONResponse:
        use_cache = self._prepare(request, body)
        subject_type = cmp.check_type("subject_type", body.subject_type)
        prompt_type = cmp.check_type("prompt_type", body.prompt_type)
        prompts = cmp.normalise_prompt(body.prompt)
        self._check_count("prompt", len(prompts.items), "prompts that can be compared at once")
        started = time.perf_counter()
        # Subject and prompts of the same kind go through the model in one batch.
        if subject_type == prompt_type == "image":
            result = self._embed_images(self._load_images([body.subject, *prompts.items]), use_cache)
            subject, others, results = result.vectors[0], result.vectors[1:], [result]
        elif subject_type == prompt_type == "text":
            texts = cmp.text_items("subject", [body.subject]) + cmp.text_items("prompt", prompts.items)
            result = self._embed_texts(texts, use_cache)
            subject, others, results = result.vectors[0], result.vectors[1:], [result]
        elif subject_type == "image":
            texts = cmp.text_items("prompt", prompts.items)  # validate before any download
            subject_r, prompt_r = self._embed_both([body.subject], texts, use_cache)
            subject, others, results = subject_r.vectors[0], prompt_r.vectors, [subject_r, prompt_r]
        else:
            subject_text = cmp.text_items("subject", [body.subject])
            prompt_r, subject_r = self._embed_both(list(prompts.items), subject_text, use_cache)
            subject, others, results = subject_r.vectors[0], prompt_r.vectors, [subject_r, prompt_r]
        sims = cmp.cosine_similarities(subject, others)
        similarity: list[float] | dict[str, float] = (
            dict(zip(prompts.keys, sims, strict=True)) if prompts.keys is not None else sims)
        return self._respond("compare", {"similarity": similarity}, started, len(prompts.items), results)

    def _check_count(self, what: str, count: int, limit_text: str) -> None:
        if count == 0:
            raise BadRequest(f"{what} is empty; send at least one.")
        if count > self.settings.max_batch_size:
            raise BadRequest(f"The maximum number of {limit_text} is {self.settings.max_batch_size}; "
                             f"got {count}. Split the request.")

    # -- registration -------------------------------------------------------------------------------
    def router(self, endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> APIRouter:
        # Bodies parsed strictly, and a query/header key checked before them (body.py); the key is read
        # per request, so a key renewed after a SnapStart restore takes effect at once.
        router = APIRouter(responses=_ERRORS, route_class=clip_route_class(lambda: self.settings.api_key))
        # Each route as its registry entry says; blocking work inline under Lambda, else in the thread pool.
        return register(router, endpoints, "roboflow", InlineOnLambda(self))
