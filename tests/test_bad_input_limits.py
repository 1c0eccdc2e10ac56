"""Bad input at the edges: non-finite JSON numbers, the API key before the body, the access log, size limits."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.lambda_events import FakeContext, http_api_event, response_json, rest_api_event

JSON = {"content-type": "application/json"}
KEY = "s3cret"


def post_raw(client: TestClient, route: str, raw: str | bytes, *, params: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> Any:
    return client.post(f"/clip/{route}", content=raw, params=params, headers={**JSON, **(headers or {})})


def assert_message(response: Any, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["message"]
    assert isinstance(message, str)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def open_client(make_app: Callable[..., Any]) -> Iterator[TestClient]:
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def keyed_client(make_app: Callable[..., Any]) -> Iterator[TestClient]:
    with TestClient(make_app(CLIP_API_KEY=KEY), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def endpoint_app(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """The single-endpoint app a Lambda function builds (api/app.py build with one endpoint)."""

    def build(endpoint: str, **env: str) -> Any:
        from clip_serverless.api.app import build as build_app

        monkeypatch.setenv("CLIP_MODEL_DIR", str(tiny_model_path))
        monkeypatch.setenv("CLIP_CACHE", "off")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return build_app(endpoints=(endpoint,))

    return build


# -- NaN, Infinity, -Infinity and overflowing numbers: 400 "not valid JSON", never a 500 -----------------

NON_FINITE: dict[str, tuple[str, str, str]] = {
    # case: (route, raw body, token named in the message)
    "NaN text": ("embed_text", '{"text": NaN}', "NaN"),
    "Infinity text": ("embed_text", '{"text": Infinity}', "Infinity"),
    "-Infinity text": ("embed_text", '{"text": -Infinity}', "-Infinity"),
    "NaN list item": ("embed_text", '{"text": ["a red circle", NaN]}', "NaN"),
    "Infinity in a valid optional field": ("embed_text", '{"text": "a", "start": Infinity}', "Infinity"),
    "NaN in an ignored unknown field": ("embed_text", '{"text": "a", "extra": {"deep": [[1, -Infinity]]}}',
                                        "-Infinity"),
    "overflowing number": ("embed_text", '{"text": 1e999}', "1e999"),
    "overflowing negative": ("embed_text", '{"text": ["a"], "start": -2e308}', "-2e308"),
    "NaN image value": ("embed_image", '{"image": {"type": "base64", "value": NaN}}', "NaN"),
    "NaN in an image list": ("embed_image", '{"image": [{"type": "url", "value": "https://a.example/x.jpg"}, '
                                            '{"type": "base64", "value": Infinity}]}', "Infinity"),
    "NaN prompt list item": ("compare", '{"subject": "a", "subject_type": "text", "prompt": ["b", NaN]}', "NaN"),
    "NaN in a prompt dict": ("compare", '{"subject": "a", "subject_type": "text", "prompt": {"k": NaN}}', "NaN"),
    "Infinity as a prompt dict's image": (
        "compare", '{"subject": "a", "subject_type": "text", "prompt_type": "image", '
                   '"prompt": {"k": {"type": "base64", "value": -Infinity}}}', "-Infinity"),
    "NaN subject": ("compare", '{"subject": NaN, "prompt": "a"}', "NaN"),
    "bare NaN body": ("embed_text", "NaN", "NaN"),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_numbers_are_400_not_valid_json(open_client: TestClient, case: str) -> None:
    route, raw, token = NON_FINITE[case]
    message = assert_message(post_raw(open_client, route, raw), 400, "not valid JSON", token)
    assert "Traceback" not in message


def test_non_finite_numbers_through_a_lambda_function(endpoint_app: Callable[..., Any]) -> None:
    from mangum import Mangum

    handler: Any = Mangum(endpoint_app("embed_text"), lifespan="off")
    for make_event in (http_api_event, rest_api_event):
        for raw in ('{"text": NaN}', '{"text": ["a", -Infinity]}'):
            response = handler(make_event("POST", "/clip/embed_text", raw), FakeContext())
            assert response["statusCode"] == 400
            assert "not valid JSON" in response_json(response)["message"]


@pytest.mark.parametrize("raw, reason", [
    ('{"text": ' + "1" * 5000 + "}", "too many digits"),
    ("[" * 100_000, "nested too deeply"),
    (b'{"text": "\xff"}', "not UTF-8"),
])
def test_bodies_json_cannot_read_are_400(open_client: TestClient, raw: str | bytes, reason: str) -> None:
    assert_message(post_raw(open_client, "embed_text", raw), 400, "not valid JSON", reason)


def test_strings_that_spell_nan_are_text(open_client: TestClient) -> None:
    response = post_raw(open_client, "embed_text", '{"text": ["NaN", "Infinity", "-Infinity"]}')
    assert response.status_code == 200 and len(response.json()["embeddings"]) == 3


def test_syntax_errors_stay_fastapis_422(open_client: TestClient) -> None:
    response = post_raw(open_client, "embed_text", '{"text": ')
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"


def test_no_error_response_fails_on_a_non_finite_float() -> None:
    """The safety net under the parser: a 422 echoing a non-finite input renders it as null, not a 500."""
    from clip_serverless.api.errors import ApiError, install_error_handlers
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/validation")
    def validation() -> None:
        raise RequestValidationError([{"type": "finite_number", "loc": ("body", "start"), "msg": "finite",
                                       "input": float("nan"), "ctx": {"limits": [float("-inf"), float("inf")]}}])

    @app.get("/api-error")
    def api_error() -> None:
        raise ApiError("bad")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/validation")
        assert response.status_code == 422
        assert response.json() == {"detail": [{"type": "finite_number", "loc": ["body", "start"], "msg": "finite",
                                               "input": None, "ctx": {"limits": [None, None]}}]}
        assert client.get("/api-error").json() == {"message": "bad"}


def test_validation_errors_keep_fastapis_shape(open_client: TestClient) -> None:
    response = post_raw(open_client, "embed_text", '{"text": 5, "start": 1.5}')
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert {"type", "loc", "msg", "input"} <= set(detail[0]) and detail[0]["input"] == 5


# -- the API key before the body ---------------------------------------------------------------------

MALFORMED = '{"text": "a red'
INVALID = '{"text": 42}'


@pytest.mark.parametrize("params, headers", [
    ({"api_key": "wrong"}, {}),
    ({}, {"Authorization": "Bearer wrong"}),
    ({"api_key": "wrong"}, {"Authorization": f"Bearer {KEY}"}),  # the query wins, as in Roboflow's order
])
@pytest.mark.parametrize("raw", [MALFORMED, INVALID, '{"text": NaN}', '{"text": []}', "", f'{{"api_key": "{KEY}"}}'])
def test_a_wrong_query_or_header_key_is_401_whatever_the_body(
        keyed_client: TestClient, params: dict[str, str], headers: dict[str, str], raw: str) -> None:
    response = post_raw(keyed_client, "embed_text", raw, params=params, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json() == {"message": "Unauthorized api_key"}
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_wrong_key_is_checked_before_the_body_is_read(
        keyed_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from clip_serverless.api import body

    def parse(_raw: bytes) -> Any:
        raise AssertionError("the body was parsed")

    monkeypatch.setattr(body, "parse_json", parse)
    response = post_raw(keyed_client, "embed_text", '{"text": "a"}', params={"api_key": "wrong"})
    assert response.status_code == 401


def test_an_oversize_body_is_413_before_the_key(make_app: Callable[..., Any]) -> None:
    """The size limit runs first (app.py BodyLimit): on AWS such a request never reaches the function."""
    with TestClient(make_app(CLIP_API_KEY=KEY, CLIP_MAX_BODY_BYTES="1000")) as client:
        raw = json.dumps({"text": "x" * 2000})
        assert post_raw(client, "embed_text", raw, params={"api_key": "wrong"}).status_code == 413
        assert post_raw(client, "embed_text", raw, params={"api_key": KEY}).status_code == 413
        assert post_raw(client, "embed_text", '{"text": "x"}', params={"api_key": "wrong"}).status_code == 401


@pytest.mark.parametrize("params, headers", [({"api_key": KEY}, {}), ({}, {"Authorization": f"Bearer {KEY}"})])
def test_a_right_query_or_header_key_lets_the_body_error_through(
        keyed_client: TestClient, params: dict[str, str], headers: dict[str, str]) -> None:
    assert post_raw(keyed_client, "embed_text", MALFORMED, params=params, headers=headers).status_code == 422
    assert post_raw(keyed_client, "embed_text", INVALID, params=params, headers=headers).status_code == 422
    assert_message(post_raw(keyed_client, "embed_text", '{"text": NaN}', params=params, headers=headers),
                   400, "not valid JSON")
    assert_message(post_raw(keyed_client, "embed_text", '{"text": ["a", {"x": Infinity}]}', params=params,
                            headers=headers), 400, "Infinity")
    assert post_raw(keyed_client, "embed_text", '{"text": []}', params=params, headers=headers).status_code == 400
    assert post_raw(keyed_client, "embed_text", '{"text": "a"}', params=params, headers=headers).status_code == 200


@pytest.mark.parametrize("route, raw", [
    ("embed_text", MALFORMED),
    ("embed_text", INVALID),
    ("embed_text", '{"text": NaN}'),
    ("embed_text", '{"text": 1e999}'),
    ("embed_text", '{"text": []}'),
    ("embed_text", ""),
    ("embed_text", "[1,"),
    ("embed_text", "[" * 100_000),
    ("embed_image", '{"image": "aGVsbG8="}'),
    ("embed_image", '{"image": {"type": "base64", "value": NaN}}'),
    ("compare", '{"subject": "a"}'),
    ("compare", '{"subject": "a", "subject_type": "text", "prompt": {"k": NaN}}'),
])
def test_no_key_and_a_bad_body_is_401_not_the_body_error(keyed_client: TestClient, route: str, raw: str) -> None:
    response = post_raw(keyed_client, route, raw)
    assert response.status_code == 401, response.text
    assert response.json() == {"message": "Unauthorized api_key"}


@pytest.mark.parametrize("raw", [
    '{"text": 42, "api_key": "wrong"}',
    '{"text": NaN, "api_key": "wrong"}',
    '{"text": 42, "api_key": null}',
    '{"text": 42, "api_key": ["s3cret"]}',
    '{"text": 42, "api_key": ""}',
    '{"text": 42, "api_key": "\\ud800"}',  # a lone surrogate: not encodable as UTF-8, still just a wrong key
    '{"text": "a", "api_key": "\\ud800"}',
    f'["{KEY}"]',
])
def test_a_wrong_body_key_with_a_bad_body_is_401(keyed_client: TestClient, raw: str) -> None:
    response = post_raw(keyed_client, "embed_text", raw)
    assert response.status_code == 401, response.text


def test_the_right_body_key_lets_the_body_error_through(keyed_client: TestClient) -> None:
    invalid = post_raw(keyed_client, "embed_text", f'{{"text": 42, "api_key": "{KEY}"}}')
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"][:2] == ["body", "text"]
    assert_message(post_raw(keyed_client, "embed_text", f'{{"text": NaN, "api_key": "{KEY}"}}'), 400, "NaN")
    assert_message(post_raw(keyed_client, "compare", f'{{"subject": "a", "prompt": {{"k": -Infinity}}, '
                                                     f'"api_key": "{KEY}"}}'), 400, "-Infinity")
    wrong_field = post_raw(keyed_client, "embed_image", f'{{"image": "aGVsbG8=", "api_key": "{KEY}"}}')
    assert wrong_field.status_code == 422
    assert post_raw(keyed_client, "embed_text", f'{{"text": [], "api_key": "{KEY}"}}').status_code == 400
    assert post_raw(keyed_client, "embed_text", f'{{"text": "a", "api_key": "{KEY}"}}').status_code == 200
    # Malformed JSON cannot show a key: 401.
    assert post_raw(keyed_client, "embed_text", f'{{"api_key": "{KEY}", "text": ').status_code == 401


def test_a_body_key_without_a_json_content_type(keyed_client: TestClient) -> None:
    """FastAPI reads such a body as bytes (422); the key in it still counts, the 422 stands."""
    raw = f'{{"text": "a", "api_key": "{KEY}"}}'
    response = keyed_client.post("/clip/embed_text", content=raw, headers={"content-type": ""})
    assert response.status_code == 422
    response = keyed_client.post("/clip/embed_text", content='{"text": "a"}', headers={"content-type": ""})
    assert response.status_code == 401


def test_key_checks_through_a_lambda_function(endpoint_app: Callable[..., Any]) -> None:
    from mangum import Mangum

    handler: Any = Mangum(endpoint_app("embed_text", CLIP_API_KEY=KEY), lifespan="off")
    def status(make_event: Callable[..., dict[str, Any]], raw: str, **kwargs: Any) -> int:
        return int(handler(make_event("POST", "/clip/embed_text", raw, **kwargs), FakeContext())["statusCode"])

    for make_event in (http_api_event, rest_api_event):
        assert status(make_event, MALFORMED, query={"api_key": "wrong"}) == 401
        assert status(make_event, MALFORMED) == 401
        assert status(make_event, '{"text": NaN}', headers={"Authorization": f"Bearer {KEY}"}) == 400
        assert status(make_event, f'{{"text": 42, "api_key": "{KEY}"}}') == 422
        assert status(make_event, '{"text": "a"}', query={"api_key": KEY}) == 200


# -- the local server's access log ---------------------------------------------------------------------

def _access_record(path: str) -> logging.LogRecord:
    # As uvicorn's HTTP protocols log a request (uvicorn/protocols/http/h11_impl.py).
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                             ("127.0.0.1:50000", "POST", path, "1.1", 200), None)


@pytest.mark.parametrize("path, expected", [
    ("/clip/embed_text?api_key=s3cret", "/clip/embed_text?api_key=***"),
    ("/clip/embed_text?x=1&api_key=s3cret&y=2", "/clip/embed_text?x=1&api_key=***&y=2"),
    ("/clip/embed_text?api%5Fkey=s3cret", "/clip/embed_text?api%5Fkey=***"),  # Starlette decodes the name
    ("/clip/embed_text?API_KEY=s3cret&api_key=s3cret", "/clip/embed_text?API_KEY=***&api_key=***"),
    ("/clip/embed_text?api_key=s3cret%26more", "/clip/embed_text?api_key=***"),
    ("/clip/embed_text?not_api_key=1&api_keys=2", "/clip/embed_text?not_api_key=1&api_keys=2"),
    ("/healthz", "/healthz"),
])
def test_the_access_log_filter_redacts_the_key(path: str, expected: str) -> None:
    from clip_serverless.api.local import RedactApiKey

    record = _access_record(path)
    assert RedactApiKey().filter(record) is True
    assert record.getMessage() == f'127.0.0.1:50000 - "POST {expected} HTTP/1.1" 200'
    assert "s3cret" not in record.getMessage()


def test_the_local_server_never_logs_a_key(make_app: Callable[..., Any]) -> None:
    """A real uvicorn server as `make serve` builds it (local.server), its access-log records captured."""
    from clip_serverless.api.local import server

    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    local = server(make_app(CLIP_API_KEY=KEY), "127.0.0.1", 0)
    capture = Capture()
    access = logging.getLogger("uvicorn.access")
    access.addHandler(capture)
    thread = threading.Thread(target=local.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not local.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = local.servers[0].sockets[0].getsockname()[1]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/clip/embed_text?api_key={KEY}&n=1",
                                         data=b'{"text": "a red circle"}', headers=JSON)
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    finally:
        local.should_exit = True
        thread.join(timeout=10)
        access.removeHandler(capture)
    lines = [record.getMessage() for record in records]
    assert any("/clip/embed_text?api_key=***&n=1" in line for line in lines), lines
    assert not any(KEY in line for line in lines), lines


# -- the response limit (Lambda returns at most 6 MB) ----------------------------------------------------

# The longest repr a float32 value gets (23 characters): sign, 17 significant digits, exponent.
WORST_FLOAT32 = float(np.array([3056930049], dtype=np.uint32).view(np.float32)[0])
WORST_DOUBLE = -2.2250738585072014e-308  # 24 characters: the longest any float gets


def lambda_response_bytes(rows: list[list[float]], elapsed: float) -> int:
    """What the response weighs in Lambda's payload: the compact JSON body escaped as a string, plus the
    X-Clip-Truncated-Texts value at its longest (every text truncated)."""
    from starlette.responses import JSONResponse

    body = JSONResponse({"inference_id": None, "frame_id": None, "time": elapsed, "embeddings": rows}).body
    header = ",".join(map(str, range(len(rows))))
    return len(json.dumps(bytes(body).decode())) + len(header)


def test_the_worst_case_floats_are_what_the_bound_assumes() -> None:
    from clip_serverless.settings import MAX_FLOAT_CHARS

    assert len(repr(WORST_FLOAT32)) == 23 == MAX_FLOAT_CHARS - 1
    assert len(repr(WORST_DOUBLE)) == MAX_FLOAT_CHARS


@pytest.mark.parametrize("dim", [64, 512, 768])
def test_the_maximum_text_count_fits_and_one_more_would_not(dim: int) -> None:
    from clip_serverless.settings import (
        DEFAULT_MAX_RESPONSE_BYTES,
        max_embeddings_per_response,
        worst_case_response_bytes,
    )

    budget = DEFAULT_MAX_RESPONSE_BYTES
    most = max_embeddings_per_response(dim, budget)
    assert most > 0
    # The real worst case: float32 embeddings at their longest and the longest possible "time".
    assert lambda_response_bytes([[WORST_FLOAT32] * dim] * most, WORST_DOUBLE) <= budget
    # The model is exact for what it assumes (every float at 24 characters)...
    for count in (1, most, most + 1):
        assert lambda_response_bytes([[WORST_DOUBLE] * dim] * count, WORST_DOUBLE) == \
            worst_case_response_bytes(count, dim)
    # ...and the maximum is tight: one more row would not fit.
    assert worst_case_response_bytes(most, dim) <= budget < worst_case_response_bytes(most + 1, dim)


def test_default_limits_leave_room_for_lambdas_envelope() -> None:
    from clip_serverless.settings import (
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_MAX_RESPONSE_BYTES,
        LAMBDA_PAYLOAD_BYTES,
        Settings,
        max_embeddings_per_response,
    )

    assert LAMBDA_PAYLOAD_BYTES == 6_291_456
    assert Settings(model_dir=Path(".")).max_body_bytes == DEFAULT_MAX_BODY_BYTES == 6_258_688
    assert Settings(model_dir=Path(".")).max_response_bytes == DEFAULT_MAX_RESPONSE_BYTES == 6_275_072
    assert max_embeddings_per_response(512, DEFAULT_MAX_RESPONSE_BYTES) == 490  # ViT-B-32/16, as documented
    # A Mangum response of the maximum size, with every header the routes set, fits Lambda's limit.
    dim = 512
    most = max_embeddings_per_response(dim, DEFAULT_MAX_RESPONSE_BYTES)
    from starlette.responses import JSONResponse

    body = bytes(JSONResponse({"inference_id": None, "frame_id": None, "time": WORST_DOUBLE,
                               "embeddings": [[WORST_FLOAT32] * dim] * most}).body).decode()
    envelope = {"statusCode": 200, "isBase64Encoded": False, "body": body, "headers": {
        "content-type": "application/json", "content-length": str(len(body)), "x-model-id": "clip/ViT-L-14-336px",
        "x-processing-time": "123.456789", "x-clip-cache": "memory_hits=0;disk_hits=0;s3_hits=0;misses=490;s3_puts=490",
        "x-clip-truncated-texts": ",".join(map(str, range(most)))}}
    assert len(json.dumps(envelope).encode()) <= LAMBDA_PAYLOAD_BYTES


def test_too_many_texts_is_413_naming_the_maximum_before_any_work(
        make_app: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from clip_serverless.service import ClipService
    from clip_serverless.settings import max_embeddings_per_response

    budget = 20_000
    with TestClient(make_app(CLIP_MAX_RESPONSE_BYTES=str(budget)), raise_server_exceptions=False) as client:
        dim = client.app.state.service.manifest.embed_dim  # type: ignore[attr-defined]
        most = max_embeddings_per_response(dim, budget)
        assert 2 < most < 50
        texts = [f"a photo of {i} red circles" for i in range(most)]
        ok = client.post("/clip/embed_text", json={"text": texts})
        assert ok.status_code == 200 and len(ok.json()["embeddings"]) == most
        assert len(json.dumps(ok.text)) <= budget

        def never(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError("embedded before refusing")

        monkeypatch.setattr(ClipService, "embed_texts", never)
        refused = client.post("/clip/embed_text", json={"text": [*texts, "one more"]})
        assert_message(refused, 413, f"maximum number of texts per call is {most}", str(budget),
                       f"got {most + 1}", "Split")


def test_the_default_text_limit_is_far_above_ordinary_lists(open_client: TestClient) -> None:
    response = open_client.post("/clip/embed_text", json={"text": [f"text {i}" for i in range(300)]})
    assert response.status_code == 200 and len(response.json()["embeddings"]) == 300


# -- the request limit (the body inside a 6 MB Lambda event) ---------------------------------------------

def test_the_default_body_limit_fits_a_lambda_event() -> None:
    """A body at the limit (escapes counted), in an HTTP API (v2) or REST (v1) event with 8 KiB of headers
    and a query string, is an event Lambda takes."""
    from clip_serverless.api.app import event_bytes
    from clip_serverless.settings import DEFAULT_MAX_BODY_BYTES, LAMBDA_PAYLOAD_BYTES

    head = '{"text": ["a \\"quoted\\" caption\\n", "'
    filler = DEFAULT_MAX_BODY_BYTES - event_bytes(head.encode()) - event_bytes(b'"]}')
    raw = head + "x" * filler + '"]}'
    assert event_bytes(raw.encode()) == DEFAULT_MAX_BODY_BYTES
    headers = {f"x-header-{i}": "v" * 90 for i in range(80)}  # ~8 KiB of headers
    for make_event in (http_api_event, rest_api_event):
        event = make_event("POST", "/clip/embed_text", raw, headers=headers, query={"api_key": "k" * 64},
                           base64_encoded=False)
        assert len(json.dumps(event).encode()) <= LAMBDA_PAYLOAD_BYTES, make_event.__name__


def test_the_body_limit_counts_json_escapes(make_app: Callable[..., Any]) -> None:
    with TestClient(make_app(CLIP_MAX_BODY_BYTES="1000")) as client:
        plain = json.dumps({"text": "x" * 900})
        assert len(plain) < 1000
        assert client.post("/clip/embed_text", content=plain, headers=JSON).status_code == 200
        quoted = json.dumps({"text": 'x"' * 300})  # 600 characters, 300 of them escaped: 1500+ in the event
        assert len(quoted) < 1000
        message = assert_message(client.post("/clip/embed_text", content=quoted, headers=JSON), 413,
                                 "1000 bytes", "URL", '"type": "url"')
        assert "6 MB" in message


def test_the_body_limit_without_content_length(make_app: Callable[..., Any]) -> None:
    with TestClient(make_app(CLIP_MAX_BODY_BYTES="1000")) as client:
        def chunks(raw: bytes) -> Iterator[bytes]:
            for i in range(0, len(raw), 100):
                yield raw[i:i + 100]

        small = json.dumps({"text": "x" * 500}).encode()
        assert client.post("/clip/embed_text", content=chunks(small), headers=JSON).status_code == 200
        large = json.dumps({"text": "x" * 2000}).encode()
        response = client.post("/clip/embed_text", content=chunks(large), headers=JSON)
        assert_message(response, 413, "1000 bytes", "URL")
        # Under the limit in bytes, over it escaped: counting starts mid-body (past half the limit) and must
        # still weigh the chunks that came before.
        quoted = json.dumps({"text": 'x"' * 300}).encode()
        assert len(quoted) < 1000
        assert_message(client.post("/clip/embed_text", content=chunks(quoted), headers=JSON), 413, "1000 bytes")


# -- GET /, /info, /healthz on every single-endpoint (Lambda) app ---------------------------------------

@pytest.mark.parametrize("endpoint", ["embed_text", "embed_image", "compare"])
def test_each_function_app_serves_root_info_and_health(endpoint_app: Callable[..., Any], endpoint: str) -> None:
    with TestClient(endpoint_app(endpoint), raise_server_exceptions=False) as client:
        root = client.get("/")
        assert root.status_code == 200 and set(root.json()) == {"name", "version", "uuid"}
        assert client.get("/info").json() == root.json()
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["endpoints"] == [f"/clip/{endpoint}"]
        others = [e for e in ("embed_text", "embed_image", "compare") if e != endpoint]
        for other in others:
            missing = client.post(f"/clip/{other}", json={})
            assert missing.status_code == 404 and "message" in missing.json()


def test_root_through_the_embed_text_function(endpoint_app: Callable[..., Any]) -> None:
    from mangum import Mangum

    handler: Any = Mangum(endpoint_app("embed_text"), lifespan="off")
    for make_event in (http_api_event, rest_api_event):
        response = handler(make_event("GET", "/"), FakeContext())
        assert response["statusCode"] == 200
        assert set(response_json(response)) == {"name", "version", "uuid"}


def test_the_strict_routes_document_the_same_api(make_app: Callable[..., Any]) -> None:
    """strict_router rebuilds routes.py's routes: the OpenAPI document must not change."""
    from clip_serverless.api.routes import ClipRoutes
    from clip_serverless.settings import Settings
    from fastapi import FastAPI

    app = make_app()
    plain = FastAPI(title=app.title, version=app.version, summary=app.summary)
    plain.include_router(ClipRoutes(app.state.service, Settings.from_env()).router())
    ours = {p: v for p, v in app.openapi()["paths"].items() if p.startswith("/clip/")}
    assert ours == plain.openapi()["paths"]
    assert app.openapi()["components"]["schemas"].keys() >= plain.openapi()["components"]["schemas"].keys()

