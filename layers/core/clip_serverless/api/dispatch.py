"""Where a route's blocking work runs: inline under Lambda, in FastAPI's thread pool on a server.

The CLIP handlers are blocking (decode, resize, ONNX Runtime). FastAPI runs a sync handler in a worker
thread so that it never blocks the event loop, which a server answering several clients at once needs.
A Lambda execution environment serves one request at a time, so there the hand-off to a thread and back
is pure cost (0.5-1.5 ms a request, measured through Mangum). Mangum marks its requests with the Lambda
context in the ASGI scope (``aws.context``); the route looks at that, per request, and runs inline there.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

LAMBDA_SCOPE_KEY = "aws.context"  # set by Mangum on every request it adapts from a Lambda event


def on_lambda(request: Request) -> bool:
    return LAMBDA_SCOPE_KEY in request.scope


def inline_on_lambda(handler: Callable[..., Any]) -> Callable[..., Any]:
    """An async route with ``handler``'s signature: ``handler`` inline under Lambda, else in the thread pool.

    ``handler`` must take the ``Request`` as a parameter (every CLIP route does, for its API key)."""
    signature = inspect.signature(handler, eval_str=True)  # FastAPI reads parameters and types from it
    names = [name for name, p in signature.parameters.items() if p.annotation is Request]
    if not names:
        raise TypeError(f"{handler.__qualname__} takes no Request parameter")
    request_name = names[0]

    @functools.wraps(handler)
    async def route(**kwargs: Any) -> Any:
        if on_lambda(kwargs[request_name]):
            return handler(**kwargs)
        return await run_in_threadpool(functools.partial(handler, **kwargs))

    del route.__wrapped__  # FastAPI must see the signature below, not follow the wrapped sync handler
    route.__signature__ = signature  # type: ignore[attr-defined]
    return route


class InlineOnLambda:
    """``handlers`` (an object whose methods answer routes), each method wrapped by :func:`inline_on_lambda`."""

    def __init__(self, handlers: object) -> None:
        self._handlers = handlers

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return inline_on_lambda(getattr(self._handlers, name))
