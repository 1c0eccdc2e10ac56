"""Typed HTTP errors and the one place that turns exceptions into JSON responses.

Every error body is a JSON object with a ``message`` (inference-sdk reads ``message``), except
FastAPI's own 422 validation errors, which keep FastAPI's shape as Roboflow's server does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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


def error_response(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status_code, headers=headers)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.message, exc.headers)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own 404/405: the same {"message"} shape as every other error.
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The detail goes to the log only: it may hold paths or library internals.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "Internal error.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
