"""AWS stand-ins shared by the tests: moto in-process (``aws``), and S3 helpers for any endpoint, among them
moto's HTTP server (conftest's ``moto_server``). No test reaches AWS.

A pytest plugin (tests/conftest.py lists it in ``pytest_plugins``); the helpers are imported by name.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

REGION = "us-east-1"


@pytest.fixture
def aws() -> Iterator[None]:
    """moto in this process, for every boto3 client the test creates (moto sets fake credentials meanwhile)."""
    from moto import mock_aws

    with mock_aws():
        yield


def create_bucket(bucket: str, endpoint: str | None = None) -> None:
    """An empty bucket in moto: over HTTP at ``endpoint``, or in-process (inside ``aws``) when it is None."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket=bucket)


def s3_keys(bucket: str, endpoint: str | None = None, prefix: str = "") -> list[str]:
    """The keys in ``bucket`` under ``prefix`` (the first 1000, more than any test writes)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
