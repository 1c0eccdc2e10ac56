"""The optional API key: off when no key is configured (local use), required when one is.

The caller's key is read as Roboflow's server reads it: the ``api_key`` query parameter, then an
``Authorization: Bearer`` header, then the body's ``api_key``. The first source present is the one
checked. Keys are compared in constant time and never logged (the local server's access log shows
``api_key=***``, local.py). A query or header key is checked before the body is parsed (body.py).
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from .errors import Unauthorized


def query_or_header_key(request: HTTPConnection) -> str | None:
    """The key sent outside the body: the ``api_key`` query parameter, else an ``Authorization: Bearer`` header."""
    query = request.query_params.get("api_key")
    if query:
        return query
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def presented_key(request: HTTPConnection, body_key: str | None) -> str | None:
    return query_or_header_key(request) or body_key or None


def key_matches(key: str | None, expected: str) -> bool:
    """Constant-time comparison. ``surrogatepass``: a JSON body may carry a lone
    surrogate (``"\\ud800"``), which strict UTF-8 cannot encode."""
    if key is None:
        return False
    return hmac.compare_digest(key.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def check_api_key(request: HTTPConnection, body_key: str | None, expected: str | None) -> None:
    if expected is None:
        return
    if not key_matches(presented_key(request, body_key), expected):
        raise Unauthorized()
