"""``embed_cached``: the one place where a request's inputs meet the cache and the model.

    keys (N, request order) -> distinct keys -> lookup (memory, disk, S3 concurrently)
        -> compute(miss indices) in ONE call -> store (memory, disk, S3 concurrently) -> (N, D) in input order

Only ``compute`` may raise (a bad image is the caller's 400); anything the cache does wrong is logged and
answered by computing. S3 writes run in the background (``CLIP_CACHE_S3_WRITE``). On Lambda a thread
still writing when the handler returns is frozen with the container, so there an internal extension
(:mod:`.after_response`) holds the freeze until ``EmbeddingCache.drain()`` returns: the client has its
response, the writes complete. Where the extension cannot register, writes are waited for (``sync``,
bounded by the S3 deadline) before the response.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .faultlog import FaultLog
from .keys import Modality
from .stats import CacheStats
from .tiered import Lookup

if TYPE_CHECKING:
    from .tiered import EmbeddingCache

Float32Array = npt.NDArray[np.float32]
_bugs = FaultLog()


def _checked(out: Float32Array, rows: int, dim: int | None) -> Float32Array:
    array = np.asarray(out)
    if array.ndim != 2 or array.shape[0] != rows or (dim is not None and array.shape[1] != dim):
        expected = f"({rows}, {dim if dim is not None else 'D'})"
        raise ValueError(f"compute returned shape {array.shape}, expected {expected}")
    return np.ascontiguousarray(array, dtype=np.float32)


def embed_cached(cache: EmbeddingCache | None, keys: Sequence[str],
                 compute: Callable[[Sequence[int]], Float32Array], *, modality: Modality,
                 use_cache: bool = True) -> tuple[Float32Array, CacheStats]:
    """(N, D) float32 for N keys in input order, and what the cache did.

    ``compute(indices)`` receives the input indices of the misses (each distinct key once, the index
    of its first occurrence, ascending) and returns (len(indices), D) float32. It is not called when
    everything hits. Without a cache or with ``use_cache=False`` it is called once with all indices.
    """
    stats = CacheStats(modality=modality, requested=len(keys), unique=len(keys))
    if cache is None or not use_cache:
        stats.enabled = False
        stats.misses = len(keys)
        start = time.perf_counter()
        out = _checked(compute(list(range(len(keys)))), len(keys), None)
        stats.compute_ms = (time.perf_counter() - start) * 1000
        return out, stats

    dim = cache.model.embed_dim
    first: dict[str, int] = {}
    for index, key in enumerate(keys):
        first.setdefault(key, index)
    stats.unique = len(first)

    start = time.perf_counter()
    lookup = _safe_lookup(cache, list(first), modality, stats)
    stats.lookup_ms = (time.perf_counter() - start) * 1000

    missing = [key for key in first if key not in lookup.found]
    stats.misses = len(missing)
    computed: dict[str, Float32Array] = {}
    if missing:
        start = time.perf_counter()
        rows = _checked(compute([first[key] for key in missing]), len(missing), dim)
        stats.compute_ms = (time.perf_counter() - start) * 1000
        computed = {key: rows[j] for j, key in enumerate(missing)}

    out = np.empty((len(keys), dim), dtype=np.float32)
    for index, key in enumerate(keys):
        out[index] = computed[key] if key in computed else lookup.found[key]

    if computed:
        start = time.perf_counter()
        try:
            cache.store(computed, write_s3=lookup.write_s3, stats=stats)
        except Exception as exc:  # a bug in a tier must not fail the request
            stats.errors += 1
            _bugs.fault("store", f"unexpected {type(exc).__name__}", str(exc)[:200], exc_info=True)
        stats.store_ms = (time.perf_counter() - start) * 1000
    try:
        cache.emit(stats)
    except Exception as exc:
        _bugs.fault("metrics", f"unexpected {type(exc).__name__}", str(exc)[:200], exc_info=True)
    return out, stats


def _safe_lookup(cache: EmbeddingCache, keys: list[str], modality: Modality, stats: CacheStats) -> Lookup:
    try:
        return cache.lookup(keys, modality=modality, stats=stats)
    except Exception as exc:  # a bug in a tier must not fail the request: compute everything instead
        stats.errors += 1
        stats.memory_hits = stats.disk_hits = stats.s3_hits = 0
        _bugs.fault("lookup", f"unexpected {type(exc).__name__}", str(exc)[:200], exc_info=True)
        return Lookup()
