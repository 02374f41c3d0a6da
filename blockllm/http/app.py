"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions.

Requests are translated into `blockllm.Client` calls: the caller's `Authorization: Bearer <key>`
travels with each request (the block host checks it again), completions come back as the
client's futures, streams as server-sent events fed from `Client.stream`. Model ids on the wire
are "tenant/name"; a tenant sees its own models and the shared ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, StreamingResponse

from ..auth import KeyRing, check_access
from ..exceptions import BlockLLMError, OverloadedError, ZooError
from .errors import APIError, error_body, model_not_found, to_api_error
from .schemas import (
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    messages_of,
    prompts_of,
    sampling_of,
)

log = logging.getLogger(__name__)

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "max_tokens": "length", "abort": "stop", "aborted": "stop"}


class Backend:
    """What the HTTP layer needs from BlockLLM: keys, models, tokenizers, and a Client to run requests."""

    def __init__(self, client: Any, *, max_inflight_per_tenant: int = 256, workers: int = 32) -> None:
        from ..client import GenerationRequest

        self.client = client
        self.zoo = client.zoo
        self.keys = KeyRing(self.zoo)
        self.max_inflight = max_inflight_per_tenant
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockllm-http")
        self._inflight: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._tokenizers: dict[str, Any] = {}
        self._manifests: dict[str, tuple[float, Any]] = {}

        class KeyedRequest(GenerationRequest):
            """A request that carries its caller's API key instead of the client's."""

            def __init__(self, *args: Any, api_key: str | None = None, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.api_key = api_key

            def to_wire(self, api_key: str | None) -> dict[str, Any]:
                return super().to_wire(self.api_key)

        self.request_cls = KeyedRequest

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- tenants and models
    def tenant(self, authorization: str | None) -> tuple[str, str]:
        """(tenant, key) of an `Authorization: Bearer <key>` header; 401 without a valid key."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "no API key given: send 'Authorization: Bearer <key>'", "authentication_error", None, "invalid_api_key")
        key = key.strip()
        return self.keys.tenant(key), key

    def visible_models(self, tenant: str) -> list[Any]:
        out = []
        for m in self.zoo.list_models():
            if m.tenant == tenant or m.visibility == "shared":
                out.append(m)
        return sorted(out, key=lambda m: m.key)

    def manifest(self, model: str, tenant: str) -> Any:
        """The manifest of `model` for `tenant`: 404 when unknown, 403 when private to another tenant."""
        owner, sep, name = model.partition("/")
        if not sep or not owner or not name or "/" in name:
            raise model_not_found(model)
        cached = self._manifests.get(model)
        if cached is None or time.monotonic() - cached[0] > 30:
            try:
                cached = self._manifests[model] = (time.monotonic(), self.zoo.get_manifest(owner, name))
            except Exception as e:
                raise to_api_error(e, model=model) from e
        check_access(cached[1], tenant)
        return cached[1]

    def tokenizer(self, model: str) -> Any:
        tok = self._tokenizers.get(model)
        if tok is None:
            from ..chain import load_tokenizer

            tok = self._tokenizers[model] = load_tokenizer(self.zoo, model)
        return tok

    def chat_ids(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        """The prompt of a chat: the model's chat template applied (as the block host would)."""
        tok = self.tokenizer(model)
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {model} has no chat template; use /v1/completions", param="messages")
        return [int(i) for i in tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]]

    def count_prompt(self, model: str, req: dict[str, Any]) -> int:
        if req.get("prompt_token_ids") is not None:
            return len(req["prompt_token_ids"])
        return len(self.tokenizer(model)(req["prompt"])["input_ids"])

    # -------------------------------------------------------------- admission
    def admit(self, tenant: str, n: int) -> None:
        with self._lock:
            if self._inflight[tenant] + n > self.max_inflight:
                raise OverloadedError(
                    f"tenant {tenant} may have {self.max_inflight} requests in flight; it has {self._inflight[tenant]} and asked for {n} more",
                    retry_after=1.0,
                )
            self._inflight[tenant] += n

    def release(self, tenant: str, n: int) -> None:
        with self._lock:
            self._inflight[tenant] -= n

    # -------------------------------------------------------------- running
    async def run(self, fn, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def complete(self, requests: list[Any]) -> list[Any]:
        futures = await self.run(self.client.submit, requests)
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    def stream(self, request: Any) -> Iterator[list[int]]:
        return self.client.stream(request)


class Detokenizer:
    """Incremental text of a growing token sequence, as the engine will finally decode it.

    Holds back an incomplete UTF-8 tail, and any tail that could be the start of a stop string;
    text from a stop string on is never sent (the engine cuts the final text there too).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        hits = [text.index(s) for s in self.stop if s in text]
        if hits:
            text, self.stopped = text[: min(hits)], True
        elif not final:
            if text.endswith("\ufffd"):
                return ""
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        if text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""  # an earlier piece changed on re-decode (rare); keep what was sent


def create_app(client: Any, *, max_inflight_per_tenant: int = 256) -> FastAPI:
    """The FastAPI application serving `client` (a blockllm.Client) the OpenAI way."""
    backend = Backend(client, max_inflight_per_tenant=max_inflight_per_tenant)
    app = FastAPI(title="BlockLLM", description="OpenAI-compatible API of a BlockLLM cluster", version="1", docs_url=None, redoc_url=None)
    app.state.backend = backend

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return JSONResponse(error_body(f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", ".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    async def _typed(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    for cls in (BlockLLMError, ZooError, PermissionError, ValueError, KeyError):
        app.add_exception_handler(cls, _typed)

    async def auth(request: Request) -> tuple[str, str]:
        try:
            return await backend.run(backend.tenant, request.headers.get("authorization"))
        except Exception as e:
            raise to_api_error(e) from e

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        tenant, _ = await auth(request)
        models = await backend.run(backend.visible_models, tenant)
        return {"object": "list", "data": [_model_card(m) for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        tenant, _ = await auth(request)
        try:
            m = await backend.run(backend.manifest, model_id, tenant)
        except Exception as e:  # a model the tenant may not use does not exist for it here
            err = to_api_error(e, model=model_id)
            raise (model_not_found(model_id) if err.status == 403 else err) from e
        return _model_card(m)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        tenant, key = await auth(request)
        return await _generate(backend, body, tenant, key, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        tenant, key = await auth(request)
        return await _generate(backend, body, tenant, key, chat=True)

    return app


def _model_card(m: Any) -> dict[str, Any]:
    created = 0
    if getattr(m, "created", ""):
        try:
            from datetime import datetime

            created = int(datetime.fromisoformat(m.created.replace("Z", "+00:00")).timestamp())
        except ValueError:
            created = 0
    return {"id": m.key, "object": "model", "created": created, "owned_by": m.tenant}


async def _generate(backend: Backend, body: Any, tenant: str, key: str, *, chat: bool):
    from ..types import SamplingParams

    await backend.run(backend.manifest, body.model, tenant)
    sampling = sampling_of(body, SamplingParams, default_max_tokens=None if chat else DEFAULT_COMPLETION_TOKENS)
    if chat:
        # The chat template is applied here, with the model's own tokenizer, once: the ids also
        # give the usage count, and token ids cross the wire as they are.
        ids = await backend.run(backend.chat_ids, body.model, messages_of(body))
        inputs = [{"prompt_token_ids": ids}]
    else:
        inputs = prompts_of(body)
    requests = [
        backend.request_cls(model=body.model, sampling=sampling, api_key=key, **inp)
        for inp in inputs for _ in range(body.n)
    ]
    prompt_tokens = sum(await asyncio.gather(*(backend.run(backend.count_prompt, body.model, inp) for inp in inputs))) * body.n
    created = int(time.time())
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    backend.admit(tenant, len(requests))
    if body.stream:
        try:
            return await _stream(backend, body, requests, tenant, rid, created, prompt_tokens, chat=chat)
        except BaseException:
            backend.release(tenant, len(requests))
            raise
    try:
        results = await backend.complete(requests)
    except Exception as e:
        raise to_api_error(e, model=body.model) from e
    finally:
        backend.release(tenant, len(requests))
    choices = []
    for i, c in enumerate(results):
        reason = FINISH_REASONS.get(c.finish_reason or "", c.finish_reason or "stop")
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": reason, "logprobs": None})
        else:
            choices.append({"index": i, "text": c.text, "finish_reason": reason, "logprobs": None})
    completion_tokens = sum(len(c.token_ids) for c in results)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": None,
    }


async def _stream(backend: Backend, body: Any, requests: list[Any], tenant: str, rid: str, created: int, prompt_tokens: int, *, chat: bool):
    """Server-sent events: one chunk per new piece of text of any choice, then [DONE]."""
    import json

    tok = await backend.run(backend.tokenizer, body.model)
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    max_new = getattr(requests[0].sampling, "max_new_tokens", None)

    def pump(index: int, request: Any) -> None:
        try:
            for ids in backend.stream(request):
                loop.call_soon_threadsafe(queue.put_nowait, (index, ids, None))
                if stop.is_set():
                    return
            loop.call_soon_threadsafe(queue.put_nowait, (index, None, None))
        except BaseException as e:
            loop.call_soon_threadsafe(queue.put_nowait, (index, None, e))

    for i, r in enumerate(requests):
        loop.run_in_executor(backend.pool, pump, i, r)
    # Wait for the first event so that errors before any token get their proper status.
    first = await queue.get()
    if first[2] is not None:
        stop.set()
        raise to_api_error(first[2], model=body.model)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        d = {"id": rid, "object": kind, "created": created, "model": body.model, "choices": choices, "system_fingerprint": None}
        if usage is not None:
            d["usage"] = usage
        return f"data: {json.dumps(d)}\n\n"

    def piece(i: int, text: str | None, reason: str | None) -> dict:
        if chat:
            return {"index": i, "delta": {} if text is None else {"content": text}, "finish_reason": reason, "logprobs": None}
        return {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}

    async def events() -> AsyncIterator[str]:
        detok = [Detokenizer(tok, tuple(getattr(requests[0].sampling, "stop", ()) or ())) for _ in requests]
        done = 0
        completion_tokens = 0
        try:
            if chat:
                for i in range(len(requests)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])
            event = first
            while True:
                i, ids, err = event
                if err is not None:
                    api = to_api_error(err, model=body.model)
                    yield f"data: {json.dumps(error_body(api.message, api.type, api.param, api.code))}\n\n"
                    return
                if ids is None:  # this choice has finished
                    tail = detok[i].flush()
                    if tail:
                        yield chunk([piece(i, tail, None)])
                    n = len(detok[i].ids)
                    reason = "length" if max_new is not None and n >= max_new else "stop"
                    yield chunk([piece(i, None if chat else "", reason)])
                    done += 1
                    if done == len(requests):
                        break
                else:
                    completion_tokens += len(ids)
                    text = detok[i].add(list(ids))
                    if text:
                        yield chunk([piece(i, text, None)])
                event = await queue.get()
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
            yield "data: [DONE]\n\n"
        finally:
            stop.set()
            backend.release(tenant, len(requests))

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["Backend", "Detokenizer", "create_app"]
