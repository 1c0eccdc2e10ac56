"""A stand-in for Lambda's Runtime API.

Lambda's runtime client (``awslambdaric``, the same code as in the managed python3.12 runtime) polls
``GET /2018-06-01/runtime/invocation/next`` for an event and posts the handler's result back. This
server answers those calls from an in-process queue, so a test can run a built function in its own
process exactly as Lambda would, without Docker or the Runtime Interface Emulator binary.

Sockets disable Nagle's algorithm: the client writes headers and body separately, and with Nagle on,
each call stalls ~40 ms on delayed ACKs.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
import urllib.parse
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "/2018-06-01/runtime"


@dataclass(frozen=True)
class InvocationResult:
    """What the function answered: ``kind`` is "response" or "error" (handler or init error)."""

    kind: str
    body: bytes
    error_type: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)


class InitError(RuntimeError):
    """The function failed at init (its module raised): the runtime reported ``/init/error``."""


@dataclass
class _Pending:
    request_id: str
    event: bytes
    deadline_ms: int
    future: Future[InvocationResult] = field(default_factory=Future)


class RuntimeApi:
    """One function's Runtime API on ``127.0.0.1:<port>``. Thread-safe; one invocation at a time is
    what Lambda does per execution environment, and what :meth:`invoke` does."""

    def __init__(self, function_arn: str, timeout_s: float = 30.0) -> None:
        self.function_arn = function_arn
        self.timeout_s = timeout_s
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.init_error: InvocationResult | None = None
        self._server = _Server(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="runtime-api", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``host:port``, the value of ``AWS_LAMBDA_RUNTIME_API``."""
        return f"127.0.0.1:{self._server.server_port}"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.address}"

    # -- the test side ---------------------------------------------------------------------------
    def submit(self, event: bytes) -> Future[InvocationResult]:
        request_id = f"00000000-0000-4000-8000-{next(self._ids):012d}"
        pending = _Pending(request_id, event, int((time.time() + self.timeout_s) * 1000))
        with self._lock:
            if self.init_error is not None:
                raise InitError(self.init_error.body.decode(errors="replace"))
            self._pending[request_id] = pending
        self._queue.put(pending)
        return pending.future

    def invoke(self, event: bytes | dict[str, Any], timeout_s: float | None = None) -> InvocationResult:
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        return self.submit(body).result(timeout=timeout_s or self.timeout_s)

    def close(self) -> None:
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for pending in self._pending.values():
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("runtime API closed"))

    # -- the runtime side ------------------------------------------------------------------------
    def _next(self) -> _Pending | None:
        while not self._closed.is_set():
            try:
                return self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    def _finish(self, request_id: str, result: InvocationResult) -> bool:
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is None:
            return False
        pending.future.set_result(result)
        return True

    def _fail_init(self, result: InvocationResult) -> None:
        with self._lock:
            self.init_error = result
            pending, self._pending = list(self._pending.values()), {}
        for item in pending:
            item.future.set_exception(InitError(result.body.decode(errors="replace")))


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A runtime process killed mid-poll drops its connection: expected, not worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_class(api: RuntimeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Lambda's runtime client expects
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes = b"{}", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == f"{PREFIX}/invocation/next":
                pending = api._next()
                if pending is None:
                    self._reply(500, b'{"errorMessage": "shutting down"}')
                    return
                self._reply(200, pending.event, {
                    "Lambda-Runtime-Aws-Request-Id": pending.request_id,
                    "Lambda-Runtime-Deadline-Ms": str(pending.deadline_ms),
                    "Lambda-Runtime-Invoked-Function-Arn": api.function_arn,
                    "Lambda-Runtime-Trace-Id": f"Root=1-00000000-{pending.request_id[-24:]};Sampled=0",
                })
            else:
                self._reply(404, b'{"errorMessage": "not found"}')

        def do_POST(self) -> None:
            path = self.path
            body = self._body()
            if path == f"{PREFIX}/init/error":
                api._fail_init(InvocationResult("error", body, self.headers.get("Lambda-Runtime-Function-Error-Type")))
                self._reply(202, b'{"status": "OK"}')
                return
            parts = path.removeprefix(f"{PREFIX}/invocation/").split("/")
            if len(parts) == 2 and parts[1] in ("response", "error"):
                kind = parts[1]
                error_type = self.headers.get("Lambda-Runtime-Function-Error-Type") if kind == "error" else None
                if api._finish(parts[0], InvocationResult(kind, body, error_type)):
                    self._reply(202, b'{"status": "OK"}')
                else:
                    self._reply(400, b'{"errorMessage": "unknown request id"}')
                return
            self._reply(404, b'{"errorMessage": "not found"}')

    return Handler
