"""Reading a CLIP route's JSON body: parsed once, strictly, and only after a query or header API key passed.

FastAPI's documented hook for this is a custom ``APIRoute`` whose handler wraps the request in a
``Request`` subclass; :func:`clip_route_class` builds one.

**Strict JSON.** Python's ``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON
(RFC 8259), and turns a number beyond a double's range such as ``1e999`` into ``inf``. A non-finite
float in a body would come back in a 422's echo of the input, which Starlette cannot serialise (a 500). The body is
parsed with ``parse_constant``/``parse_float`` hooks that note the first such token; the parse runs to
the end (so the body's ``api_key`` can still be read) and then answers 400 "not valid JSON". Other
syntax errors stay FastAPI's 422 (as Roboflow's server answers them).

**The key first.** With a key configured, one sent by the ``api_key`` query parameter or an
``Authorization: Bearer`` header is checked before the body is parsed: a wrong one is a 401 whatever
the body holds. A caller who sent neither and whose body does not parse or validate gets 401, not the
400/422, unless the parsed body carries the right ``api_key``: an unauthenticated caller learns nothing
about the schema. (The body-size limit, ``BodyLimit`` in app.py, still comes first: on AWS an oversize
request never reaches the function whatever its key, and a 413 tells nothing about the key.) A valid
body is checked again by the route (``check_api_key``), which also reads the body's ``api_key``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from .auth import key_matches, query_or_header_key
from .errors import Unauthorized

KeyGetter = Callable[[], str | None]


def not_json(reason: str) -> HTTPException:
    """A 400 that the app's handler renders as ``{"message": ...}``."""
    return HTTPException(400, detail=f"The request body is not valid JSON: {reason}.")


class _Strict:
    """``json.loads`` hooks that note the first non-finite number and let the parse finish."""

    def __init__(self) -> None:
        self.problem: str | None = None

    def constant(self, token: str) -> None:
        if self.problem is None:
            self.problem = f"{token} is not a JSON number (JSON has no NaN or Infinity)"

    def number(self, text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            if self.problem is None:
                shown = text if len(text) <= 40 else text[:37] + "..."
                self.problem = f"the number {shown} is out of range (larger than a 64-bit float)"
            return 0.0
        return value


def parse_json(body: bytes) -> tuple[Any, str | None]:
    """The parsed body and why it is not strict JSON (None: it is).

    Raises ``json.JSONDecodeError`` for a syntax error and the 400 of :func:`not_json` when the body
    cannot be parsed at all for another reason."""
    strict = _Strict()
    try:
        value = json.loads(body, parse_constant=strict.constant, parse_float=strict.number)
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError:
        raise not_json("it is not UTF-8 text") from None
    except RecursionError:
        raise not_json("it is nested too deeply") from None
    except ValueError:  # an integer over Python's 4300-digit conversion limit
        raise not_json("a number has too many digits") from None
    return value, strict.problem


class JsonBodyRequest(Request):
    """``json()`` parses strictly, once; the parsed value stays readable for the API key after a 400."""

    _attempted = False
    _error: Exception | None = None
    _parsed: Any = None
    _problem: str | None = None

    async def json(self) -> Any:
        if not self._attempted:
            self._attempted = True
            try:
                self._parsed, self._problem = parse_json(await self.body())
            except Exception as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        if self._problem is not None:
            raise not_json(self._problem)
        return self._parsed

    async def body_api_key(self) -> str | None:
        """The body's ``api_key`` if the body parses (non-finite numbers aside) as an object holding one."""
        if not self._attempted:
            # FastAPI parses only JSON content types; a body sent without one is parsed here, once.
            with contextlib.suppress(HTTPException, ValueError):
                await self.json()
        parsed = self._parsed
        key = parsed.get("api_key") if isinstance(parsed, dict) else None
        return key if isinstance(key, str) and key else None


def clip_route_class(expected_key: KeyGetter) -> type[APIRoute]:
    """An ``APIRoute`` reading JSON bodies strictly, with the key from query/header checked first.

    ``expected_key`` is read per request (``Settings.api_key``: a renewed key takes effect at once)."""

    class ClipRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handle = super().get_route_handler()

            async def route_handler(request: Request) -> Response:
                strict = JsonBodyRequest(request.scope, request.receive)
                expected = expected_key()
                if expected is None:
                    return await handle(strict)
                early = query_or_header_key(strict)
                if early is not None and not key_matches(early, expected):
                    raise Unauthorized()
                try:
                    return await handle(strict)
                except (RequestValidationError, HTTPException):
                    # Raised while reading, parsing or validating the body, before the route checks the key.
                    if early is None and not key_matches(await strict.body_api_key(), expected):
                        raise Unauthorized() from None
                    raise

            return route_handler

    return ClipRoute
