"""The after-response extension against a fake Lambda Extensions API (threaded ``http.server`` on 127.0.0.1).

The test plays Lambda's part: it hands the extension an INVOKE, calls the wrapped handler as the runtime
would, and records when each request reaches the API. Proven here: registration (path, headers, body); the
handler returns before a slow S3 write ends; the extension asks for the next event only after that write is
drained; a register answered 404 (or no Lambda at all) leaves the cache in ``sync``; a failing ``/event/next``
falls back to ``sync``; the extension thread ends (no leak); every wait is bounded.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from clip_serverless.aws_lambda import after_response as ar
from clip_serverless.aws_lambda.drain_extension import DRAIN_TIMEOUT_S, EXTENSION_NAME, THREAD_NAME
from clip_serverless.aws_lambda.extensions_api import REGISTER_TIMEOUT_S
from clip_serverless.cache import EmbeddingCache, ModelIdentity, embed_cached
from clip_serverless.cache.memory import MemoryTier
from clip_serverless.cache.s3 import S3Tier
from clip_serverless.cache.tier import WriteMode

from tests.fixtures_aws import create_bucket, s3_keys
from tests.lambda_events import FakeContext

DIM = 8
MODEL = ModelIdentity(model_id="clip/test", digest="cd" * 32, embed_dim=DIM)
PUT_SECONDS = 0.4  # a slow PUT: far above the handler's own time, far below every bound below
BOUND = 5.0  # generous: correctness bounds, not benchmarks
_ids = itertools.count(1)


# -- the fake Lambda API ----------------------------------------------------------------------------
@dataclass
class Call:
    method: str
    path: str
    at: float  # time.monotonic() on arrival
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeLambdaApi:
    """``/2020-01-01/extension/register`` and ``/event/next``; events are handed out from a queue."""

    register_status: int = 200
    next_status: int = 200
    identifier: str = field(default_factory=lambda: str(uuid.uuid4()))
    calls: list[Call] = field(default_factory=list)
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    closed: threading.Event = field(default_factory=threading.Event)
    next_arrived: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-lambda-api", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {"AWS_LAMBDA_FUNCTION_NAME": "clip-test", "AWS_LAMBDA_RUNTIME_API": self.address, **extra}

    def nexts(self) -> list[Call]:
        return [c for c in self.calls if c.path.endswith("/event/next")]

    def wait_for_nexts(self, count: int, timeout: float = BOUND) -> list[Call]:
        with self.next_arrived:
            assert self.next_arrived.wait_for(lambda: len(self.nexts()) >= count, timeout), self.calls
            return self.nexts()

    def invoke(self, request_id: str, deadline_in_s: float = 30.0) -> None:
        self.events.put({"eventType": "INVOKE", "requestId": request_id,
                         "deadlineMs": int((time.time() + deadline_in_s) * 1000),
                         "invokedFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:clip-test",
                         "tracing": {"type": "X-Amzn-Trace-Id", "value": "Root=1-0-0"}})

    def shutdown_event(self) -> None:
        self.events.put({"eventType": "SHUTDOWN", "shutdownReason": "spindown",
                         "deadlineMs": int((time.time() + 0.5) * 1000)})

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()


def _handler(api: FakeLambdaApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> Call:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            call = Call(self.command, self.path, time.monotonic(), dict(self.headers.items()), body)
            with api.next_arrived:
                api.calls.append(call)
                api.next_arrived.notify_all()
            return call

        def do_POST(self) -> None:
            self._record()
            if self.path != "/2020-01-01/extension/register" or api.register_status != 200:
                self._reply(api.register_status if self.path.endswith("/register") else 404,
                            {"errorMessage": "not found"})
                return
            self._reply(200, {"functionName": "clip-test", "functionVersion": "$LATEST", "handler": "app.handler"},
                        {"Lambda-Extension-Identifier": api.identifier})

        def do_GET(self) -> None:
            self._record()
            if self.path != "/2020-01-01/extension/event/next":
                self._reply(404, {"errorMessage": "not found"})
                return
            if self.headers.get("Lambda-Extension-Identifier") != api.identifier:
                self._reply(403, {"errorMessage": "unknown extension"})
                return
            if api.next_status != 200:
                self._reply(api.next_status, {"errorMessage": "container error"})
                return
            while not api.closed.is_set():  # blocks, as Lambda's does, until there is an event
                try:
                    event = api.events.get(timeout=0.05)
                except queue.Empty:
                    continue
                self._reply(200, event, {"Lambda-Extension-Event-Identifier": str(uuid.uuid4())})
                return

    return Handler


@pytest.fixture
def lambda_api() -> Iterator[FakeLambdaApi]:
    api = FakeLambdaApi()
    api.start()
    yield api
    ar.uninstall()
    api.close()


@pytest.fixture(autouse=True)
def no_leaked_extension() -> Iterator[None]:
    yield
    ar.uninstall()
    for thread in threading.enumerate():
        if thread.name == THREAD_NAME:
            thread.join(BOUND)
            assert not thread.is_alive(), "the extension thread outlived its test"


# -- a cache whose S3 tier is a slow stub -----------------------------------------------------------
class NoSuchKey(Exception):
    response: ClassVar[dict[str, Any]] = {"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}


class SlowS3Client:
    """get_object: always a miss; put_object: takes PUT_SECONDS. Records when each PUT ended."""

    def __init__(self, put_seconds: float = PUT_SECONDS) -> None:
        self.put_seconds = put_seconds
        self.put_done: dict[str, float] = {}

    def get_object(self, **kwargs: Any) -> Any:
        raise NoSuchKey(kwargs["Key"])

    def put_object(self, **kwargs: Any) -> dict[str, Any]:
        time.sleep(self.put_seconds)
        self.put_done[kwargs["Key"]] = time.monotonic()
        return {}


def slow_cache(put_seconds: float = PUT_SECONDS) -> tuple[EmbeddingCache, SlowS3Client]:
    client = SlowS3Client(put_seconds)
    tier = S3Tier("bucket", "p/", deadline_s=BOUND, client_factory=lambda: client, policy={"image": 1, "text": 1})
    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20), tier], write_mode="sync")
    return cache, client


def Context(request_id: str) -> FakeContext:
    """Lambda's context object for one request."""
    context = FakeContext()
    context.aws_request_id = request_id
    return context


def image_handler(cache: EmbeddingCache) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """A Lambda handler that embeds one (new) image through the cache: a miss, hence an S3 write."""

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        payload = event["image"].encode()
        _, stats = embed_cached(cache, [cache.key("image", payload)],
                                 lambda idx: np.ones((len(idx), DIM), np.float32), modality="image")
        return {"statusCode": 200, "misses": stats.misses, "s3_writes": stats.tier("s3").writes}

    return handler


def run_invocation(api: FakeLambdaApi, handler: Callable[[dict[str, Any], Any], Any],
                   event: dict[str, Any]) -> tuple[Any, float]:
    """What Lambda and its runtime do for one invocation: INVOKE to the extension, then the handler."""
    request_id = f"req-{next(_ids)}"
    api.invoke(request_id)
    result = handler(event, Context(request_id))
    return result, time.monotonic()


def noop(event: Any, context: Any) -> None:
    """A handler that does nothing (what the extension sees of it is its start and end)."""


def answer_42(event: Any, context: Any) -> int:
    return 42


class FakeDrainable:
    """A cache stand-in whose drain takes ``seconds``; records when drains started and ended."""

    has_remote_tiers = True

    def __init__(self, seconds: float = 0.0) -> None:
        self.write_mode: WriteMode = "sync"
        self.seconds = seconds
        self.drains: list[tuple[float, float, float]] = []  # (start, end, timeout)

    def drain(self, timeout_s: float) -> bool:
        start = time.monotonic()
        time.sleep(min(self.seconds, timeout_s))
        self.drains.append((start, time.monotonic(), timeout_s))
        return self.seconds <= timeout_s


# -- tests ------------------------------------------------------------------------------------------
def test_registers_for_invoke_with_the_documented_request(lambda_api: FakeLambdaApi) -> None:
    cache = FakeDrainable()
    assert ar.install(cache, lambda_api.env())
    register = lambda_api.calls[0]
    assert (register.method, register.path) == ("POST", "/2020-01-01/extension/register")
    assert register.headers["Lambda-Extension-Name"] == EXTENSION_NAME
    assert json.loads(register.body) == {"events": ["INVOKE"]}  # internal extensions may not ask for SHUTDOWN
    # Init is complete only once the extension calls /event/next, with its identifier.
    first = lambda_api.wait_for_nexts(1)[0]
    assert first.headers["Lambda-Extension-Identifier"] == lambda_api.identifier
    assert cache.write_mode == "background"


def test_handler_returns_before_the_slow_write_and_next_waits_for_it(lambda_api: FakeLambdaApi) -> None:
    cache, client = slow_cache()
    assert ar.install(cache, lambda_api.env())
    handler = ar.after_response(image_handler(cache))
    lambda_api.wait_for_nexts(1)

    start = time.monotonic()
    result, returned = run_invocation(lambda_api, handler, {"image": "a new image"})
    assert result["misses"] == 1 and result["statusCode"] == 200
    assert returned - start < PUT_SECONDS, "the handler waited for its S3 write"

    nexts = lambda_api.wait_for_nexts(2)
    assert len(client.put_done) == 1, "the write did not happen"
    put_done = next(iter(client.put_done.values()))
    assert returned < put_done <= nexts[1].at, "Lambda was told the invocation is done before the write ended"
    assert nexts[1].at - start < BOUND

    # The next invocation works the same way (the loop continues).
    start = time.monotonic()
    _, returned = run_invocation(lambda_api, handler, {"image": "another image"})
    assert returned - start < PUT_SECONDS
    nexts = lambda_api.wait_for_nexts(3)
    assert len(client.put_done) == 2 and max(client.put_done.values()) <= nexts[2].at
    cache.close()


def test_the_same_miss_in_sync_mode_waits_for_the_write() -> None:
    """The control: without the extension (off Lambda, no env), the handler pays the PUT."""
    cache, client = slow_cache()
    assert not ar.install(cache, {})
    start = time.monotonic()
    image_handler(cache)({"image": "a new image"}, Context("r"))
    assert time.monotonic() - start >= PUT_SECONDS and len(client.put_done) == 1
    cache.close()


def test_drain_starts_only_after_the_handler_ended(lambda_api: FakeLambdaApi) -> None:
    """The INVOKE reaches the extension when the invocation starts; it must not drain (and call next) before
    the handler has stored its vectors, even when the handler starts late and runs long."""
    cache = FakeDrainable(seconds=0.1)
    assert ar.install(cache, lambda_api.env())
    lambda_api.wait_for_nexts(1)
    lambda_api.invoke("slow-request")
    time.sleep(0.3)  # the runtime is slow to call the handler
    assert cache.drains == [] and len(lambda_api.nexts()) == 1

    def slow(event: Any, context: Any) -> str:
        time.sleep(0.3)
        return "ok"

    assert ar.after_response(slow)({}, Context("slow-request")) == "ok"
    ended = time.monotonic()
    nexts = lambda_api.wait_for_nexts(2)
    assert len(cache.drains) == 1
    drain_start, drain_end, timeout = cache.drains[0]
    assert ended <= drain_start and drain_end <= nexts[1].at
    assert 0 < timeout <= DRAIN_TIMEOUT_S


def test_a_handler_that_raises_still_ends_the_invocation(lambda_api: FakeLambdaApi) -> None:
    cache = FakeDrainable()
    assert ar.install(cache, lambda_api.env())
    lambda_api.wait_for_nexts(1)
    lambda_api.invoke("failing")

    def failing(event: Any, context: Any) -> None:
        raise ValueError("bad image")

    with pytest.raises(ValueError):
        ar.after_response(failing)({}, Context("failing"))
    lambda_api.wait_for_nexts(2)
    assert len(cache.drains) == 1


def test_the_end_signal_is_not_lost_when_the_handler_finishes_first(lambda_api: FakeLambdaApi) -> None:
    """If the extension thread sees its INVOKE only after the handler returned, it must not wait for it."""
    cache = FakeDrainable()
    assert ar.install(cache, lambda_api.env())
    lambda_api.wait_for_nexts(1)
    ar.after_response(noop)({}, Context("early"))
    start = time.monotonic()
    lambda_api.invoke("early")
    nexts = lambda_api.wait_for_nexts(2)
    assert nexts[1].at - start < 1.0 and len(cache.drains) == 1


def test_a_stale_signal_does_not_release_the_next_invocation(lambda_api: FakeLambdaApi) -> None:
    """An end reported for another request must not make the extension drain this one early."""
    cache = FakeDrainable()
    assert ar.install(cache, lambda_api.env())
    lambda_api.wait_for_nexts(1)
    ar.after_response(noop)({}, Context("other-request"))
    lambda_api.invoke("this-request")
    time.sleep(0.3)
    assert len(lambda_api.nexts()) == 1 and cache.drains == []
    ar.after_response(noop)({}, Context("this-request"))
    lambda_api.wait_for_nexts(2)
    assert len(cache.drains) == 1


def test_waits_are_bounded_by_the_invocation_deadline(lambda_api: FakeLambdaApi) -> None:
    """A handler that never reports (or a drain that never ends) cannot hold the environment past the
    invocation's deadline: the extension calls next by then."""
    cache = FakeDrainable(seconds=10.0)
    assert ar.install(cache, lambda_api.env())
    lambda_api.wait_for_nexts(1)
    start = time.monotonic()
    lambda_api.invoke("never-reported", deadline_in_s=0.5)
    nexts = lambda_api.wait_for_nexts(2)
    assert nexts[1].at - start < 0.5 + 0.5
    assert cache.drains and cache.drains[0][2] < 0.5  # the drain got what was left, not DRAIN_TIMEOUT_S


def test_register_404_leaves_the_cache_in_sync_mode(lambda_api: FakeLambdaApi,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    lambda_api.register_status = 404  # e.g. an emulator without the Extensions API
    cache, _ = slow_cache()
    before = set(threading.enumerate())
    with caplog.at_level(logging.INFO, logger="clip_serverless.cache"):
        assert not ar.install(cache, lambda_api.env())
    assert cache.write_mode == "sync" and ar.installed() is None
    assert [c.path for c in lambda_api.calls] == ["/2020-01-01/extension/register"]
    assert not [t for t in set(threading.enumerate()) - before if t.name == THREAD_NAME]
    assert "HTTP 404" in caplog.text
    cache.close()


def test_no_lambda_no_s3_or_explicit_sync_means_no_registration(lambda_api: FakeLambdaApi) -> None:
    cache = FakeDrainable()
    assert not ar.install(cache, {})  # not on Lambda
    assert not ar.install(cache, {"AWS_LAMBDA_FUNCTION_NAME": "f"})  # no runtime API
    assert not ar.install(cache, lambda_api.env(CLIP_CACHE_S3_WRITE="sync"))  # the operator's choice
    memory_only = EmbeddingCache(MODEL, [MemoryTier(1 << 20)])
    assert not ar.install(memory_only, lambda_api.env())  # nothing to write after the response
    assert lambda_api.calls == [] and cache.write_mode == "sync"
    assert not ar.install(cache, {"AWS_LAMBDA_FUNCTION_NAME": "f", "AWS_LAMBDA_RUNTIME_API": "no-port"})


def test_unreachable_api_leaves_the_cache_in_sync_mode() -> None:
    cache = FakeDrainable()
    start = time.monotonic()
    env = {"AWS_LAMBDA_FUNCTION_NAME": "f", "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{_closed_port()}"}
    assert not ar.install(cache, env)
    assert cache.write_mode == "sync" and time.monotonic() - start < REGISTER_TIMEOUT_S + 1.0


def test_failing_event_next_falls_back_to_sync_and_ends_the_thread(lambda_api: FakeLambdaApi,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    cache = FakeDrainable()
    assert ar.install(cache, lambda_api.env())
    lambda_api.wait_for_nexts(1)
    extension = ar.installed()
    assert extension is not None and extension.thread is not None
    lambda_api.next_status = 500  # "container error: the extension should exit promptly"
    with caplog.at_level(logging.WARNING, logger="clip_serverless.cache"):
        lambda_api.invoke("r1")
        ar.after_response(noop)({}, Context("r1"))
        extension.thread.join(BOUND)
    assert not extension.thread.is_alive()
    assert cache.write_mode == "sync" and not extension.active
    assert caplog.text.count("S3 writes are synchronous again") == 1
    # A handler still works (and signalling a dead extension is harmless).
    assert ar.after_response(answer_42)({}, Context("r2")) == 42


def test_shutdown_ends_the_thread_and_restores_sync(lambda_api: FakeLambdaApi) -> None:
    cache = FakeDrainable()
    assert ar.install(cache, lambda_api.env())
    extension = ar.installed()
    assert extension is not None and extension.thread is not None
    lambda_api.wait_for_nexts(1)
    lambda_api.shutdown_event()
    extension.thread.join(BOUND)
    assert not extension.thread.is_alive() and cache.write_mode == "sync"
    assert len(cache.drains) == 1


def test_uninstall_interrupts_a_blocked_next(lambda_api: FakeLambdaApi) -> None:
    cache = FakeDrainable()
    assert ar.install(cache, lambda_api.env())
    lambda_api.wait_for_nexts(1)  # the thread is now blocked in /event/next
    start = time.monotonic()
    assert ar.uninstall(timeout_s=BOUND)
    assert time.monotonic() - start < 1.0 and cache.write_mode == "sync"


def test_one_extension_per_process_drains_every_cache(lambda_api: FakeLambdaApi) -> None:
    first, second = FakeDrainable(), FakeDrainable()
    assert ar.install(first, lambda_api.env()) and ar.install(second, lambda_api.env())
    registers = [c for c in lambda_api.calls if c.path.endswith("/register")]
    assert len(registers) == 1
    lambda_api.wait_for_nexts(1)
    lambda_api.invoke("r")
    ar.after_response(noop)({}, Context("r"))
    lambda_api.wait_for_nexts(2)
    assert len(first.drains) == 1 and len(second.drains) == 1


@pytest.mark.usefixtures("fake_aws_credentials")  # moto only: never real credentials
def test_the_lambda_handler_writes_s3_after_the_response(lambda_api: FakeLambdaApi, tiny_model_path: Path,
                                                         moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: a function module (handler_for) on "Lambda", S3 on a moto server."""
    from tests.handlers import load_function
    from tests.lambda_events import http_api_event, response_json

    url = moto_server
    create_bucket("after-response", url)
    env = lambda_api.env(CLIP_MODEL_DIR=str(tiny_model_path), CLIP_CACHE="on", CLIP_CACHE_BUCKET="after-response",
                         CLIP_CACHE_S3_ENDPOINT_URL=url, CLIP_CACHE_S3_POLICY="text=1", CLIP_CACHE_METRICS="off")
    try:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("CLIP_CACHE_S3_WRITE", raising=False)
        handler = load_function("embed_text").handler
        assert isinstance(handler, ar.AfterResponseHandler)
        lambda_api.wait_for_nexts(1)
        event = http_api_event("POST", "/clip/embed_text", {"text": ["a photo of a red circle."]})
        response, _ = run_invocation(lambda_api, handler, event)
        assert response["statusCode"] == 200 and len(response_json(response)["embeddings"]) == 1
        lambda_api.wait_for_nexts(2)
        listing = s3_keys("after-response", url)
        assert [key for key in listing if "/text/" in key], listing
    finally:
        ar.uninstall()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
