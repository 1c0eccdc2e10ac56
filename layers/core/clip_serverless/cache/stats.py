"""What the cache did for one request and one modality: for the structured log and the metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CacheStats:
    """Counts are over the distinct keys of the request (a repeated input is looked up once)."""

    modality: str
    enabled: bool = True  # False: the request opted out or the cache is off (everything computed)
    requested: int = 0  # inputs in the request, repeats included
    unique: int = 0  # distinct keys
    memory_hits: int = 0
    disk_hits: int = 0
    s3_hits: int = 0
    misses: int = 0  # computed
    corrupt: int = 0  # stored values that failed verification: treated as misses and overwritten
    errors: int = 0  # tier faults (already logged), abandoned calls included
    s3_lookups: int = 0  # keys asked of S3
    s3_writes: int = 0  # entries written to S3 (0 while writes run in the background)
    s3_skipped: str = ""  # why a configured S3 tier was not asked: "", "policy", "breaker-open"
    lookup_ms: float = 0.0
    compute_ms: float = 0.0
    store_ms: float = 0.0

    @property
    def hits(self) -> int:
        return self.memory_hits + self.disk_hits + self.s3_hits

    def to_log(self) -> dict[str, int | float | str]:
        """Flat dict for a structured log line; counts are ints, durations floats in ms."""
        out: dict[str, int | float | str] = {
            "modality": self.modality,
            "hits": self.hits,
            "misses": self.misses,
        }
        if not self.enabled:
            out["cache"] = "off"
            return out
        for name in ("memory_hits", "disk_hits", "s3_hits", "corrupt", "errors", "s3_lookups", "s3_writes"):
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.s3_skipped:
            out["s3_skipped"] = self.s3_skipped
        out["lookup_ms"] = round(self.lookup_ms, 2)
        out["compute_ms"] = round(self.compute_ms, 2)
        out["store_ms"] = round(self.store_ms, 2)
        return out
