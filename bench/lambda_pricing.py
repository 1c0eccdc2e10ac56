"""What one API request costs on AWS: Lambda duration and requests, API Gateway HTTP API requests.

List prices, us-east-1, x86_64, on-demand, first pricing tier, no free tier; checked 2026-12-01 against
https://aws.amazon.com/lambda/pricing/ (and AWS's "How AWS Pricing Works" whitepaper, Lambda chapter)
and https://aws.amazon.com/api-gateway/pricing/. Every price used by the benchmarks is here, nowhere else.

- Lambda duration: $0.0000166667 per GB-second (x86_64, the first 6 billion GB-s a month), the memory
  size in GB being MB / 1024, the duration "rounded up to the nearest 1 ms".
- Lambda requests: $0.20 per million, counted per invocation: API Gateway's, and each Invoke one
  function makes of another (compare -> embed_text).
- HTTP API: $1.00 per million for the first 300 million a month, "metered in 512 KB increments". Which
  direction is metered AWS does not say; we count the larger of request and response body, in KiB
  (524,288-byte) increments. Every request the benchmarks send is one increment either way.

Left out (see the README's cost section): S3 reads and writes of the embedding cache, CloudWatch Logs,
data transfer out, init duration of cold starts (billed since August 2025), the free tier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PRICES_CHECKED = "2026-12-01"
PRICE_SOURCES = ("https://aws.amazon.com/lambda/pricing/", "https://aws.amazon.com/api-gateway/pricing/")
REGION = "us-east-1"
ARCHITECTURE = "x86_64"
LAMBDA_USD_PER_GB_SECOND = 0.0000166667
LAMBDA_USD_PER_REQUEST = 0.20 / 1_000_000
HTTP_API_USD_PER_REQUEST = 1.00 / 1_000_000  # the first 300 million requests a month
HTTP_API_METERING_BYTES = 512 * 1024
MB_PER_GB = 1024
MILLION = 1_000_000


def billed_ms(duration_s: float) -> int:
    """Lambda's billed duration: rounded up to the next whole millisecond (at least 1)."""
    if duration_s < 0:
        raise ValueError(f"a duration cannot be negative: {duration_s}")
    # round() first: 0.021 s is 21.000000000000004 ms in floating point, billed 21, not 22.
    return max(1, math.ceil(round(duration_s * 1000, 6)))


def compute_usd(billed: float, memory_mb: int) -> float:
    """Lambda duration charge of one invocation: ``billed`` ms at ``memory_mb``."""
    return billed / 1000 * memory_mb / MB_PER_GB * LAMBDA_USD_PER_GB_SECOND


def http_api_units(request_bytes: int, response_bytes: int = 0) -> int:
    """HTTP API requests billed for one call: one per started 512 KB of its larger body."""
    return max(1, math.ceil(max(request_bytes, response_bytes) / HTTP_API_METERING_BYTES))


@dataclass(frozen=True)
class Invocation:
    """One Lambda invocation a request causes: its billed milliseconds and its function's memory."""

    billed_ms: float
    memory_mb: int


@dataclass(frozen=True)
class CostPerMillion:
    """Dollars per million API requests, by line of the bill."""

    compute: float
    requests: float
    http_api: float

    @property
    def total(self) -> float:
        return self.compute + self.requests + self.http_api


def cost_per_million(invocations: Sequence[Invocation], http_units: int = 1) -> CostPerMillion:
    """A million API requests, each causing ``invocations`` (the function behind the route first, then the
    functions it invokes) and ``http_units`` HTTP API requests (0: not called through API Gateway)."""
    if not invocations:
        raise ValueError("a request runs at least one invocation")
    compute = sum(compute_usd(inv.billed_ms, inv.memory_mb) for inv in invocations)
    return CostPerMillion(compute=compute * MILLION, requests=len(invocations) * LAMBDA_USD_PER_REQUEST * MILLION,
                          http_api=http_units * HTTP_API_USD_PER_REQUEST * MILLION)
