"""What crosses the wire: typed errors as plain dicts (and back), and request dicts checked into WireRequest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import zoo_store.exceptions as _zoo_exc

from .. import exceptions as _exc
from ..types import SamplingParams

# Every typed error of ours, by class name (engine errors are added to blockllm.exceptions).
ERROR_TYPES: dict[str, type[BaseException]] = {
    name: obj
    for module in (_zoo_exc, _exc)
    for name, obj in vars(module).items()
    if isinstance(obj, type) and issubclass(obj, BaseException)
}


def error_to_wire(error: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    retry = getattr(error, "retry_after", None)
    if retry is not None:
        out["retry_after"] = retry
    return out


def error_from_wire(wire: dict[str, Any]) -> BaseException:
    """The typed exception a wire error stands for (falling back to the closest builtin)."""
    name, message = wire.get("type", "BlockLLMError"), wire.get("message", "")
    cls = ERROR_TYPES.get(name)
    if cls is None:
        cls = {"KeyError": KeyError, "ValueError": ValueError, "PermissionError": PermissionError}.get(name, _exc.BlockLLMError)
    if cls is _exc.OverloadedError:
        return cls(message, retry_after=float(wire.get("retry_after", 1.0)))
    try:
        return cls(message)
    except TypeError:  # errors whose constructors take structured arguments
        err = cls.__new__(cls)
        Exception.__init__(err, message)
        return err


# ---------------------------------------------------------------------------- requests on the wire
_REQUEST_KEYS = {"request_id", "model", "prompt", "messages", "prompt_token_ids", "sampling", "priority", "api_key", "resume_token_ids"}
MAX_REQUEST_ID = 200  # characters


@dataclass(frozen=True)
class WireRequest:
    """A request dict from a client, checked for shape and types (the zoo and the engine check the rest)."""

    request_id: str
    model: str  # "tenant/name", both names valid
    sampling: SamplingParams
    priority: str  # "online" | "batch"
    api_key: str | None = None
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    resume_token_ids: tuple[int, ...] = ()  # tokens already generated elsewhere (failover): continue after them

    @property
    def owner(self) -> str:
        return self.model.partition("/")[0]

    @property
    def name(self) -> str:
        return self.model.partition("/")[2]


def _token_ids(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise _exc.InvalidRequestError(f"{what} must be a list of non-negative integers")
    return tuple(value)


def parse_request(raw: Any) -> WireRequest:
    """Check a wire request dict; every problem is a typed error (InvalidRequestError, InvalidNameError,
    InvalidSamplingError), never a TypeError or KeyError from deep inside."""
    from zoo_store import validate_name

    from .admission import parse_priority

    if not isinstance(raw, dict):
        raise _exc.InvalidRequestError(f"a request must be a dict, not {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _REQUEST_KEYS)
    if unknown:
        raise _exc.InvalidRequestError(f"unknown request fields {unknown}")
    rid = raw.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_REQUEST_ID:
        raise _exc.InvalidRequestError(f"request_id must be a non-empty string of at most {MAX_REQUEST_ID} characters")
    model = raw.get("model")
    if not isinstance(model, str) or model.count("/") != 1:
        raise _exc.InvalidRequestError(f"model must be 'tenant/name', not {model!r}")
    owner, _, name = model.partition("/")
    validate_name(owner, "tenant")
    validate_name(name, "model name")
    given = [k for k in ("prompt", "messages", "prompt_token_ids") if raw.get(k) is not None]
    if len(given) != 1:
        raise _exc.InvalidRequestError(f"give exactly one of prompt, messages or prompt_token_ids (got {given or 'none'})")
    prompt = raw.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise _exc.InvalidRequestError("prompt must be a non-empty string")
    messages = raw.get("messages")
    if messages is not None:
        if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise _exc.InvalidRequestError("messages must be a non-empty list of {'role': str, 'content': str}")
        messages = tuple(dict(m) for m in messages)
    ids = raw.get("prompt_token_ids")
    if ids is not None:
        ids = _token_ids(ids, "prompt_token_ids")
        if not ids:
            raise _exc.InvalidRequestError("prompt_token_ids is empty: give at least one token id")
    sampling = raw.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise _exc.InvalidSamplingError(f"sampling must be a dict, not {type(sampling).__name__}")
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    bad = sorted(str(k) for k in sampling if k not in fields)
    if bad:
        raise _exc.InvalidSamplingError(f"unknown sampling parameters {bad}; known: {sorted(fields)}")
    sampling = SamplingParams(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in sampling.items()})
    api_key = raw.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        raise _exc.AuthenticationError("api_key must be a string")
    resume = _token_ids(raw.get("resume_token_ids") or (), "resume_token_ids")
    if len(resume) >= sampling.max_new_tokens:
        raise _exc.InvalidRequestError("resume_token_ids already hold max_new_tokens tokens: nothing is left to generate")
    return WireRequest(rid, model, sampling, parse_priority(raw.get("priority")), api_key, prompt, messages, ids, resume)
