"""Where the routes' blocking work runs: on the invoking thread under Lambda (Mangum), in FastAPI's thread
pool on a server (the event loop stays free for other clients)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from clip_serverless.api.dispatch import InlineOnLambda, inline_on_lambda
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from mangum import Mangum
from pydantic import BaseModel

from tests.conftest import b64
from tests.lambda_events import FakeContext, http_api_event, response_json


class Body(BaseModel):
    text: str


class Handlers:
    """Sync handlers recording the thread they ran on."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def echo(self, request: Request, body: Body) -> dict[str, Any]:
        self.threads.append(threading.current_thread())
        return {"text": body.text, "path": request.url.path}


def app_for(handlers: Handlers) -> FastAPI:
    app = FastAPI()
    app.add_api_route("/echo", InlineOnLambda(handlers).echo, methods=["POST"])
    return app


def test_under_lambda_the_handler_runs_on_the_invoking_thread() -> None:
    handlers = Handlers()
    handler: Callable[[Any, Any], dict[str, Any]] = Mangum(app_for(handlers), lifespan="off")
    response = handler(http_api_event("POST", "/echo", {"text": "hi"}), FakeContext())
    assert response["statusCode"] == 200, response
    assert response_json(response) == {"text": "hi", "path": "/echo"}
    assert handlers.threads == [threading.current_thread()]


def test_on_a_server_the_handler_runs_in_the_thread_pool() -> None:
    handlers = Handlers()
    with TestClient(app_for(handlers)) as client:
        response = client.post("/echo", json={"text": "hi"})
    assert response.status_code == 200 and response.json() == {"text": "hi", "path": "/echo"}
    assert len(handlers.threads) == 1 and handlers.threads[0] is not threading.current_thread()
    assert handlers.threads[0].name != "MainThread"


def test_validation_and_openapi_still_see_the_handlers_parameters() -> None:
    handlers = Handlers()
    with TestClient(app_for(handlers)) as client:
        assert client.post("/echo", json={"wrong": 1}).status_code == 422
        schema = client.get("/openapi.json").json()
    body = schema["paths"]["/echo"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/Body"}
    assert handlers.threads == []


def test_a_handler_without_a_request_parameter_is_refused() -> None:
    def no_request(body: Body) -> None: ...

    with pytest.raises(TypeError, match="no Request parameter"):
        inline_on_lambda(no_request)


def test_the_clip_routes_run_inline_under_lambda(make_app: Callable[..., Any], red_circle: bytes,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The product's own embed_image route, through Mangum: the embedding runs on the invoking thread."""
    app = make_app()
    service = app.state.service
    seen: list[threading.Thread] = []
    embed = service.embed_images

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread())
        return embed(*args, **kwargs)

    monkeypatch.setattr(service, "embed_images", recording)
    handler: Callable[[Any, Any], dict[str, Any]] = Mangum(app, lifespan="off")
    event = http_api_event("POST", "/clip/embed_image", {"image": {"type": "base64", "value": b64(red_circle)}})
    response = handler(event, FakeContext())
    assert response["statusCode"] == 200, response
    assert len(response_json(response)["embeddings"]) == 1
    assert seen == [threading.current_thread()]
