"""Remote cache writes after the response on Lambda: what the Lambda entry calls.

- :func:`install`, once per process at init: registers the internal extension (:mod:`.drain_extension`,
  which explains why and how) and switches a cache with remote tiers to ``background`` writes, drained after
  each response;
- :func:`after_response` wraps the Lambda handler so that the extension learns when each invocation's
  handler has returned (:mod:`.invocation_signal`).

Nothing here may break a request: off Lambda, when ``CLIP_CACHE_S3_WRITE=sync`` is set explicitly, for a
cache without remote tiers, or when registering fails (an emulator without the Extensions API answers 404),
:func:`install` returns False and the cache keeps its configured mode; the wrapper then only calls the
handler. Standard library only; no botocore here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from .drain_extension import DRAIN_TIMEOUT_S, Drainable, DrainExtension
from .extensions_api import ExtensionsApi

logger = logging.getLogger("clip_serverless.cache")

_install_lock = threading.Lock()
_installed: DrainExtension | None = None


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
            extension = DrainExtension(api, drain_timeout_s=drain_timeout_s)
            if not extension.register():
                return False
            extension.start()
            _installed = extension
            logger.info("cache: S3 writes run after the response (internal Lambda extension %r)", extension.name)
        _installed.add(cache)
        return _installed.active


def installed() -> DrainExtension | None:
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
