"""Reading the API key with one bounded retry policy, and the SnapStart hooks that renew what a restore makes stale.

Time is never measured here: a fake clock advances by each call's simulated latency and by each sleep, so
the assertions are about attempts, sleeps and the simulated total, which the policy bounds.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from botocore.stub import Stubber
from clip_serverless.aws_clients import forget_session
from clip_serverless.aws_lambda import snapstart
from clip_serverless.aws_lambda.secrets import (
    DEFAULT_RETRY,
    SECRET_VARIABLE,
    SSM_VARIABLE,
    ApiKey,
    ApiKeyConflict,
    ApiKeyUnavailable,
    RetryPolicy,
    _aws_client,
    resolve_api_key,
)
from clip_serverless.cache.s3 import S3Tier

REGION = "us-east-1"
PARAMETER = "/clip-serverless/api-key"
SECRET = "clip-serverless/api-key"


# ---- fakes ------------------------------------------------------------------------------------------
class FakeClock:
    """Monotonic time that moves only when a call takes time or the code sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def client_error(code: str, status: int, operation: str = "GetParameter") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} (test)"},
                        "ResponseMetadata": {"RequestId": "test", "HostId": "", "HTTPStatusCode": status,
                                             "HTTPHeaders": {}, "RetryAttempts": 0}}, operation)


class ScriptedClient:
    """An SSM / Secrets Manager client answering from a script; each call takes ``latency`` of fake time."""

    def __init__(self, clock: FakeClock, script: list[BaseException | str], latency: float = 0.02) -> None:
        self.clock = clock
        self.script = list(script)
        self.latency = latency
        self.calls = 0
        self.closed = False

    def _next(self) -> str:
        self.calls += 1
        self.clock.now += self.latency
        outcome = self.script.pop(0) if len(self.script) > 1 else self.script[0]  # the last one repeats
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def get_parameter(self, *, Name: str, WithDecryption: bool) -> dict[str, Any]:
        assert Name == PARAMETER and WithDecryption
        return {"Parameter": {"Name": Name, "Value": self._next()}}

    def get_secret_value(self, *, SecretId: str) -> dict[str, Any]:
        assert SecretId == SECRET
        return {"SecretString": self._next()}

    def close(self) -> None:
        self.closed = True


def read(env: dict[str, str], client: Any, clock: FakeClock, *, retry: RetryPolicy = DEFAULT_RETRY,
         uniform: Callable[[float, float], float] = lambda _a, b: b) -> str | None:
    """resolve_api_key with the client injected; by default every jittered sleep draws its cap (worst case)."""
    return resolve_api_key(env, retry=retry, client_factory=lambda _service, _retry: client, sleep=clock.sleep,
                           clock=clock, uniform=uniform)


def stubbed(service: Literal["ssm", "secretsmanager"]) -> tuple[Any, Stubber]:
    client = boto3.session.Session().client(service, region_name=REGION)
    return client, Stubber(client)


# ---- the bound ---------------------------------------------------------------------------------------
def test_the_worst_case_is_computed_from_the_policy_and_the_deadline_binds() -> None:
    policy = DEFAULT_RETRY
    assert policy.attempt_s == pytest.approx(1.5)  # 0.5 s connect + 1.0 s read
    assert [policy.delay_cap(i) for i in range(4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    # without the deadline: 5 attempts that all time out, plus every sleep at its cap
    unbounded = 5 * 1.5 + (0.1 + 0.2 + 0.4 + 0.8)
    assert unbounded == pytest.approx(9.0)
    assert policy.worst_case_s() == pytest.approx(3.0)  # the deadline binds
    assert RetryPolicy(attempts=1, deadline_s=10).worst_case_s() == pytest.approx(1.5)
    assert RetryPolicy(attempts=3, deadline_s=10).worst_case_s() == pytest.approx(3 * 1.5 + 0.1 + 0.2)


def test_the_aws_client_has_the_timeouts_and_no_retries_of_its_own() -> None:
    client = _aws_client("ssm", DEFAULT_RETRY)
    assert client.meta.config.connect_timeout == 0.5
    assert client.meta.config.read_timeout == 1.0
    assert client.meta.config.retries["total_max_attempts"] == 1  # the loop in secrets.py is the only policy


# ---- retries -----------------------------------------------------------------------------------------
def test_a_transient_throttle_then_success_reads_the_key() -> None:
    clock = FakeClock()
    client, stub = stubbed("ssm")
    params = {"Name": PARAMETER, "WithDecryption": True}
    stub.add_client_error("get_parameter", "ThrottlingException", "Rate exceeded", 400, expected_params=params)
    stub.add_response("get_parameter", {"Parameter": {"Name": PARAMETER, "Value": "k-1", "Type": "SecureString"}},
                      params)
    with stub:
        assert read({SSM_VARIABLE: PARAMETER}, client, clock) == "k-1"
        stub.assert_no_pending_responses()
    assert clock.sleeps == [0.1]


def test_persistent_throttling_gives_up_after_all_attempts_within_the_bound() -> None:
    clock = FakeClock()
    client, stub = stubbed("secretsmanager")
    for _ in range(DEFAULT_RETRY.attempts):
        stub.add_client_error("get_secret_value", "ThrottlingException", "Rate exceeded", 400)
    with stub, pytest.raises(ApiKeyUnavailable) as failure:
        read({SECRET_VARIABLE: SECRET}, client, clock)
    stub.assert_no_pending_responses()  # exactly 5 calls
    message = str(failure.value)
    assert SECRET_VARIABLE in message and "ThrottlingException" in message and "5 attempt" in message
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8])  # full jitter at its caps: the longest it sleeps


def test_throttling_sleeps_are_full_jitter_draws_below_each_cap() -> None:
    clock = FakeClock()
    draws: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        draws.append((a, b))
        return random.Random(len(draws)).uniform(a, b)

    client = ScriptedClient(clock, [client_error("ThrottlingException", 400)])
    with pytest.raises(ApiKeyUnavailable):
        read({SSM_VARIABLE: PARAMETER}, client, clock, uniform=uniform)
    assert client.calls == 5
    assert [a for a, _ in draws] == [0, 0, 0, 0]
    assert [b for _, b in draws] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert all(0 <= s <= b for s, (_, b) in zip(clock.sleeps, draws, strict=True))


def test_attempts_that_time_out_stop_at_the_deadline() -> None:
    clock = FakeClock()
    timeout = ReadTimeoutError(endpoint_url="https://ssm.us-east-1.amazonaws.com/")
    client = ScriptedClient(clock, [timeout], latency=DEFAULT_RETRY.attempt_s)  # each attempt uses its whole budget
    with pytest.raises(ApiKeyUnavailable, match="ReadTimeoutError on all 2 attempt"):
        read({SSM_VARIABLE: PARAMETER}, client, clock)
    # 1.5 s attempt, the 0.1 s sleep cut to 0 so a second whole attempt fits, 1.5 s attempt: 3.0 s, no third
    assert client.calls == 2 and clock.sleeps == [0.0]
    assert clock.now <= DEFAULT_RETRY.deadline_s + 1e-9


@pytest.mark.parametrize("latency", [0.0, 0.05, 0.3, 0.7, 1.0, 1.5])
def test_the_total_never_exceeds_the_computed_bound(latency: float) -> None:
    clock = FakeClock()
    client = ScriptedClient(clock, [client_error("ThrottlingException", 400)], latency=latency)
    with pytest.raises(ApiKeyUnavailable):
        read({SSM_VARIABLE: PARAMETER}, client, clock)
    assert clock.now <= DEFAULT_RETRY.worst_case_s() + 1e-9
    assert client.calls <= DEFAULT_RETRY.attempts


@pytest.mark.parametrize("error", [
    client_error("InternalServerError", 500),
    client_error("ServiceUnavailable", 503),
    EndpointConnectionError(endpoint_url="https://ssm.us-east-1.amazonaws.com/"),
    ReadTimeoutError(endpoint_url="https://ssm.us-east-1.amazonaws.com/"),
], ids=["500", "503", "connection", "read-timeout"])
def test_5xx_and_connection_errors_are_retried(error: BaseException) -> None:
    clock = FakeClock()
    client = ScriptedClient(clock, [error, "k-2"])
    assert read({SSM_VARIABLE: PARAMETER}, client, clock) == "k-2"
    assert client.calls == 2 and len(clock.sleeps) == 1


def test_a_missing_parameter_fails_at_once_naming_the_variable() -> None:
    clock = FakeClock()
    client, stub = stubbed("ssm")
    stub.add_client_error("get_parameter", "ParameterNotFound", "", 400)
    with stub, pytest.raises(ApiKeyUnavailable, match=f"SSM parameter {PARAMETER} \\({SSM_VARIABLE}\\)"):
        read({SSM_VARIABLE: PARAMETER}, client, clock)
    stub.assert_no_pending_responses()
    assert clock.sleeps == []


@pytest.mark.parametrize("error", [
    client_error("ResourceNotFoundException", 400, "GetSecretValue"),
    client_error("AccessDeniedException", 400, "GetSecretValue"),
    client_error("DecryptionFailure", 400, "GetSecretValue"),
    NoCredentialsError(),
], ids=["not-found", "access-denied", "kms", "no-credentials"])
def test_errors_waiting_cannot_fix_are_not_retried(error: BaseException) -> None:
    clock = FakeClock()
    client = ScriptedClient(clock, [error, "never read"])
    with pytest.raises(ApiKeyUnavailable, match=SECRET_VARIABLE):
        read({SECRET_VARIABLE: SECRET}, client, clock)
    assert client.calls == 1 and clock.sleeps == []


def test_the_client_is_closed_after_the_read() -> None:
    clock = FakeClock()
    ok = ScriptedClient(clock, ["k"])
    assert read({SECRET_VARIABLE: SECRET}, ok, clock) == "k" and ok.closed
    failing = ScriptedClient(clock, [client_error("AccessDeniedException", 400)])
    with pytest.raises(ApiKeyUnavailable):
        read({SECRET_VARIABLE: SECRET}, failing, clock)
    assert failing.closed


def test_botocore_is_imported_only_when_a_store_is_configured() -> None:
    code = ("import sys\n"
            "from clip_serverless.aws_lambda.secrets import ApiKey, resolve_api_key\n"
            "assert resolve_api_key({}) is None and resolve_api_key({'CLIP_API_KEY': 'k'}) == 'k'\n"
            "assert ApiKey.from_env({'CLIP_API_KEY': 'k'}).get() == 'k'\n"
            "import clip_serverless.aws_lambda.snapstart\n"
            "print(sorted(m for m in ('boto3', 'botocore') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


# ---- the key holder ----------------------------------------------------------------------------------
def test_a_fixed_or_absent_key_is_not_refreshable_and_never_shown() -> None:
    assert ApiKey().get() is None and not ApiKey().refreshable
    fixed = ApiKey("s3cret")
    assert fixed.get() == "s3cret" and fixed.refresh() is False
    assert "s3cret" not in repr(fixed)
    assert ApiKey.from_env({"CLIP_API_KEY": "direct", SSM_VARIABLE: PARAMETER}).get() == "direct"


def test_refresh_reads_the_rotated_key_and_fails_closed(aws: None) -> None:
    sm = boto3.client("secretsmanager", region_name=REGION)
    sm.create_secret(Name=SECRET, SecretString="old-key")
    holder = ApiKey.from_env({SECRET_VARIABLE: SECRET})
    assert holder.refreshable and holder.get() == "old-key"
    assert holder.refresh() is False
    sm.put_secret_value(SecretId=SECRET, SecretString="new-key")
    assert holder.refresh() is True and holder.get() == "new-key"
    sm.delete_secret(SecretId=SECRET, ForceDeleteWithoutRecovery=True)
    with pytest.raises(ApiKeyUnavailable, match=SECRET_VARIABLE):
        holder.refresh()
    with pytest.raises(ApiKeyUnavailable, match="could not be re-read"):
        holder.get()  # neither the old key nor None (an open API)
    sm.create_secret(Name=SECRET, SecretString="newer-key")
    assert holder.refresh() is True and holder.get() == "newer-key"


def test_a_background_read_is_waited_for_and_its_failure_raised_by_wait(aws: None) -> None:
    boto3.client("secretsmanager", region_name=REGION).create_secret(Name=SECRET, SecretString="k-init")
    holder = ApiKey.from_env({SECRET_VARIABLE: SECRET}, background=True)
    holder.wait()
    assert holder.get() == "k-init" and holder.refreshable
    missing = ApiKey.from_env({SECRET_VARIABLE: "absent"}, background=True)
    with pytest.raises(ApiKeyUnavailable, match=SECRET_VARIABLE):
        missing.wait()  # Lambda init's end: the function fails its init
    with pytest.raises(ApiKeyUnavailable, match="could not be read"):
        missing.get()  # and a request would never find an open API
    with pytest.raises(ApiKeyConflict):  # a bad configuration is raised at once, not in the thread
        ApiKey.from_env({SECRET_VARIABLE: SECRET, SSM_VARIABLE: PARAMETER}, background=True)
    assert ApiKey.from_env({"CLIP_API_KEY": "direct"}, background=True).get() == "direct"


def test_get_waits_for_a_background_read_instead_of_answering_open() -> None:
    class SlowStore:
        def get_secret_value(self, *, SecretId: str) -> dict[str, Any]:
            time.sleep(0.2)
            return {"SecretString": "slow-key"}

        def close(self) -> None: ...

    holder = ApiKey.from_env({SECRET_VARIABLE: SECRET}, background=True,
                             client_factory=lambda _service, _retry: SlowStore())
    assert holder.get() == "slow-key"


def test_the_holder_pins_the_variables_it_was_built_from(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3.client("ssm", region_name=REGION).put_parameter(Name=PARAMETER, Value="from-ssm", Type="SecureString")
    monkeypatch.setenv(SSM_VARIABLE, PARAMETER)
    holder = ApiKey.from_env()
    monkeypatch.setenv("CLIP_API_KEY", "later")  # the environment changing afterwards does not matter
    holder.refresh()
    assert holder.get() == "from-ssm"


# ---- the hook registry -------------------------------------------------------------------------------
@pytest.fixture
def local_hooks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Off Lambda: the runtime module absent (even if some package installed it), the local registry empty."""
    monkeypatch.setitem(sys.modules, snapstart.SNAPSHOT_RESTORE_MODULE, None)
    snapstart.clear_local_hooks()
    yield
    snapstart.clear_local_hooks()


def test_local_hooks_run_in_the_runtime_s_order(local_hooks: None) -> None:
    calls: list[str] = []
    assert snapstart.runtime_hooks() is None
    for name in ("a", "b"):
        snapstart.register_before_snapshot(calls.append, f"before-{name}")
        snapstart.register_after_restore(calls.append, f"after-{name}")
    snapstart.run_before_snapshot()
    snapstart.run_after_restore()
    assert calls == ["before-b", "before-a", "after-a", "after-b"]


def test_hooks_go_to_lambda_s_module_when_it_is_there(local_hooks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = types.ModuleType(snapstart.SNAPSHOT_RESTORE_MODULE)
    registered: dict[str, list[tuple[Any, ...]]] = {"before": [], "after": []}

    def register(kind: str) -> Callable[..., Any]:
        def add(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
            registered[kind].append((func, args, kwargs))
            return func
        return add

    runtime.register_before_snapshot = register("before")  # type: ignore[attr-defined]
    runtime.register_after_restore = register("after")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, snapstart.SNAPSHOT_RESTORE_MODULE, runtime)

    def renew_lambda_client() -> None: ...

    assert snapstart.register_after_restore(renew_lambda_client) is renew_lambda_client  # usable as a decorator
    names = snapstart.install()
    assert registered["after"][0] == (renew_lambda_client, (), {})
    assert [f for f, _, _ in registered["after"][1:]] == [snapstart.reseed_random, snapstart.renew_instance_id,
                                                          forget_session]
    assert names == ["reseed_random", "renew_instance_id", "forget_session"]
    assert snapstart.local_hooks() == ([], [])  # nothing kept locally: the runtime runs them, once


def test_restored_copies_of_one_snapshot_draw_different_random_numbers(local_hooks: None) -> None:
    import numpy as np

    snapstart.install()
    random.seed(7)
    np.random.seed(7)
    snapshot = random.getstate(), np.random.get_state()

    def restore_and_draw(run_hooks: bool) -> tuple[float, float]:
        random.setstate(snapshot[0])
        np.random.set_state(snapshot[1])
        if run_hooks:
            snapstart.run_after_restore()
        return random.random(), float(np.random.random())

    assert restore_and_draw(False) == restore_and_draw(False)  # what SnapStart does without the hook
    first, second = restore_and_draw(True), restore_and_draw(True)
    assert first[0] != second[0] and first[1] != second[1]


# ---- the S3 tier's client ----------------------------------------------------------------------------
class FakeS3:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_renew_replaces_a_created_client_and_closes_the_old_one() -> None:
    made: list[FakeS3] = []

    def factory() -> FakeS3:
        made.append(FakeS3())
        return made[-1]

    tier = S3Tier("bucket", client_factory=factory)
    assert tier.renew() is False and made == []  # never created: stays lazy
    tier.prepare()
    old = tier.client
    assert tier.renew() is True
    assert tier.client is made[-1] is not old and old.closed and len(made) == 2
    tier.close()


def test_renew_never_raises_and_leaves_the_client_to_first_use() -> None:
    attempts: Iterator[FakeS3 | Exception] = iter([FakeS3(), RuntimeError("no region"), FakeS3()])

    def factory() -> FakeS3:
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    tier = S3Tier("bucket", client_factory=factory)
    tier.prepare()
    assert tier.renew() is True  # the new client failed: logged as a fault, not raised
    assert isinstance(tier.client, FakeS3)  # created at first use
    tier.close()


# ---- a restore, end to end through the app -----------------------------------------------------------
def test_a_simulated_restore_renews_the_key_the_s3_client_the_instance_id(
        aws: None, local_hooks: None, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clip_serverless.api.app import build
    from clip_serverless.settings import Settings
    from fastapi.testclient import TestClient

    sm = boto3.client("secretsmanager", region_name=REGION)
    sm.create_secret(Name=SECRET, SecretString="old-key")
    boto3.client("s3", region_name=REGION).create_bucket(Bucket="cache")
    for name, value in {"CLIP_MODEL_DIR": str(tiny_model_path), SECRET_VARIABLE: SECRET, "CLIP_CACHE": "on",
                        "CLIP_CACHE_BUCKET": "cache", "CLIP_CACHE_S3_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CLIP_API_KEY", raising=False)
    monkeypatch.delenv(SSM_VARIABLE, raising=False)

    # init, as the Lambda entry does it
    settings = Settings.from_env()
    app = build(settings, endpoints=("embed_text",))
    service = app.state.service
    service.cache.preload(("image", "text"))
    names = snapstart.install(settings=settings, service=service)
    assert names == ["reseed_random", "renew_instance_id", "forget_session", "renew_clients", "refresh_api_key"]
    s3_client = service.cache.tier("s3").client

    body = {"text": ["a photo of a red circle."]}
    with TestClient(app, raise_server_exceptions=False) as c:
        def status(key: str | None) -> int:
            return int(c.post("/clip/embed_text", json={**body, "api_key": key}).status_code)

        uuid_before = c.get("/info").json()["uuid"]
        assert (status("old-key"), status(None)) == (200, 401)
        sm.put_secret_value(SecretId=SECRET, SecretString="new-key")  # rotated while the snapshot sleeps
        assert status("new-key") == 401  # no read per request: only a restore (or a cold start) re-reads

        snapstart.run_after_restore()  # what Lambda's runtime does on restore
        assert (status("new-key"), status("old-key"), status(None)) == (200, 401, 401)
        assert service.cache.tier("s3").client is not s3_client
        assert c.get("/info").json()["uuid"] != uuid_before

        # the store is unreadable at the next restore: the restore fails, and nothing is served meanwhile
        sm.delete_secret(SecretId=SECRET, ForceDeleteWithoutRecovery=True)
        with pytest.raises(ApiKeyUnavailable, match=SECRET_VARIABLE):
            snapstart.run_after_restore()
        assert (status("new-key"), status(None)) == (500, 500)
    service.cache.close()
