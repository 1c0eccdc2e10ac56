"""CloudWatch metrics as Embedded Metric Format (EMF) log lines, hand-written.

One JSON object per request and modality, written straight to stdout: Lambda ships stdout to CloudWatch
Logs, which extracts the metrics. (Not through ``logging``: the Lambda runtime's log format prefixes each
record with a level and request id, and CloudWatch then no longer sees a JSON object.)

The cache does not know this module: :meth:`EmfEmitter.emit` is an observer of the cache's statistics, which
the Lambda entry wires in when ``CLIP_CACHE_METRICS=emf`` (the default on Lambda; :func:`emf_observer`).

Why not AWS Lambda Powertools' ``Metrics`` (3.37): ``from aws_lambda_powertools.metrics import Metrics``
costs 22-39 ms of cold start in a fresh process with .pyc (10 ms if FastAPI and numpy are already loaded;
~90 ms without .pyc, as a layer without precompiled files would pay) and a 7.6 MB dependency, for what is
one ``json.dumps`` per request; this module imports nothing beyond the standard library. Figures:
``bench/bench_cache.py``. The format:
https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable

from ..cache.config import CacheConfig
from ..cache.stats import CacheStats, StatsObserver

DEFAULT_NAMESPACE = "ClipServerless"

# The tiers whose hits are always reported (0 when a function has no such tier), so that a dashboard's
# series never has gaps; any other tier of the cache is reported too. Metric: Cache<Name>Hits.
ALWAYS_REPORTED_TIERS = ("memory", "disk", "s3")

# (metric name, unit, value from the stats); the per-tier hits go between misses and corrupt.
_BEFORE_TIERS: tuple[tuple[str, str, Callable[[CacheStats], float]], ...] = (
    ("CacheHits", "Count", lambda s: s.hits),
    ("CacheMisses", "Count", lambda s: s.misses),
)
_AFTER_TIERS: tuple[tuple[str, str, Callable[[CacheStats], float]], ...] = (
    ("CacheCorrupt", "Count", lambda s: s.corrupt),
    ("CacheErrors", "Count", lambda s: s.errors),
    ("CacheLookupTime", "Milliseconds", lambda s: round(s.lookup_ms, 3)),
)


def tier_metric(tier: str) -> str:
    """``s3`` -> ``CacheS3Hits``, ``memory`` -> ``CacheMemoryHits``."""
    return f"Cache{tier[:1].upper()}{tier[1:]}Hits"


def _metrics(stats: CacheStats) -> list[tuple[str, str, float]]:
    tiers = dict.fromkeys([*ALWAYS_REPORTED_TIERS, *stats.tiers])
    return ([(name, unit, value(stats)) for name, unit, value in _BEFORE_TIERS]
            + [(tier_metric(tier), "Count", stats.tier(tier).hits) for tier in tiers]
            + [(name, unit, value(stats)) for name, unit, value in _AFTER_TIERS])


def _stdout(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class EmfEmitter:
    """Writes one EMF record per :meth:`emit`, with dimensions FunctionName and Modality."""

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, function_name: str | None = None,
                 sink: Callable[[str], None] = _stdout, clock: Callable[[], float] = time.time) -> None:
        self.namespace = namespace
        self.function_name = function_name or os.environ.get("AWS_LAMBDA_FUNCTION_NAME") or "local"
        self.sink = sink
        self.clock = clock

    def record(self, stats: CacheStats) -> dict[str, object]:
        """The EMF object for one request's stats (metrics at the top level, as the spec requires)."""
        metrics = _metrics(stats)
        record: dict[str, object] = {
            "_aws": {
                "Timestamp": int(self.clock() * 1000),
                "CloudWatchMetrics": [{
                    "Namespace": self.namespace,
                    "Dimensions": [["FunctionName", "Modality"]],
                    "Metrics": [{"Name": name, "Unit": unit} for name, unit, _ in metrics],
                }],
            },
            "FunctionName": self.function_name,
            "Modality": stats.modality,
        }
        for name, _, value in metrics:
            record[name] = value
        for tier, counts in stats.tiers.items():
            if counts.skipped:  # a property ("s3_skipped"): searchable in Logs Insights, not a metric
                record[f"{tier}_skipped"] = counts.skipped
        return record

    def emit(self, stats: CacheStats) -> None:
        """One line on the sink: a :data:`~clip_serverless.cache.stats.StatsObserver` of the cache."""
        with contextlib.suppress(Exception):  # metrics must never fail a request
            self.sink(json.dumps(self.record(stats), separators=(",", ":")))


def emf_observer(config: CacheConfig) -> StatsObserver | None:
    """The cache observer that writes EMF lines when ``CLIP_CACHE_METRICS=emf`` (the default on Lambda)."""
    return EmfEmitter(config.metrics_namespace).emit if config.metrics else None
