"""A client of the Lambda Extensions API (2020-01-01) on ``http://$AWS_LAMBDA_RUNTIME_API``: register, next event.

Protocol::

    init    POST /2020-01-01/extension/register   Lambda-Extension-Name: <name>   {"events": ["INVOKE"]}
              -> 200, header Lambda-Extension-Identifier
            (during init only: once the runtime has called /invocation/next, registering fails. Internal
            extensions may not register for SHUTDOWN: the runtime process starts and stops them.)
    later   GET /2020-01-01/extension/event/next   Lambda-Extension-Identifier: <id>   (no timeout: it blocks)
              <- INVOKE {requestId, deadlineMs, ...}   at the *start* of an invocation
            Lambda may freeze the environment once every extension is back in this call.

``http.client`` rather than ``urllib``: no proxy from ``HTTP_PROXY`` may come between the runtime process and
its own local API. Standard library only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from typing import Any

API_VERSION = "2020-01-01"
REGISTER_TIMEOUT_S = 1.0  # the local API answers at once; never hold init long on a broken one


class ExtensionsApiError(RuntimeError):
    """The API answered with another status than 200 (403/500 from event/next: the extension should exit)."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}")
        self.status = status


class ExtensionsApi:
    """The API on ``host:port`` (``AWS_LAMBDA_RUNTIME_API``)."""

    def __init__(self, address: str, *, register_timeout_s: float = REGISTER_TIMEOUT_S) -> None:
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"AWS_LAMBDA_RUNTIME_API={address!r} is not host:port")
        self.host, self.port = host, int(port)
        self.register_timeout_s = register_timeout_s
        self._lock = threading.Lock()
        self._open: http.client.HTTPConnection | None = None  # the blocking /event/next, so close() can end it
        self._closed = False

    def register(self, name: str) -> str:
        """Register for INVOKE events; returns the extension identifier."""
        body = json.dumps({"events": ["INVOKE"]}).encode()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.register_timeout_s)
        try:
            conn.request("POST", f"/{API_VERSION}/extension/register", body=body,
                         headers={"Lambda-Extension-Name": name, "Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise ExtensionsApiError(response.status, "register")
            identifier = response.getheader("Lambda-Extension-Identifier", "")
        finally:
            conn.close()
        if not identifier:
            raise ExtensionsApiError(200, "register answered without Lambda-Extension-Identifier")
        return identifier

    def next_event(self, identifier: str) -> dict[str, Any]:
        """Block until the next event (AWS: set no timeout on this call; the environment may be frozen in it)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=None)
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("extensions API client closed")
            self._open = conn
        try:
            conn.request("GET", f"/{API_VERSION}/extension/event/next",
                         headers={"Lambda-Extension-Identifier": identifier})
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise ExtensionsApiError(response.status, "event/next")
        finally:
            with self._lock:
                self._open = None
            conn.close()
        event = json.loads(data)
        if not isinstance(event, dict):
            raise ValueError("event/next answered something other than a JSON object")
        return event

    def close(self) -> None:
        """End a blocked :meth:`next_event` (it raises): tests and the extension's ``stop()`` only."""
        with self._lock:
            self._closed = True
            sock = self._open.sock if self._open is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)


def describe(exc: BaseException) -> str:
    """A fault of this API for a log line: the status for an API answer, the type and text otherwise."""
    return str(exc) if isinstance(exc, ExtensionsApiError) else f"{type(exc).__name__}: {exc}"
