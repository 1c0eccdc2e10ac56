"""What the cache tests share: a fake model with deterministic vectors, entries for byte tiers, a thread hammer.

Fixtures (fake AWS credentials, the moto server) are in ``conftest.py``; S3 buckets and listings in
``fixtures_aws.py``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from clip_serverless.cache import Entry

DIM = 16


def vector_for(payload: bytes, dim: int = DIM) -> np.ndarray:
    """The fake model's (dim,) vector for a payload: the same payload, the same vector, in any process."""
    seed = int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def expected(payloads: Sequence[bytes], dim: int = DIM) -> np.ndarray:
    return np.stack([vector_for(p, dim) for p in payloads])


def entry(blob: bytes, dim: int = DIM) -> Entry:
    """An entry for a tier that stores bytes (its vector is not what a byte tier looks at)."""
    return Entry(np.zeros(dim, np.float32), blob)


class CountingCompute:
    """A fake model: a deterministic vector per payload, and a record of every call's indices."""

    def __init__(self, payloads: Sequence[bytes], dim: int = DIM) -> None:
        self.payloads = payloads
        self.dim = dim
        self.calls: list[list[int]] = []
        self._lock = threading.Lock()

    def __call__(self, indices: Sequence[int]) -> np.ndarray:
        with self._lock:
            self.calls.append(list(indices))
        rows = [vector_for(self.payloads[i], self.dim) for i in indices]
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)

    @property
    def computed(self) -> int:
        return sum(len(c) for c in self.calls)


def hammer(worker: Callable[..., None], threads: int, args: Callable[[int], tuple[Any, ...]] = lambda i: ()
           ) -> list[BaseException]:
    """Run ``worker(*args(i))`` on ``threads`` threads at once, wait for all; what they raised (empty: none)."""
    errors: list[BaseException] = []
    lock = threading.Lock()

    def guarded(*worker_args: Any) -> None:
        try:
            worker(*worker_args)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    started = [threading.Thread(target=guarded, args=args(i)) for i in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    return errors

