"""What a Lambda function's module calls once, at init: build the app for one endpoint, wrap it in Mangum.

Module level in the function's ``app.py`` runs once per container, so the model loads at init (where
SnapStart can snapshot it), never per request.

Init is ordered for its two vCPUs (Lambda gives init full CPU): the ONNX Runtime sessions start loading in
background threads first (they release the GIL), and only then are FastAPI, pydantic and Mangum imported
and the app built, on the other vCPU (``bench/bench_cold_start.py``; ``python -X importtime`` shows what
each import costs). Nothing here imports FastAPI at module level.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..api.endpoints import REGISTRY, EndpointSpec
from ..api.endpoints import endpoint as endpoint_spec
from ..engine import SessionTuning
from ..service import ClipService
from ..settings import Settings
from ..types import Tower
from . import snapstart, tower_function

if TYPE_CHECKING:
    from ..api.endpoints import EndpointName as Endpoint

log = logging.getLogger("clip_serverless.aws_lambda.entry")

# What each endpoint loads at init (where SnapStart snapshots it), from its registry entry: each function
# loads exactly one tower. compare's "textual" is its tokenizer and the Lambda client of the embed_text
# function, which embeds its texts (CLIP_TEXT_FUNCTION). embeddings' image client (CLIP_IMAGE_FUNCTION) serves
# image requests only: the first one creates it (botocore's import and the client: ~110 ms that a text request,
# the usual one, never needs; under SnapStart a client made at init would be made anew after each restore).
PRELOAD: dict[Endpoint, tuple[Tower, ...]] = {spec.name: spec.preload for spec in REGISTRY}


def preload_for(endpoint: Endpoint, requested: tuple[Tower, ...] | None = None) -> tuple[Tower, ...]:
    """The towers ``endpoint``'s function loads at init: its own (``PRELOAD``), or those of them that
    ``requested`` (``CLIP_PRELOAD``, :class:`~clip_serverless.settings.LambdaSettings`) names."""
    if requested is None:
        return PRELOAD[endpoint]
    return tuple(t for t in PRELOAD[endpoint] if t in requested)


# GET /healthz (every app answers it) through Mangum and the app once at init: what a first request sets up
# lazily (Mangum's event loop, anyio's backend, FastAPI's response serialisation) is done while Lambda gives
# init its full CPU, and before a SnapStart snapshot.
WARM_UP_EVENT: dict[str, Any] = {
    "version": "2.0", "routeKey": "$default", "rawPath": "/healthz", "rawQueryString": "", "headers": {},
    "requestContext": {"http": {"method": "GET", "path": "/healthz", "protocol": "HTTP/1.1",
                                "sourceIp": "127.0.0.1", "userAgent": "clip-serverless-init"},
                       "requestId": "init", "stage": "$default"},
    "isBase64Encoded": False,
}


ONE_VCPU_MB = 1769  # AWS: at 1,769 MB a function has the equivalent of one vCPU; CPU is proportional to memory


def engine_defaults(spec: EndpointSpec, memory_mb: int | None) -> SessionTuning:
    """The session tuning ``spec``'s function runs with at ``memory_mb``: the registry's, except below one vCPU's
    worth of CPU, where a second thread, let alone a spinning one, only burns the quota (embed_image at 1,024 MB:
    56 ms with one thread, 61 with two, 106 with two spinning; bench/bench_engine_settings.py). At one vCPU
    (1,769 MB) it is a wash: embed_image 39 ms with one thread, 43 with two spinning; embed_text 15 and 14."""
    if memory_mb is not None and memory_mb < ONE_VCPU_MB:
        return replace(spec.engine, threads=1, spinning=False)
    return spec.engine


@contextmanager
def without_pydantic_v1() -> Iterator[None]:
    """Keep ``pydantic.v1`` (~20 ms of import) out of init: FastAPI imports it as it registers each route, and as
    it encodes a plain value, only to tell v1 models apart, of which this package has none, and takes an
    ImportError for "no v1" (``fastapi/_compat/shared.py``). A ``None`` in ``sys.modules`` makes that import
    fail at once; it is removed again on the way out, so the process is left as it was (a later 422 or
    ``/healthz`` answer imports v1 then, once), and nothing else that imports v1 ever finds it missing."""
    if "pydantic.v1" in sys.modules:  # already imported (or blocked by someone else): nothing to save
        yield
        return
    sys.modules["pydantic.v1"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "pydantic.v1" in sys.modules and sys.modules["pydantic.v1"] is None:
            del sys.modules["pydantic.v1"]


def handler_for(endpoint: Endpoint) -> Callable[[Any, Any], dict[str, Any]]:
    # Init allocates objects that nearly all stay: collecting them on the way is wasted work (~5% of init).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _handler_for(endpoint)
    finally:
        if collecting:
            gc.enable()


def _handler_for(endpoint: Endpoint) -> Callable[[Any, Any], dict[str, Any]]:
    started = time.perf_counter()
    spec = endpoint_spec(endpoint)  # a KeyError naming the registry's endpoints for any other name
    settings = Settings.from_env(key_in_background=True)  # the key store's round trip overlaps the rest of init
    engine = settings.engine.with_defaults(engine_defaults(spec, settings.aws_lambda.memory_mb))
    service = ClipService.from_settings(settings, engine=engine)
    towers = preload_for(endpoint, settings.aws_lambda.preload)
    loading = service.start_preload(towers)  # sessions load in threads while FastAPI imports below
    from mangum import Mangum

    from ..api.app import build
    from .after_response import after_response, install
    from .metrics import emf_observer

    with without_pydantic_v1():
        app = build(settings, endpoints=(endpoint,), service=service)
    app_built = time.perf_counter()
    if service.cache is not None:
        emf = emf_observer(settings.cache)  # CLIP_CACHE_METRICS: EMF lines per request (the Lambda default)
        if emf is not None:
            service.cache.observe(emf)
        if "visual" in towers:
            # An image miss consults S3 on its first request; create the client (~240 ms) at init instead.
            service.cache.preload(spec.cache)
    # lifespan="off": with "auto" Mangum runs ASGI startup on every invocation.
    handler: Callable[[Any, Any], dict[str, Any]] = Mangum(
        app, lifespan="off", api_gateway_base_path=settings.aws_lambda.base_path)
    with without_pydantic_v1():
        handler(WARM_UP_EVENT, None)
    if spec.lends is not None:  # other functions' direct invocations for this tower's vectors
        handler = ServingTower(app, handler, service, spec.lends, max_images=settings.max_batch_size)
    # SnapStart: what init created and a restore makes stale (clients, random state, the key) is renewed.
    snapstart.install(settings=settings, service=service,
                      renew=[remote.renew for remote in app.state.remote_towers])
    waited = time.perf_counter()
    loading.wait()
    settings.api_key_holder.wait()  # a key that cannot be read fails init: the API never starts open
    ms = {"app": app_built - started, "waited": time.perf_counter() - waited, "init": time.perf_counter() - started,
          **{job: loading.started - started + seconds for job, seconds in loading.finished.items()}}
    log.info("init of %s (ms from handler_for): %s", endpoint, json.dumps({k: round(v * 1000) for k, v in ms.items()}))
    if settings.aws_lambda.in_lambda:
        gc.freeze()  # init's objects to the permanent generation: no collection during a request walks them
    if service.cache is not None and install(service.cache):  # Lambda: remote writes after the response
        return after_response(handler)
    return handler


class ServingTower:
    """The function's handler, which also answers other functions' direct invocations for the vectors of
    the tower it lends (:mod:`clip_serverless.aws_lambda.tower_function`): ``embed_text`` text vectors for
    ``compare``, ``embed_image`` image vectors for ``embeddings``."""

    def __init__(self, app: Any, handler: Callable[[Any, Any], dict[str, Any]], service: ClipService,
                 tower: Tower, *, max_images: int) -> None:
        self.app = app
        self.handler = handler
        self.service = service
        self.tower = tower
        self.max_images = max_images

    def __call__(self, event: Any, context: Any) -> dict[str, Any]:
        if self.tower == "textual" and tower_function.is_request(event):
            return tower_function.serve(event, self.service.text_encoder, self.service.manifest)
        if self.tower == "visual" and tower_function.is_image_request(event):
            return tower_function.serve_images(event, self.service, max_images=self.max_images)
        return self.handler(event, context)
