"""The API key from AWS Parameter Store or Secrets Manager, read once per process (at Lambda init).

| variable | meaning |
|---|---|
| ``CLIP_API_KEY`` | the key itself (local use, tests); wins over the two below |
| ``CLIP_API_KEY_SSM_PARAMETER`` | name of an SSM parameter (``SecureString``) holding the key |
| ``CLIP_API_KEY_SECRET_ID`` | name or ARN of a Secrets Manager secret whose ``SecretString`` is the key |

boto3 is imported only when one of the last two is set (it costs ~140 ms of cold start), and a key
that cannot be read fails init with a message naming the variable: an API meant to be protected
must never start open.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SSM_VARIABLE = "CLIP_API_KEY_SSM_PARAMETER"
SECRET_VARIABLE = "CLIP_API_KEY_SECRET_ID"  # noqa: S105 (a variable name, not a secret)


class ApiKeyUnavailable(RuntimeError):
    """The configured parameter or secret could not be read, or is empty."""


def resolve_api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The key from ``CLIP_API_KEY``, else from SSM or Secrets Manager, else None (the API is open)."""
    env = os.environ if environ is None else environ
    direct = env.get("CLIP_API_KEY", "")
    if direct:
        return direct
    parameter = env.get(SSM_VARIABLE, "").strip()
    secret_id = env.get(SECRET_VARIABLE, "").strip()
    if parameter and secret_id:
        raise ApiKeyUnavailable(f"set one of {SSM_VARIABLE} and {SECRET_VARIABLE}, not both")
    if parameter:
        return _non_empty(_from_ssm(parameter), f"{SSM_VARIABLE}={parameter}")
    if secret_id:
        return _non_empty(_from_secrets_manager(secret_id), f"{SECRET_VARIABLE}={secret_id}")
    return None


def _non_empty(value: str | None, source: str) -> str:
    if not value or not value.strip():
        raise ApiKeyUnavailable(f"the API key from {source} is empty")
    return value.strip()


def _from_ssm(name: str) -> str | None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        answer = boto3.client("ssm").get_parameter(Name=name, WithDecryption=True)
    except (BotoCoreError, ClientError) as exc:
        raise ApiKeyUnavailable(f"could not read SSM parameter {name} ({SSM_VARIABLE}): {exc}") from None
    value: str | None = answer.get("Parameter", {}).get("Value")
    return value


def _from_secrets_manager(secret_id: str) -> str | None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        answer = boto3.client("secretsmanager").get_secret_value(SecretId=secret_id)
    except (BotoCoreError, ClientError) as exc:
        raise ApiKeyUnavailable(f"could not read secret {secret_id} ({SECRET_VARIABLE}): {exc}") from None
    value: str | None = answer.get("SecretString")
    return value
