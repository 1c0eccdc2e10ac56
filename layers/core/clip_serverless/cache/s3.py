"""The shared tier: one S3 object per entry, read and written concurrently, never allowed to fail a request.

- botocore is imported when the tier is first used (or :meth:`S3Tier.prepare` is called), never at import:
  ~60 ms of import and ~60 ms of session and client creation that a function without a bucket never pays
  (:mod:`clip_serverless.aws_clients`: botocore without boto3, one session for the process).
- A remote :class:`~.tier.Tier` named ``s3``: consulted per its ``policy`` (``CLIP_CACHE_S3_POLICY``), its
  writes waited for or queued (:meth:`S3Tier.drain`) as the cache's write mode says.
- botocore timeouts are short and attempts bounded (``Config(connect_timeout, read_timeout,
  retries={"total_max_attempts", "mode": "standard"})``: ``total_max_attempts`` counts the first try, where
  botocore's ``max_attempts`` would count retries only), and each batch waits at most ``deadline_s`` for its
  calls: a lookup of a whole list takes at most about one deadline even if S3 hangs. Calls still running
  then are abandoned (their result still informs the breaker) and their keys count as misses.
- A :class:`Breaker` per operation skips S3 after repeated faults (a skipped batch costs nothing); GET and
  PUT have their own, so a read-only role that cannot write still reads.
- Faults are logged once per batch and cause (bucket, operation, error code, count), never with
  credentials or request headers.

A missing object is a miss, not a fault. Note: S3 answers a GET of a missing key with 403 AccessDenied,
not 404, when the caller lacks ``s3:ListBucket`` on the bucket; grant it, or every miss counts as a fault
and trips the breaker.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Literal

from .breaker import Breaker, State
from .codec import MAX_ENTRY_BYTES
from .config import DEFAULT_S3_POLICY, S3Config
from .faultlog import FaultLog, logger
from .tier import Entry, Policy, TierResult

Outcome = Literal["hit", "miss", "written", "fault"]
Operation = Literal["GET", "PUT"]
OPERATIONS: tuple[Operation, ...] = ("GET", "PUT")
MAX_QUEUED_WRITE_BATCHES = 64
_URL_PATH = re.compile(r"(https?://[^/\s\"']+)[^\s\"']*")
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def describe_error(exc: BaseException, operation: str) -> tuple[bool, str]:
    """(is_missing_key, cause) for an exception from a botocore call; the cause carries no secrets."""
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        code = str(response["Error"].get("Code", "?"))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        if code in _MISSING_KEY_CODES and operation == "GET":
            return True, code
        cause = f"{code} (HTTP {status})"
        if code == "AccessDenied" and operation == "GET":
            cause += " [a missing key also reads as AccessDenied without s3:ListBucket]"
        return False, cause
    # Keep the host, drop path and query: one cause per endpoint (not per key), and no signed URLs.
    text = _URL_PATH.sub(r"\1", str(exc).replace("\n", " "))
    return False, f"{type(exc).__name__}: {text[:200]}"


class S3Tier:
    remote = True

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, connect_timeout_s: float = 0.25, read_timeout_s: float = 0.4,
                 max_attempts: int = 2, deadline_s: float = 0.5, workers: int = 8,
                 breaker_failures: int = 5, breaker_cooldown_s: float = 30.0,
                 policy: Policy = DEFAULT_S3_POLICY, name: str = "s3",
                 clock: Callable[[], float] = time.monotonic, fault_log: FaultLog | None = None,
                 client_factory: Callable[[], Any] | None = None) -> None:
        if not bucket:
            raise ValueError("an S3 tier needs a bucket name")
        self.name = name
        self.policy = dict(policy)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_attempts = max_attempts
        self.deadline_s = deadline_s
        self.workers = max(1, workers)
        self.faults = fault_log or FaultLog()
        self.breakers: dict[Operation, Breaker] = {
            op: Breaker(breaker_failures, breaker_cooldown_s, clock=clock,
                        on_change=functools.partial(self._breaker_changed, op))
            for op in OPERATIONS
        }
        self._client_factory = client_factory or self._default_client
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._background: ThreadPoolExecutor | None = None
        self._queued = 0
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)

    @classmethod
    def from_config(cls, config: S3Config, fault_log: FaultLog | None = None) -> S3Tier:
        remote = config.remote
        return cls(config.bucket, config.prefix, endpoint_url=config.endpoint_url, region=config.region,
                   connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s,
                   max_attempts=config.max_attempts, deadline_s=remote.deadline_s, workers=remote.workers,
                   breaker_failures=remote.breaker_failures, breaker_cooldown_s=remote.breaker_cooldown_s,
                   policy=remote.policy, fault_log=fault_log)

    # -- set-up ------------------------------------------------------------------------------------
    def _default_client(self) -> Any:
        from botocore.config import Config  # here, not at the top: only a configured, used S3 tier pays for it

        from ..aws_clients import client

        config = Config(
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            # total_max_attempts counts the first try ("max_attempts" would count retries: one more call).
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
            max_pool_connections=self.workers,
        )
        return client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)

    def prepare(self) -> None:
        """Create the client and the thread pool now (e.g. during Lambda init) instead of at first use."""
        self._ensure_ready()

    def _ensure_ready(self) -> tuple[Any, ThreadPoolExecutor]:
        if self._client is None or self._pool is None:
            with self._lock:
                if self._client is None:
                    self._client = self._client_factory()
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="clip-cache-s3")
        return self._client, self._pool

    def renew(self) -> bool:
        """Replace the S3 client, and with it its connection pool; True when there was one to replace.

        For a SnapStart restore (:mod:`clip_serverless.aws_lambda.snapstart`): the client created at init holds pooled
        connections the peer closed long ago, shared by every environment restored from the snapshot. The
        old client's connections are closed; the new client is created now (restore runs before the first
        request). A tier that never created a client stays lazy. Never raises: a client that cannot be
        created now is created at first use, where a failure counts as a fault. Meant for a moment with no
        request in flight: a call still using the old client may fail, and counts as a fault.
        """
        with self._lock:
            old, self._client = self._client, None
        if old is None:
            return False
        close = getattr(old, "close", None)
        if callable(close):
            try:
                close()
            except Exception as exc:
                self.faults.fault(self.name, f"closing the old client: {type(exc).__name__}", str(exc)[:200])
        try:
            self._ensure_ready()
        except Exception as exc:
            self.faults.fault(self.name, f"client: {type(exc).__name__}", str(exc)[:200])
        return True

    @property
    def client(self) -> Any:
        """The botocore S3 client, created on first access."""
        return self._ensure_ready()[0]

    def object_key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    # -- one call each (run in the pool; never raise) ----------------------------------------------
    # Each returns (outcome, value): the object's bytes for "hit", b"" for "miss" and "written", and the
    # cause (str) for "fault".
    def _get_one(self, client: Any, key: str) -> tuple[Outcome, bytes | str]:
        try:
            response = client.get_object(Bucket=self.bucket, Key=self.object_key(key))
            body = response["Body"]
            try:
                # An entry is ~2 KB; never read more than the largest valid entry plus one byte.
                data = body.read(MAX_ENTRY_BYTES + 1)
            finally:
                body.close()
        except Exception as exc:
            missing, cause = describe_error(exc, "GET")
            if missing:
                self.breakers["GET"].record_success()
                return "miss", b""
            self.breakers["GET"].record_failure(cause)
            return "fault", cause
        self.breakers["GET"].record_success()
        return "hit", bytes(data)

    def _put_one(self, client: Any, key: str, blob: bytes) -> tuple[Outcome, bytes | str]:
        try:
            client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=blob,
                              ContentType="application/octet-stream")
        except Exception as exc:
            _, cause = describe_error(exc, "PUT")
            self.breakers["PUT"].record_failure(cause)
            return "fault", cause
        self.breakers["PUT"].record_success()
        return "written", b""

    # -- batches -----------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> TierResult:
        """GET all keys concurrently; waits at most ``deadline_s``. Keys not in ``found`` are misses."""
        return self._batch("GET", {key: b"" for key in keys})

    def put_many(self, entries: Mapping[str, Entry], *, wait_for_completion: bool = True) -> TierResult:
        """PUT all entries' bytes concurrently, waiting at most ``deadline_s``.

        With ``wait_for_completion=False`` the batch runs on a background thread and this returns at
        once (a long-running server; on Lambda, threads freeze after the response, unless the
        after-response extension holds the freeze until :meth:`drain` returns).
        """
        if not entries:
            return TierResult()
        blobs = {key: entry.blob for key, entry in entries.items()}
        if wait_for_completion:
            return self._batch("PUT", blobs)
        result = TierResult()
        with self._lock:
            if self._queued >= MAX_QUEUED_WRITE_BATCHES:  # S3 slower than the requests: drop, stay bounded
                result.errors = len(entries)
            else:
                if self._background is None:
                    self._background = ThreadPoolExecutor(1, thread_name_prefix="clip-cache-s3-writer")
                try:
                    self._background.submit(self._background_batch, blobs)
                    self._queued += 1
                except RuntimeError:  # shut down
                    result.errors = len(entries)
        if result.errors:
            self.faults.fault(self.name, "PUT dropped: background writes are behind",
                              f"{MAX_QUEUED_WRITE_BATCHES} batches queued")
        return result

    def _background_batch(self, entries: dict[str, bytes]) -> None:
        try:
            self._batch("PUT", entries)
        finally:
            with self._lock:
                self._queued -= 1
                self._drained.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for queued background writes; True when none is left.

        For a post-response hook (e.g. a Lambda internal extension that delays its ``/event/next``
        until the writes are done) or a server's shutdown.
        """
        with self._lock:
            return self._drained.wait_for(lambda: self._queued == 0, timeout=timeout_s)

    def _batch(self, operation: Operation, entries: dict[str, bytes]) -> TierResult:
        result = TierResult()
        if not entries:
            return result
        breaker = self.breakers[operation]
        if not breaker.allow():
            result.skipped = "breaker-open"
            return result
        start = time.perf_counter()
        causes: Counter[str] = Counter()
        try:
            client, pool = self._ensure_ready()
        except Exception as exc:  # botocore missing, bad endpoint URL, no region...
            _, cause = describe_error(exc, operation)
            breaker.record_failure(cause)
            causes[f"client: {cause}"] += len(entries)
        else:
            futures: dict[Future[tuple[Outcome, bytes | str]], str] = {}
            try:
                for key, blob in entries.items():
                    if operation == "GET":
                        futures[pool.submit(self._get_one, client, key)] = key
                    else:
                        futures[pool.submit(self._put_one, client, key, blob)] = key
            except RuntimeError as exc:  # pool shut down (interpreter exit)
                causes[f"RuntimeError: {exc}"] += len(entries) - len(futures)
            done, pending = wait(futures, timeout=self.deadline_s)
            for future in pending:
                if not future.cancel():  # already running: report its cause when it ends
                    future.add_done_callback(functools.partial(self._late, operation))
            if pending:
                causes[f"no answer within {self.deadline_s:g} s"] += len(pending)
                breaker.record_failure(f"{operation} deadline of {self.deadline_s:g} s exceeded")
            for future in done:
                outcome, value = future.result()
                if outcome == "fault":
                    causes[str(value)] += 1
                    continue
                result.ok += 1
                if outcome == "hit" and isinstance(value, bytes):
                    result.found[futures[future]] = value
        result.errors = sum(causes.values())
        result.elapsed_ms = (time.perf_counter() - start) * 1000
        for cause, count in causes.items():
            self.faults.fault(self.name, f"{operation} {cause}",
                              f"bucket {self.bucket!r}, {count} of {len(entries)} key(s) in this batch")
        return result

    def _late(self, operation: Operation, future: Future[tuple[Outcome, bytes | str]]) -> None:
        outcome, value = future.result()
        if outcome == "fault" and isinstance(value, str):
            self.faults.fault(self.name, f"{operation} {value}", "answered after the request's deadline")

    def _breaker_changed(self, operation: Operation, old: State, new: State, reason: str) -> None:
        if new == "open":
            logger.warning("cache %s %s disabled for %g s (bucket %r): %s", self.name, operation,
                           self.breakers[operation].cooldown_s, self.bucket, reason)
        elif new == "closed":
            logger.info("cache %s %s enabled again (bucket %r): %s", self.name, operation, self.bucket, reason)

    def close(self, wait: bool = True) -> None:
        """Stop the worker threads (tests, server shutdown). Queued calls are cancelled; running ones
        end within botocore's timeouts, waited for if ``wait``."""
        with self._lock:
            pools = [p for p in (self._background, self._pool) if p is not None]
            self._pool = self._background = None
        for pool in pools:
            pool.shutdown(wait=wait, cancel_futures=True)
