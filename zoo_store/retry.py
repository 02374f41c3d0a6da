"""Bounded retries with exponential backoff (tenacity) for zoo reads whose store cannot be reached.

Only connection failures are retried (an object store stopped or restarting); a missing key, a
corrupt block or a bad name fails at once. After `zoo.retry.attempts` tries or `zoo.retry.deadline`
seconds the read raises ZooUnavailableError: a typed error, never a hang.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import tenacity

from . import config as _config
from .exceptions import ZooUnavailableError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
_depth = threading.local()  # retry only at the outermost zoo call: nested calls would multiply tries


@functools.cache
def transient_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the store did not answer': builtins, plus botocore's and aiohttp's
    (and, in `_is_transient`, any HTTP 5xx answer)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:  # s3fs surfaces botocore's connection errors unwrapped (EndpointConnectionError, timeouts)
        from botocore import exceptions as boto

        types += [boto.ConnectionError, boto.HTTPClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError

        types.append(ClientConnectionError)
    except ImportError:
        pass
    return tuple(types)


def _is_transient(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:  # wrapped ones too (e.g. OSError from s3fs)
        if isinstance(error, transient_errors()):
            return True
        response = getattr(error, "response", None)  # botocore's ClientError: a 5xx is the server starting or failing
        if isinstance(response, dict) and int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def call_with_retries(fn: Callable[[], Any], what: str) -> Any:
    """fn(), retried on connection failures per `blockllm.zoo.retry`; ZooUnavailableError when they run out."""
    attempts = int(_config.get("zoo.retry.attempts", 6))
    backoff = float(_config.get("zoo.retry.backoff", 0.25))
    max_backoff = float(_config.get("zoo.retry.max-backoff", 8.0))
    deadline = float(_config.get("zoo.retry.deadline", 60.0))
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_after_delay(deadline),
        wait=tenacity.wait_exponential(multiplier=backoff, max=max_backoff) + tenacity.wait_random(0, backoff),
        retry=tenacity.retry_if_exception(_is_transient),
        before_sleep=lambda rs: log.warning(
            "zoo store unreachable during %s (try %d of %d): %r; retrying", what, rs.attempt_number, attempts, rs.outcome.exception()
        ),
        reraise=True,
    )
    try:
        return retrying(fn)
    except Exception as e:
        if _is_transient(e):
            raise ZooUnavailableError(f"the zoo's store did not answer during {what} after {attempts} tries or {deadline:.0f} s: {e!r}; check that it is up (blockllm.zoo.retry sets the tries)") from e
        raise


def retried(what: str) -> Callable[[F], F]:
    """Decorate a Zoo method: the outermost zoo call on a thread retries, inner ones do not."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if getattr(_depth, "n", 0):
                return fn(*args, **kwargs)
            _depth.n = 1
            try:
                return call_with_retries(lambda: fn(*args, **kwargs), what)
            finally:
                _depth.n = 0

        return inner  # type: ignore[return-value]

    return wrap
