"""``embed_cached``: the one place where a request's inputs meet the cache and the model.

    keys (N, request order) -> distinct keys -> lookup (tier by tier; a remote tier's keys concurrently)
        -> compute(miss indices) in ONE call -> store (every tier; a remote tier's keys concurrently)
        -> (N, D) in input order, and one :class:`CacheStats`

Only ``compute`` may raise (a bad image is the caller's 400); anything the cache does wrong is logged and
answered by computing. A request without the cache (none configured, or ``Cache-Control: no-cache``) goes
through :func:`compute_uncached` and gets statistics of the same shape.

Remote writes run in the background when the cache's write mode says so (``CLIP_CACHE_S3_WRITE``). On
Lambda a thread still writing when the handler returns is frozen with the container, so there an internal
extension (:mod:`clip_serverless.aws_lambda.after_response`) holds the freeze until
``EmbeddingCache.drain()`` returns: the client has its response, the writes complete. Where the extension
cannot register, writes are waited for (``sync``, bounded by the tier's deadline) before the response.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..types import Float32Array, Modality
from .faultlog import FaultLog
from .stats import CacheStats
from .tiered import EmbeddingCache, Lookup

Compute = Callable[[Sequence[int]], Float32Array]
_bugs = FaultLog()


def _checked(out: Float32Array, rows: int, dim: int | None) -> Float32Array:
    array = np.asarray(out)
    if array.ndim != 2 or array.shape[0] != rows or (dim is not None and array.shape[1] != dim):
        expected = f"({rows}, {dim if dim is not None else 'D'})"
        raise ValueError(f"compute returned shape {array.shape}, expected {expected}")
    return np.ascontiguousarray(array, dtype=np.float32)


def embed_payloads(cache: EmbeddingCache | None, modality: Modality, payloads: Sequence[bytes],
                   compute: Compute, *, use_cache: bool = True) -> tuple[Float32Array, CacheStats]:
    """Embeddings (N, D) for N payloads (encoded images, or ``keys.text_payload(ids)``), input order, and
    what the cache did. What the service calls: keys are hashed only when the cache is used."""
    if cache is None or not use_cache:
        return compute_uncached(len(payloads), compute, modality=modality, bypassed=cache is not None)
    keys = [cache.key(modality, payload) for payload in payloads]
    return embed_cached(cache, keys, compute, modality=modality)


def compute_uncached(count: int, compute: Compute, *, modality: Modality,
                     bypassed: bool = False) -> tuple[Float32Array, CacheStats]:
    """The one path without a cache: ``compute`` once with all ``count`` indices, every input a miss.
    ``bypassed``: a cache is configured and the caller opted out (the header says ``bypass``)."""
    stats = CacheStats(modality=modality, enabled=False, bypassed=int(bypassed), requested=count, unique=count,
                       misses=count)
    start = time.perf_counter()
    out = _checked(compute(list(range(count))), count, None)
    stats.compute_ms = (time.perf_counter() - start) * 1000
    return out, stats


def embed_cached(cache: EmbeddingCache | None, keys: Sequence[str], compute: Compute, *, modality: Modality,
                 use_cache: bool = True) -> tuple[Float32Array, CacheStats]:
    """(N, D) float32 for N keys in input order, and what the cache did.

    ``compute(indices)`` receives the input indices of the misses (each distinct key once, the index
    of its first occurrence, ascending) and returns (len(indices), D) float32. It is not called when
    everything hits. Without a cache or with ``use_cache=False`` it is called once with all indices.
    """
    if cache is None or not use_cache:
        return compute_uncached(len(keys), compute, modality=modality, bypassed=cache is not None)

    dim = cache.model.embed_dim
    stats = cache.new_stats(modality, len(keys))
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
            cache.store(computed, lookup=lookup, stats=stats)
        except Exception as exc:  # a bug in a tier must not fail the request
            stats.errors += 1
            _bugs.fault("store", f"unexpected {type(exc).__name__}", str(exc)[:200], exc_info=True)
        stats.store_ms = (time.perf_counter() - start) * 1000
    try:
        cache.notify(stats)
    except Exception as exc:
        _bugs.fault("metrics", f"unexpected {type(exc).__name__}", str(exc)[:200], exc_info=True)
    return out, stats


def _safe_lookup(cache: EmbeddingCache, keys: list[str], modality: Modality, stats: CacheStats) -> Lookup:
    try:
        return cache.lookup(keys, modality=modality, stats=stats)
    except Exception as exc:  # a bug in a tier must not fail the request: compute everything instead
        stats.errors += 1
        for tier in stats.tiers.values():
            tier.hits = 0
        _bugs.fault("lookup", f"unexpected {type(exc).__name__}", str(exc)[:200], exc_info=True)
        return Lookup()
