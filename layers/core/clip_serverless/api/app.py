"""Building the FastAPI app: one endpoint for a Lambda function, all three for the local server."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..service import ClipService
from ..settings import Settings
from .endpoints import endpoint
from .errors import error_response, install_error_handlers
from .openai_routes import OpenAIRoutes
from .routes import ENDPOINTS, ClipRoutes, Endpoint


def package_version() -> str:
    """The version the core layer's build wrote (``infra/build_layer.py``), else the installed distribution's.

    A layer holds no distribution metadata, and looking for it costs importlib.metadata's import (~10 ms of a
    cold start) to find nothing."""
    try:
        from .._version import VERSION as built  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # a source checkout or an installed distribution
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("clip-serverless")
        except PackageNotFoundError:
            return "0.1.0"
    return str(built)


VERSION = package_version()

_INSTANCE = str(uuid.uuid4())


# Bytes that JSON escaping doubles when API Gateway puts the body into the Lambda event as a string. (Other
# control characters take 6 bytes escaped, but cannot appear raw in valid JSON.)
_ESCAPED = (b'"', b"\\", b"\n", b"\r", b"\t")


def event_bytes(chunk: bytes) -> int:
    """What ``chunk`` of a body weighs inside a Lambda event: its length plus one per escaped byte."""
    return len(chunk) + sum(chunk.count(byte) for byte in _ESCAPED)


class BodyLimit:
    """413 with a JSON message for a body a Lambda event could not carry (see ``settings.DEFAULT_MAX_BODY_BYTES``).

    The body counts as it would sit in the event: quotes, backslashes and line breaks twice. This runs before
    routing, so before the API key is checked: on AWS an oversize request never reaches the function either.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = (
            f"The request body is too large: the limit is {max_bytes} bytes (AWS Lambda takes 6 MB per request, "
            f"the API Gateway event around the body included; quotes, backslashes and line breaks count twice). "
            f'Send large images by URL ({{"type": "url", "value": "https://..."}}) instead of base64, '
            f"or fewer per request.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(413, self.message)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await too_large(scope, receive, send)
                return
        # Within the declared length (or none, or a lying one): count while reading. Escaping at most doubles
        # a byte, so a body under half the limit is not counted at all (five passes over a base64 image
        # cost 0.5 ms a request).
        weight = length = weighed = 0
        body: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            body.append(chunk)
            length += len(chunk)
            if 2 * length > self.max_bytes:
                weight += sum(event_bytes(part) for part in body[weighed:])
                weighed = len(body)
                if weight > self.max_bytes:
                    await too_large(scope, receive, send)
                    return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(service: ClipService, settings: Settings, endpoints: tuple[Endpoint, ...] = ENDPOINTS,
               *, routes: ClipRoutes | None = None) -> FastAPI:
    manifest = service.manifest
    app = FastAPI(
        title="clip-serverless",
        version=VERSION,
        summary=f"OpenAI CLIP ({manifest.model_id}) with Roboflow Inference's CLIP API.",
    )
    app.state.service = service
    install_error_handlers(app)
    clip = routes or ClipRoutes(service, settings)
    # Strict JSON bodies, and a query/header API key checked before the body is parsed (body.py).
    app.include_router(clip.router(endpoints))
    openai = OpenAIRoutes(service, settings, loader=clip.loader)  # OpenAI's shapes, errors included
    app.include_router(openai.router(endpoints))
    # Other functions' towers this app calls through Lambda Invoke: their clients are made at init (entry.py).
    app.state.remote_towers = ([service.text_encoder] if service.text_is_remote else []) + openai.remote_towers

    def info() -> dict[str, object]:
        return {"name": "clip-serverless", "version": VERSION, "uuid": _INSTANCE}

    demo = manifest.provenance.get("source") != "pretrained"

    def health() -> dict[str, object]:
        answer: dict[str, object] = {
            "status": "ok",
            "model_id": manifest.model_id,
            "clip_version_id": manifest.version_id,
            "precision": manifest.precision,
            "provenance": manifest.provenance,
            "demo": demo,
            "endpoints": [route.path for e in endpoints for route in endpoint(e).routes],
            "loaded": service.loaded_towers(),
        }
        if demo:
            answer["warning"] = (f"{manifest.model_id} is a demo model ({manifest.provenance.get('source')}), "
                                 "not OpenAI's CLIP: its embeddings mean nothing for real images and text.")
        return answer

    app.add_api_route("/", info, methods=["GET"], summary="Server info (Roboflow's /info shape)")
    app.add_api_route("/info", info, methods=["GET"], summary="Server info (Roboflow's /info shape)")
    app.add_api_route("/healthz", health, methods=["GET"], summary="Health and the deployed model")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    logging.getLogger("clip_serverless").setLevel(logging.INFO)
    return app


def build(settings: Settings | None = None, endpoints: tuple[Endpoint, ...] = ENDPOINTS, *,
          service: ClipService | None = None) -> FastAPI:
    """The app for ``endpoints``, every part configured from ``settings`` (default: the environment, read now):
    model directory opened and validated, service (engine, cache, text tower) built, routes bound. A Lambda
    function passes its ``service``, built and loading before FastAPI is even imported (``entry.py``)."""
    settings = settings or Settings.from_env()
    return create_app(service or ClipService.from_settings(settings), settings, endpoints)
