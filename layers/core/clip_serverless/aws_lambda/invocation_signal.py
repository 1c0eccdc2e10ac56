"""The handler side tells the extension thread that an invocation's handler has returned.

Lambda hands the extension its INVOKE when the invocation *starts*; the extension may drain the cache's
writes only once the handler has stored its vectors. Ends are matched by request id (the INVOKE event's
``requestId`` is the context's ``aws_request_id``), so an end reported before the extension even received
its INVOKE is not lost, and a late one from an earlier request cannot be taken for this one. Without ids,
the k-th INVOKE waits for the k-th finished handler (invocations of one environment are strictly sequential).
"""

from __future__ import annotations

import threading
from collections import deque


class InvocationEnds:
    """Ends of invocations reported by the handler wrapper, waited for by the extension thread."""

    def __init__(self, remembered: int = 64) -> None:
        self._cond = threading.Condition()
        self._finished_ids: deque[str] = deque(maxlen=remembered)
        self._finished = 0
        self._ids_reported = False
        self._cancelled = False

    def finished(self, request_id: str | None) -> None:
        """The handler of ``request_id`` has returned (or raised)."""
        with self._cond:
            self._finished += 1
            if request_id:
                self._ids_reported = True
                self._finished_ids.append(request_id)
            self._cond.notify_all()

    def cancel(self) -> None:
        """Wake a waiting extension thread for good (the extension stops)."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def wait(self, request_id: str | None, ordinal: int, timeout_s: float) -> bool:
        """Until ``request_id`` (else the ``ordinal``-th invocation) has ended, or cancel(); False on timeout."""

        def done() -> bool:
            if self._cancelled:
                return True
            if request_id and self._ids_reported:
                return request_id in self._finished_ids
            return self._finished >= ordinal

        with self._cond:
            return self._cond.wait_for(done, timeout=max(0.0, timeout_s))
