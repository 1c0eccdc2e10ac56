"""OpenAI's embeddings API (POST /v1/embeddings, GET /v1/models) through OpenAI's own `openai` client, LangChain's
OpenAIEmbeddings and LlamaIndex's OpenAIEmbedding against a real local server (uvicorn, in a thread), unchanged
but for a base_url; and the image vectors that the embeddings function gets from embed_image through Invoke.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from clip_serverless.api.endpoints import endpoint
from clip_serverless.api.openai_routes import (
    MAX_INPUTS,
    OpenAIRoutes,
    l2_normalised,
    max_inputs,
    worst_case_response_bytes,
)
from clip_serverless.aws_lambda.tower_function import ImageFunction
from clip_serverless.service import ClipService, ModelDir
from clip_serverless.settings import MAX_FLOAT_CHARS
from fastapi.testclient import TestClient

from tests.conftest import REPO, b64, shape_png
from tests.handlers import load_function
from tests.lambda_events import FakeContext, http_api_event, response_json
from tests.test_image_function import EmbedImageStandIn

MODEL = "clip/tiny-shapes"
API_KEY = "openai-test-key-7c2e"
CAPTIONS = ["a photo of a red circle.", "a photo of a blue square.", "a photo of a green triangle."]


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{b64(data)}"


@contextlib.contextmanager
def serving(tiny_model_path: Path, **env: str) -> Iterator[str]:
    """The local server's app (every endpoint) under uvicorn in a thread, on a free port."""
    import uvicorn
    from clip_serverless.api.app import build

    with pytest.MonkeyPatch.context() as mp:
        for key in ("CLIP_API_KEY", "CLIP_API_KEY_SECRET_ID", "CLIP_API_KEY_SSM_PARAMETER", "CLIP_IMAGE_FUNCTION"):
            mp.delenv(key, raising=False)
        for key, value in {"CLIP_MODEL_DIR": str(tiny_model_path), "CLIP_CACHE": "on", **env}.items():
            mp.setenv(key, value)
        app = build()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-openai-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(tiny_model_path: Path) -> Iterator[str]:
    with serving(tiny_model_path) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(tiny_model_path: Path) -> Iterator[str]:
    with serving(tiny_model_path, CLIP_API_KEY=API_KEY) as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    # No retries: an error must surface as the exception the client raises for its status.
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-checked-here", max_retries=0)


def clip_vectors(server: str, route: str, body: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The raw vectors of the same server's CLIP route, L2-normalised: what /v1/embeddings must give."""
    answer = httpx.post(f"{server}/clip/{route}", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return l2_normalised(np.array(answer.json()["embeddings"], dtype=np.float32))


def as_array(response: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.array([item.embedding for item in response.data], dtype=np.float32)


# -- what works -------------------------------------------------------------------------------------------
def test_a_text_and_a_list_of_texts(client: openai.OpenAI, server: str) -> None:
    one = client.embeddings.create(model=MODEL, input=CAPTIONS[0])
    assert one.object == "list" and one.model == MODEL and len(one.data) == 1
    assert one.data[0].object == "embedding" and one.data[0].index == 0
    many = client.embeddings.create(model=MODEL, input=CAPTIONS)
    assert [item.index for item in many.data] == [0, 1, 2]
    vectors = as_array(many)
    assert vectors.shape == (3, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)  # L2-normalised, as OpenAI's are
    assert np.allclose(vectors, clip_vectors(server, "embed_text", {"text": CAPTIONS}), atol=1e-6)
    assert np.allclose(as_array(one)[0], vectors[0], atol=1e-6)
    assert many.usage.prompt_tokens == many.usage.total_tokens > one.usage.prompt_tokens > 2


def test_base64_float_and_the_clients_default_agree(client: openai.OpenAI) -> None:
    default = client.embeddings.create(model=MODEL, input=CAPTIONS)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model=MODEL, input=CAPTIONS, encoding_format="float")
    raw = client.embeddings.create(model=MODEL, input=CAPTIONS, encoding_format="base64")
    assert all(isinstance(item.embedding, str) for item in raw.data)  # asked for explicitly: left as sent
    decoded = np.array([np.frombuffer(base64.b64decode(str(item.embedding)), dtype="<f4") for item in raw.data])
    assert np.array_equal(decoded, as_array(floats))  # little-endian float32, bit for bit the float answer
    assert np.array_equal(as_array(default), as_array(floats))


def test_model_by_version_id_or_omitted_and_dimensions_of_the_model(client: openai.OpenAI, server: str) -> None:
    want = as_array(client.embeddings.create(model=MODEL, input="a red circle"))
    by_version = client.embeddings.create(model="tiny-shapes", input="a red circle", dimensions=64, user="u-1")
    assert by_version.model == MODEL and np.array_equal(as_array(by_version), want)
    omitted = httpx.post(f"{server}/v1/embeddings", json={"input": "a red circle"}).json()
    assert omitted["model"] == MODEL


def test_images_as_data_uris_and_urls(client: openai.OpenAI, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    red, blue = shape_png("circle", "red"), shape_png("square", "blue")
    answer = client.embeddings.create(model=MODEL, input=[data_uri(red), data_uri(blue, "image/png")],
                                      extra_body={"modality": "image"})
    images = as_array(answer)
    want = clip_vectors(server, "embed_image", {"image": [{"type": "base64", "value": b64(red)},
                                                          {"type": "base64", "value": b64(blue)}]})
    assert np.allclose(images, want, atol=1e-6)
    assert answer.usage.prompt_tokens == 0
    texts = as_array(client.embeddings.create(model=MODEL, input=CAPTIONS))
    assert int(np.argmax(texts @ images[0])) == 0 and int(np.argmax(texts @ images[1])) == 1  # zero-shot
    # An https URL is fetched under the CLIP routes' URL policy (here the fetch itself is a stand-in).
    fetched: list[str] = []

    def fetch(url: str, policy: Any) -> bytes:
        fetched.append(url)
        return red

    monkeypatch.setattr("clip_serverless.api.images.fetch_image_url", fetch)
    by_url = client.embeddings.create(model=MODEL, input="https://images.example.com/red.png",
                                      extra_body={"modality": "image"})
    assert fetched == ["https://images.example.com/red.png"]
    assert np.allclose(as_array(by_url)[0], images[0], atol=1e-6)


def test_models_list(client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert model.id == MODEL and model.object == "model" and model.owned_by == "clip-serverless"
    assert isinstance(model.created, int) and model.created > 0


def test_async_client(server: str) -> None:
    import asyncio

    async def embed() -> Any:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0) as aclient:
            return await aclient.embeddings.create(model=MODEL, input=CAPTIONS)

    assert as_array(asyncio.run(embed())).shape == (3, 64)


def test_headers_cache_and_truncation(client: openai.OpenAI) -> None:
    text = "a photo of a circle drawn in the colour of a ripe cherry, number 7c"
    first = client.embeddings.with_raw_response.create(model=MODEL, input=text)
    second = client.embeddings.with_raw_response.create(model=MODEL, input=text)
    assert first.headers["x-model-id"] == MODEL and float(first.headers["x-processing-time"]) >= 0
    assert "misses=1" in first.headers["x-clip-cache"] and "hits=1" in second.headers["x-clip-cache"]
    assert np.array_equal(as_array(first.parse()), as_array(second.parse()))
    long = client.embeddings.with_raw_response.create(model=MODEL, input=["short", "word " * 100])
    assert long.headers["x-clip-truncated-texts"] == "1"
    assert long.parse().usage.prompt_tokens == 3 + 77



def test_a_text_request_is_tokenized_once(make_app: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The usage count comes from the tokenization the embedding needs: 2,048 long texts take ~0.35 s to
    tokenize on a whole vCPU, which a second pass would spend again."""
    from clip_serverless.engine.tokenizer import ClipTokenizer

    calls: list[int] = []
    original = ClipTokenizer.encode

    def counted(self: ClipTokenizer, texts: Any) -> Any:
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(ClipTokenizer, "encode", counted)
    with TestClient(make_app()) as local_client:
        response = local_client.post("/v1/embeddings", json={"input": ["short", "word " * 100]})
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == 3 + 77
    assert calls == [2]

# -- what is refused, and how the client sees it -----------------------------------------------------------
def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    """The error object as the client read it, checked against OpenAI's shape."""
    whole = exc.response.json()
    assert set(whole) == {"error"} and set(whole["error"]) == {"message", "type", "param", "code"}
    assert exc.body == whole["error"]
    return dict(whole["error"])


def test_an_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input="a")
    error = _error(caught.value)
    assert error["code"] == "model_not_found" and error["param"] == "model" and error["type"] == "invalid_request_error"
    assert "text-embedding-3-small" in error["message"] and MODEL in error["message"]


@pytest.mark.parametrize(("kwargs", "param", "words"), [
    ({"input": []}, "input", "empty list"),
    ({"input": ""}, "input", "empty string"),
    ({"input": ["a", ""]}, "input", "index 1"),
    ({"input": [[49406, 320, 49407]]}, "input", "token ids"),  # LangChain's default sends these
    ({"input": [320, 1125]}, "input", "token ids"),
    ({"input": "a", "dimensions": 32}, "dimensions", "64 dimensions"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, "input", f"at most {MAX_INPUTS} texts"),
])
def test_bad_requests_are_400_in_openais_shape(client: openai.OpenAI, kwargs: dict[str, Any], param: str,
                                               words: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, **kwargs)
    error = _error(caught.value)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"], error
    assert caught.value.status_code == 400


@pytest.mark.parametrize(("value", "words"), [
    (data_uri(b"hello, I am not an image"), "Could not load input image"),
    ("data:image/png;base64,%%%", "Could not load input image"),
    ("https://127.0.0.1/x.png", "Could not load input image"),  # the CLIP routes' URL policy
    ("http://images.example.com/x.png", "Could not load input image"),
    ("a photo of a cat", "not an image"),
])
def test_bad_images_are_400(client: openai.OpenAI, value: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input=[data_uri(shape_png()), value], extra_body={"modality": "image"})
    error = _error(caught.value)
    assert error["param"] == "input" and words in error["message"]


def test_too_many_images_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input=[data_uri(shape_png())] * 9, extra_body={"modality": "image"})
    assert "at most 8 images" in _error(caught.value)["message"]


def test_bodies_that_are_not_json_or_not_an_object_are_400(server: str) -> None:
    for raw in (b'{"input": "a"', b'{"input": NaN}', b"[1, 2]", b'"a"'):
        answer = httpx.post(f"{server}/v1/embeddings", content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error", raw


def test_the_api_key_is_checked_as_openai_sends_it(keyed_server: str) -> None:
    right = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=API_KEY, max_retries=0)
    assert len(right.embeddings.create(model=MODEL, input="a").data) == 1
    assert right.models.list().data[0].id == MODEL
    wrong = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="wrong", max_retries=0)
    for call in (lambda: wrong.embeddings.create(model=MODEL, input="a"), wrong.models.list):
        with pytest.raises(openai.AuthenticationError) as caught:
            call()
        error = _error(caught.value)
        assert error["code"] == "invalid_api_key" and API_KEY not in error["message"]
    # No key at all, and a wrong key with a bad body: 401 before the body is read.
    missing = httpx.post(f"{keyed_server}/v1/embeddings", json={"model": MODEL, "input": "a"})
    assert missing.status_code == 401 and "Authorization" in missing.json()["error"]["message"]
    assert missing.headers["www-authenticate"] == "Bearer"
    bad_body = httpx.post(f"{keyed_server}/v1/embeddings", content=b"{", headers={"authorization": "Bearer nope"})
    assert bad_body.status_code == 401
    # The CLIP routes of the same server keep their own shape.
    clip = httpx.post(f"{keyed_server}/clip/embed_text", json={"text": "a"}, headers={"authorization": "Bearer nope"})
    assert clip.status_code == 401 and clip.json() == {"message": "Unauthorized api_key"}


# -- frameworks built on the client ------------------------------------------------------------------------
def test_langchain_openai_embeddings(client: openai.OpenAI, server: str) -> None:
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: LangChain then sends the texts; by default it sends tiktoken's token
    # ids (after downloading tiktoken's vocabulary), which CLIP cannot read (400, see above).
    embedder = OpenAIEmbeddings(model=MODEL, base_url=f"{server}/v1", api_key="x",  # type: ignore[arg-type]
                                check_embedding_ctx_length=False, max_retries=0)
    documents = np.array(embedder.embed_documents(CAPTIONS), dtype=np.float32)
    query = np.array(embedder.embed_query(CAPTIONS[0]), dtype=np.float32)
    want = as_array(client.embeddings.create(model=MODEL, input=CAPTIONS))
    assert np.allclose(documents, want, atol=1e-6) and np.allclose(query, want[0], atol=1e-6)


def test_llamaindex_openai_embedding(client: openai.OpenAI, server: str) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding  # type: ignore[import-untyped]

    embedder = OpenAIEmbedding(model_name=MODEL, api_base=f"{server}/v1", api_key="x", max_retries=0)
    batch = np.array(embedder.get_text_embedding_batch(CAPTIONS), dtype=np.float32)
    want = as_array(client.embeddings.create(model=MODEL, input=CAPTIONS))
    assert np.allclose(batch, want, atol=1e-6)
    assert np.allclose(np.array(embedder.get_query_embedding(CAPTIONS[1]), dtype=np.float32), want[1], atol=1e-6)


# -- the response limit ------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("dim", [64, 512, 768])
def test_the_text_limit_keeps_the_worst_case_answer_within_lambdas_response(dim: int, encoding: str) -> None:
    from clip_serverless.settings import DEFAULT_MAX_RESPONSE_BYTES

    most = max_inputs(dim, encoding, "clip/ViT-L-14", DEFAULT_MAX_RESPONSE_BYTES)
    assert most <= MAX_INPUTS
    if most < MAX_INPUTS:  # the bound is what stops the list
        assert worst_case_response_bytes(most + 1, dim, encoding, "clip/ViT-L-14") > DEFAULT_MAX_RESPONSE_BYTES
    # The bound holds for an answer whose every float is as long as Python writes one.
    widest = -2.2250738585072014e-308
    assert len(repr(widest)) == MAX_FLOAT_CHARS
    count = 7
    value: Any = [widest] * dim if encoding == "float" else "A" * (4 * -(-4 * dim // 3))
    body = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": value} for i in range(count)],
            "model": "clip/ViT-L-14", "usage": {"prompt_tokens": 77 * count, "total_tokens": 77 * count}}
    rendered = json.dumps(json.dumps(body, separators=(",", ":")))
    header = ",".join(map(str, range(count)))
    bound = worst_case_response_bytes(count, dim, encoding, "clip/ViT-L-14")
    assert len(rendered) + len(header) <= bound <= len(rendered) + len(header) + 64


def test_the_worst_case_size_is_the_rendered_count_for_every_count() -> None:
    """The closed form (sizes built once) against the sizes built afresh for each count."""
    def built(count: int, dim: int, encoding: str, model_id: str) -> int:
        if encoding == "base64":
            value = '"' + "A" * (4 * -(-4 * dim // 3)) + '"'
        else:
            value = "[" + ",".join(["0" * 24] * dim) + "]"
        row = '{"object":"embedding","index":,"embedding":' + value + "}"
        outer = ('{"object":"list","data":[],"model":' + json.dumps(model_id) +
                 ',"usage":{"prompt_tokens":' + "9" * 12 + ',"total_tokens":' + "9" * 12 + "}}")
        digits = sum(len(str(i)) for i in range(count))
        return len(json.dumps(outer)) + count * (len(json.dumps(row)) - 2 + 1) + 2 * digits + count

    for encoding in ("float", "base64"):
        for count in [*range(0, 120), 999, 1000, 1001, 2047, 2048, 10_000]:
            assert worst_case_response_bytes(count, 512, encoding, 'clip/"x"') == built(count, 512, encoding,
                                                                                      'clip/"x"'), (encoding, count)


# -- image vectors from another function (the embeddings function on AWS) -----------------------------------
@pytest.fixture(scope="module")
def local(tiny_model_path: Path) -> ClipService:
    return ClipService(ModelDir.open(tiny_model_path))


def test_the_routes_use_the_image_function_when_one_is_configured(local: ClipService, tiny_model_path: Path) -> None:
    from clip_serverless.settings import Settings
    from fastapi import FastAPI

    stand_in = EmbedImageStandIn(local)
    service = ClipService(ModelDir.open(tiny_model_path))
    routes = OpenAIRoutes(service, Settings(model_dir=tiny_model_path),
                          image_function=ImageFunction("EmbedImageFunction", service.manifest, client=stand_in))
    assert routes.remote_towers == [routes.image_function]
    app = FastAPI()
    app.include_router(routes.router(("embeddings",)))
    with TestClient(app) as http:
        red = shape_png("circle", "red")
        answer = http.post("/v1/embeddings", json={"input": [data_uri(red)], "modality": "image"})
        assert answer.status_code == 200, answer.text
        assert len(stand_in.payload_sizes) == 1
        want = l2_normalised(local.embed_images([red], use_cache=False).vectors)
        assert np.allclose(np.array(answer.json()["data"][0]["embedding"]), want[0], atol=1e-6)
        bad = http.post("/v1/embeddings", json={"input": [data_uri(b"nope")], "modality": "image"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
        assert bad.json()["error"]["message"].startswith("Could not load input image. Cause: ")
    assert service.loaded_towers() == []  # the image tower never loaded here


# -- the Lambda functions, in process -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def handlers(tiny_model_path: Path) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIP_MODEL_DIR", str(tiny_model_path))
        mp.setenv("CLIP_CACHE", "off")
        mp.delenv("CLIP_IMAGE_FUNCTION", raising=False)
        return {"embeddings": load_function("embeddings").handler}


def test_the_embeddings_function_answers_api_gateway_events(handlers: dict[str, Any]) -> None:
    spec = endpoint("embeddings")
    for route in spec.routes:
        body = {"model": MODEL, "input": CAPTIONS} if route.method == "POST" else None
        response = handlers["embeddings"](http_api_event(route.method, route.path, body), FakeContext())
        assert response["statusCode"] == 200, response
        assert response_json(response)["object"] == "list"
    event = json.loads((REPO / "events" / "embeddings.http-api.json").read_text())
    answer = response_json(handlers["embeddings"](event, FakeContext()))
    assert len(answer["data"]) == len(json.loads(base64.b64decode(event["body"]))["input"])
    # Its app serves only its own routes.
    other = handlers["embeddings"](http_api_event("POST", "/clip/embed_text", {"text": "a"}), FakeContext())
    assert other["statusCode"] == 404


def test_the_embeddings_function_never_imports_pillow_nor_loads_the_visual_tower(tiny_model_path: Path) -> None:
    """Its init loads the text tower only; the image function's Lambda client (and botocore) wait for the first
    image request (tests/test_built_functions.py makes one)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import json, os, sys
        os.environ.update(CLIP_MODEL_DIR={str(tiny_model_path)!r}, CLIP_CACHE="off",
                          CLIP_IMAGE_FUNCTION="EmbedImageFunction")
        sys.path.insert(0, {str(REPO)!r})
        from tests.handlers import load_function
        handler = load_function("embeddings").handler
        print(json.dumps({{"pil": any(m == "PIL" or m.startswith("PIL.") for m in sys.modules),
                          "botocore": "botocore" in sys.modules, "ftfy": "ftfy" in sys.modules,
                          "loaded": handler.app.state.service.loaded_towers(),
                          "remote": [type(r).__name__ for r in handler.app.state.remote_towers],
                          "clients": [r.loaded for r in handler.app.state.remote_towers]}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe == {"pil": False, "botocore": False, "ftfy": False, "loaded": ["textual"],
                     "remote": ["ImageFunction"], "clients": [False]}


def test_an_image_function_client_not_created_yet_is_not_renewed(tiny_model_path: Path) -> None:
    """After a SnapStart restore a client created at init is replaced; one never created stays lazy."""
    manifest = ModelDir.open(tiny_model_path).manifest
    lazy = ImageFunction("EmbedImageFunction", manifest)
    lazy.renew()
    assert not lazy.loaded
    made = ImageFunction("EmbedImageFunction", manifest, client=object())
    first = made.client
    made.renew()
    assert made.loaded and made.client is not first
