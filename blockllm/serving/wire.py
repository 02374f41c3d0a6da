"""Errors on the wire: typed exceptions become plain dicts between workers and clients, and back."""

from __future__ import annotations

from typing import Any

import zoo_store.exceptions as _zoo_exc

from .. import exceptions as _exc

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
