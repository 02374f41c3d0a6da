"""The OpenAI request bodies BlockLLM accepts (pydantic), and their translation to SamplingParams."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Any = None
    response_format: Any = None


def prompts_of(body: CompletionRequest) -> list[dict[str, Any]]:
    """Each prompt as GenerationRequest keyword arguments (text or token ids)."""
    p = body.prompt
    if isinstance(p, str):
        return [{"prompt": p}]
    if not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(x, str) for x in p):
        return [{"prompt": x} for x in p]
    if all(isinstance(x, int) for x in p):
        return [{"prompt_token_ids": list(p)}]
    return [{"prompt_token_ids": list(x)} for x in p]


def messages_of(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """Chat messages as {role, content} strings (text content parts joined)."""
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text":
                    raise APIError(400, f"messages[{i}]: only text content is supported, not {part.get('type')!r}", param=f"messages.{i}.content")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": content or ""})
    return out


def sampling_of(body: _Common, sampling_cls: type, *, default_max_tokens: int | None) -> Any:
    """The SamplingParams for an OpenAI body; 400 naming the parameter BlockLLM cannot honour."""
    fields = {f.name for f in dataclasses.fields(sampling_cls)}
    kwargs: dict[str, Any] = {}
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max_tokens
    if max_tokens is not None:
        kwargs["max_new_tokens"] = max_tokens
    # OpenAI samples at temperature 1 unless told otherwise; 0 is greedy.
    kwargs["temperature"] = 1.0 if body.temperature is None else body.temperature
    if body.top_p is not None:
        kwargs["top_p"] = body.top_p
    if body.seed is not None:
        kwargs["seed"] = body.seed
    if body.stop:
        kwargs["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value:
            kwargs[name] = value
    if body.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported", param="logprobs")
    for name in ("echo", "suffix"):
        if getattr(body, name, None):
            raise APIError(400, f"{name} is not supported", param=name)
    if getattr(body, "best_of", None) not in (None, 1):
        raise APIError(400, "best_of is not supported", param="best_of")
    if getattr(body, "tools", None):
        raise APIError(400, "tools are not supported", param="tools")
    unsupported = [k for k in kwargs if k not in fields]
    if unsupported:
        name = {"max_new_tokens": "max_tokens"}.get(unsupported[0], unsupported[0])
        raise APIError(400, f"{name} is not supported by this server", param=name)
    try:
        return sampling_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from e
