"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

BlockLLM's typed errors map onto HTTP statuses (and so onto the openai SDK's exception classes):
AuthenticationError 401, ForbiddenError 403, unknown models 404, bad requests 400, a full
admission queue 429 (with Retry-After), no capacity for a model or an unreachable zoo 503.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from starlette.responses import JSONResponse

from zoo_store.exceptions import InvalidNameError, ModelNotFoundError, ZooUnavailableError

from ..exceptions import (
    AuthenticationError,
    ForbiddenError,
    NoCapacityError,
    OverloadedError,
    PromptTooLongError,
    UnknownModelError,
)

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered as-is: status, OpenAI error type, message, offending param, code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist or you do not have access to it.", "invalid_request_error", "model", "model_not_found")


def to_api_error(error: BaseException, *, model: str | None = None) -> APIError:
    """The APIError a (typed) exception stands for."""
    if isinstance(error, APIError):
        return error
    msg = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if isinstance(error, AuthenticationError):
        return APIError(401, msg, "authentication_error", None, "invalid_api_key")
    if isinstance(error, ForbiddenError):
        return APIError(403, msg, "permission_error", "model", "model_not_permitted")
    if isinstance(error, (ModelNotFoundError, InvalidNameError, UnknownModelError)):
        return model_not_found(model or msg)
    if isinstance(error, OverloadedError):
        retry = error.retry_after if math.isfinite(error.retry_after) else 1.0
        return APIError(429, msg, "rate_limit_error", None, "overloaded", {"Retry-After": str(max(1, math.ceil(retry)))})
    if isinstance(error, ZooUnavailableError):  # the object store is down or restarting
        return APIError(503, msg, "server_error", None, "zoo_unavailable", {"Retry-After": "10"})
    if isinstance(error, NoCapacityError):
        return APIError(503, msg, "server_error", "model", "no_capacity", {"Retry-After": "5"})
    if isinstance(error, PermissionError):
        return APIError(403, msg, "permission_error")
    if isinstance(error, (ValueError, TypeError)):
        # InvalidSamplingError, PromptTooLongError and malformed requests are ValueErrors.
        code = "context_length_exceeded" if isinstance(error, PromptTooLongError) else None
        return APIError(400, msg, "invalid_request_error", None, code)
    if isinstance(error, KeyError):
        return APIError(400, msg, "invalid_request_error")
    log.exception("unexpected error serving an HTTP request", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}: {msg}", "server_error")
