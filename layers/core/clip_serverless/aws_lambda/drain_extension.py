"""The internal Lambda extension that runs the cache's remote writes after the response.

Why: on Lambda a thread still writing when the handler returns is frozen with the container (and resumes
minutes later, or never), so without help the cache waits for its remote writes (S3 PUTs) before answering
(``sync``) and every miss that goes to a remote tier pays a write. Lambda freezes an environment only when the
runtime has posted its response AND every registered extension has called ``/event/next`` again; the response
itself goes to the caller as soon as the runtime posts it. An internal extension (a thread of the runtime
process) that delays its ``/event/next`` until the cache's writes are drained therefore runs them after the
client has its answer (AWS Compute Blog, "Running code after returning a response from an AWS Lambda
function"). The loop, on this extension's thread::

    GET /event/next                   <- INVOKE {requestId, deadlineMs}, at the *start* of an invocation
    wait until the handler wrapper reports that request finished (:mod:`.invocation_signal`)
    drain the caches' queued writes, bounded    (the client already has, or is getting, its response)
    GET /event/next again             -> Lambda may freeze now; blocks until the next INVOKE

Costs: the drain counts towards the invocation's duration (billed; Lambda's ``PostRuntimeExecutionDuration``
metric) and the environment takes no new invocation until it ends, so it is bounded by ``drain_timeout_s`` and
by the invocation's deadline. Writes still running then are frozen and resume with the next invocation, as in
the plain ``background`` mode.

Any fault after registration (``/event/next`` failing, a bug here) is logged once and every cache goes back
to ``sync`` writes. The API client is :mod:`.extensions_api`; the process-wide install and the handler
wrapper are :mod:`.after_response`. Standard library only; no botocore here.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..cache.tier import WriteMode
from .extensions_api import ExtensionsApi, ExtensionsApiError, describe
from .invocation_signal import InvocationEnds

logger = logging.getLogger("clip_serverless.cache")

EXTENSION_NAME = "clip-cache-s3-writer"  # an internal extension's name is free (external: its file name)
DRAIN_TIMEOUT_S = 2.0  # a request queues 1-2 write batches, each bounded by its tier's deadline (S3: 0.5 s)
HANDLER_TIMEOUT_S = 900.0  # Lambda's longest function timeout; an INVOKE's deadlineMs usually bounds sooner
DEADLINE_MARGIN_S = 0.05  # finish the drain this long before the invocation's deadline
NEXT_RETRIES = 3  # /event/next transport errors in a row before giving up
THREAD_NAME = "clip-cache-after-response"


class Drainable(Protocol):
    """What the extension needs from a cache (:class:`~clip_serverless.cache.tiered.EmbeddingCache` is one)."""

    write_mode: WriteMode

    @property
    def has_remote_tiers(self) -> bool:
        """Whether any of its writes can be deferred past the response (nothing to drain otherwise)."""
        ...

    def drain(self, timeout_s: float) -> bool: ...


class DrainExtension:
    """The internal extension: after each invocation's handler, drain the caches, then ``/event/next``."""

    def __init__(self, api: ExtensionsApi, *, name: str = EXTENSION_NAME,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, handler_timeout_s: float = HANDLER_TIMEOUT_S,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.api = api
        self.name = name
        self.drain_timeout_s = drain_timeout_s
        self.handler_timeout_s = handler_timeout_s = handler_timeout_s
        self._now = wall_clock  # deadlineMs is wall-clock epoch milliseconds
        self._caches: list[Drainable] = []
        self._lock = threading.Lock()
        self._ends = InvocationEnds()
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
                           describe(exc), level=logging.INFO)
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
        self._ends.finished(request_id)

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
                        reason = f"event/next failed {failures} times in a row ({describe(exc)})"
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
        if not self._ends.wait(request_id, self._invokes, wait_s):
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
                self._log_once("drain error", "cache extension: drain failed: %s", describe(exc))
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
        self._ends.cancel()
        self.api.close()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()
