"""One log line per fault and cause, without letting a persistent fault flood the log.

The first occurrence of a (tier, cause) is logged at once; repeats within ``interval_s`` are counted
and reported with the next line for that cause. Nothing here ever raises.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("clip_serverless.cache")


class FaultLog:
    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def fault(self, tier: str, cause: str, detail: str = "", *, exc_info: bool = False) -> None:
        """Log ``<tier> fault: <cause>`` (plus detail) unless the same cause was logged recently."""
        try:
            now = self._clock()
            ident = (tier, cause)
            with self._lock:
                last = self._last.get(ident)
                if last is not None and now - last < self.interval_s:
                    self._suppressed[ident] = self._suppressed.get(ident, 0) + 1
                    return
                self._last[ident] = now
                repeats = self._suppressed.pop(ident, 0)
            more = f" (+{repeats} more since the last report)" if repeats else ""
            logger.warning("cache %s fault: %s%s%s; answering from computation", tier, cause,
                           f" ({detail})" if detail else "", more, exc_info=exc_info)
        except Exception:  # noqa: S110  # logging must never fail a request
            pass
