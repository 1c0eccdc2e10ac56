"""S3 cache writes after the response on Lambda: an internal extension that holds the freeze until they end.

Why: on Lambda a thread still writing when the handler returns is frozen with the container (and resumes
minutes later, or never), so without help the cache waits for its PUTs before answering (``sync``) and every
miss that goes to S3 pays a PUT. Lambda freezes an environment only when the runtime has posted its response
AND every registered extension has called ``/event/next`` again; the response itself goes to the caller as
soon as the runtime posts it. An internal extension (a thread of the runtime process) that delays its
``/event/next`` until the cache's writes are drained therefore runs them after the client has its answer
(AWS Compute Blog, "Running code after returning a response from an AWS Lambda function").

Protocol (Lambda Extensions API 2020-01-01, ``http://$AWS_LAMBDA_RUNTIME_API``)::

    init    POST /2020-01-01/extension/register   Lambda-Extension-Name: <name>   {"events": ["INVOKE"]}
              -> 200, header Lambda-Extension-Identifier
            (during init only: once the runtime has called /invocation/next, registering fails. Internal
            extensions may not register for SHUTDOWN: the runtime process starts and stops them.)
    thread  GET /2020-01-01/extension/event/next   Lambda-Extension-Identifier: <id>   (no timeout: it blocks)
              <- INVOKE {requestId, deadlineMs, ...}   at the *start* of an invocation
            wait until the handler wrapper reports that request finished (:func:`after_response`)
            drain the cache's background writes, bounded  (the client already has, or is getting, its response)
            GET /event/next again                       -> Lambda may freeze now; blocks until the next INVOKE

Costs: the drain counts towards the invocation's duration (billed; Lambda's ``PostRuntimeExecutionDuration``
metric) and the environment takes no new invocation until it ends, so it is bounded by ``drain_timeout_s`` and
by the invocation's deadline. Writes still running then are frozen and resume with the next invocation, as in
the plain ``background`` mode.

Nothing here may break a request: off Lambda, when ``CLIP_CACHE_S3_WRITE=sync`` is set explicitly, without an
S3 tier, or when registering fails (an emulator without the Extensions API answers 404), :func:`install`
returns False and the cache keeps its configured mode. Any later fault (``/event/next`` failing) is logged
once and every cache goes back to ``sync`` writes. Standard library only; no boto3 here.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from ..cache.tier import WriteMode

logger = logging.getLogger("clip_serverless.cache")

API_VERSION = "2020-01-01"
EXTENSION_NAME = "clip-cache-s3-writer"  # an internal extension's name is free (external: its file name)
REGISTER_TIMEOUT_S = 1.0  # the local API answers at once; never hold init long on a broken one
DRAIN_TIMEOUT_S = 2.0  # a request queues 1-2 write batches, each bounded by CLIP_CACHE_S3_DEADLINE (0.5 s)
HANDLER_TIMEOUT_S = 900.0  # Lambda's longest function timeout; an INVOKE's deadlineMs usually bounds sooner
DEADLINE_MARGIN_S = 0.05  # finish the drain this long before the invocation's deadline
NEXT_RETRIES = 3  # /event/next transport errors in a row before giving up
THREAD_NAME = "clip-cache-after-response"


class Drainable(Protocol):
    """What the extension needs from a cache (:class:`~.tiered.EmbeddingCache` is one)."""

    write_mode: WriteMode

    @property
    def has_remote_tiers(self) -> bool:
        """Whether any of its writes can be deferred past the response (nothing to drain otherwise)."""
        ...

    def drain(self, timeout_s: float) -> bool: ...


class ExtensionsApiError(RuntimeError):
    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}")
        self.status = status


class ExtensionsApi:
    """A client of the Lambda Extensions API on ``host:port`` (``AWS_LAMBDA_RUNTIME_API``).

    ``http.client`` rather than ``urllib``: no proxy from ``HTTP_PROXY`` may come between the runtime process
    and its own local API.
    """

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
        """End a blocked :meth:`next_event` (it raises): tests and :func:`uninstall` only."""
        with self._lock:
            self._closed = True
            sock = self._open.sock if self._open is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)


class _Handshake:
    """The handler wrapper tells the extension thread that an invocation's handler has returned.

    Matched by request id (the INVOKE event's ``requestId`` is the context's ``aws_request_id``), so a signal
    given before the extension even received its INVOKE is not lost, and a late one from an earlier request
    cannot be taken for this one. Without ids, the k-th INVOKE waits for the k-th finished handler
    (invocations of one environment are strictly sequential).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._finished_ids: deque[str] = deque(maxlen=64)
        self._finished = 0
        self._ids_reported = False
        self._cancelled = False

    def finished(self, request_id: str | None) -> None:
        with self._cond:
            self._finished += 1
            if request_id:
                self._ids_reported = True
                self._finished_ids.append(request_id)
            self._cond.notify_all()

    def cancel(self) -> None:
        """Wake a waiting extension thread for good (stop())."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def wait(self, request_id: str | None, ordinal: int, timeout_s: float) -> bool:
        def done() -> bool:
            if self._cancelled:
                return True
            if request_id and self._ids_reported:
                return request_id in self._finished_ids
            return self._finished >= ordinal

        with self._cond:
            return self._cond.wait_for(done, timeout=max(0.0, timeout_s))


class AfterResponse:
    """The internal extension: after each invocation's handler, drain the caches, then ``/event/next``."""

    def __init__(self, api: ExtensionsApi, *, name: str = EXTENSION_NAME,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, handler_timeout_s: float = HANDLER_TIMEOUT_S,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.api = api
        self.name = name
        self.drain_timeout_s = drain_timeout_s
        self.handler_timeout_s = handler_timeout_s
        self._now = wall_clock  # deadlineMs is wall-clock epoch milliseconds
        self._caches: list[Drainable] = []
        self._lock = threading.Lock()
        self._handshake = _Handshake()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._identifier: str | None = None
        self._active = False
        self._invokes = 0
        self._logged: set[str] = set()

    @property
    def active(self) -> bool:
        """True while the thread serves invocations and the caches write in the background."""
        return self._active

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    # -- set-up (init, main thread) ----------------------------------------------------------------
    def register(self) -> bool:
        try:
            self._identifier = self.api.register(self.name)
        except Exception as exc:  # 404 from an emulator without the Extensions API, refused connection...
            self._log_once("register", "cache: S3 writes stay synchronous (Lambda extension not registered: %s)",
                           _describe(exc), level=logging.INFO)
            return False
        return True

    def start(self) -> None:
        if self._identifier is None:
            raise RuntimeError("register() first")
        self._active = True
        # Daemon: the runtime process ends without waiting for a thread blocked in /event/next.
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def add(self, cache: Drainable) -> None:
        """Drain ``cache`` after every invocation and let it write in the background from now on."""
        with self._lock:
            if not self._active:
                return
            if cache not in self._caches:
                self._caches.append(cache)
            cache.write_mode = "background"

    # -- the handler side --------------------------------------------------------------------------
    def invocation_finished(self, request_id: str | None) -> None:
        self._handshake.finished(request_id)

    # -- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._identifier is not None
        failures = 0
        reason = ""  # why the loop ended, when that is a fault worth a warning
        try:
            while not self._stopping.is_set():
                try:
                    event = self.api.next_event(self._identifier)
                except ExtensionsApiError as exc:  # 403/500: "non-recoverable, the extension should exit"
                    reason = f"event/next failed ({exc})"
                    return
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    if self._stopping.is_set():
                        return
                    failures += 1
                    if failures >= NEXT_RETRIES:
                        reason = f"event/next failed {failures} times in a row ({_describe(exc)})"
                        return
                    # Lambda still waits for this extension's next call: retry rather than leave.
                    time.sleep(0.05 * failures)
                    continue
                failures = 0
                kind = event.get("eventType")
                if kind == "SHUTDOWN":  # not sent to internal extensions on Lambda; honoured if it comes
                    self._drain(min(self.drain_timeout_s, 0.3), self._deadline(event))
                    return
                if kind != "INVOKE":
                    self._log_once(f"event {kind}", "cache extension: unexpected event %s ignored", repr(kind))
                    continue
                try:
                    if self._active:
                        self._after_invoke(event)
                except Exception as exc:
                    # A bug here: stop draining (sync writes from now on) but keep calling /event/next, or
                    # Lambda would wait for this extension until the invocation times out.
                    self._fall_back(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            # Whatever ended the loop, nothing drains any more: background writes would freeze mid-way.
            self._fall_back(reason)

    def _after_invoke(self, event: Mapping[str, Any]) -> None:
        self._invokes += 1
        request_id = event.get("requestId")
        request_id = request_id if isinstance(request_id, str) and request_id else None
        deadline = self._deadline(event)
        wait_s = self.handler_timeout_s if deadline is None else min(self.handler_timeout_s, deadline - self._now())
        # The INVOKE arrives when the invocation starts: drain only once its handler has stored its vectors.
        if not self._handshake.wait(request_id, self._invokes, wait_s):
            self._log_once("handler wait", "cache extension: no end reported for request %s within %s s; "
                           "draining anyway", str(request_id), f"{wait_s:.1f}")
        if not self._stopping.is_set():
            self._drain(self.drain_timeout_s, deadline)

    def _drain(self, budget_s: float, deadline: float | None) -> None:
        start = time.monotonic()
        if deadline is not None:
            budget_s = min(budget_s, deadline - DEADLINE_MARGIN_S - self._now())
        with self._lock:
            caches = list(self._caches)
        for cache in caches:
            left = budget_s - (time.monotonic() - start)
            try:
                drained = cache.drain(max(0.0, left))
            except Exception as exc:
                self._log_once("drain error", "cache extension: drain failed: %s", _describe(exc))
                continue
            if not drained:
                self._log_once("drain timeout", "cache extension: S3 writes still running after %s s; they "
                               "resume with the next invocation", f"{max(0.0, budget_s):.2f}")

    def _deadline(self, event: Mapping[str, Any]) -> float | None:
        """The invocation's deadline in epoch seconds, from ``deadlineMs``."""
        value = event.get("deadlineMs")
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value) / 1000.0
        return None

    def _fall_back(self, reason: str) -> None:
        """Stop draining: every cache writes synchronously again; a fault (``reason``) is logged once."""
        with self._lock:
            self._active = False
            caches = list(self._caches)
        for cache in caches:
            cache.write_mode = "sync"
        if reason and not self._stopping.is_set():
            self._log_once("fallback", "cache extension stopped, S3 writes are synchronous again: %s", reason)

    def _log_once(self, ident: str, message: str, *args: str, level: int = logging.WARNING) -> None:
        if ident in self._logged:
            return
        self._logged.add(ident)
        logger.log(level, message, *args)

    # -- tests and the bench -----------------------------------------------------------------------
    def stop(self, timeout_s: float = 2.0) -> bool:
        """End the thread (interrupting a blocked ``/event/next``) and restore ``sync`` writes; True if it ended."""
        self._stopping.set()
        self._fall_back("")
        self._handshake.cancel()
        self.api.close()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ExtensionsApiError) else f"{type(exc).__name__}: {exc}"


# -- the process-wide extension ---------------------------------------------------------------------
_install_lock = threading.Lock()
_installed: AfterResponse | None = None


def install(cache: Drainable, environ: Mapping[str, str] | None = None, *,
            drain_timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
    """Register the extension (once per process; call at init, at import) and switch ``cache`` to
    background writes drained after each response. False, with the cache untouched, when that is not
    possible or not wanted: off Lambda, ``CLIP_CACHE_S3_WRITE=sync`` set explicitly, no remote tier, or a
    failed registration."""
    global _installed
    env = os.environ if environ is None else environ
    address = env.get("AWS_LAMBDA_RUNTIME_API", "").strip()
    if not env.get("AWS_LAMBDA_FUNCTION_NAME") or not address:
        return False
    if env.get("CLIP_CACHE_S3_WRITE", "").strip().lower() == "sync":
        return False  # the operator's explicit choice (and the kill switch)
    if not cache.has_remote_tiers:
        return False  # nothing is written after the response without a remote tier
    with _install_lock:
        if _installed is None:
            try:
                api = ExtensionsApi(address)
            except ValueError as exc:
                logger.warning("cache: S3 writes stay synchronous: %s", exc)
                return False
            extension = AfterResponse(api, drain_timeout_s=drain_timeout_s)
            if not extension.register():
                return False
            extension.start()
            _installed = extension
            logger.info("cache: S3 writes run after the response (internal Lambda extension %r)", extension.name)
        _installed.add(cache)
        return _installed.active


def installed() -> AfterResponse | None:
    return _installed


def uninstall(timeout_s: float = 2.0) -> bool:
    """Stop the process-wide extension (tests, the bench): caches back to ``sync``; True if its thread ended."""
    global _installed
    with _install_lock:
        extension, _installed = _installed, None
    return extension.stop(timeout_s) if extension is not None else True


E = TypeVar("E")
C = TypeVar("C")
R = TypeVar("R")


class AfterResponseHandler(Generic[E, C, R]):
    """A Lambda handler that reports the end of each invocation to the extension (if one is installed)."""

    def __init__(self, handler: Callable[[E, C], R]) -> None:
        self.handler = handler

    def __call__(self, event: E, context: C) -> R:
        try:
            return self.handler(event, context)
        finally:
            extension = _installed
            if extension is not None:
                request_id = getattr(context, "aws_request_id", None)
                extension.invocation_finished(request_id if isinstance(request_id, str) else None)


def after_response(handler: Callable[[E, C], R]) -> AfterResponseHandler[E, C, R]:
    """Wrap a Lambda handler (e.g. Mangum's) so the extension drains the cache once it has returned."""
    return AfterResponseHandler(handler)
