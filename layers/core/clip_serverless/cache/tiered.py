"""``EmbeddingCache``: memory -> [disk] -> [S3] for one model, hits promoted to the tiers above.

Lookups and writes never raise for a tier fault: a fault is logged (once per batch and cause),
counted in :class:`CacheStats` and answered as a miss. Values read from disk or S3 are verified by the
codec (key, model, dimension, sha256); one that fails is a miss and is overwritten when recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from . import codec
from .config import DEFAULT_S3_POLICY, CacheConfig, WriteMode
from .faultlog import FaultLog
from .keys import Modality, ModelIdentity, payload_key
from .memory import MemoryTier
from .stats import CacheStats

if TYPE_CHECKING:  # imported when configured: a memory-only cache loads neither tempfile nor a thread pool
    from ..aws_lambda.metrics import EmfEmitter
    from .disk import DiskTier
    from .s3 import S3Tier

Float32Array = npt.NDArray[np.float32]


@dataclass
class Lookup:
    """The verified hits of one lookup, and whether the request may write its misses to S3."""

    found: dict[str, Float32Array] = field(default_factory=dict)
    write_s3: bool = False


class EmbeddingCache:
    def __init__(self, model: ModelIdentity, *, memory: MemoryTier | None = None,
                 disk: DiskTier | None = None, s3: S3Tier | None = None,
                 s3_policy: Mapping[Modality, int | None] = DEFAULT_S3_POLICY,
                 write_mode: WriteMode = "sync", metrics: EmfEmitter | None = None,
                 fault_log: FaultLog | None = None) -> None:
        self.model = model
        self.memory = memory
        self.disk = disk
        self.s3 = s3
        self.s3_policy = dict(s3_policy)
        self.write_mode = write_mode
        self.metrics = metrics
        self.faults = fault_log or FaultLog()

    @classmethod
    def from_config(cls, model: ModelIdentity, config: CacheConfig) -> EmbeddingCache:
        faults = FaultLog()
        s3 = disk = metrics = None
        if config.bucket:
            from .s3 import S3Tier

            s3 = S3Tier(config.bucket, config.prefix, endpoint_url=config.endpoint_url, region=config.region,
                        connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s,
                        max_attempts=config.max_attempts, deadline_s=config.deadline_s,
                        workers=config.workers, breaker_failures=config.breaker_failures,
                        breaker_cooldown_s=config.breaker_cooldown_s, fault_log=faults)
        if config.disk_dir:
            from .disk import DiskTier

            disk = DiskTier(config.disk_dir, fault_log=faults)
        if config.metrics:
            from ..aws_lambda.metrics import EmfEmitter

            metrics = EmfEmitter(config.metrics_namespace)
        return cls(
            model,
            memory=MemoryTier(config.memory_bytes) if config.memory_bytes > 0 else None,
            disk=disk,
            s3=s3,
            s3_policy=config.s3_policy,
            write_mode=config.write_mode,
            metrics=metrics,
            fault_log=faults,
        )

    # -- the call the service makes ----------------------------------------------------------------
    def key(self, modality: Modality, payload: bytes | memoryview) -> str:
        return payload_key(self.model, modality, payload)

    def embed(self, modality: Modality, payloads: Sequence[bytes],
              compute: Callable[[Sequence[int]], Float32Array],
              ) -> tuple[Float32Array, dict[str, int | float | str]]:
        """Embeddings (N, D) for N payloads (encoded images, or ``keys.text_payload(ids)``), input order.

        ``compute(indices)`` embeds only the misses, in one call, and returns (len(indices), D) float32.
        Returns the vectors and ``CacheStats.to_log()``.
        """
        from .embedder import embed_cached

        keys = [self.key(modality, payload) for payload in payloads]
        vectors, stats = embed_cached(self, keys, compute, modality=modality)
        return vectors, stats.to_log()

    def preload(self, modalities: Iterable[Modality] = ("image", "text")) -> None:
        """Import boto3 and create the S3 client now (Lambda init), if S3 serves one of these modalities."""
        if self.s3 is not None and any(self.s3_policy.get(m) is not None for m in modalities):
            try:
                self.s3.prepare()
            except Exception as exc:
                self.faults.fault("s3", f"client: {type(exc).__name__}", str(exc)[:200])

    # -- tiers -------------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[str], *, modality: Modality, stats: CacheStats) -> Lookup:
        """Look distinct keys up, tier by tier; counts hits, corrupt entries and faults into ``stats``."""
        result = Lookup()
        remaining = list(keys)
        if self.memory is not None:
            still: list[str] = []
            for key in remaining:
                vector = self.memory.get(key)
                if vector is None:
                    still.append(key)
                else:
                    result.found[key] = vector
                    stats.memory_hits += 1
            remaining = still
        if self.disk is not None and remaining:
            still = []
            for key in remaining:
                blob = self.disk.get(key)
                vector = self._verify(key, blob, stats) if blob is not None else None
                if vector is None:
                    still.append(key)
                else:
                    result.found[key] = vector
                    stats.disk_hits += 1
                    if self.memory is not None:
                        self.memory.put(key, vector)
            remaining = still
        if self.s3 is None or not remaining:
            return result
        threshold = self.s3_policy.get(modality)
        if threshold is None or len(remaining) < threshold:
            stats.s3_skipped = "policy"  # computing these few costs less than a round trip to S3
            return result
        fetched = self.s3.get_many(remaining)
        stats.s3_skipped = fetched.skipped
        stats.s3_lookups = 0 if fetched.skipped else len(remaining)
        stats.errors += fetched.errors
        # Write back only if S3 answered: after a failed read, a write would fail the same way and
        # double the time this request spends on a broken S3.
        result.write_s3 = fetched.ok > 0
        for key, blob in fetched.found.items():
            vector = self._verify(key, blob, stats)
            if vector is None:
                continue
            result.found[key] = vector
            stats.s3_hits += 1
            if self.memory is not None:
                self.memory.put(key, vector)
            if self.disk is not None:
                self.disk.put(key, blob)
        return result

    def store(self, vectors: Mapping[str, Float32Array], *, write_s3: bool, stats: CacheStats) -> None:
        """Write computed (D,) vectors to memory, disk and (if ``write_s3``) S3, overwriting old entries."""
        blobs: dict[str, bytes] = {}
        for key, vector in vectors.items():
            try:
                blob = codec.encode(key, self.model.model_id, vector)
            except ValueError as exc:  # NaN/inf from the model: return it, never store it
                self.faults.fault("store", "vector not stored", str(exc))
                continue
            blobs[key] = blob
            if self.memory is not None:
                self.memory.put(key, vector)
            if self.disk is not None:
                self.disk.put(key, blob)
        if self.s3 is not None and write_s3 and blobs:
            written = self.s3.put_many(blobs, wait_for_completion=self.write_mode == "sync")
            stats.s3_writes += written.ok
            stats.errors += written.errors

    def _verify(self, key: str, blob: bytes, stats: CacheStats) -> Float32Array | None:
        try:
            return codec.decode(blob, key=key, model_id=self.model.model_id, dim=self.model.embed_dim)
        except codec.CorruptEntry as exc:
            stats.corrupt += 1
            self.faults.fault("entry", "corrupt entry recomputed", f"{key}: {exc}")
            return None

    def emit(self, stats: CacheStats) -> None:
        if self.metrics is not None:
            self.metrics.emit(stats)

    def drain(self, timeout_s: float = 1.0) -> bool:
        """Wait (bounded) for background S3 writes to finish; True when none is pending."""
        return self.s3.drain(timeout_s) if self.s3 is not None else True

    def close(self) -> None:
        if self.s3 is not None:
            self.s3.close()
