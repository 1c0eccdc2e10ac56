"""What a Lambda function's module calls once, at init: build the app for one endpoint, wrap it in Mangum.

Module level in the function's ``app.py`` runs once per container, so the model loads at init (where
SnapStart can snapshot it), never per request.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from mangum import Mangum

from ..cache.after_response import after_response, install
from ..service import Tower
from .app import build
from .routes import Endpoint

# What each endpoint needs. compare loads both towers at init: almost every compare call needs both
# (image subject vs text prompts is the default), and init is where the work is cheapest to pay
# (and where SnapStart snapshots it).
PRELOAD: dict[Endpoint, tuple[Tower, ...]] = {
    "embed_image": ("visual",),
    "embed_text": ("textual",),
    "compare": ("visual", "textual"),
}


def preload_for(endpoint: Endpoint) -> tuple[Tower, ...]:
    raw = os.environ.get("CLIP_PRELOAD", "").strip().lower()
    if raw == "none":
        return ()
    if raw:
        return tuple(t for t in PRELOAD[endpoint] if t in raw.split(","))
    return PRELOAD[endpoint]


def handler_for(endpoint: Endpoint) -> Callable[[Any, Any], dict[str, Any]]:
    app = build(endpoints=(endpoint,))
    service = app.state.service
    towers = preload_for(endpoint)
    service.preload(towers)
    if service.cache is not None and "visual" in towers:
        # An image miss consults S3 on its first request; create the client (~240 ms) at init instead.
        service.cache.preload(("image", "text") if endpoint == "compare" else ("image",))
    # lifespan="off": with "auto" Mangum runs ASGI startup on every invocation.
    handler = Mangum(app, lifespan="off", api_gateway_base_path=os.environ.get("CLIP_BASE_PATH", "/"))
    if service.cache is not None and install(service.cache):  # Lambda: S3 writes after the response
        return after_response(handler)
    return handler
