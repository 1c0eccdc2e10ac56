"""A spinning session for runs that have the cores to themselves, a quiet one for runs that overlap another.

Spin-waiting makes a run faster only while nothing else needs the cores: ViT-B/32 int8 on 2 cores, one client
at a time, the local server answers an image in 36 ms spinning against 45 quiet. Once requests overlap, the
spinners burn what the other run needs (4 clients: half the throughput), and a lock that keeps spinning runs
apart still gave 17-23 % less throughput than quiet sessions with 2-4 clients. So each tower keeps its spinning
session, and a run that starts while another is in flight (of either tower) takes the tower's quiet one (one
thread, no spinning), made the first time it is needed: a process that never sees two runs at once never pays
its memory (int8 ViT-B/32: ~250 MB). Against quiet sessions alone, with 1, 2 and 4 concurrent clients of mixed
requests: +10 %, -3 % and +14 % requests per second (bench/bench_local_concurrency.py; README, "Engine settings").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class RunCount:
    """How many runs are in flight in this process, over every tower that shares it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0

    @contextmanager
    def run(self) -> Iterator[bool]:
        """Counts a run while the block executes; yields whether it started alone."""
        with self._lock:
            alone = self._running == 0
            self._running += 1
        try:
            yield alone
        finally:
            with self._lock:
                self._running -= 1

    @property
    def running(self) -> int:
        return self._running


class Alternates(Generic[T]):
    """A tower's ``fast`` encoder, and the ``quiet`` one that ``make_quiet`` creates on first need."""

    def __init__(self, fast: T, make_quiet: Callable[[], T], runs: RunCount) -> None:
        self.fast = fast
        self._make_quiet = make_quiet
        self._quiet: T | None = None
        self._lock = threading.Lock()
        self._runs = runs

    @property
    def quiet(self) -> T | None:
        """The quiet encoder, if a run has needed it yet."""
        return self._quiet

    @contextmanager
    def pick(self) -> Iterator[T]:
        """The encoder for a run that starts now, counted as in flight until the block ends."""
        with self._runs.run() as alone:
            yield self.fast if alone else self._quiet_encoder()

    def _quiet_encoder(self) -> T:
        if self._quiet is None:
            with self._lock:
                if self._quiet is None:
                    self._quiet = self._make_quiet()
        return self._quiet
