"""S3 for bulk jobs: one client with patient retries, small JSON helpers, and what a failed GET means.

Unlike the cache's S3 tier (short timeouts: a request must not wait), a bulk job must not lose an object to
a transient fault: botocore's adaptive retry mode (backoff, and a client-side rate limit after throttling)
with up to 10 attempts. A fault that survives them fails the invocation with :class:`TransientS3Error`,
which the state machine retries with backoff; a missing or forbidden object is an answer, not a fault.

The endpoint comes from the environment as botocore reads it (``AWS_ENDPOINT_URL_S3``): a moto server or
any S3-compatible store for ``bulk-local``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MAX_ATTEMPTS = 10
# Error codes that mean "this object cannot be read", not "try again later".
MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
FORBIDDEN = frozenset({"AccessDenied", "403", "InvalidObjectState", "AllAccessDisabled"})


class TransientS3Error(RuntimeError):
    """S3 kept failing after every retry (throttling, 5xx, network): the state machine retries the shard."""


def client(pool: int = 32) -> S3Client:
    import boto3  # the Lambda runtime has it; imported here so that importing this module stays cheap
    from botocore.config import Config

    config = Config(retries={"mode": "adaptive", "total_max_attempts": MAX_ATTEMPTS},
                    max_pool_connections=pool, connect_timeout=5, read_timeout=60)
    s3: S3Client = boto3.session.Session().client("s3", config=config)
    return s3


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, else None."""
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        return str(response["Error"].get("Code", ""))
    return None


def is_missing(exc: BaseException) -> bool:
    return error_code(exc) in MISSING


def get_bytes(s3: S3Client, bucket: str, key: str) -> bytes | None:
    """The object's bytes, or None when it does not exist."""
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        if is_missing(exc):
            return None
        raise transient_or(exc, f"GET s3://{bucket}/{key}") from exc


def get_json(s3: S3Client, bucket: str, key: str) -> Any:
    """The parsed JSON object, or None when it does not exist."""
    data = get_bytes(s3, bucket, key)
    return None if data is None else json.loads(data)


def put_bytes(s3: S3Client, bucket: str, key: str, data: bytes, content_type: str) -> None:
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
    except Exception as exc:
        raise transient_or(exc, f"PUT s3://{bucket}/{key}") from exc


def put_json(s3: S3Client, bucket: str, key: str, value: Any) -> None:
    body = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    put_bytes(s3, bucket, key, body, "application/json")


def transient_or(exc: BaseException, what: str) -> Exception:
    """What to raise for a failed call of the job's own (not a source object's): access errors as they are
    (a misconfigured role: retrying does not help), everything else as :class:`TransientS3Error`."""
    code = error_code(exc)
    if code in FORBIDDEN:
        return PermissionError(f"{what}: {code} (does the function's role allow it?)")
    return TransientS3Error(f"{what}: {code or type(exc).__name__}: {str(exc)[:300]}")
