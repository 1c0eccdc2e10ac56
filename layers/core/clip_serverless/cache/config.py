"""Cache configuration from the environment. A bad value is logged and replaced by its default:
the cache is never the reason a function fails to start.

| variable | default | meaning |
|---|---|---|
| ``CLIP_CACHE`` | ``on`` | ``off`` disables every tier |
| ``CLIP_CACHE_MEMORY_MB`` | ``32`` | in-process LRU bound (a 512-d entry costs ~2.4 KB: ~14,000 entries) |
| ``CLIP_CACHE_DIR`` | unset | on-disk tier (local server) |
| ``CLIP_CACHE_BUCKET`` | unset | S3 tier; unset means no S3 and boto3 is never imported |
| ``CLIP_CACHE_PREFIX`` | ``embeddings/`` | object key prefix (a ``/`` is appended if missing) |
| ``CLIP_CACHE_S3_ENDPOINT_URL`` | unset | another S3 endpoint (moto, MinIO) |
| ``CLIP_CACHE_S3_REGION`` | unset | else botocore's own (``AWS_REGION`` on Lambda) |
| ``CLIP_CACHE_S3_POLICY`` | ``image=1,text=4`` | per modality, the fewest memory/disk misses in one |
|  |  | request for which S3 is read and written; ``off``: never |
| ``CLIP_CACHE_S3_CONNECT_TIMEOUT`` | ``0.25`` | seconds, botocore |
| ``CLIP_CACHE_S3_READ_TIMEOUT`` | ``0.4`` | seconds, botocore |
| ``CLIP_CACHE_S3_MAX_ATTEMPTS`` | ``2`` | botocore standard retry mode, first try included |
| ``CLIP_CACHE_S3_DEADLINE`` | ``0.5`` | seconds a request waits for one batch of GETs (or PUTs) at most |
| ``CLIP_CACHE_S3_WORKERS`` | ``8`` | concurrent S3 calls |
| ``CLIP_CACHE_S3_BREAKER`` | ``5,30`` | failures in a row that open the breaker, seconds it stays open |
| ``CLIP_CACHE_S3_WRITE`` | ``sync`` on Lambda, else ``background`` | whether a request waits |
|  |  | (bounded by the deadline) for its S3 writes. On Lambda, unless set to ``sync`` explicitly, |
|  |  | the handler switches to ``background`` drained after the response by an internal |
|  |  | extension when it registers (:mod:`.after_response`) |
| ``CLIP_CACHE_METRICS`` | ``emf`` on Lambda, else ``off`` | CloudWatch EMF lines on stdout |
| ``CLIP_CACHE_METRICS_NAMESPACE`` | ``ClipServerless`` | |

The S3 timeouts are far shorter than AWS's advice for latency-sensitive reads (retry a small GET after
~2 s): that advice is for data an application needs, and a cache entry is never needed. A GET that is not
back within the deadline is answered by computing (an image: ~50-150 ms on one vCPU), so waiting longer
than the computation would take only makes the request slower.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .keys import MODALITIES, Modality

logger = logging.getLogger("clip_serverless.cache")

WriteMode = Literal["sync", "background"]
# Why text needs 4 misses: one S3 GET round trip in-region is ~10-30 ms, a short caption embeds in ~4-15 ms,
# so S3 only beats computing for a text list (GETs run concurrently, the text batch grows linearly).
# An image costs decode + ~15-55 ms of inference: one miss already pays for a GET. See bench/bench_cache.py.
DEFAULT_S3_POLICY: Mapping[Modality, int | None] = {"image": 1, "text": 4}


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    memory_bytes: int = 32 * 1024 * 1024
    disk_dir: str | None = None
    bucket: str | None = None
    prefix: str = "embeddings/"
    endpoint_url: str | None = None
    region: str | None = None
    s3_policy: Mapping[Modality, int | None] = field(default_factory=lambda: dict(DEFAULT_S3_POLICY))
    connect_timeout_s: float = 0.25
    read_timeout_s: float = 0.4
    max_attempts: int = 2
    deadline_s: float = 0.5
    workers: int = 8
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    write_mode: WriteMode = "sync"
    metrics: bool = False
    metrics_namespace: str = "ClipServerless"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CacheConfig:
        env = os.environ if environ is None else environ
        on_lambda = bool(env.get("AWS_LAMBDA_FUNCTION_NAME"))
        get = _Reader(env)
        breaker = get.text("CLIP_CACHE_S3_BREAKER", "5,30")
        failures, cooldown = _parse_breaker(breaker)
        write = get.choice("CLIP_CACHE_S3_WRITE", "sync" if on_lambda else "background",
                           ("sync", "background"))
        metrics = get.choice("CLIP_CACHE_METRICS", "emf" if on_lambda else "off", ("emf", "off"))
        return cls(
            enabled=get.choice("CLIP_CACHE", "on", ("on", "off")) == "on",
            memory_bytes=int(get.number("CLIP_CACHE_MEMORY_MB", 32.0, minimum=0.0) * 1024 * 1024),
            disk_dir=get.text("CLIP_CACHE_DIR", "") or None,
            bucket=get.text("CLIP_CACHE_BUCKET", "") or None,
            prefix=_normalise_prefix(get.text("CLIP_CACHE_PREFIX", "embeddings/")),
            endpoint_url=get.text("CLIP_CACHE_S3_ENDPOINT_URL", "") or None,
            region=get.text("CLIP_CACHE_S3_REGION", "") or None,
            s3_policy=parse_policy(get.text("CLIP_CACHE_S3_POLICY", "")),
            connect_timeout_s=get.number("CLIP_CACHE_S3_CONNECT_TIMEOUT", 0.25, minimum=0.01),
            read_timeout_s=get.number("CLIP_CACHE_S3_READ_TIMEOUT", 0.4, minimum=0.01),
            max_attempts=int(get.number("CLIP_CACHE_S3_MAX_ATTEMPTS", 2, minimum=1)),
            deadline_s=get.number("CLIP_CACHE_S3_DEADLINE", 0.5, minimum=0.01),
            workers=int(get.number("CLIP_CACHE_S3_WORKERS", 8, minimum=1)),
            breaker_failures=failures,
            breaker_cooldown_s=cooldown,
            write_mode="sync" if write == "sync" else "background",
            metrics=metrics == "emf",
            metrics_namespace=get.text("CLIP_CACHE_METRICS_NAMESPACE", "ClipServerless") or "ClipServerless",
        )


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str) -> str:
        return self.env.get(name, default).strip()

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name, default).lower() or default
        if value not in allowed:
            logger.warning("%s=%r is not one of %s; using %r", name, value, ", ".join(allowed), default)
            return default
        return value

    def number(self, name: str, default: float, *, minimum: float) -> float:
        raw = self.text(name, "")
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value >= minimum:  # also catches NaN
            logger.warning("%s=%r is not a number >= %g; using %g", name, raw, minimum, default)
            return default
        return value


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip().lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _parse_breaker(raw: str) -> tuple[int, float]:
    try:
        failures_s, cooldown_s = raw.split(",")
        failures, cooldown = int(failures_s), float(cooldown_s)
        if failures >= 1 and cooldown >= 0:
            return failures, cooldown
    except ValueError:
        pass
    logger.warning("CLIP_CACHE_S3_BREAKER=%r is not '<failures>,<seconds>'; using 5,30", raw)
    return 5, 30.0


def parse_policy(raw: str) -> dict[Modality, int | None]:
    """``"image=1,text=4"`` -> {"image": 1, "text": 4}; ``text=off`` -> None.

    Modalities not named keep their defaults; malformed items are logged and ignored.
    """
    policy: dict[Modality, int | None] = dict(DEFAULT_S3_POLICY)
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, _, value = item.partition("=")
        name, value = name.strip().lower(), value.strip().lower()
        modality = next((m for m in MODALITIES if m == name), None)
        if modality is None:
            logger.warning("CLIP_CACHE_S3_POLICY: unknown modality %r ignored", name)
            continue
        if value in ("off", "never", "none"):
            policy[modality] = None
        elif value.isdigit() and int(value) >= 1:
            policy[modality] = int(value)
        else:
            logger.warning("CLIP_CACHE_S3_POLICY: %r is not a whole number >= 1 or 'off'", item)
    return policy
