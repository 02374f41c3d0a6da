"""Shared vocabulary of requests: sampling parameters, requests and their outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .exceptions import InvalidSamplingError


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidSamplingError(f"{name} must be an integer >= {low}, not {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        _int("max_new_tokens", self.max_new_tokens, 1)
        _int("top_k", self.top_k, 0)
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise InvalidSamplingError(f"{name} must be a number, not {v!r}")
        if self.temperature < 0 or math.isinf(self.temperature):
            raise InvalidSamplingError(f"temperature must be finite and >= 0, not {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if self.seed is not None:
            _int("seed", self.seed, 0)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidSamplingError(f"stop must be non-empty strings, not {self.stop!r}")
        for t in self.stop_token_ids:
            _int("stop_token_ids entries", t, 0)
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSamplingError(f"{name} must be true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


# Request.priority classes in the engine: higher is admitted first and preempted last. Online work
# may preempt running batch work (priority <= BATCH_PRIORITY); batch work fills what online leaves.
ONLINE_PRIORITY = 1
BATCH_PRIORITY = 0


@dataclass(frozen=True)
class Request:
    request_id: str
    model: str  # "tenant/name"
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    priority: int = ONLINE_PRIORITY  # higher first; <= BATCH_PRIORITY is batch work


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    model: str
    token_ids: tuple[int, ...]  # generated so far
    finished: bool
    finish_reason: str | None = None  # length | stop | eos | abort
    text: str | None = None
    logprobs: tuple[float, ...] | None = None
    blocks: tuple[str, ...] = ()  # fingerprints it passed through (chain + adapters)
