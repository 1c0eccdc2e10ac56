"""A request's deadline under Lambda: its timeout, less what the answer needs after the work.

A function that runs past its timeout is killed, and the caller gets API Gateway's bare 500 after the whole
wait. With the deadline, work that cannot end in time is refused early with a 413 that says how much would
fit (``service.OutOfTime``). On a server there is no timeout, so no deadline.
"""

from __future__ import annotations

import time

from fastapi import Request

from .dispatch import LAMBDA_SCOPE_KEY

# Kept back from the timeout for what follows the work: the response's JSON (a 6 MB answer takes ~0.5 s on
# the CPU share of a small function), Mangum, and cache writes waited for.
RESERVE_S = 2.0


def deadline(request: Request, reserve_s: float = RESERVE_S) -> float | None:
    """The ``time.monotonic()`` instant by which the request's work must end, or None off Lambda."""
    context = request.scope.get(LAMBDA_SCOPE_KEY)
    remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
    if remaining_ms is None:
        return None
    return time.monotonic() + float(remaining_ms()) / 1000 - reserve_s
