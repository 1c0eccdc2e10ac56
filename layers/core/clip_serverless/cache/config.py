"""Cache configuration from the environment, read once at start. A bad value raises
:class:`~clip_serverless.envparse.SettingsError` naming the variable: start-up stops with a message that says
what to fix (as for every other setting), rather than serving with a cache configured otherwise than asked.

| variable | default | meaning |
|---|---|---|
| ``CLIP_CACHE`` | ``on`` | ``off`` disables every tier |
| ``CLIP_CACHE_MEMORY_MB`` | ``32`` | in-process LRU bound (a 512-d entry costs ~2.4 KB: ~14,000 entries); 0: none |
| ``CLIP_CACHE_DIR`` | unset | on-disk tier (local server) |
| ``CLIP_CACHE_BUCKET`` | unset | S3 tier; unset means no S3 and botocore is never imported |
| ``CLIP_CACHE_PREFIX`` | ``embeddings/`` | object key prefix (a ``/`` is appended if missing) |
| ``CLIP_CACHE_S3_ENDPOINT_URL`` | unset | another S3 endpoint (moto, MinIO) |
| ``CLIP_CACHE_S3_REGION`` | unset | else botocore's own (``AWS_REGION`` on Lambda) |
| ``CLIP_CACHE_S3_POLICY`` | ``image=1,text=4`` | per modality, the fewest memory/disk misses in one |
|  |  | request for which S3 is read and written; ``text=off``: never for text; ``off``: never |
| ``CLIP_CACHE_S3_CONNECT_TIMEOUT`` | ``0.25`` | seconds, botocore |
| ``CLIP_CACHE_S3_READ_TIMEOUT`` | ``0.4`` | seconds, botocore |
| ``CLIP_CACHE_S3_MAX_ATTEMPTS`` | ``2`` | botocore standard retry mode, first try included |
| ``CLIP_CACHE_S3_DEADLINE`` | ``0.5`` | seconds a request waits for one batch of GETs (or PUTs) at most |
| ``CLIP_CACHE_S3_WORKERS`` | ``8`` | concurrent S3 calls |
| ``CLIP_CACHE_S3_BREAKER`` | ``5,30`` | failures in a row that open the breaker, seconds it stays open |
| ``CLIP_CACHE_S3_WRITE`` | ``sync`` on Lambda, else ``background`` | whether a request waits |
|  |  | (bounded by the deadline) for its remote-tier writes. On Lambda, unless set to ``sync`` |
|  |  | explicitly, the handler switches to ``background`` drained after the response by an internal |
|  |  | extension when it registers (:mod:`clip_serverless.aws_lambda.after_response`) |
| ``CLIP_CACHE_METRICS`` | ``emf`` on Lambda, else ``off`` | CloudWatch EMF lines on stdout (the Lambda |
|  |  | entry wires them in: :mod:`clip_serverless.aws_lambda.metrics`) |
| ``CLIP_CACHE_METRICS_NAMESPACE`` | ``ClipServerless`` | |

Every remote tier reads the same four variables under its own name (:meth:`RemoteTierConfig.from_env`):
``CLIP_CACHE_<TIER>_POLICY``, ``_DEADLINE``, ``_WORKERS``, ``_BREAKER``; S3's are the ``CLIP_CACHE_S3_*`` above.

The S3 timeouts are far shorter than AWS's advice for latency-sensitive reads (retry a small GET after
~2 s): that advice is for data an application needs, and a cache entry is never needed. A GET that is not
back within the deadline is answered by computing (an image: ~50-150 ms on one vCPU), so waiting longer
than the computation would take only makes the request slower.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..envparse import SettingsError, env_bool, env_float, env_int, env_str
from ..types import Modality
from .keys import MODALITIES
from .tier import Policy, WriteMode

# Why text needs 4 misses: one S3 GET round trip in-region is ~10-30 ms, a short caption embeds in ~4-15 ms,
# so S3 only beats computing for a text list (GETs run concurrently, the text batch grows linearly).
# An image costs decode + ~15-55 ms of inference: one miss already pays for a GET. See bench/bench_cache.py.
DEFAULT_S3_POLICY: Policy = {"image": 1, "text": 4}
_MIB = 1024 * 1024
_OFF = ("off", "never", "none")


@dataclass(frozen=True)
class RemoteTierConfig:
    """What every remote tier is configured with: when it is worth a round trip, and how long to wait."""

    policy: Policy = field(default_factory=lambda: dict(DEFAULT_S3_POLICY))
    deadline_s: float = 0.5  # a request waits at most this long for one batch of reads (or writes)
    workers: int = 8  # concurrent calls
    breaker_failures: int = 5  # failures in a row that open the breaker
    breaker_cooldown_s: float = 30.0  # seconds it stays open

    @classmethod
    def from_env(cls, tier: str, environ: Mapping[str, str] | None = None, *,
                 default_policy: Policy = DEFAULT_S3_POLICY) -> RemoteTierConfig:
        """From ``CLIP_CACHE_<TIER>_POLICY``, ``_DEADLINE``, ``_WORKERS`` and ``_BREAKER``."""
        env = os.environ if environ is None else environ
        prefix = f"CLIP_CACHE_{tier.upper()}_"
        failures, cooldown = parse_breaker(env_str(prefix + "BREAKER", "", env) or "", variable=prefix + "BREAKER")
        return cls(
            policy=parse_policy(env_str(prefix + "POLICY", "", env) or "", variable=prefix + "POLICY",
                                default=default_policy),
            deadline_s=env_float(prefix + "DEADLINE", 0.5, env),
            workers=env_int(prefix + "WORKERS", 8, 1, env),
            breaker_failures=failures,
            breaker_cooldown_s=cooldown,
        )


@dataclass(frozen=True)
class S3Config:
    """The S3 tier (:class:`~.s3.S3Tier`)."""

    bucket: str
    prefix: str = "embeddings/"
    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout_s: float = 0.25
    read_timeout_s: float = 0.4
    max_attempts: int = 2  # botocore's total_max_attempts: the first try included
    remote: RemoteTierConfig = field(default_factory=RemoteTierConfig)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Config | None:
        """None when ``CLIP_CACHE_BUCKET`` is unset (the other variables are checked all the same)."""
        env = os.environ if environ is None else environ
        bucket = env_str("CLIP_CACHE_BUCKET", None, env)
        # Every variable is read (and checked) without a bucket too: a bad value is reported now, not later.
        config = cls(
            bucket=bucket or "",
            # Set but empty means no prefix, so not env_str (which would answer the default).
            prefix=_normalise_prefix(env.get("CLIP_CACHE_PREFIX", "embeddings/")),
            endpoint_url=env_str("CLIP_CACHE_S3_ENDPOINT_URL", None, env),
            region=env_str("CLIP_CACHE_S3_REGION", None, env),
            connect_timeout_s=env_float("CLIP_CACHE_S3_CONNECT_TIMEOUT", 0.25, env),
            read_timeout_s=env_float("CLIP_CACHE_S3_READ_TIMEOUT", 0.4, env),
            max_attempts=env_int("CLIP_CACHE_S3_MAX_ATTEMPTS", 2, 1, env),
            remote=RemoteTierConfig.from_env("s3", env, default_policy=DEFAULT_S3_POLICY),
        )
        return config if bucket else None


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    memory_bytes: int = 32 * _MIB
    disk_dir: str | None = None
    s3: S3Config | None = None
    write_mode: WriteMode = "sync"  # remote tiers' writes: waited for, or queued
    metrics: bool = False  # EMF lines (wired in by the Lambda entry)
    metrics_namespace: str = "ClipServerless"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CacheConfig:
        """Every ``CLIP_CACHE*`` variable; raises :class:`SettingsError` naming the first bad one."""
        env = os.environ if environ is None else environ
        on_lambda = bool(env.get("AWS_LAMBDA_FUNCTION_NAME"))
        write = _choice("CLIP_CACHE_S3_WRITE", "sync" if on_lambda else "background", ("sync", "background"), env)
        metrics = _choice("CLIP_CACHE_METRICS", "emf" if on_lambda else "off", ("emf", "off"), env)
        return cls(
            enabled=env_bool("CLIP_CACHE", True, env),
            memory_bytes=_megabytes("CLIP_CACHE_MEMORY_MB", 32.0, env),
            disk_dir=env_str("CLIP_CACHE_DIR", None, env),
            s3=S3Config.from_env(env),
            write_mode="sync" if write == "sync" else "background",
            metrics=metrics == "emf",
            metrics_namespace=env_str("CLIP_CACHE_METRICS_NAMESPACE", "ClipServerless", env) or "ClipServerless",
        )


def _choice(name: str, default: str, allowed: tuple[str, ...], env: Mapping[str, str]) -> str:
    value = (env_str(name, default, env) or default).lower()
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _megabytes(name: str, default: float, env: Mapping[str, str]) -> int:
    """A size in MB (fractions allowed) as bytes; 0 is allowed (no memory tier)."""
    raw = env_str(name, None, env)
    if raw is None:
        return int(default * _MIB)
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of megabytes, got {raw!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise SettingsError(f"{name} must be 0 or more megabytes, got {raw!r}")
    return int(value * _MIB)


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip().lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def parse_breaker(raw: str, *, variable: str = "CLIP_CACHE_S3_BREAKER") -> tuple[int, float]:
    """``"5,30"`` -> (5, 30.0): failures in a row (>= 1), seconds open (>= 0); empty: the default."""
    if not raw.strip():
        return 5, 30.0
    try:
        failures_s, cooldown_s = raw.split(",")
        failures, cooldown = int(failures_s), float(cooldown_s)
    except ValueError:
        raise SettingsError(f"{variable} must be '<failures>,<seconds>' (e.g. 5,30), got {raw!r}") from None
    if failures < 1 or not (cooldown >= 0 and math.isfinite(cooldown)):
        raise SettingsError(f"{variable} needs failures >= 1 and seconds >= 0, got {raw!r}")
    return failures, cooldown


def parse_policy(raw: str, *, variable: str = "CLIP_CACHE_S3_POLICY",
                 default: Policy = DEFAULT_S3_POLICY) -> dict[Modality, int | None]:
    """``"image=1,text=4"`` -> {"image": 1, "text": 4}; ``text=off`` -> None for text; ``off`` -> None for both.

    Modalities not named keep their defaults; anything else raises :class:`SettingsError` naming ``variable``.
    """
    policy: dict[Modality, int | None] = dict(default)
    if raw.strip().lower() in _OFF:
        return dict.fromkeys(MODALITIES, None)
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, _, value = item.partition("=")
        name, value = name.strip().lower(), value.strip().lower()
        modality = next((m for m in MODALITIES if m == name), None)
        if modality is None:
            raise SettingsError(f"{variable}: unknown modality {name!r} in {item!r} (image, text)")
        if value in _OFF:
            policy[modality] = None
        elif value.isdigit() and int(value) >= 1:
            policy[modality] = int(value)
        else:
            raise SettingsError(f"{variable}: {item!r} is not <modality>=<whole number >= 1> or <modality>=off")
    return policy
