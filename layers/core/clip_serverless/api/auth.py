"""The optional API key: off when no key is configured (local use), required when one is.

The caller's key is read as Roboflow's server reads it: the ``api_key`` query parameter, then an
``Authorization: Bearer`` header, then the body's ``api_key``. The first source present is the one
checked. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import Unauthorized


def presented_key(request: Request, body_key: str | None) -> str | None:
    query = request.query_params.get("api_key")
    if query:
        return query
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return body_key or None


def check_api_key(request: Request, body_key: str | None, expected: str | None) -> None:
    if expected is None:
        return
    key = presented_key(request, body_key)
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        raise Unauthorized()
