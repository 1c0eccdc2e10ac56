"""The in-process tier: a thread-safe LRU of vectors, bounded in bytes.

It lives as long as the process (a warm Lambda container, the local server). Values are stored as
read-only float32 arrays that this process computed or verified, so they need no codec; callers copy
them into their own result arrays.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from ..types import Float32Array
from .tier import ALWAYS, Entry, InProcessTier, Policy, TierResult

# What one entry costs beyond its vector and key: the ndarray object, the key str object and the
# OrderedDict node (CPython 3.11, numpy 2.4, measured with tracemalloc: ~230 bytes).
ENTRY_OVERHEAD_BYTES = 256


def entry_bytes(key: str, vector: Float32Array) -> int:
    return int(vector.nbytes) + len(key) + ENTRY_OVERHEAD_BYTES


class MemoryTier(InProcessTier):
    """LRU bounded by ``max_bytes`` (vector bytes + key + per-entry overhead). A local :class:`~.tier.Tier`."""

    name = "memory"
    remote = False
    policy: Policy = ALWAYS

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Float32Array] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Float32Array | None:
        """The (D,) read-only vector, marked most recently used, or None."""
        with self._lock:
            vector = self._entries.get(key)
            if vector is not None:
                self._entries.move_to_end(key)
            return vector

    def put(self, key: str, vector: Float32Array) -> None:
        """Store a copy of a (D,) vector, evicting least recently used entries to stay within the bound."""
        stored = np.array(vector, dtype=np.float32, copy=True)
        if stored.ndim != 1:
            raise ValueError(f"expected a vector of shape (D,), got {stored.shape}")
        stored.setflags(write=False)
        size = entry_bytes(key, stored)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= entry_bytes(key, old)
            self._entries[key] = stored
            self._bytes += size
            while self._bytes > self.max_bytes:
                evicted_key, evicted = self._entries.popitem(last=False)
                self._bytes -= entry_bytes(evicted_key, evicted)

    # -- the Tier interface ------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> TierResult:
        vectors = {key: vector for key in keys if (vector := self.get(key)) is not None}
        return TierResult(vectors=vectors, ok=len(keys))

    def put_many(self, entries: Mapping[str, Entry], *, wait_for_completion: bool = True) -> TierResult:
        for key, entry in entries.items():
            self.put(key, entry.vector)
        return TierResult(ok=len(entries))

    # -- for tests and operators -------------------------------------------------------------------
    def discard(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= entry_bytes(key, old)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries
