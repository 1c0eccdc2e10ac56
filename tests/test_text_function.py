"""compare's text vectors through another function: both sides of the exchange, in process.

The built functions talking through a local Invoke API are in test_built_functions.py; here each side
alone: :func:`serve` against the real text tower, and :class:`TextFunctionEncoder` against botocore's
Stubber, for every answer Lambda can give.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import numpy as np
import pytest
from botocore.stub import Stubber
from clip_serverless.aws_lambda.tower_function import (
    EVENT_KEY,
    TextFunctionEncoder,
    TextFunctionError,
    is_request,
    serve,
)
from clip_serverless.service import ClipService

from tests.lambda_events import invoke_payload


class _ServedLocally:
    """A stand-in Lambda client whose invoke runs :func:`serve` on the local tower, as embed_text does."""

    def __init__(self, service: ClipService) -> None:
        self.service = service
        self.calls = 0

    def invoke(self, FunctionName: str, Payload: bytes) -> dict[str, Any]:
        self.calls += 1
        answer = serve(json.loads(Payload), self.service.text_encoder, self.service.manifest)
        return {"StatusCode": 200, "Payload": invoke_payload(answer)}


def test_remote_vectors_are_bit_identical_to_the_local_tower(tiny_service: ClipService) -> None:
    texts = ["a red circle", "a blue square on a white background", "x"]
    want = tiny_service.embed_texts(texts, use_cache=False).vectors
    client = _ServedLocally(tiny_service)
    encoder = TextFunctionEncoder("embed-text", tiny_service.manifest, client=client)
    remote = ClipService(tiny_service.model_dir, text_tower=encoder)
    got = remote.embed_texts(texts, use_cache=False)
    assert client.calls == 1
    assert got.vectors.dtype == np.float32 and np.array_equal(got.vectors, want)
    assert remote.loaded_towers() == []  # another function's tower is not loaded here


def test_serve_refuses_what_it_cannot_embed(tiny_service: ClipService) -> None:
    manifest, encoder = tiny_service.manifest, tiny_service.text_encoder

    def status(request: Any) -> int:
        answer = serve({EVENT_KEY: request}, encoder, manifest)[EVENT_KEY]
        return int(answer["error"]["status"])

    good = {"v": 1, "model": manifest.digest, "ids": [[49406, 320, 49407]]}
    assert "vectors" in serve({EVENT_KEY: good}, encoder, manifest)[EVENT_KEY]
    assert status({**good, "v": 2}) == 400
    assert status({**good, "model": "0" * 64}) == 503  # another model: a deployment in progress
    assert status({**good, "ids": []}) == 400
    assert status({**good, "ids": [[]]}) == 400
    assert status({**good, "ids": [[1] * 78]}) == 400
    assert status({**good, "ids": [[49406, 1.5]]}) == 400
    assert status({**good, "ids": [[49406, 49408]]}) == 400
    assert status({**good, "ids": [[-1]]}) == 400
    assert status("nonsense") == 400
    assert is_request({EVENT_KEY: good}) and not is_request({"version": "2.0", "rawPath": "/"})


def _stubbed(manifest: Any) -> tuple[TextFunctionEncoder, Stubber]:
    import boto3

    client = boto3.client("lambda", region_name="us-east-1")
    return TextFunctionEncoder("arn:aws:lambda:us-east-1:123456789012:function:t:live", manifest,
                               client=client), Stubber(client)


IDS = np.array([[49406, 320, 49407]], dtype=np.int64)


def test_throttled_twice_is_503_with_retry_after(tiny_service: ClipService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clip_serverless.aws_lambda.tower_function.time.sleep", lambda _s: None)
    encoder, stub = _stubbed(tiny_service.manifest)
    for _ in range(2):
        stub.add_client_error("invoke", "TooManyRequestsException", "Rate Exceeded.", 429)
    with stub, pytest.raises(TextFunctionError) as caught:
        encoder.encode(IDS)
    assert (caught.value.status, caught.value.retry_after) == (503, 1)
    stub.assert_no_pending_responses()


def test_throttled_once_then_answered(tiny_service: ClipService, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr("clip_serverless.aws_lambda.tower_function.time.sleep", sleeps.append)
    encoder, stub = _stubbed(tiny_service.manifest)
    stub.add_client_error("invoke", "TooManyRequestsException", "Rate Exceeded.", 429)
    vector = np.arange(tiny_service.manifest.embed_dim, dtype="<f4")
    answer = {EVENT_KEY: {"dim": vector.size, "count": 1, "vectors": base64.b64encode(vector.tobytes()).decode()}}
    stub.add_response("invoke", {"StatusCode": 200, "Payload": invoke_payload(answer)})
    with stub:
        got = encoder.encode(IDS)
    assert np.array_equal(got[0], vector) and len(sleeps) == 1 and 0.05 <= sleeps[0] <= 0.25


@pytest.mark.parametrize(("payload", "function_error", "status", "text"), [
    ({"errorType": "Sandbox.Timedout", "errorMessage": "Task timed out after 28.00 seconds"}, "Unhandled", 504,
     "timed out"),
    ({"errorType": "MemoryError", "errorMessage": "/opt/python/secret/path"}, "Unhandled", 502, "MemoryError"),
    ({EVENT_KEY: {"error": {"status": 400, "message": "each row of ids must hold 1 to 77 integers"}}}, None, 400,
     "1 to 77"),
    ({EVENT_KEY: {"error": {"status": 503, "message": "a deployment is in progress; retry"}}}, None, 503, "retry"),
    ({EVENT_KEY: {"dim": 3, "count": 1, "vectors": "AAAA"}}, None, 502, "malformed"),
    ({"statusCode": 200, "body": "{}"}, None, 502, "unexpected"),
])
def test_text_function_answers_become_clear_statuses(tiny_service: ClipService, payload: dict[str, Any],
                                                     function_error: str | None, status: int, text: str) -> None:
    encoder, stub = _stubbed(tiny_service.manifest)
    response: dict[str, Any] = {"StatusCode": 200, "Payload": invoke_payload(payload)}
    if function_error:
        response["FunctionError"] = function_error
    stub.add_response("invoke", response)
    with stub, pytest.raises(TextFunctionError) as caught:
        encoder.encode(IDS)
    assert caught.value.status == status and text in caught.value.message
    assert "/opt/python" not in caught.value.message
    assert (caught.value.retry_after == 1) == (status == 503)


def test_other_client_errors_are_502_naming_the_code(tiny_service: ClipService) -> None:
    encoder, stub = _stubbed(tiny_service.manifest)
    stub.add_client_error("invoke", "AccessDeniedException", "not authorized", 403)
    with stub, pytest.raises(TextFunctionError) as caught:
        encoder.encode(IDS)
    assert caught.value.status == 502 and "AccessDeniedException" in caught.value.message


def test_a_text_function_that_does_not_answer_in_time_is_504(tiny_service: ClipService) -> None:
    """A real socket that accepts and never answers: botocore's read timeout, then 504."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    import boto3
    from botocore.config import Config

    port = listener.getsockname()[1]
    client = boto3.client("lambda", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{port}",
                          config=Config(read_timeout=0.5, connect_timeout=0.5, retries={"total_max_attempts": 1}))
    encoder = TextFunctionEncoder("t", tiny_service.manifest, timeout_s=0.5, client=client)
    try:
        with pytest.raises(TextFunctionError) as caught:
            encoder.encode(IDS)
    finally:
        listener.close()
    assert caught.value.status == 504 and "0.5 s" in caught.value.message


# ---- the Lambda client's data loader (clip_serverless.aws_clients) --------------------------------
@pytest.mark.parametrize("type_name", ["service-2", "endpoint-rule-set-1", "paginators-1", "waiters-2"])
def test_the_named_services_loader_finds_a_named_service_as_botocore_does(type_name: str) -> None:
    """Its list holds the named services botocore's own list holds, and nothing else; the models it loads
    are botocore's."""
    from botocore.loaders import Loader
    from clip_serverless.aws_clients import named_services_loader

    botocores = Loader()
    known = set(botocores.list_available_services(type_name))
    loader = named_services_loader()
    assert loader.list_available_services(type_name) == []
    named = {"lambda", "s3", "secretsmanager", "ssm", "sts", "no-such-service"}
    loader.services.update(named)
    assert loader.list_available_services(type_name) == sorted(named & known)
    assert set(loader.list_available_services(type_name)) >= {"lambda", "s3"} or type_name == "waiters-2"
    for service in sorted(named & known):
        assert loader.load_service_model(service, type_name) == botocores.load_service_model(service, type_name)


def test_clients_come_from_the_named_services_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import UnknownServiceError
    from clip_serverless import aws_clients

    monkeypatch.delenv("AWS_DATA_PATH", raising=False)
    lam = aws_clients.client("lambda", region_name="us-east-1")
    assert lam.meta.service_model.service_name == "lambda"
    assert aws_clients._session is not None
    loader = aws_clients._session.get_component("data_loader")
    assert type(loader).__name__ == "NamedServicesLoader" and loader.services == {"lambda"}
    assert aws_clients.client("s3", region_name="us-east-1").meta.service_model.service_name == "s3"
    with pytest.raises(UnknownServiceError):
        aws_clients.client("no-such-service", region_name="us-east-1")


def test_the_named_services_loader_searches_aws_data_path_first(tmp_path: Any) -> None:
    """``AWS_DATA_PATH`` (a model of one's own) comes before botocore's data, as with botocore's loader."""
    from botocore.loaders import create_loader
    from clip_serverless.aws_clients import named_services_loader

    path = f"{tmp_path}/a{os.pathsep}{tmp_path}/b"
    assert named_services_loader(path).search_paths == create_loader(path).search_paths
    assert named_services_loader(None).search_paths == create_loader(None).search_paths


def test_compare_s_init_leaves_the_text_function_s_client_to_the_first_request(
        tiny_service: ClipService, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = TextFunctionEncoder("embed-text", tiny_service.manifest)
    made: list[str] = []

    def new_client() -> _ServedLocally:
        made.append("client")
        return _ServedLocally(tiny_service)

    monkeypatch.setattr(encoder, "_new_client", new_client)
    remote = ClipService(tiny_service.model_dir, text_tower=encoder)
    remote.preload(("visual", "textual"))
    assert made == [] and not encoder.loaded  # init: the image session and the tokenizer only
    assert remote.image_encoder.loaded and remote._tokenizer is not None
    want = tiny_service.embed_texts(["a red circle"], use_cache=False).vectors
    assert np.array_equal(remote.embed_texts(["a red circle"], use_cache=False).vectors, want)
    assert made == ["client"] and encoder.loaded
