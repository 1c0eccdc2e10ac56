"""The template's bulk state machine in moto's Step Functions interpreter, the functions served in process.

moto (5.x, ``execute_state_machine``) interprets the definition, Distributed Map included, and invokes Lambda
through its own Lambda backend, which would start a Docker container; ``LambdaFunction._invoke_lambda`` is
replaced here by a call of the handler in this process (on the interpreter's thread: children run
concurrently, as on AWS). S3 is moto's in-process S3, or the endpoint ``AWS_ENDPOINT_URL_S3`` names (boto3
reads it, the interpreter's own clients included), e.g. a moto server.

What moto 5.2.5's interpreter does not do as AWS does (measured; the README lists them): it ignores
ToleratedFailurePercentage (a Map run with failed items succeeds), its ResultWriter writes an empty manifest,
and it rejects ItemBatcher (unused here). What this definition relies on runs: the Choice loop around the
planner, ItemReader over ``s3:getObject`` JSON, ItemSelector, MaxConcurrencyPath, Retry, Catch, and
ListMapRuns/DescribeMapRun for the progress bar.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from unittest import mock

from .definition import FUNCTIONS, definition

Handler = Callable[[Any, Any], dict[str, Any]]
NAMES = {"BulkJobFunction": "bulk-job", "BulkEmbedImageFunction": "bulk-embed-image",
         "BulkEmbedTextFunction": "bulk-embed-text"}
REGION = "us-east-1"


@dataclass
class LambdaContext:
    """What the handlers read of Lambda's context: the time left (a planner checkpoints before it ends)."""

    timeout_s: float
    started: float

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self.started)) * 1000))


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("app.py", "handler = None  # served in process by bulk_cli.local_sfn\n")
    return buffer.getvalue()


class LocalStateMachine:
    """The bulk state machine on moto: ``start(job_input)`` then ``wait(arn)`` (or the watcher)."""

    def __init__(self, handlers: Mapping[str, Handler], *, timeouts: Mapping[str, float] | None = None,
                 results: tuple[str, str] = ("bulk-results", "_sfn-results")) -> None:
        """``handlers``: logical id (BulkJobFunction, ...) -> handler; ``timeouts``: seconds each invocation
        may run, as the function's Timeout (default 900), which the planner's checkpoints follow;
        ``results``: the ResultWriter's (bucket, prefix), as the template's BulkDestination* parameters."""
        import boto3

        self.handlers = dict(handlers)
        self.timeouts = dict(timeouts or {})
        self.calls: list[tuple[str, Any]] = []
        # Unique names: moto's backends outlive this object when it shares them with a server in this process.
        suffix = uuid.uuid4().hex[:8]
        self.names = {f"{name}-{suffix}": logical for logical, name in NAMES.items()}
        iam = boto3.client("iam", region_name=REGION)
        role = iam.create_role(RoleName=f"bulk-{suffix}", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        lam = boto3.client("lambda", region_name=REGION)
        arns = {}
        for name, logical in self.names.items():
            arns[logical] = lam.create_function(FunctionName=name, Runtime="python3.12", Role=role,
                                                Handler="app.handler", Code={"ZipFile": _zip()})["FunctionArn"]
        self.sfn = boto3.client("stepfunctions", region_name=REGION)
        self.arn = self.sfn.create_state_machine(name=f"bulk-embed-{suffix}", definition=definition(arns, results),
                                                 roleArn=role)["stateMachineArn"]

    def invoke(self, function_name: str, event: Any) -> tuple[str, bool, str]:
        """What replaces moto's ``_invoke_lambda``: (payload, errored, logs), as Lambda would answer."""
        logical = self.names[function_name]
        parsed = json.loads(event) if isinstance(event, str) else event
        self.calls.append((logical, parsed))
        handler = self.handlers.get(logical)
        if handler is None:
            return json.dumps({"errorType": "ResourceNotFound", "errorMessage": f"{logical} is not served"}), True, ""
        context = LambdaContext(self.timeouts.get(logical, 900.0), time.monotonic())
        try:
            return json.dumps(handler(parsed, context)), False, ""
        except Exception as exc:  # Lambda's answer for an unhandled exception: errorType is the class name
            return json.dumps({"errorType": type(exc).__name__, "errorMessage": str(exc)}), True, ""

    def start(self, job_input: dict[str, Any], name: str | None = None) -> str:
        return self.sfn.start_execution(stateMachineArn=self.arn, name=name or f"job-{uuid.uuid4().hex[:12]}",
                                        input=json.dumps(job_input))["executionArn"]

    def wait(self, execution_arn: str, timeout_s: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            described: dict[str, Any] = dict(self.sfn.describe_execution(executionArn=execution_arn))
            if described["status"] != "RUNNING":
                return described
            if time.monotonic() > deadline:
                raise TimeoutError(f"{execution_arn} still running after {timeout_s} s")
            time.sleep(0.05)


@contextlib.contextmanager
def local_state_machine(handlers: Mapping[str, Handler], *, timeouts: Mapping[str, float] | None = None,
                        results: tuple[str, str] = ("bulk-results", "_sfn-results"),
                        mock_aws: bool = True) -> Iterator[LocalStateMachine]:
    """moto with the state machine interpreter on (``mock_aws``: unless the caller already mocks AWS), and
    Lambda invocations served by ``handlers``."""
    import moto.awslambda.models as lambda_models
    from moto import mock_aws as moto_mock

    machine: list[LocalStateMachine] = []

    def invoke(function: Any, event: Any = None) -> tuple[str, bool, str]:
        return machine[0].invoke(function.function_name, event if event is not None else {})

    # reset=False, remove_data=False: a moto server in this process shares moto's backends, and must keep
    # its buckets (the S3 of the job, when AWS_ENDPOINT_URL_S3 names it).
    mocked = moto_mock(config={"stepfunctions": {"execute_state_machine": True}}) if mock_aws else None
    if mocked is not None:
        mocked.start(reset=False)
    try:
        with mock.patch.object(lambda_models.LambdaFunction, "_invoke_lambda", invoke):
            machine.append(LocalStateMachine(handlers, timeouts=timeouts, results=results))
            yield machine[0]
    finally:
        if mocked is not None:
            mocked.stop(remove_data=False)


__all__ = ["FUNCTIONS", "LambdaContext", "LocalStateMachine", "local_state_machine"]
