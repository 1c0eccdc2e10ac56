"""``EmbeddingCache``: an ordered list of tiers (:class:`~.tier.Tier`: memory, [disk], [S3]) for one model,
looked up in order, hits promoted to the tiers above.

The cache knows no tier by name: a remote tier is consulted per its policy, written after it answered, and in
the background when the write mode says so; its counts go to :class:`~.stats.CacheStats` under its name.
Lookups and writes never raise for a tier fault: a fault is logged (once per batch and cause), counted and
answered as a miss. Values read as bytes (disk, S3) are verified by the codec (key, model, dimension,
sha256); one that fails is a miss and is overwritten when recomputed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..types import Float32Array, Modality
from . import codec
from .config import CacheConfig
from .faultlog import FaultLog
from .keys import ModelIdentity, payload_key
from .memory import MemoryTier
from .stats import CacheStats, StatsObserver, TierStats
from .tier import Entry, Tier, WriteMode


@dataclass(slots=True)
class Lookup:
    """The verified hits of one lookup, and the remote tiers that answered it (and so may be written)."""

    found: dict[str, Float32Array] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)  # names of remote tiers


class EmbeddingCache:
    def __init__(self, model: ModelIdentity, tiers: Sequence[Tier] = (), *, write_mode: WriteMode = "sync",
                 observers: Iterable[StatsObserver] = (), fault_log: FaultLog | None = None) -> None:
        """``tiers`` in lookup order (fastest first); ``write_mode`` for the remote tiers' writes;
        ``observers`` are told each request's :class:`CacheStats` (metrics)."""
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"cache tier names must be unique, got {names}")
        self.model = model
        self.tiers: tuple[Tier, ...] = tuple(tiers)
        self.write_mode = write_mode
        self.observers: list[StatsObserver] = list(observers)
        self.faults = fault_log or FaultLog()

    @classmethod
    def from_config(cls, model: ModelIdentity, config: CacheConfig,
                    observers: Iterable[StatsObserver] = ()) -> EmbeddingCache:
        faults = FaultLog()
        tiers: list[Tier] = []
        if config.memory_bytes > 0:
            tiers.append(MemoryTier(config.memory_bytes))
        # Imported when configured: a memory-only cache loads neither tempfile nor a thread pool.
        if config.disk_dir:
            from .disk import DiskTier

            tiers.append(DiskTier(config.disk_dir, fault_log=faults))
        if config.s3 is not None:
            from .s3 import S3Tier

            tiers.append(S3Tier.from_config(config.s3, fault_log=faults))
        return cls(model, tiers, write_mode=config.write_mode, observers=observers, fault_log=faults)

    # -- what the request path calls ---------------------------------------------------------------
    def key(self, modality: Modality, payload: bytes | memoryview) -> str:
        return payload_key(self.model, modality, payload)

    def new_stats(self, modality: Modality, requested: int) -> CacheStats:
        """Empty statistics for one request, with a slot per tier in lookup order."""
        return CacheStats(modality=modality, requested=requested, unique=requested,
                          tiers={tier.name: TierStats() for tier in self.tiers})

    def lookup(self, keys: Sequence[str], *, modality: Modality, stats: CacheStats) -> Lookup:
        """Look distinct keys up, tier by tier; counts hits, corrupt entries and faults into ``stats``."""
        result = Lookup()
        found = result.found
        remaining = list(keys)
        above: list[Tier] = []  # tiers already consulted that take this lookup's hits
        for tier in self.tiers:
            if not remaining:
                break
            counts = stats.tiers.get(tier.name)
            if counts is None:
                counts = stats.tiers[tier.name] = TierStats()
            threshold = tier.policy.get(modality)
            if threshold is None or len(remaining) < threshold:
                counts.skipped = "policy"  # computing these few costs less than a round trip
                continue
            got = tier.get_many(remaining)
            stats.errors += got.errors
            if tier.remote:
                counts.skipped = got.skipped
                counts.lookups = 0 if got.skipped else len(remaining)
                # Write back only if the tier answered: after a failed read, a write would fail the same way
                # and double the time this request spends on a broken tier.
                if got.ok > 0:
                    result.answered.add(tier.name)
            hits = len(found)
            promote: dict[str, Entry] = {}
            if got.vectors:  # a vector tier holds what this process computed or verified
                found.update(got.vectors)
                if above:
                    promote.update((key, self._entry(key, vector)) for key, vector in got.vectors.items())
            for key, blob in got.found.items():
                verified = self._verify(key, blob, stats)
                if verified is not None:
                    found[key] = verified
                    promote[key] = Entry(verified, blob)
            if len(found) > hits:
                counts.hits += len(found) - hits
                remaining = [key for key in remaining if key not in found]
                if promote:
                    for upper in above:
                        self._put(upper, promote, stats)
            if self._writable(tier, result):
                above.append(tier)
        return result

    def store(self, vectors: Mapping[str, Float32Array], *, lookup: Lookup, stats: CacheStats) -> None:
        """Write computed (D,) vectors to every local tier and to the remote tiers that answered ``lookup``."""
        entries: dict[str, Entry] = {}
        for key, vector in vectors.items():
            try:
                entries[key] = Entry(vector, codec.encode(key, self.model.model_id, vector))
            except ValueError as exc:  # NaN/inf from the model: return it, never store it
                self.faults.fault("store", "vector not stored", str(exc))
        if not entries:
            return
        for tier in self.tiers:
            if self._writable(tier, lookup):
                self._put(tier, entries, stats)

    def notify(self, stats: CacheStats) -> None:
        """Tell the observers (metrics) what one request did."""
        for observer in self.observers:
            observer(stats)

    def observe(self, observer: StatsObserver) -> None:
        """Add an observer after construction (the Lambda entry wires its EMF emitter in)."""
        self.observers.append(observer)

    # -- tiers -------------------------------------------------------------------------------------
    @property
    def has_remote_tiers(self) -> bool:
        """Whether any write can be deferred past the response (what the Lambda extension drains)."""
        return any(tier.remote for tier in self.tiers)

    def tier(self, name: str) -> Tier | None:
        return next((tier for tier in self.tiers if tier.name == name), None)

    def _writable(self, tier: Tier, lookup: Lookup) -> bool:
        return not tier.remote or tier.name in lookup.answered

    def _put(self, tier: Tier, entries: Mapping[str, Entry], stats: CacheStats) -> None:
        written = tier.put_many(entries, wait_for_completion=not tier.remote or self.write_mode == "sync")
        stats.errors += written.errors
        if tier.remote:
            stats.tiers.setdefault(tier.name, TierStats()).writes += written.ok

    def _entry(self, key: str, vector: Float32Array) -> Entry:
        return Entry(vector, codec.encode(key, self.model.model_id, vector))

    def _verify(self, key: str, blob: bytes, stats: CacheStats) -> Float32Array | None:
        try:
            return codec.decode(blob, key=key, model_id=self.model.model_id, dim=self.model.embed_dim)
        except codec.CorruptEntry as exc:
            stats.corrupt += 1
            self.faults.fault("entry", "corrupt entry recomputed", f"{key}: {exc}")
            return None

    # -- life cycle --------------------------------------------------------------------------------
    def preload(self, modalities: Iterable[Modality] = ("image", "text")) -> None:
        """Create clients now (Lambda init: botocore and the S3 client), for the tiers serving these modalities."""
        wanted = tuple(modalities)
        for tier in self.tiers:
            if any(tier.policy.get(m) is not None for m in wanted):
                try:
                    tier.prepare()
                except Exception as exc:
                    self.faults.fault(tier.name, f"client: {type(exc).__name__}", str(exc)[:200])

    def renew(self) -> list[str]:
        """New clients and connection pools for every tier that has them (after a SnapStart restore); the
        names of the tiers renewed. Never raises."""
        renewed: list[str] = []
        for tier in self.tiers:
            try:
                if tier.renew():
                    renewed.append(tier.name)
            except Exception as exc:
                self.faults.fault(tier.name, f"renew: {type(exc).__name__}", str(exc)[:200])
        return renewed

    def drain(self, timeout_s: float = 1.0) -> bool:
        """Wait (bounded, over all tiers) for queued remote writes; True when none is pending."""
        deadline = time.monotonic() + timeout_s
        drained = True
        for tier in self.tiers:
            if tier.remote:
                drained = tier.drain(max(0.0, deadline - time.monotonic())) and drained
        return drained

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
