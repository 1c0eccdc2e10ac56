"""What the cache did for one request: one typed object from the cache to the response header, the request's
log line and the metrics (an observer of the cache, e.g. the Lambda entry's EMF emitter).

Counts per tier are kept under the tier's name, and flattened as ``<tier>_<count>``: the S3 tier, named
``s3``, gives ``s3_hits``, ``s3_lookups``, ``s3_writes`` and ``s3_skipped``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class TierStats:
    """One tier's part of a request. ``lookups``, ``writes`` and ``skipped`` are kept for remote tiers only."""

    hits: int = 0  # verified values found in this tier
    lookups: int = 0  # keys asked of the tier (0 when it was skipped)
    writes: int = 0  # entries written (0 while its writes run in the background)
    skipped: str = ""  # why the tier was not asked: "", "policy", "breaker-open"

    def add(self, other: TierStats) -> None:
        self.hits += other.hits
        self.lookups += other.lookups
        self.writes += other.writes
        self.skipped = self.skipped or other.skipped


@dataclass(slots=True)
class CacheStats:
    """Counts are over the distinct keys of the request (a repeated input is looked up once).

    A request that did not use the cache (none configured, or ``Cache-Control: no-cache``) has the same shape:
    ``enabled`` False, everything a miss, and ``bypassed`` 1 when the caller opted out of a configured cache.
    """

    modality: str  # "image", "text"; "image,text" for a request's stats merged over both (compare)
    enabled: bool = True  # False: the request opted out or the cache is off (everything computed)
    bypassed: int = 0  # lookups the caller opted out of (Cache-Control: no-cache); summed when merged
    requested: int = 0  # inputs in the request, repeats included
    unique: int = 0  # distinct keys
    misses: int = 0  # computed
    corrupt: int = 0  # stored values that failed verification: treated as misses and overwritten
    errors: int = 0  # tier faults (already logged), abandoned calls included
    tiers: dict[str, TierStats] = field(default_factory=dict)  # by tier name, in lookup order
    lookup_ms: float = 0.0
    compute_ms: float = 0.0
    store_ms: float = 0.0

    @property
    def hits(self) -> int:
        return sum(t.hits for t in self.tiers.values())

    def tier(self, name: str) -> TierStats:
        """The counts of the tier called ``name`` (all zero when the cache has no such tier)."""
        return self.tiers.get(name) or TierStats()

    def counts(self) -> dict[str, int]:
        """The whole-number counts, as the ``X-Clip-Cache`` header and the request's log line show them:
        hits and misses, then whatever is not zero. Empty when no cache is configured."""
        if not self.enabled:
            return {"hits": 0, "misses": self.misses, "bypass": self.bypassed} if self.bypassed else {}
        out = {"hits": self.hits, "misses": self.misses}
        flat = [(f"{name}_hits", t.hits) for name, t in self.tiers.items()]
        flat += [("corrupt", self.corrupt), ("errors", self.errors)]
        for name, t in self.tiers.items():
            flat += [(f"{name}_lookups", t.lookups), (f"{name}_writes", t.writes)]
        out.update((key, value) for key, value in flat if value)
        return out

    def to_log(self) -> dict[str, int | float | str]:
        """Flat dict for a structured log line; counts are ints, durations floats in ms."""
        out: dict[str, int | float | str] = {"modality": self.modality, "hits": self.hits, "misses": self.misses}
        if not self.enabled:
            out["cache"] = "off"
            return out
        out.update(self.counts())
        for name, t in self.tiers.items():
            if t.skipped:
                out[f"{name}_skipped"] = t.skipped
        out["lookup_ms"] = round(self.lookup_ms, 2)
        out["compute_ms"] = round(self.compute_ms, 2)
        out["store_ms"] = round(self.store_ms, 2)
        return out

    @classmethod
    def merge(cls, parts: Iterable[CacheStats]) -> CacheStats:
        """One request's stats over several lookups (compare: its images and its texts): counts and
        durations summed, tiers by name."""
        parts = list(parts)
        merged = cls(modality=",".join(dict.fromkeys(p.modality for p in parts)),
                     enabled=any(p.enabled for p in parts))
        for part in parts:
            merged.bypassed += part.bypassed
            merged.requested += part.requested
            merged.unique += part.unique
            merged.misses += part.misses
            merged.corrupt += part.corrupt
            merged.errors += part.errors
            merged.lookup_ms += part.lookup_ms
            merged.compute_ms += part.compute_ms
            merged.store_ms += part.store_ms
            for name, tier in part.tiers.items():
                merged.tiers.setdefault(name, TierStats()).add(tier)
        return merged


# Told each request's stats (e.g. the Lambda entry's EMF emitter); must not raise, and is guarded anyway.
StatsObserver = Callable[[CacheStats], None]
