"""The API key from AWS Secrets Manager or Parameter Store, read at Lambda init (and again after a SnapStart restore).

| variable | meaning |
|---|---|
| ``CLIP_API_KEY`` | the key itself (local use, tests); wins over the two below |
| ``CLIP_API_KEY_SECRET_ID`` | name or ARN of a Secrets Manager secret whose ``SecretString`` is the key |
| ``CLIP_API_KEY_SSM_PARAMETER`` | name of an SSM parameter (``SecureString``) holding the key |

**Which store.** Every cold start reads the key once, so a burst of cold starts is a burst of reads.
Secrets Manager's ``GetSecretValue`` allows 10,000 requests/s per account and Region: prefer it. SSM's
``GetParameter`` allows 40/s per account and Region at standard throughput, shared with everything else in
the account (deploy tooling, other services): a burst of a few dozen cold starts is throttled. Use SSM only
with the higher-throughput setting (``aws ssm update-service-setting --setting-id
/ssm/parameter-store/high-throughput-enabled --setting-value true``, up to 10,000/s, billed per call).

**One bounded retry policy** (:class:`RetryPolicy`, :data:`DEFAULT_RETRY`) so that a throttled read cannot
push init towards Lambda's 10 s init limit (nor the after-restore hooks past their 10 s):

- botocore's own retries are off (``total_max_attempts=1``); each attempt has a connect timeout (0.5 s, TCP
  and TLS) and a read timeout (1.0 s), so one attempt ends within ``attempt_s`` = 1.5 s;
- retried: throttling error codes, HTTP 5xx, and connection errors/timeouts. Everything else
  (``AccessDenied*``, ``ParameterNotFound``, ``ResourceNotFoundException``, ``DecryptionFailure``, no
  credentials, no region...) fails at once with a message naming the variable: waiting cannot fix it;
- between attempts a *full jitter* sleep, uniform in [0, min(1.0, 0.1 * 2**retry)] s, drawn from the OS
  (``random.SystemRandom``: environments restored from one SnapStart snapshot share ``random``'s state and
  would otherwise retry in lockstep);
- a hard deadline of ``deadline_s`` = 3 s from the start of the read (client creation included): an attempt
  starts only when a whole ``attempt_s`` still fits before it, and the sleep before it is shortened to fit.

**Worst case** (:meth:`RetryPolicy.worst_case_s`): ``min(deadline_s, attempts * attempt_s + sum of the sleep
caps)`` = min(3.0, 5 * 1.5 + (0.1 + 0.2 + 0.4 + 0.8)) = min(3.0, 9.0) = **3.0 s**, plus the one-time
botocore import and session (~120 ms) on the first read. It assumes each attempt ends within its timeouts: botocore's
read timeout applies per socket read (a ``GetParameter`` answer is a few hundred bytes, one read) and DNS lookups
are not covered by the connect timeout (Lambda's resolver is local). Throttling answers take milliseconds,
so under a throttling burst all 5 attempts run and the read gives up after at most ~1.5 s of sleeps.

botocore is imported only when a store is configured (:mod:`clip_serverless.aws_clients`), the client is closed
after the read (no pooled connection goes into a SnapStart snapshot), and a key that cannot be read fails
with :class:`ApiKeyUnavailable`: an API meant to be protected must never start open.

**Renewal.** :class:`ApiKey` holds the key the routes check (``Settings.api_key`` reads it per request).
:meth:`ApiKey.refresh` re-reads the store; :mod:`clip_serverless.aws_lambda.snapstart` calls it after a restore, since
the key may have been rotated since the snapshot was taken. A failed refresh fails closed: the holder then
refuses every request (:meth:`ApiKey.get` raises) and the error propagates, so Lambda's runtime reports the
restore as failed and discards the environment.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..envparse import SettingsError

DIRECT_VARIABLE = "CLIP_API_KEY"
SSM_VARIABLE = "CLIP_API_KEY_SSM_PARAMETER"
SECRET_VARIABLE = "CLIP_API_KEY_SECRET_ID"  # noqa: S105 (a variable name, not a secret)
VARIABLES = (DIRECT_VARIABLE, SSM_VARIABLE, SECRET_VARIABLE)

logger = logging.getLogger("clip_serverless.api")

# Throttling as AWS services spell it (botocore's standard retry mode uses the same list).
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "TransactionInProgressException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled",
    "SlowDown", "PriorRequestNotComplete", "EC2ThrottledException",
})


class ApiKeyUnavailable(RuntimeError):
    """The configured parameter or secret could not be read, or is empty."""


class ApiKeyConflict(SettingsError, ApiKeyUnavailable):
    """Both stores are named: a bad configuration (a :class:`SettingsError`, which stops start-up) that leaves
    no key to read (an :class:`ApiKeyUnavailable` to those who read the key)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How reads of the key are retried; see the module docstring for the bound."""

    attempts: int = 5
    connect_timeout_s: float = 0.5
    read_timeout_s: float = 1.0
    base_delay_s: float = 0.1
    max_delay_s: float = 1.0
    deadline_s: float = 3.0

    @property
    def attempt_s(self) -> float:
        """The longest one attempt takes: botocore's connect timeout, then its read timeout."""
        return self.connect_timeout_s + self.read_timeout_s

    def delay_cap(self, retry: int) -> float:
        """Upper end of the full-jitter sleep before retry number ``retry`` (0 for the first retry)."""
        return float(min(self.max_delay_s, self.base_delay_s * 2**retry))

    def worst_case_s(self) -> float:
        """The longest a read can take (excluding the botocore import): every attempt times out, every sleep
        draws its cap, and the deadline cuts it short."""
        unbounded = self.attempts * self.attempt_s + sum(self.delay_cap(i) for i in range(self.attempts - 1))
        return min(self.deadline_s, unbounded)


DEFAULT_RETRY = RetryPolicy()
KeyStore = Literal["ssm", "secretsmanager"]  # the AWS service names of the two key stores
ClientFactory = Callable[[KeyStore, RetryPolicy], Any]  # (service name, policy) -> a botocore client
_SYSTEM_RANDOM = random.SystemRandom()


def resolve_api_key(environ: Mapping[str, str] | None = None, *, retry: RetryPolicy = DEFAULT_RETRY,
                    client_factory: ClientFactory | None = None, sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic,
                    uniform: Callable[[float, float], float] = _SYSTEM_RANDOM.uniform) -> str | None:
    """The key from ``CLIP_API_KEY``, else from Secrets Manager or SSM, else None (the API is open).

    ``client_factory``, ``sleep``, ``clock`` and ``uniform`` are for tests (a stubbed client, a fake clock).
    """
    env = os.environ if environ is None else environ
    direct = env.get(DIRECT_VARIABLE, "")
    if direct:
        return direct
    parameter = env.get(SSM_VARIABLE, "").strip()
    secret_id = env.get(SECRET_VARIABLE, "").strip()
    if parameter and secret_id:
        raise ApiKeyConflict(f"set one of {SSM_VARIABLE} and {SECRET_VARIABLE}, not both")
    if not parameter and not secret_id:
        return None
    service: KeyStore
    if parameter:
        service, source, what = "ssm", f"{SSM_VARIABLE}={parameter}", f"SSM parameter {parameter} ({SSM_VARIABLE})"

        def call(client: Any) -> str | None:
            value: str | None = client.get_parameter(Name=parameter, WithDecryption=True).get(
                "Parameter", {}).get("Value")
            return value
    else:
        service, source = "secretsmanager", f"{SECRET_VARIABLE}={secret_id}"
        what = f"secret {secret_id} ({SECRET_VARIABLE})"

        def call(client: Any) -> str | None:
            value: str | None = client.get_secret_value(SecretId=secret_id).get("SecretString")
            return value

    value = _read_with_retries(service, what, call, retry=retry, client_factory=client_factory or _aws_client,
                               sleep=sleep, clock=clock, uniform=uniform)
    return _non_empty(value, source)


def _non_empty(value: str | None, source: str) -> str:
    if not value or not value.strip():
        raise ApiKeyUnavailable(f"the API key from {source} is empty")
    return value.strip()


def _aws_client(service: KeyStore, retry: RetryPolicy) -> Any:
    from botocore.config import Config  # here, not at the top: only a function with a key store pays for botocore

    from ..aws_clients import client

    config = Config(connect_timeout=retry.connect_timeout_s, read_timeout=retry.read_timeout_s,
                    retries={"total_max_attempts": 1, "mode": "standard"})  # our loop is the only retry policy
    return client(service, config=config)


def is_retryable(exc: BaseException) -> bool:
    """Throttling, a 5xx, or a connection error / timeout: worth another attempt. Nothing else is."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return error.get("Code") in THROTTLING_CODES or (isinstance(status, int) and status >= 500)
    # EndpointConnectionError, ConnectTimeoutError (ConnectionError); ReadTimeoutError, ConnectionClosedError
    # (HTTPClientError). Not: NoCredentialsError, NoRegionError, ParamValidationError...
    return isinstance(exc, BotoConnectionError | HTTPClientError)


def _describe(exc: BaseException) -> str:
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        return str(response["Error"].get("Code", type(exc).__name__))
    return type(exc).__name__


def _read_with_retries(service: KeyStore, what: str, call: Callable[[Any], str | None], *, retry: RetryPolicy,
                       client_factory: ClientFactory, sleep: Callable[[float], None], clock: Callable[[], float],
                       uniform: Callable[[float, float], float]) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError

    start = clock()
    try:
        client = client_factory(service, retry)
    except (BotoCoreError, ClientError, ValueError) as exc:  # no region, bad endpoint URL...
        raise ApiKeyUnavailable(f"could not read {what}: {exc}") from None
    try:
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(client)
            except (BotoCoreError, ClientError) as exc:
                if not is_retryable(exc):
                    raise ApiKeyUnavailable(f"could not read {what}: {exc}") from None
                last: BaseException = exc
            elapsed = clock() - start
            room = retry.deadline_s - elapsed - retry.attempt_s  # what may be slept with a whole attempt after it
            if attempt >= retry.attempts or room < 0:
                break
            delay = min(uniform(0.0, retry.delay_cap(attempt - 1)), room)
            logger.warning("reading %s: %s on attempt %d, retrying in %.2f s", what, _describe(last), attempt, delay)
            sleep(delay)
        raise ApiKeyUnavailable(
            f"could not read {what}: {_describe(last)} on all {attempt} attempt(s) within {elapsed:.2f} s "
            f"(limit {retry.deadline_s:g} s): {last}") from None
    finally:
        close = getattr(client, "close", None)  # no pooled connection should outlive the read (or go into a snapshot)
        if callable(close):
            with contextlib.suppress(Exception):  # best effort: the read's outcome stands
                close()


class ApiKey:
    """The key requests must present, renewable in place. Thread-safe.

    ``get()`` is None when no key is configured (the API is open), the key otherwise. After a failed
    :meth:`refresh` it raises :class:`ApiKeyUnavailable` until a refresh succeeds: it never falls back to
    an old key, nor to None.
    """

    def __init__(self, value: str | None = None, *, reader: Callable[[], str | None] | None = None) -> None:
        self._state: tuple[str | None, str | None] = (value, None)  # (key, failure): swapped as one object
        self._reader = reader
        self._lock = threading.Lock()
        self._first_read: threading.Thread | None = None  # from_env(background=True): the read under way
        self._first_error: BaseException | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, background: bool = False,
                 **read_options: Any) -> ApiKey:
        """Read the key now (raises :class:`ApiKeyUnavailable`), and keep how to read it again.

        ``background`` (Lambda init): a key in a store is read in a thread, so init goes on meanwhile (the
        botocore import, the client and the network round trip: ~150 ms); :meth:`wait` joins it and raises
        what the read raised, and :meth:`get` waits for it too. A key given directly is taken at once."""
        env = os.environ if environ is None else environ
        pinned = {name: env[name] for name in VARIABLES if name in env}
        reader = functools.partial(resolve_api_key, pinned, **read_options)
        stores = [name for name in (SSM_VARIABLE, SECRET_VARIABLE) if pinned.get(name, "").strip()]
        if not background or pinned.get(DIRECT_VARIABLE) or len(stores) != 1:  # nothing to wait for, or a conflict
            return cls(reader(), reader=reader)
        holder = cls(None, reader=reader)
        holder._first_read = threading.Thread(target=holder._read_first, name="api-key", daemon=True)
        holder._first_read.start()
        return holder

    def _read_first(self) -> None:
        assert self._reader is not None
        try:
            self._state = (self._reader(), None)
        except BaseException as exc:  # re-raised by wait(), in init's thread
            self._first_error = exc
            self._state = (None, f"the API key could not be read: {exc}")

    def wait(self) -> None:
        """Wait for a read started by ``from_env(background=True)``; raise its error (init must then fail)."""
        if self._first_read is not None:
            self._first_read.join()
        if self._first_error is not None:
            raise self._first_error

    @property
    def refreshable(self) -> bool:
        """Whether :meth:`refresh` reads a store (False for a fixed key or an open API)."""
        return self._reader is not None

    def get(self) -> str | None:
        if self._first_read is not None and self._first_read.is_alive():
            self._first_read.join()
        value, failure = self._state
        if failure is not None:
            raise ApiKeyUnavailable(failure)
        return value

    def refresh(self) -> bool:
        """Re-read the key; True when it changed. On failure the holder refuses every request, and raises."""
        if self._reader is None:
            return False
        with self._lock:
            old = self._state[0]
            try:
                value = self._reader()
            except ApiKeyUnavailable as exc:
                self._state = (None, f"the API key could not be re-read: {exc}")
                raise
            self._state = (value, None)
        return value != old

    def __repr__(self) -> str:  # never the key
        value, failure = self._state
        state = "unavailable" if failure else ("required" if value else "open")
        return f"ApiKey({state}, refreshable={self.refreshable})"
