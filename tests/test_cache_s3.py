"""The S3 tier against moto, in-process (``mock_aws``) and over HTTP (``ThreadedMotoServer`` on 127.0.0.1),
and against endpoints that misbehave: AccessDenied, throttling, a missing bucket, a closed port, a server
that accepts and never answers. Every request must still be answered, correctly and within a bound.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import boto3
import numpy as np
import pytest
from clip_serverless.cache import CacheStats, EmbeddingCache, Modality, ModelIdentity, codec, embed_cached
from clip_serverless.cache.memory import MemoryTier
from clip_serverless.cache.s3 import S3Tier
from moto import mock_aws

from tests.cache_helpers import DIM, CountingCompute, entry, expected, hammer, vector_for
from tests.fixtures_aws import REGION, create_bucket

MODEL = ModelIdentity(model_id="clip/ViT-B-32", digest="ab" * 32, embed_dim=DIM)
BOTH: dict[Modality, int | None] = {"image": 1, "text": 1}
_names = itertools.count()
pytestmark = pytest.mark.usefixtures("fake_aws_credentials")  # nothing real is ever read or used


def run(cache: EmbeddingCache, payloads: Sequence[bytes], modality: str = "image",
        ) -> tuple[np.ndarray, CacheStats, CountingCompute, float]:
    compute = CountingCompute(payloads)
    keys = [cache.key(modality, p) for p in payloads]  # type: ignore[arg-type]
    start = time.perf_counter()
    out, stats = embed_cached(cache, keys, compute, modality=modality)  # type: ignore[arg-type]
    return out, stats, compute, time.perf_counter() - start


@dataclass
class Backend:
    endpoint: str | None
    tiers: list[S3Tier] = field(default_factory=list)

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION)

    def bucket(self) -> str:
        name = f"clip-cache-test-{next(_names)}"
        create_bucket(name, self.endpoint)
        return name

    def tier(self, bucket: str, **kwargs: Any) -> S3Tier:
        """An S3 tier consulted for one miss of either modality, unless ``policy`` says otherwise."""
        options: dict[str, Any] = {"connect_timeout_s": 0.5, "read_timeout_s": 1.0, "deadline_s": 3.0,
                                   "policy": BOTH}
        options.update(kwargs)
        tier = S3Tier(bucket, "embeddings/", endpoint_url=self.endpoint, **options)
        self.tiers.append(tier)
        return tier

    def cache(self, tier: S3Tier, model: ModelIdentity = MODEL, **kwargs: Any) -> EmbeddingCache:
        """A fresh cache (a new container: empty memory) on a shared S3 tier."""
        return EmbeddingCache(model, [MemoryTier(1 << 20), tier], **kwargs)


@pytest.fixture(params=["mock_aws", "moto_server"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "mock_aws":
        with mock_aws():
            b = Backend(endpoint=None)  # clients are created lazily, i.e. after the mock started
            yield b
            for tier in b.tiers:
                tier.close()
    else:
        b = Backend(endpoint=request.getfixturevalue("moto_server"))
        yield b
        for tier in b.tiers:
            tier.close()


# -- correctness against moto -------------------------------------------------------------------
def test_miss_then_hit_from_another_container(backend: Backend) -> None:
    tier = backend.tier(backend.bucket())
    payloads = [b"img-1", b"img-2", b"img-3"]
    out1, stats1, compute1, _ = run(backend.cache(tier), payloads)
    assert compute1.calls == [[0, 1, 2]]
    assert (stats1.misses, stats1.tier("s3").lookups, stats1.tier("s3").writes, stats1.errors) == (3, 3, 3, 0)

    out2, stats2, compute2, _ = run(backend.cache(tier), payloads)
    assert compute2.calls == []  # the model never ran
    assert (stats2.tier("s3").hits, stats2.misses, stats2.tier("s3").writes) == (3, 0, 0)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(out2, expected(payloads))

    listed = backend.client().list_objects_v2(Bucket=tier.bucket)["Contents"]
    assert len(listed) == 3
    for obj in listed:
        assert obj["Key"].startswith("embeddings/ViT-B-32/abababababab/image/")
        _, _, _, _, shard, h = obj["Key"].split("/")
        assert shard == h[:2] and len(h) == 64


def test_s3_hit_is_promoted_to_memory(backend: Backend) -> None:
    tier = backend.tier(backend.bucket())
    run(backend.cache(tier), [b"x"])
    cache = backend.cache(tier)
    _, first, _, _ = run(cache, [b"x"])
    _, second, _, _ = run(cache, [b"x"])
    assert (first.tier("s3").hits, second.tier("memory").hits, second.tier("s3").lookups) == (1, 1, 0)


def test_corrupted_object_is_recomputed_and_overwritten(backend: Backend) -> None:
    tier = backend.tier(backend.bucket())
    payloads = [b"a", b"b", b"c"]
    run(backend.cache(tier), payloads)
    client = backend.client()
    victim = tier.object_key(backend.cache(tier).key("image", b"b"))
    raw = bytearray(client.get_object(Bucket=tier.bucket, Key=victim)["Body"].read())
    raw[-40] ^= 0x55  # a payload byte
    client.put_object(Bucket=tier.bucket, Key=victim, Body=bytes(raw))

    out, stats, compute, _ = run(backend.cache(tier), payloads)
    assert compute.calls == [[1]]
    assert (stats.tier("s3").hits, stats.corrupt, stats.misses, stats.tier("s3").writes) == (2, 1, 1, 1)
    np.testing.assert_array_equal(out, expected(payloads))
    healed = client.get_object(Bucket=tier.bucket, Key=victim)["Body"].read()
    key = victim.removeprefix("embeddings/")
    np.testing.assert_array_equal(codec.decode(healed, key=key, model_id=MODEL.model_id, dim=DIM),
                                  vector_for(b"b"))


def test_an_object_that_is_not_an_entry_is_a_miss(backend: Backend) -> None:
    tier = backend.tier(backend.bucket())
    cache = backend.cache(tier)
    key = cache.key("image", b"a")
    backend.client().put_object(Bucket=tier.bucket, Key=tier.object_key(key), Body=b"\x80\x04pickle?")
    out, stats, compute, _ = run(cache, [b"a"])
    assert compute.calls == [[0]] and stats.corrupt == 1
    np.testing.assert_array_equal(out, expected([b"a"]))


def test_a_different_model_digest_misses(backend: Backend) -> None:
    tier = backend.tier(backend.bucket())
    run(backend.cache(tier), [b"a"])
    reexported = ModelIdentity(MODEL.model_id, "cd" * 32, DIM)
    _, stats, compute, _ = run(backend.cache(tier, model=reexported), [b"a"])
    assert compute.calls == [[0]] and stats.tier("s3").hits == 0 and stats.misses == 1


def test_a_list_with_some_hits_keeps_input_order(backend: Backend) -> None:
    tier = backend.tier(backend.bucket())
    run(backend.cache(tier), [b"b", b"d"])
    payloads = [b"a", b"b", b"c", b"a", b"d", b"e"]
    out, stats, compute, _ = run(backend.cache(tier), payloads)
    assert compute.calls == [[0, 2, 5]]
    assert (stats.tier("s3").hits, stats.misses, stats.tier("s3").writes) == (2, 3, 3)
    np.testing.assert_array_equal(out, expected(payloads))


def test_text_policy_keeps_single_prompts_off_s3(backend: Backend) -> None:
    tier = backend.tier(backend.bucket(), policy={"image": 1, "text": 4})
    cache = backend.cache(tier)
    few = [b"t1", b"t2"]
    _, stats, _, _ = run(cache, few, modality="text")
    assert stats.tier("s3").skipped == "policy" and stats.tier("s3").lookups == 0 and stats.tier("s3").writes == 0
    many = [b"t3", b"t4", b"t5", b"t6"]
    _, stats, _, _ = run(cache, many, modality="text")
    assert stats.tier("s3").lookups == 4 and stats.tier("s3").writes == 4
    # Another container asking for the whole list gets it from S3 (the two memory-only ones are computed).
    out, stats, compute, _ = run(backend.cache(tier), few + many, "text")
    assert stats.tier("s3").hits == 4 and compute.calls == [[0, 1]]
    np.testing.assert_array_equal(out, expected(few + many))


def test_background_writes_land(backend: Backend) -> None:
    tier = backend.tier(backend.bucket())
    writer = backend.cache(tier, write_mode="background")
    _, stats, _, _ = run(writer, [b"bg-1", b"bg-2"])
    assert stats.tier("s3").writes == 0  # not waited for
    assert writer.drain(5.0)
    assert backend.client().list_objects_v2(Bucket=tier.bucket)["KeyCount"] == 2
    _, stats, compute, _ = run(backend.cache(tier), [b"bg-1", b"bg-2"])
    assert stats.tier("s3").hits == 2 and compute.calls == []


def test_concurrent_requests_for_the_same_keys(backend: Backend) -> None:
    tier = backend.tier(backend.bucket())
    payloads = [b"hot-1", b"hot-2", b"hot-1", b"hot-3"]
    want = expected(payloads)
    fault_counts: list[int] = []

    def container() -> None:
        for _ in range(5):
            out, stats, _, _ = run(backend.cache(tier), payloads)  # a new container each time
            np.testing.assert_array_equal(out, want)
            fault_counts.append(stats.errors + stats.corrupt)

    errors = hammer(container, 6)
    assert not errors and fault_counts == [0] * 30
    client = backend.client()
    for p in set(payloads):
        key = backend.cache(tier).key("image", p)
        blob = client.get_object(Bucket=tier.bucket, Key=tier.object_key(key))["Body"].read()
        np.testing.assert_array_equal(codec.decode(blob, key=key, model_id=MODEL.model_id, dim=DIM),
                                      vector_for(p))


# -- faults ---------------------------------------------------------------------------------------
def state(tier: S3Tier) -> str:
    return tier.breakers["GET"].state


def fault_lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "clip_serverless.cache" and r.levelno >= logging.WARNING
            and needle in r.getMessage()]


def assert_answered_from_computation(stats: CacheStats, out: np.ndarray, compute: CountingCompute,
                                     payloads: Sequence[bytes], elapsed: float, bound: float) -> None:
    np.testing.assert_array_equal(out, expected(payloads))
    assert compute.calls == [list(range(len(payloads)))]
    assert stats.errors >= 1 and stats.hits == 0
    assert elapsed < bound, f"took {elapsed:.2f} s, bound {bound} s"


def test_missing_bucket(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    tier = backend.tier("clip-cache-bucket-that-does-not-exist")
    payloads = [b"a", b"b", b"c"]
    out, stats, compute, elapsed = run(backend.cache(tier), payloads)
    assert_answered_from_computation(stats, out, compute, payloads, elapsed, bound=3.0)
    assert stats.tier("s3").writes == 0  # no write attempt after a failed read
    lines = fault_lines(caplog, "NoSuchBucket")
    assert len(lines) == 1 and "3 of 3" in lines[0], lines


def _deny(**kwargs: Any) -> tuple[Any, dict[str, Any]]:
    class Http:
        status_code = 403
        headers: ClassVar[dict[str, str]] = {}
        content = b""

    return Http(), {"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                    "ResponseMetadata": {"HTTPStatusCode": 403}}


def test_access_denied_in_process(caplog: pytest.LogCaptureFixture) -> None:
    with mock_aws():
        backend = Backend(endpoint=None)
        tier = backend.tier(backend.bucket())
        tier.client.meta.events.register("before-call.s3.GetObject", _deny)
        payloads = [b"a", b"b"]
        out, stats, compute, elapsed = run(backend.cache(tier), payloads)
        assert_answered_from_computation(stats, out, compute, payloads, elapsed, bound=3.0)
        lines = fault_lines(caplog, "AccessDenied (HTTP 403)")
        assert len(lines) == 1 and "GET" in lines[0] and "s3:ListBucket" in lines[0], lines
        tier.close()


def test_breaker_opens_skips_and_recovers_after_a_probe(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    with mock_aws():
        backend = Backend(endpoint=None)
        tier = backend.tier(backend.bucket(), breaker_failures=3, breaker_cooldown_s=30, clock=lambda: now[0])
        run(backend.cache(tier), [b"warm"])  # S3 healthy: written
        tier.client.meta.events.register("before-call.s3.GetObject", _deny, unique_id="deny")

        _, stats, _, _ = run(backend.cache(tier), [b"a", b"b", b"c"])  # 3 failures: opens
        assert stats.errors == 3 and state(tier) == "open"
        assert fault_lines(caplog, "GET disabled for 30 s")

        _, stats, compute, elapsed = run(backend.cache(tier), [b"warm", b"d"])
        assert stats.tier("s3").skipped == "breaker-open" and stats.tier("s3").lookups == 0 and stats.errors == 0
        assert compute.calls == [[0, 1]] and elapsed < 0.5

        now[0] = 31.0  # cool-down over; the probe fails: open again
        _, stats, _, _ = run(backend.cache(tier), [b"warm"])
        assert stats.errors == 1 and state(tier) == "open"

        tier.client.meta.events.unregister("before-call.s3.GetObject", unique_id="deny")
        now[0] = 62.0  # next probe succeeds: closed, and the entry written before is a hit
        _, stats, compute, _ = run(backend.cache(tier), [b"warm"])
        assert stats.tier("s3").hits == 1 and compute.calls == [] and state(tier) == "closed"
        tier.close()


def test_client_creation_failure_is_a_fault(caplog: pytest.LogCaptureFixture) -> None:
    def factory() -> Any:
        raise ImportError("No module named 'boto3'")

    tier = S3Tier("bucket", client_factory=factory, policy=BOTH)
    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20), tier])
    out, stats, compute, elapsed = run(cache, [b"a"])
    assert_answered_from_computation(stats, out, compute, [b"a"], elapsed, bound=1.0)
    assert fault_lines(caplog, "client: ImportError")


# -- misbehaving endpoints over real HTTP ---------------------------------------------------------------
class _ErrorHandler(BaseHTTPRequestHandler):
    status = 500
    code = "InternalError"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.code}</Code>"
                f"<Message>injected</Message><RequestId>r</RequestId></Error>").encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def error_endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    status, code = request.param
    handler = type("Handler", (_ErrorHandler,), {"status": status, "code": code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """Accepts connections and never answers: S3 hanging."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def _endpoint_cache(url: str, **kwargs: Any) -> tuple[EmbeddingCache, S3Tier]:
    options: dict[str, Any] = {"connect_timeout_s": 0.2, "read_timeout_s": 0.2, "max_attempts": 2,
                               "deadline_s": 0.5}
    options.update(kwargs)
    tier = S3Tier("clip-cache", "embeddings/", endpoint_url=url, region="us-east-1", policy=BOTH, **options)
    return EmbeddingCache(MODEL, [MemoryTier(1 << 20), tier]), tier


def test_max_attempts_counts_the_first_try() -> None:
    """CLIP_CACHE_S3_MAX_ATTEMPTS=2 is two calls in all (botocore's total_max_attempts), not a first try and
    two retries (botocore's max_attempts), as the configuration documents it."""
    calls: list[str] = []

    class Counting(_ErrorHandler):
        def do_GET(self) -> None:
            calls.append(self.path)
            self._answer()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    tier = S3Tier("clip-cache", endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", region="us-east-1",
                  max_attempts=2, deadline_s=10.0)
    try:
        result = tier.get_many(["one-key"])
    finally:
        tier.close()
        server.shutdown()
        server.server_close()
    assert result.errors == 1 and len(calls) == 2, calls


@pytest.mark.parametrize("error_endpoint, cause", [
    ((403, "AccessDenied"), "AccessDenied (HTTP 403)"),
    ((503, "SlowDown"), "SlowDown (HTTP 503)"),
    ((500, "InternalError"), "InternalError (HTTP 500)"),
], indirect=["error_endpoint"])
def test_error_responses_over_http(error_endpoint: str, cause: str, caplog: pytest.LogCaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if cause.startswith("SlowDown"):
        # botocore's throttling backoff before the retry is uniform in [0, 1) s: pinned at its upper end so
        # that the 0.5 s deadline cuts it (a short draw would let the retry fail first, with another line).
        from botocore.retries.standard import ExponentialBackoff

        monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 1.0)
    cache, tier = _endpoint_cache(error_endpoint)
    payloads = [b"a", b"b", b"c", b"d"]
    try:
        out, stats, compute, elapsed = run(cache, payloads)
    finally:
        tier.close()
    # Throttling is retried with backoff; the batch deadline (0.5 s) still bounds the request.
    assert_answered_from_computation(stats, out, compute, payloads, elapsed, bound=2.0)
    assert stats.errors == 4
    lines = fault_lines(caplog, "cache s3 fault: GET")
    if cause.startswith("SlowDown"):  # botocore backs off ~1 s before retrying: the deadline cuts first,
        tier_lines = " ".join(r.getMessage() for r in caplog.records)  # the cause is logged when known
        assert "no answer within 0.5 s" in lines[0] and cause in tier_lines, lines
    else:
        assert len(lines) == 1 and cause in lines[0] and "4 of 4" in lines[0], lines


def test_unreachable_endpoint(closed_port: str, caplog: pytest.LogCaptureFixture) -> None:
    cache, tier = _endpoint_cache(closed_port)
    payloads = [b"a", b"b"]
    try:
        out, stats, compute, elapsed = run(cache, payloads)
    finally:
        tier.close()
    assert_answered_from_computation(stats, out, compute, payloads, elapsed, bound=2.0)
    lines = fault_lines(caplog, "EndpointConnectionError")
    assert len(lines) == 1 and "2 of 2" in lines[0], lines
    assert "testing" not in " ".join(r.getMessage() for r in caplog.records)  # no credentials in logs


def test_hanging_endpoint_is_bounded_by_the_deadline(silent_endpoint: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    cache, tier = _endpoint_cache(silent_endpoint, read_timeout_s=5.0, deadline_s=0.4, breaker_failures=2)
    payloads = [b"a", b"b", b"c"]
    try:
        out, stats, compute, elapsed = run(cache, payloads)
        # The deadline, not botocore's 5 s read timeout (x 2 attempts), bounds the request.
        assert_answered_from_computation(stats, out, compute, payloads, elapsed, bound=1.5)
        assert fault_lines(caplog, "GET no answer within 0.4 s (bucket 'clip-cache', 3 of 3")
        # Each abandoned batch counts as a failure: after two, S3 is skipped and costs nothing.
        _, stats, _, _ = run(cache, [b"d"])
        assert stats.errors == 1
        _, stats, compute, elapsed = run(cache, [b"e"])
        assert stats.tier("s3").skipped == "breaker-open" and compute.calls == [[0]] and elapsed < 0.2
    finally:
        tier.close(wait=False)  # the endpoint fixture's teardown closes the hung connections


def test_a_slow_but_working_s3_is_used(moto_server: str) -> None:
    """An injected delay below the deadline: S3 is slow, the answer still comes from it."""
    backend = Backend(endpoint=moto_server)
    tier = backend.tier(backend.bucket(), deadline_s=2.0)

    def delay(**kwargs: Any) -> None:
        time.sleep(0.15)

    run(backend.cache(tier), [b"slow"])
    tier.client.meta.events.register("before-send.s3.GetObject", delay)
    out, stats, compute, elapsed = run(backend.cache(tier), [b"slow"])
    tier.close()
    assert stats.tier("s3").hits == 1 and compute.calls == [] and 0.15 <= elapsed < 2.0
    np.testing.assert_array_equal(out, expected([b"slow"]))


def test_a_delay_beyond_the_deadline_is_cut(moto_server: str) -> None:
    backend = Backend(endpoint=moto_server)
    tier = backend.tier(backend.bucket(), deadline_s=0.3)
    release = threading.Event()

    def delay(**kwargs: Any) -> None:
        release.wait(3.0)

    run(backend.cache(tier), [b"late"])
    tier.client.meta.events.register("before-send.s3.GetObject", delay)
    try:
        out, stats, compute, elapsed = run(backend.cache(tier), [b"late"])
    finally:
        release.set()
        tier.close()
    assert_answered_from_computation(stats, out, compute, [b"late"], elapsed, bound=1.0)



def test_background_writes_stay_bounded_when_s3_is_slow(caplog: pytest.LogCaptureFixture) -> None:
    from clip_serverless.cache.s3 import MAX_QUEUED_WRITE_BATCHES

    release = threading.Event()
    written: list[str] = []

    class SlowClient:
        def put_object(self, Bucket: str, Key: str, **kwargs: Any) -> None:
            release.wait(5.0)
            written.append(Key)

    tier = S3Tier("bucket", client_factory=SlowClient, deadline_s=5.0)
    try:
        results = [tier.put_many({f"k{i}": entry(b"v")}, wait_for_completion=False)
                   for i in range(MAX_QUEUED_WRITE_BATCHES + 5)]
        dropped = sum(r.errors for r in results)
        assert 5 <= dropped <= 6  # the writer thread may already have taken the first batch off the queue
        assert fault_lines(caplog, "PUT dropped: background writes are behind")
        assert not tier.drain(0.05)  # still writing
        release.set()
        assert tier.drain(5.0)
        assert len(written) == MAX_QUEUED_WRITE_BATCHES + 5 - dropped  # every accepted batch lands
        assert tier.put_many({"again": entry(b"v")}, wait_for_completion=False).errors == 0  # the queue drained
    finally:
        release.set()
        tier.close()
