"""What a cache tier is: the one interface that the memory, disk and S3 tiers implement (and a DynamoDB or a
Redis tier would). :class:`~.tiered.EmbeddingCache` holds an ordered list of them and knows none by name.

A tier stores entries by cache key (:mod:`.keys`: the same string in every tier). It may keep the vectors
themselves (memory: values this process computed or verified) or the codec's bytes (disk, S3: verified by
the cache on every read, :mod:`.codec`). Its answers are counted in :class:`~.stats.CacheStats` under its
:attr:`Tier.name` (``memory_hits``, ``s3_lookups``...), so names must be unique within a cache.

A **remote** tier is one a request pays a round trip for (S3):

- it is consulted for a modality only when a request has at least ``policy[modality]`` misses left after the
  tiers above it (``None``: never), so that computing a few cheap inputs never waits for the network;
- its writes follow the cache's :data:`WriteMode` (``background``: the request does not wait; on Lambda the
  after-response extension drains them, :mod:`clip_serverless.aws_lambda.after_response`), and
  :meth:`Tier.drain` waits for them;
- it is written only when it answered the request's read (after a failed read a write fails the same way);
- its keys asked and entries written are counted (``<name>_lookups``, ``<name>_writes``) and a skip is
  reported with its reason (``<name>_skipped``: ``policy``, ``breaker-open``).

A local tier (memory, disk) is always consulted and always written, synchronously. Nothing here may raise
for a fault: a tier logs it (:class:`~.faultlog.FaultLog`), counts it in :attr:`TierResult.errors` and
answers as if the key were missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..types import Float32Array, Modality

WriteMode = Literal["sync", "background"]
Policy = Mapping[Modality, int | None]

# A local tier is consulted whenever a key is left to find.
ALWAYS: Policy = {"image": 1, "text": 1}


@dataclass(frozen=True, slots=True)
class Entry:
    """One value to store: the (D,) vector and its codec bytes (each tier keeps the form it stores)."""

    vector: Float32Array
    blob: bytes


@dataclass(slots=True)
class TierResult:
    """What one batch of reads or writes did."""

    found: dict[str, bytes] = field(default_factory=dict)  # read: stored bytes by key, unverified
    vectors: dict[str, Float32Array] = field(default_factory=dict)  # read: vectors held by a vector tier
    ok: int = 0  # calls that answered (hit, clean miss, or successful write)
    errors: int = 0  # faults (already logged), calls abandoned at a deadline included
    skipped: str = ""  # why the batch never reached the tier, e.g. "breaker-open"
    elapsed_ms: float = 0.0


class Tier(Protocol):
    """A cache tier. Every method is safe to call from several threads at once and never raises for a fault."""

    @property
    def name(self) -> str:
        """Short and unique within a cache: the prefix of its statistics (``s3`` -> ``s3_hits``)."""
        ...

    @property
    def remote(self) -> bool:
        """True for a tier with a round trip per batch: policy thresholds, write modes and counts apply."""
        ...

    @property
    def policy(self) -> Policy:
        """Per modality, the fewest misses left for which this tier is consulted; None: never."""
        ...

    def get_many(self, keys: Sequence[str]) -> TierResult:
        """Look distinct keys up (concurrently, for a remote tier, bounded by its deadline).

        Keys in neither ``found`` nor ``vectors`` are misses."""
        ...

    def put_many(self, entries: Mapping[str, Entry], *, wait_for_completion: bool = True) -> TierResult:
        """Store entries, overwriting old ones. ``wait_for_completion=False``: queue them and return at once
        (``ok`` is then 0); :meth:`drain` waits for the queue."""
        ...

    def prepare(self) -> None:
        """Create clients and threads now (Lambda init) rather than at first use. May raise (logged by the cache)."""
        ...

    def renew(self) -> bool:
        """Replace clients and their connection pools (after a SnapStart restore); True when one was replaced."""
        ...

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for queued writes; True when none is left."""
        ...

    def close(self) -> None:
        """Stop threads and close clients (tests, server shutdown)."""
        ...


class InProcessTier:
    """The lifecycle of a tier that holds no client and no queue (memory, disk): nothing to do."""

    def prepare(self) -> None:
        pass

    def renew(self) -> bool:
        return False

    def drain(self, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        pass
