"""Each endpoint through its Lambda handler, with HTTP API (v2) and REST (v1) events, and the bad-input suite."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clip_serverless.api.endpoints import ENDPOINTS

from tests.conftest import REPO, b64, image_obj, shape_png
from tests.handlers import load_function
from tests.lambda_events import FakeContext, http_api_event, response_headers, response_json, rest_api_event

EVENTS = {"v2": http_api_event, "v1": rest_api_event}
Invoke = Callable[..., tuple[int, Any, dict[str, str]]]


@pytest.fixture(scope="module")
def handlers(tiny_model_path: Path) -> dict[str, Any]:
    mp = pytest.MonkeyPatch()
    mp.setenv("CLIP_MODEL_DIR", str(tiny_model_path))
    mp.setenv("CLIP_CACHE", "off")
    mp.setenv("CLIP_MAX_BODY_BYTES", str(6 * 1024 * 1024))
    try:
        return {name: load_function(name).handler for name in ENDPOINTS}  # every endpoint of the registry
    finally:
        mp.undo()


@pytest.fixture(params=["v2", "v1"])
def invoke(request: pytest.FixtureRequest, handlers: dict[str, Any]) -> Invoke:
    make_event = EVENTS[request.param]

    def call(endpoint: str, body: Any, method: str = "POST", **kwargs: Any) -> tuple[int, Any, dict[str, str]]:
        event = make_event(method, f"/clip/{endpoint}", body, **kwargs)
        response = handlers[endpoint](event, FakeContext())
        return response["statusCode"], response_json(response), response_headers(response)

    return call


def test_each_endpoint_answers_both_payload_versions(invoke: Invoke, red_circle: bytes) -> None:
    status, body, headers = invoke("embed_text", {"text": ["a red circle", "a blue square"]})
    assert status == 200 and len(body["embeddings"]) == 2
    assert headers["content-type"] == "application/json"
    status, body, _ = invoke("embed_image", {"image": image_obj(red_circle)})
    assert status == 200 and len(body["embeddings"]) == 1
    status, body, _ = invoke("compare", {"subject": image_obj(red_circle),
                                         "prompt": ["a photo of a red circle.", "a photo of a blue square."]})
    assert status == 200 and body["similarity"][0] > body["similarity"][1]
    assert list(body) == ["inference_id", "frame_id", "time", "similarity", "parent_id"]


def test_plain_text_bodies_work_too(invoke: Invoke) -> None:
    status, body, _ = invoke("embed_text", {"text": "a red circle"}, base64_encoded=False)
    assert status == 200 and len(body["embeddings"]) == 1


def test_a_function_serves_only_its_own_route(invoke: Invoke, handlers: dict[str, Any]) -> None:
    event = http_api_event("POST", "/clip/embed_image", {"image": image_obj(b"x")})
    response = handlers["embed_text"](event, FakeContext())
    assert response["statusCode"] == 404
    assert "message" in response_json(response)


def test_missing_content_type_is_a_422_as_documented(invoke: Invoke) -> None:
    # `sam local generate-event` bodies carry no content-type; the events/ fixtures add it.
    status, body, _ = invoke("embed_text", {"text": "a"}, content_type=None)
    assert status == 422 and "detail" in body


def test_committed_event_fixtures_work(handlers: dict[str, Any]) -> None:
    files = sorted((REPO / "events").glob("*.json"))
    assert len(files) >= 6
    for file in files:
        event = json.loads(file.read_text())
        endpoint = file.name.split(".")[0]
        handler = handlers.get(endpoint, handlers["embed_text"])
        response = handler(event, FakeContext())
        assert response["statusCode"] == 200, (file.name, response)
        assert isinstance(response_json(response), dict)


# -- bad input: every case a 4xx JSON object with a message, never a 500, never a hang --------------

def _truncated_jpeg() -> bytes:
    data = shape_png(fmt="JPEG")
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, format="PNG")  # 400 MP, a few kB compressed
    return buffer.getvalue()


BAD_IMAGES: dict[str, dict[str, Any]] = {
    "invalid base64": {"type": "base64", "value": "%%%not base64%%%"},
    "non-image bytes": {"type": "base64", "value": b64(b"hello, I am not an image")},
    "empty payload": {"type": "base64", "value": ""},
    "value null": {"type": "base64", "value": None},
    "value a number": {"type": "base64", "value": 12},
    "truncated jpeg": {"type": "base64", "value": b64(_truncated_jpeg())},
    "decompression bomb": {"type": "base64", "value": b64(_bomb_png())},
    "numpy (pickle)": {"type": "numpy", "value": b64(b"\x80\x04K\x01.")},
    "file": {"type": "file", "value": "/etc/passwd"},
    "multipart": {"type": "multipart", "value": "x"},
    "numpy_object": {"type": "numpy_object", "value": "x"},
    "pil": {"type": "pil", "value": "x"},
    "unknown type": {"type": "jpeg", "value": "x"},
    "http url": {"type": "url", "value": "http://images.example.com/a.jpg"},
    "ip url": {"type": "url", "value": "https://127.0.0.1/image.jpg"},
    "localhost url": {"type": "url", "value": "https://localhost/image.jpg"},
    "metadata url": {"type": "url", "value": "https://169.254.169.254/latest/meta-data/"},
    "private ip url": {"type": "url", "value": "https://10.0.0.8/x.jpg"},
    "ipv6 loopback url": {"type": "url", "value": "https://[::1]/x.jpg"},
    "name resolving to private": {"type": "url", "value": "https://intranet.example.com/x.jpg"},
    "name resolving to metadata": {"type": "url", "value": "https://metadata.example.com/x.jpg"},
    "url not a string": {"type": "url", "value": ["https://a.example.com/x.jpg"]},
    "url garbage": {"type": "url", "value": "https://exa mple.com/\x00"},
}


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {"intranet.example.com": "10.20.30.40", "metadata.example.com": "169.254.169.254"}

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host in table:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (table[host], port))]
        raise socket.gaierror("no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def assert_client_error(status: int, body: Any, expect: int | None = None) -> None:
    assert 400 <= status < 500, (status, body)
    if expect is not None:
        assert status == expect, body
    assert isinstance(body, dict)
    if status != 422:
        assert isinstance(body.get("message"), str) and body["message"], body


@pytest.mark.usefixtures("fake_dns")
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_are_400_with_a_cause(invoke: Invoke, case: str) -> None:
    status, body, _ = invoke("embed_image", {"image": BAD_IMAGES[case]})
    assert_client_error(status, body, 400)
    assert body["message"].startswith("Could not load input image. Cause: ")
    assert "Traceback" not in body["message"] and "/" not in body["message"].split("Cause: ")[1][:1]


@pytest.mark.usefixtures("fake_dns")
@pytest.mark.parametrize("case", ["invalid base64", "non-image bytes", "numpy (pickle)", "metadata url"])
def test_bad_images_in_compare_are_400(invoke: Invoke, case: str, red_circle: bytes) -> None:
    status, body, _ = invoke("compare", {"subject": BAD_IMAGES[case], "prompt": ["a"]})
    assert_client_error(status, body, 400)
    status, body, _ = invoke("compare", {"subject": image_obj(red_circle), "prompt_type": "image",
                                         "prompt": [image_obj(red_circle), BAD_IMAGES[case]]})
    assert_client_error(status, body, 400)


SCHEMA_ERRORS: dict[str, tuple[str, Any]] = {
    "text missing": ("embed_text", {}),
    "text a number": ("embed_text", {"text": 42}),
    "text null": ("embed_text", {"text": None}),
    "text list of numbers": ("embed_text", {"text": [1, 2]}),
    "text nested": ("embed_text", {"text": [["a"]]}),
    "image missing": ("embed_image", {}),
    "image a bare string": ("embed_image", {"image": "aGVsbG8="}),
    "image without type": ("embed_image", {"image": {"value": "aGVsbG8="}}),
    "image list of strings": ("embed_image", {"image": ["aGVsbG8="]}),
    "body a list": ("embed_text", ["a"]),
    "body a string": ("embed_text", "a"),
    "compare without prompt": ("compare", {"subject": "a"}),
    "compare subject a list": ("compare", {"subject": ["a"], "prompt": "b"}),
    "compare prompt a number": ("compare", {"subject": "a", "prompt": 3}),
    "clip_version_id a list": ("embed_text", {"text": "a", "clip_version_id": ["x"]}),
}


@pytest.mark.parametrize("case", list(SCHEMA_ERRORS))
def test_schema_errors_are_422(invoke: Invoke, case: str) -> None:
    endpoint, body = SCHEMA_ERRORS[case]
    status, answer, _ = invoke(endpoint, body)
    assert_client_error(status, answer, 422)
    assert isinstance(answer["detail"], list)


@pytest.mark.parametrize("raw", ['{"text": "a"', "not json", "", "\x00\x01", '{"text": "a"}}', "[1,"])
def test_malformed_json_is_422(invoke: Invoke, raw: str) -> None:
    status, body, _ = invoke("embed_text", raw)
    assert_client_error(status, body, 422)


def test_other_bad_requests_are_400(invoke: Invoke, red_circle: bytes) -> None:
    cases: list[tuple[str, Any]] = [
        ("embed_text", {"text": []}),
        ("embed_image", {"image": []}),
        ("embed_image", {"image": [image_obj(red_circle)] * 9}),
        ("compare", {"subject": image_obj(red_circle), "prompt": []}),
        ("compare", {"subject": image_obj(red_circle), "prompt": {}}),
        ("compare", {"subject": image_obj(red_circle), "prompt": [f"p{i}" for i in range(9)]}),
        ("compare", {"subject": image_obj(red_circle), "prompt": "a", "subject_type": "video"}),
        ("compare", {"subject": image_obj(red_circle), "prompt": "a", "prompt_type": "IMAGE!"}),
        ("compare", {"subject": image_obj(red_circle), "prompt": [image_obj(red_circle)], "prompt_type": "text"}),
        ("compare", {"subject": image_obj(red_circle), "prompt": "a", "subject_type": "text"}),
        ("compare", {"subject": "a", "prompt": {"k": image_obj(red_circle)}, "subject_type": "text"}),
    ]
    for endpoint, body in cases:
        status, answer, _ = invoke(endpoint, body)
        assert_client_error(status, answer, 400)


def test_unknown_version_is_404_and_wrong_method_405(invoke: Invoke) -> None:
    status, body, _ = invoke("embed_text", {"text": "a", "clip_version_id": "RN50"})
    assert_client_error(status, body, 404)
    status, body, _ = invoke("embed_text", None, method="GET")
    assert_client_error(status, body, 405)


def test_body_over_the_limit_is_413(invoke: Invoke) -> None:
    status, body, _ = invoke("embed_text", {"text": "x" * (6 * 1024 * 1024 + 10)}, base64_encoded=False)
    assert_client_error(status, body, 413)
    assert "URL" in body["message"]


def test_very_long_and_odd_texts_are_fine(invoke: Invoke) -> None:
    texts = ["", "   ", "a" * 100_000, "<|endoftext|>", "\u200d\U0001f469\u200d\U0001f4bb", "&amp;lt;", "\x00\x1f"]
    status, body, headers = invoke("embed_text", {"text": texts})
    assert status == 200 and len(body["embeddings"]) == len(texts)
    assert "2" in headers["x-clip-truncated-texts"].split(",")


def test_unexpected_failures_are_a_generic_500_with_detail_only_in_the_log(
        handlers: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from clip_serverless.service import ClipService

    def boom(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(ClipService, "embed_texts", boom)
    response = handlers["embed_text"](http_api_event("POST", "/clip/embed_text", {"text": "a"}), FakeContext())
    assert response["statusCode"] == 500
    assert response_json(response) == {"message": "Internal error."}
    assert "secret internal detail" in caplog.text


# -- cold-start leanness -------------------------------------------------------------------------

def _probe(endpoint: str, tiny_model_path: Path) -> dict[str, Any]:
    code = textwrap.dedent(f"""
        import json, sys, os
        os.environ["CLIP_MODEL_DIR"] = {str(tiny_model_path)!r}
        os.environ["CLIP_CACHE"] = "off"
        sys.path.insert(0, {str(REPO)!r})
        from tests.handlers import load_function
        handler = load_function({endpoint!r}).handler
        service = handler.app.state.service
        print(json.dumps({{
            "pil": any(m == "PIL" or m.startswith("PIL.") for m in sys.modules),
            "boto3": "boto3" in sys.modules,
            "torch": "torch" in sys.modules,
            "loaded": service.loaded_towers(),
        }}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_embed_text_function_never_imports_pillow_nor_loads_the_visual_tower(tiny_model_path: Path) -> None:
    probe = _probe("embed_text", tiny_model_path)
    assert probe == {"pil": False, "boto3": False, "torch": False, "loaded": ["textual"]}


def test_embed_image_function_never_loads_the_text_tower(tiny_model_path: Path) -> None:
    probe = _probe("embed_image", tiny_model_path)
    assert probe["loaded"] == ["visual"] and not probe["torch"]


def test_compare_function_loads_both_towers_at_init(tiny_model_path: Path) -> None:
    assert _probe("compare", tiny_model_path)["loaded"] == ["visual", "textual"]


def test_init_keeps_pydantic_v1_out_and_leaves_it_importable(tiny_model_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os, sys
        os.environ.update(CLIP_MODEL_DIR={str(tiny_model_path)!r}, CLIP_CACHE="off", AWS_LAMBDA_FUNCTION_NAME="f")
        sys.path.insert(0, {str(REPO)!r})
        from tests.handlers import load_function
        load_function("embed_text")
        assert "pydantic.v1" not in sys.modules, "imported, or left blocked"
        import pydantic.v1  # whatever else in the process needs v1 still finds it
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
