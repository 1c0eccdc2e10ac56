"""The endpoints: one entry each, which every consumer reads.

An endpoint is what one Lambda function serves on AWS (and what ``handler_for(name)`` builds); the local
server serves them all. Its entry says everything the code needs about it, in one place:

- its routes (method, path, the handler's name, request and response models, summary): ``routes.py``
  and ``openai_routes.py`` register them from here, ``app.py`` lists them in ``/healthz``;
- the towers that run in its function and what it therefore loads at init, the cache modalities it keeps,
  the other function it asks for one modality's vectors through Lambda ``Invoke`` and the tower it lends
  to others that way: ``aws_lambda/entry.py``;
- its function's logical id in both templates: ``events/make_events.py`` writes an event per endpoint,
  and ``tests/test_template.py`` checks both templates against this registry (the routes go to the
  function, the function has the layers, environment and ``lambda:InvokeFunction`` permission its entry
  implies, and nothing more); ``tests/test_built_functions.py`` runs every function it lists.

The templates cannot import Python: a new endpoint is an entry here, its handler, ``functions/<name>/app.py``,
the function and its log group in both templates, and an example body in ``events/make_events.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..engine import SessionTuning
from ..types import Modality, Tower

if TYPE_CHECKING:
    from fastapi import APIRouter
    from pydantic import BaseModel

Method = Literal["GET", "POST"]
# The wire format of an endpoint: Roboflow Inference's (errors {"message"}; handlers on ClipRoutes) or
# OpenAI's (errors {"error": {...}}; handlers on OpenAIRoutes).
Api = Literal["roboflow", "openai"]
EndpointName = str  # a key of the registry: "embed_text", ...

# Every app answers these too; on API Gateway they go to the function of the one endpoint with ``site``.
SITE_ROUTES: tuple[tuple[Method, str], ...] = (("GET", "/"), ("GET", "/healthz"), ("GET", "/info"))

# The variable that names another function serving a tower (its alias ARN on AWS), and its timeout's.
FUNCTION_ENV: dict[Tower, str] = {"textual": "CLIP_TEXT_FUNCTION", "visual": "CLIP_IMAGE_FUNCTION"}


@dataclass(frozen=True)
class Route:
    method: Method
    path: str
    handler: str  # the method of the API's routes object (ClipRoutes, OpenAIRoutes) that answers
    # The JSON body (None: no body) and the answer: models of api/schemas.py, by name. The registry is read at
    # Lambda init before pydantic is imported (entry.py starts loading the model first), so the models are too.
    request_model: str | None
    response_model: str
    summary: str
    description: str = ""

    @property
    def request(self) -> type[BaseModel] | None:
        return None if self.request_model is None else schema(self.request_model)

    @property
    def response(self) -> type[BaseModel]:
        return schema(self.response_model)


def schema(name: str) -> type[BaseModel]:
    """The model ``name`` of ``api/schemas.py`` (imported now if it was not)."""
    from . import schemas

    model: type[BaseModel] = getattr(schemas, name)
    return model


@dataclass(frozen=True)
class Invoked:
    """Another endpoint's function that embeds one modality for this one, through Lambda ``Invoke``."""

    tower: Tower  # the tower it runs for this endpoint
    endpoint: EndpointName  # whose function (it must lend that tower: ``EndpointSpec.lends``)

    @property
    def env(self) -> str:
        """The variable naming that function; ``<env>_TIMEOUT`` is how long to wait for it."""
        return FUNCTION_ENV[self.tower]


@dataclass(frozen=True)
class EndpointSpec:
    name: EndpointName  # functions/<name>/app.py, events/<name>.*.json, handler_for(name)
    function: str  # the Lambda function's logical id in template.yaml and template.image.yaml
    api: Api
    summary: str
    routes: tuple[Route, ...]
    towers: tuple[Tower, ...]  # the ONNX towers that run in this function (its model layer holds them)
    cache: tuple[Modality, ...]  # what its embedding cache holds (the S3 client is created at init for images)
    invokes: Invoked | None = None  # the other modality's vectors, from another function
    lends: Tower | None = None  # the tower whose vectors it gives other functions' direct invocations
    site: bool = False  # on API Gateway, also GET /, /healthz and /info
    # How its function's ONNX Runtime sessions run, unless CLIP_NUM_THREADS / CLIP_ORT_* say otherwise; below
    # one vCPU's worth of memory the entry makes it one thread without spinning (entry.engine_defaults).
    engine: SessionTuning = field(default_factory=SessionTuning)

    @property
    def preload(self) -> tuple[Tower, ...]:
        """What the function loads at init (``ClipService.preload``): its towers, and "textual" when another
        function runs its text tower (the tokenizer and that function's Lambda client stay here)."""
        here = set(self.towers)
        if self.invokes is not None and self.invokes.tower == "textual":
            here.add("textual")
        return tuple(tower for tower in ("visual", "textual") if tower in here)

    @property
    def gateway_routes(self) -> tuple[tuple[Method, str], ...]:
        """What API Gateway sends to this endpoint's function."""
        own = tuple((route.method, route.path) for route in self.routes)
        return own + (SITE_ROUTES if self.site else ())


# ONNX Runtime's session settings from one vCPU's worth of memory up (bench/bench_engine_settings.py, warm
# requests of the built functions under 2,048 MB's CPU share): spinning workers answer the ops of a run sooner
# (embed_image 32-36 vs 38 ms, embed_text 12.5-13.6 vs 17), as long as nothing else in the process wants the
# CPU meanwhile. compare runs its image while another thread calls embed_text and reads the answer: spinning
# there cost 48-50 ms against 39-44. Threads: every vCPU the function sees (2); memory arena and patterns:
# ONNX Runtime's own (switching either off changed nothing measurable).
ALONE = SessionTuning(spinning=True)  # the session's runs have the CPU to themselves
BESIDE_A_CALL = SessionTuning(spinning=False)  # another thread works during the session's runs

REGISTRY: tuple[EndpointSpec, ...] = (
    EndpointSpec(
        name="embed_image", function="EmbedImageFunction", api="roboflow",
        summary="CLIP image embeddings (Roboflow Inference's API); image vectors for other functions",
        routes=(Route("POST", "/clip/embed_image", "embed_image", "ClipImageEmbeddingRequest", "ClipEmbeddingResponse",
                      "CLIP Image Embeddings", "Run the OpenAI CLIP model to embed image data."),),
        towers=("visual",), cache=("image",), lends="visual", engine=ALONE),
    EndpointSpec(
        name="embed_text", function="EmbedTextFunction", api="roboflow",
        summary="CLIP text embeddings (Roboflow Inference's API); text vectors for other functions",
        routes=(Route("POST", "/clip/embed_text", "embed_text", "ClipTextEmbeddingRequest", "ClipEmbeddingResponse",
                      "CLIP Text Embeddings", "Run the OpenAI CLIP model to embed text data."),),
        towers=("textual",), cache=("text",), lends="textual", site=True, engine=ALONE),
    EndpointSpec(
        name="compare", function="CompareFunction", api="roboflow",
        summary="CLIP similarity of a subject and prompts (Roboflow Inference's API)",
        routes=(Route("POST", "/clip/compare", "compare", "ClipCompareRequest", "ClipCompareResponse",
                      "CLIP Compare", "Run the OpenAI CLIP model to compute similarity scores."),),
        towers=("visual",), cache=("image", "text"), invokes=Invoked("textual", "embed_text"), engine=BESIDE_A_CALL),
    EndpointSpec(
        name="embeddings", function="EmbeddingsFunction", api="openai",
        summary="OpenAI's embeddings API: text, and images with \"modality\": \"image\"",
        routes=(Route("POST", "/v1/embeddings", "embeddings", "OpenAIEmbeddingRequest", "OpenAIEmbeddingResponse",
                      "Embeddings (OpenAI's API)",
                      "L2-normalised CLIP embeddings of texts, or of images with `\"modality\": \"image\"`."),
                Route("GET", "/v1/models", "models", None, "OpenAIModelList", "Models (OpenAI's API)",
                      "The model this deployment serves.")),
        towers=("textual",), cache=("text",), invokes=Invoked("visual", "embed_image"), engine=ALONE),
)

ENDPOINTS: tuple[EndpointName, ...] = tuple(spec.name for spec in REGISTRY)
_BY_NAME = {spec.name: spec for spec in REGISTRY}


def endpoint(name: EndpointName) -> EndpointSpec:
    """The registry entry of ``name``; a KeyError that lists the endpoints for any other name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no endpoint {name!r}; the registry has {', '.join(ENDPOINTS)}") from None


def register(router: APIRouter, names: Iterable[EndpointName], api: Api, handlers: object) -> APIRouter:
    """Add to ``router`` the routes of the endpoints among ``names`` that speak ``api``, each answered by the
    method of ``handlers`` that its entry names. The handlers are sync: FastAPI runs them in its thread
    pool, so ONNX work never blocks the event loop."""
    for name in names:
        spec = endpoint(name)
        if spec.api != api:
            continue
        for route in spec.routes:
            router.add_api_route(route.path, getattr(handlers, route.handler), methods=[route.method],
                                 response_model=route.response, summary=route.summary, description=route.description)
    return router
