"""Typed HTTP errors and the one place that turns exceptions into JSON responses.

Every error body is a JSON object with a ``message`` (inference-sdk reads ``message``), except
FastAPI's own 422 validation errors, which keep FastAPI's shape as Roboflow's server does. No error
can turn into a 500 for holding a non-finite float (a 422 echoes the input): they render as null.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..aws_lambda.tower_function import TextFunctionError

log = logging.getLogger("clip_serverless.api")


class ApiError(Exception):
    """An error whose message is safe to show the caller."""

    status_code = 400

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class BadRequest(ApiError):
    status_code = 400


class ImageLoadError(BadRequest):
    """The reference's ``InputImageLoadError``: the message names the cause."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"Could not load input image. Cause: {cause}")
        self.cause = cause


class Unauthorized(ApiError):
    status_code = 401

    def __init__(self, message: str = "Unauthorized api_key") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ApiError):
    status_code = 404


class PayloadTooLarge(ApiError):
    status_code = 413


def _finite(value: Any) -> Any:
    """JSON-compatible data with NaN and infinities replaced by None (as FastAPI's streaming encoder does)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


class ErrorJSONResponse(JSONResponse):
    """Starlette's JSONResponse (``allow_nan=False``), minus its one way to fail on JSON-compatible data."""

    def render(self, content: Any) -> bytes:
        return super().render(_finite(content))


def error_response(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return ErrorJSONResponse({"message": message}, status_code=status_code, headers=headers)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.message, exc.headers)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own 404/405: the same {"message"} shape as every other error.
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own handler and shape; the errors echo the input, which must not make this a 500.
    assert isinstance(exc, RequestValidationError)
    return ErrorJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)


async def _text_function_error(_request: Request, exc: Exception) -> JSONResponse:
    # compare's text vectors come from another function (tower_function.py): its failure, as a status.
    assert isinstance(exc, TextFunctionError)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return error_response(exc.status, exc.message, headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The detail goes to the log only: it may hold paths or library internals.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "Internal error.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(TextFunctionError, _text_function_error)
    app.add_exception_handler(Exception, _unexpected)
