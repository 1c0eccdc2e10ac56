"""A small circuit breaker: after N consecutive failures, skip the guarded tier for T seconds.

closed ──N consecutive failures──▶ open ──T seconds──▶ half-open (one caller probes)
  ▲                                  ▲                     │
  └──────────── probe succeeds ──────┼─────────────────────┘
                                     └──── probe fails ────┘

Only one caller at a time is let through while half-open; the others keep skipping until the probe
reports. Transitions are logged by the owner (``on_change``), once each, never per request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half-open"]


class Breaker:
    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State, State, str], None] | None = None) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.on_change = on_change
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """Whether the caller may use the tier now. While half-open, True for one caller only."""
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open":
                if self._clock() - self._opened_at < self.cooldown_s:
                    return False
                self._set("half-open", "cool-down over, probing")
            if self._probing:
                return False
            self._probing = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._state != "closed":
                self._set("closed", "probe succeeded")

    def record_failure(self, cause: str) -> None:
        with self._lock:
            self._failures += 1
            if self._state == "half-open":
                self._probing = False
                self._open(f"probe failed: {cause}")
            elif self._state == "closed" and self._failures >= self.failure_threshold:
                self._open(f"{self._failures} consecutive failures, last: {cause}")

    def _open(self, reason: str) -> None:
        self._opened_at = self._clock()
        self._set("open", reason)

    def _set(self, state: State, reason: str) -> None:
        old, self._state = self._state, state
        if old != state and self.on_change is not None:
            self.on_change(old, state, reason)
