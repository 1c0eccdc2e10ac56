"""CloudWatch metrics as Embedded Metric Format (EMF) log lines, hand-written.

One JSON object per request and modality, written straight to stdout: Lambda ships stdout to CloudWatch
Logs, which extracts the metrics. (Not through ``logging``: the Lambda runtime's log format prefixes each
record with a level and request id, and CloudWatch then no longer sees a JSON object.)

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

from ..cache.stats import CacheStats

DEFAULT_NAMESPACE = "ClipServerless"

# (metric name, unit, value from the stats)
_METRICS: tuple[tuple[str, str, Callable[[CacheStats], float]], ...] = (
    ("CacheHits", "Count", lambda s: s.hits),
    ("CacheMisses", "Count", lambda s: s.misses),
    ("CacheMemoryHits", "Count", lambda s: s.memory_hits),
    ("CacheDiskHits", "Count", lambda s: s.disk_hits),
    ("CacheS3Hits", "Count", lambda s: s.s3_hits),
    ("CacheCorrupt", "Count", lambda s: s.corrupt),
    ("CacheErrors", "Count", lambda s: s.errors),
    ("CacheLookupTime", "Milliseconds", lambda s: round(s.lookup_ms, 3)),
)


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
        record: dict[str, object] = {
            "_aws": {
                "Timestamp": int(self.clock() * 1000),
                "CloudWatchMetrics": [{
                    "Namespace": self.namespace,
                    "Dimensions": [["FunctionName", "Modality"]],
                    "Metrics": [{"Name": name, "Unit": unit} for name, unit, _ in _METRICS],
                }],
            },
            "FunctionName": self.function_name,
            "Modality": stats.modality,
        }
        for name, _, value in _METRICS:
            record[name] = value(stats)
        if stats.s3_skipped:
            record["s3_skipped"] = stats.s3_skipped  # a property: searchable in Logs Insights, not a metric
        return record

    def emit(self, stats: CacheStats) -> None:
        with contextlib.suppress(Exception):  # metrics must never fail a request
            self.sink(json.dumps(self.record(stats), separators=(",", ":")))
