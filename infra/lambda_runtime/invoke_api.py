"""Lambda's Invoke API for built functions, on 127.0.0.1: what ``compare`` calls to embed its texts.

``POST /2015-03-31/functions/{FunctionName}/invocations`` is the API that boto3's ``invoke`` calls and
that ``sam local start-lambda`` serves (with Docker); a function reaches it through its standard
``AWS_ENDPOINT_URL_LAMBDA``. Like Lambda, :class:`LambdaService` keeps a pool of execution environments
per function: an invocation takes an idle one, or starts a new one (a cold start) while the function is
below its concurrency limit, and is throttled (429 ``TooManyRequestsException``) above it.

For tests it can also misbehave as Lambda does: throttle every call, answer with a function error,
or answer late (:class:`Faults`).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .runner import FunctionSpec, LocalLambda, LocalLambdaError
from .sam_build import function_name_of

INVOKE_PREFIX = "/2015-03-31/functions/"


@dataclass
class Faults:
    """What a function's invocations do instead of (or before) running: for failure tests."""

    throttle: bool = False  # every call: 429 TooManyRequestsException
    error: bool = False  # every call: a function error (X-Amz-Function-Error: Unhandled)
    delay_s: float = 0.0  # wait this long before running the call


class _Pool:
    def __init__(self, name: str, make: Callable[[Path], LocalLambda], workdir: Path, max_concurrency: int) -> None:
        self.name = name
        self.make = make
        self.workdir = workdir
        self.max_concurrency = max_concurrency
        self.idle: list[LocalLambda] = []
        self.all: list[LocalLambda] = []
        self.lock = threading.Lock()
        self.faults = Faults()
        self.invocations = 0
        self.throttled = 0

    def acquire(self) -> LocalLambda | None:
        with self.lock:
            self.invocations += 1
            if self.idle:
                return self.idle.pop()
            if len(self.all) >= self.max_concurrency:
                self.throttled += 1
                return None
            env = self.make(self.workdir / f"{self.name}-{len(self.all)}")
            self.all.append(env)
        env.start()  # its init runs while the invocation waits, as in a cold start
        return env

    def release(self, env: LocalLambda) -> None:
        with self.lock:
            self.idle.append(env)

    def prestart(self, count: int) -> None:
        """Start ``count`` environments at once (their inits run concurrently)."""
        with self.lock:
            new = [self.make(self.workdir / f"{self.name}-{len(self.all) + i}") for i in range(count)]
            self.all += new
            self.idle += new
        for env in new:
            env.start()

    def stop(self) -> None:
        for env in self.all:
            env.stop()


class LambdaService:
    """Serves Invoke for registered functions (by logical id; ARNs and qualifiers are accepted)."""

    def __init__(self, workdir: Path | None = None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lambda-service-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.pools: dict[str, _Pool] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="lambda-service", daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        """The value of ``AWS_ENDPOINT_URL_LAMBDA`` for the functions that call these."""
        return f"http://127.0.0.1:{self._server.server_port}"

    def register(self, spec: FunctionSpec, *, max_concurrency: int = 4, **env_kwargs: Any) -> _Pool:
        """Serve ``spec.name``; environments are :class:`LocalLambda` (``env_kwargs`` go to it)."""
        pool = _Pool(spec.name, lambda workdir: LocalLambda(spec, workdir, **env_kwargs),
                     self.workdir, max_concurrency)
        self.pools[spec.name] = pool
        return pool

    def faults(self, name: str) -> Faults:
        return self.pools[name].faults

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        for pool in self.pools.values():
            pool.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LambdaService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one invocation --------------------------------------------------------------------------
    def _invoke(self, name: str, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        pool = self.pools.get(function_name_of(name))
        if pool is None:
            return _error(404, "ResourceNotFoundException", f"Function not found: {name}")
        faults = pool.faults
        if faults.delay_s:
            time.sleep(faults.delay_s)
        if faults.throttle:
            pool.throttled += 1
            return _error(429, "TooManyRequestsException", "Rate Exceeded.",
                          Reason="ReservedFunctionConcurrentInvocationLimitExceeded")
        if faults.error:
            body = {"errorType": "RuntimeError", "errorMessage": "injected failure", "stackTrace": []}
            return 200, {"X-Amz-Function-Error": "Unhandled"}, json.dumps(body).encode()
        env = pool.acquire()
        if env is None:
            return _error(429, "TooManyRequestsException", "Rate Exceeded.",
                          Reason="ReservedFunctionConcurrentInvocationLimitExceeded")
        try:
            result = env.invoke(payload)
        except LocalLambdaError as exc:  # its init failed: Lambda answers with a function error
            body = {"errorType": "Runtime.InitError", "errorMessage": str(exc).splitlines()[0]}
            return 200, {"X-Amz-Function-Error": "Unhandled"}, json.dumps(body).encode()
        pool.release(env)
        headers = {"X-Amz-Executed-Version": "1"}
        if result.kind != "response":
            headers["X-Amz-Function-Error"] = "Unhandled"
        return 200, headers, result.body


def _error(status: int, kind: str, message: str, **extra: str) -> tuple[int, dict[str, str], bytes]:
    body = {"Type": "User", "message": message, **extra}
    return status, {"x-amzn-ErrorType": kind}, json.dumps(body).encode()


def _handler_class(service: LambdaService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            payload = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path.startswith(INVOKE_PREFIX) and path.endswith("/invocations"):
                name = urllib.parse.unquote(path[len(INVOKE_PREFIX):-len("/invocations")])
                status, headers, body = service._invoke(name, payload)
            else:
                status, headers, body = _error(404, "UnknownOperationException", f"no such operation: {path}")
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
