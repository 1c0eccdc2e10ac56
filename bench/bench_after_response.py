"""What a cache miss costs on the Lambda handler path: S3 writes before the response (``sync``) vs after it
(the internal extension of ``clip_serverless.aws_lambda.after_response``).

The real function code runs in this process: ``handler_for("embed_image")`` (Mangum + FastAPI + the model +
the cache) with S3 on moto's HTTP server (its own process, as in ``bench_cache.py``). Every request sends a
new image (a JPEG with distinct trailing bytes: same pixels, new content address), so each one is a miss:
GET (404) + compute + PUT. This script plays Lambda: for the after-response mode, a fake Extensions API on
127.0.0.1 hands the extension an INVOKE before each handler call, and records when the extension calls
``/event/next`` again (when Lambda could freeze the environment and give it the next invocation).

Reported per mode (medians and p90 over ``--requests``):
  * handler: what the client waits for (handler call to return; Lambda adds its own overhead on top),
  * post-response: handler return -> the extension's next ``/event/next`` (billed; the environment takes no
    new invocation meanwhile),
for three modes: S3 off for images (compute only, the floor), ``sync``, ``after-response``.

    python bench/bench_after_response.py [--model-dir models/clip-tiny] [--requests 40]

moto over loopback is a lower bound for S3: in AWS a PUT of a small object takes tens of milliseconds.
Figures taken on a shared machine drift; compare modes within one run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "layers" / "core"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cache import fake_aws_environment, moto_endpoint, sample_jpeg  # noqa: E402
from clip_serverless.aws_lambda import after_response  # noqa: E402

BUCKET = "bench-after-response"


class FakeExtensionsApi:
    """register + event/next, as Lambda's; records when each /event/next arrives."""

    def __init__(self) -> None:
        self.identifier = str(uuid.uuid4())
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.next_times: list[float] = []
        self.arrived = threading.Condition()
        self.closed = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"

    def invoke(self, request_id: str) -> None:
        self.events.put({"eventType": "INVOKE", "requestId": request_id,
                         "deadlineMs": int((time.time() + 30) * 1000)})

    def wait_next(self, count: int, timeout: float = 10.0) -> float:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.next_times) >= count, timeout):
                raise RuntimeError("the extension did not call /event/next")
            return self.next_times[count - 1]

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, body: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                for name, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._reply({"functionName": "bench"}, {"Lambda-Extension-Identifier": api.identifier})

            def do_GET(self) -> None:
                with api.arrived:
                    api.next_times.append(time.perf_counter())
                    api.arrived.notify_all()
                while not api.closed.is_set():
                    try:
                        event = api.events.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self._reply(event, {})
                    return

        return Handler


class Context:
    function_name = "bench"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"
    memory_limit_in_mb = 3008
    log_group_name = "/aws/lambda/bench"
    log_stream_name = "stream"

    def __init__(self, request_id: str) -> None:
        self.aws_request_id = request_id

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def event_for(image: bytes) -> dict[str, Any]:
    """An HTTP API (payload 2.0) event for POST /clip/embed_image."""
    body = json.dumps({"image": {"type": "base64", "value": base64.b64encode(image).decode()}}).encode()
    return {
        "version": "2.0", "routeKey": "POST /clip/embed_image", "rawPath": "/clip/embed_image",
        "rawQueryString": "", "headers": {"host": "bench.example", "content-type": "application/json"},
        "requestContext": {"http": {"method": "POST", "path": "/clip/embed_image", "protocol": "HTTP/1.1",
                                    "sourceIp": "203.0.113.7", "userAgent": "bench"},
                           "requestId": "id", "routeKey": "POST /clip/embed_image", "stage": "$default",
                           "timeEpoch": 0},
        "body": base64.b64encode(body).decode(), "isBase64Encoded": True,
    }


def images(base: bytes) -> Iterator[bytes]:
    counter = 0
    while True:
        counter += 1
        yield base + b"bench-%d-%s" % (counter, uuid.uuid4().hex.encode())  # after EOI: same pixels


def new_handler(env: dict[str, str]) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """A cold start of the function with this environment (its own app, model and cache)."""
    from clip_serverless.aws_lambda.entry import handler_for

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        handler: Callable[[dict[str, Any], Any], dict[str, Any]] = handler_for("embed_image")
        return handler
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run(handler: Callable[[dict[str, Any], Any], dict[str, Any]], requests: int, source: Iterator[bytes],
        api: FakeExtensionsApi | None) -> tuple[list[float], list[float], list[str]]:
    handler_ms: list[float] = []
    post_ms: list[float] = []
    cache_logs: list[str] = []
    for i in range(requests + 2):  # 2 warm-up requests
        request_id = str(uuid.uuid4())
        event = event_for(next(source))
        if api is not None:
            api.invoke(request_id)
        start = time.perf_counter()
        response = handler(event, Context(request_id))
        returned = time.perf_counter()
        if response["statusCode"] != 200:
            raise RuntimeError(f"handler answered {response['statusCode']}: {response.get('body')}")
        if api is not None:
            # Lambda gives the environment its next invocation only after the extension's next call.
            next_at = api.wait_next(i + 2)
            if i >= 2:
                post_ms.append((next_at - returned) * 1000)
        if i >= 2:
            handler_ms.append((returned - start) * 1000)
            cache_logs.append(str(response.get("headers", {}).get("x-clip-cache", "")))
    return handler_ms, post_ms, cache_logs


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"median {statistics.median(values):7.2f} ms   p90 {p90:7.2f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = next((p for p in (REPO / "models/clip-tiny", REPO / "build/dev-tiny")
                        if (p / "manifest.json").exists()), None)
    parser.add_argument("--model-dir", type=Path, default=default_dir)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--moto-in-process", action="store_true")
    args = parser.parse_args(argv)
    if args.model_dir is None:
        parser.error("no model directory found: pass --model-dir")

    fake_aws_environment()
    os.environ.pop("AWS_LAMBDA_RUNTIME_API", None)

    source = images(sample_jpeg())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, model {args.model_dir}, "
          f"{args.requests} misses per mode (embed_image, 640x480 JPEG)")
    with moto_endpoint(args.moto_in_process) as url:
        import boto3

        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        base = {"CLIP_MODEL_DIR": str(args.model_dir), "CLIP_CACHE": "on", "CLIP_CACHE_BUCKET": BUCKET,
                "CLIP_CACHE_S3_ENDPOINT_URL": url, "CLIP_CACHE_METRICS": "off", "CLIP_PRELOAD": "",
                "AWS_LAMBDA_FUNCTION_NAME": "bench"}
        results: dict[str, tuple[list[float], list[float], list[str]]] = {}
        results["S3 off for images (compute only)"] = run(
            new_handler({**base, "CLIP_CACHE_S3_POLICY": "image=off"}), args.requests, source, None)
        # No AWS_LAMBDA_RUNTIME_API: the extension cannot register, the Lambda default (sync) stays.
        results["sync (GET + compute + PUT)"] = run(new_handler(base), args.requests, source, None)
        api = FakeExtensionsApi()
        try:
            handler = new_handler({**base, "AWS_LAMBDA_RUNTIME_API": api.address})
            if after_response.installed() is None:
                raise RuntimeError("the extension did not register")
            api.wait_next(1)  # init done: the extension waits for its first INVOKE
            results["after-response (GET + compute; PUT after)"] = run(handler, args.requests, source, api)
        finally:
            after_response.uninstall()
            api.close()

    width = max(map(len, results)) + 2
    print("\nhandler latency (what the client waits for)")
    for name, (handler_ms, _, _) in results.items():
        print(f"  {name:<{width}}{summary(handler_ms)}")
    print("\npost-response time (handler return -> extension's /event/next; billed, environment busy)")
    for name, (_, post_ms, _) in results.items():
        if post_ms:
            print(f"  {name:<{width}}{summary(post_ms)}")
    print("\nx-clip-cache of the last request per mode")
    for name, (_, _, logs) in results.items():
        print(f"  {name:<{width}}{logs[-1] if logs else ''}")


if __name__ == "__main__":
    main()
