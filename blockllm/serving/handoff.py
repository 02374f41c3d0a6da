"""Chains split across workers: the first segment's worker drives each step and hands hidden
states straight to the next segment's worker over distributed's comms (an RPC handler of the
block host), never through the scheduler or the client; the sampled token comes back in the reply.

Speculation: while the next worker computes step t, the first worker runs its layers for step t+1
on a guessed token (prompt lookup: what followed the latest earlier occurrence of the sequence's
last n-gram). When the real token arrives, a right guess sends the precomputed rows at once; a
wrong one recomputes them (the guess's KV at that position is overwritten). Outputs are the same
tokens either way; `stats()` counts guesses, hits and misses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from .. import config as _config
from ..engine.engine import Engine
from ..engine.scheduler import Scheduler, Sequence
from ..engine.segment import SegmentEngine, SegmentModel, Work, pack, unpack
from ..exceptions import BlockLLMError, InvalidRequestError, PromptTooLongError, UnknownModelError
from ..types import Request, RequestOutput
from .wire import error_from_wire, error_to_wire

log = logging.getLogger(__name__)

# send(address, items, hidden message) -> Future of the next segment's reply {"tokens": [...]} or {"error": ...}
Send = Callable[[str, list[dict], dict], Future]


def guess_next(tokens: list[int], max_n: int = 3) -> int:
    """Prompt-lookup guess of the token after `tokens`: what followed the latest earlier match of
    its last n tokens (longest n first); the last token itself when nothing matches."""
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, len(arr) - 1), 0, -1):
        tail = arr[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # windows ending before the last token
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            return int(arr[hits[-1] + n])
    return int(arr[-1])


class SplitDriver:
    """Requests whose chain starts here: scheduling, the first segment, hand-offs, stop checks.

    `step()` runs one iteration; `start()` runs steps on a thread of its own. `send` and `release`
    reach the next segment's worker (distributed RPCs in a cluster, direct calls in tests).
    """

    # the whole-chain engine's stop checks and outputs, on the same Sequence objects
    _append = Engine._append
    _output = Engine._output

    def __init__(
        self,
        engine: SegmentEngine,
        send: Send,
        release: Callable[[str, list[str]], Any],
        *,
        speculate: bool | None = None,
        prefill_chunk: int | None = None,
        timeout: float = 60.0,
        on_outputs: Callable[[list[RequestOutput]], None] | None = None,
        on_error: Callable[[list[str], BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.send, self.release_remote = send, release
        self.speculate = bool(_config.get("serving.speculate", True) if speculate is None else speculate)
        self.timeout = timeout
        self.on_outputs, self.on_error = on_outputs, on_error
        self.routes: dict[str, str] = {}  # model -> address of the worker with its next segment
        self.scheduler = Scheduler(int(prefill_chunk or _config.get("engine.prefill-chunk", 512)), lambda fp: engine.max_batch_size)
        self._live: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []
        self._spec: dict[Sequence, tuple[int, int, torch.Tensor]] = {}  # seq -> (position, guess, its rows)
        self._downstream: set[Sequence] = set()  # requests holding KV on the next worker
        # times each request started from position 0 downstream: a release names the start it
        # ends, so one that arrives after a restart (releases and steps may overtake each other) is ignored
        self._epoch: dict[Sequence, int] = {}
        self._arrivals = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tokens_generated = 0
        self.steps = 0
        self.guesses = self.hits = self.misses = 0
        self.wait_seconds = 0.0  # time spent waiting for the next segment's replies
        self.guess: Callable[[list[int]], int] = guess_next  # tokens so far -> the next token's guess

    # ------------------------------------------------------------------ control
    def route(self, model: str, address: str) -> None:
        """Requests to `model` continue on the worker at `address` after this segment."""
        seg = self.engine.segment(model)
        if not seg.first or seg.last:
            raise InvalidRequestError(f"model {model}: only a first segment that is not the whole chain drives a split chain")
        self.routes[model] = address

    def unroute(self, model: str) -> None:
        self.routes.pop(model, None)

    def serves(self, model: str) -> bool:
        return model in self.routes

    def check_request(self, req: Request) -> None:
        """Raise the typed error `add_request` would raise for `req`, queueing nothing (admission
        checks a request before it waits in its queues)."""
        self._sequence(req)

    def queued_adds(self) -> int:
        """Requests (and aborts) handed to the driver's thread and not yet picked up by it."""
        return self._inbox.qsize()

    def add_request(self, req: Request) -> None:
        """Validate (typed errors in the caller) and queue; the driver thread picks it up."""
        seq = self._sequence(req)
        if self._thread is None:
            self._admit(seq)
        else:
            self._inbox.put(("add", seq))

    def abort(self, request_id: str) -> None:
        if self._thread is None:
            self._abort(request_id)
        else:
            self._inbox.put(("abort", request_id))

    def _sequence(self, req: Request) -> Sequence:
        if req.model not in self.routes:
            raise UnknownModelError(f"model {req.model!r} is not split with its first segment on this worker")
        m: SegmentModel = self.engine.segment(req.model)
        ids = req.prompt_token_ids
        if not ids or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < m.vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be a non-empty list of integers in [0, {m.vocab}) for {req.model}")
        if len(ids) >= m.context:
            raise PromptTooLongError(f"a prompt of {len(ids)} tokens leaves no room in {req.model}'s context of {m.context} tokens")
        if req.sampling.stop and m.tokenizer is None:
            raise InvalidRequestError(f"stop strings need a tokenizer, and {req.model} has none here; use stop_token_ids")
        return Sequence(req, m, [int(t) for t in ids], len(ids), None, next(self._arrivals))

    def _admit(self, seq: Sequence) -> None:
        rid = seq.req.request_id
        if rid in self._live:
            self._fail([seq], InvalidRequestError(f"request id {rid!r} is already in use"))
            return
        self._live[rid] = seq
        self.scheduler.add(seq)

    def _abort(self, rid: str) -> None:
        seq = self._live.pop(rid, None)
        if seq is None:
            return
        self.scheduler.finish(seq)
        self._spec.pop(seq, None)
        seq.finished, seq.reason = True, "abort"
        self._pending.append(self._output(seq))
        self._release([seq])

    def has_unfinished(self) -> bool:
        return bool(self._live or self._pending)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One iteration: this segment's rows (or the speculated ones), the hand-off, the tokens."""
        outputs, self._pending = self._pending, []
        work = self.scheduler.schedule()
        # preempted here (KV dropped, recomputed later from the start): drop their KV there too
        self._release([s for s in self._downstream if not s.slot])
        if not work:
            return outputs
        parts: list[torch.Tensor | None] = [None] * len(work)
        todo = []
        for k, (seq, n) in enumerate(work):
            spec = self._spec.pop(seq, None)
            if spec is not None:
                pos, guess, rows = spec
                if n == 1 and seq.computed == pos and seq.tokens[-1] == guess:
                    parts[k] = rows
                    self.hits += 1
                    continue
                self.misses += 1
            todo.append(k)
        if todo:
            h, _ = self.engine.forward([self._work(*work[k]) for k in todo])
            at = 0
            for k in todo:
                n = work[k][1]
                parts[k] = h[at : at + n]
                at += n
        by_addr: dict[str, list[int]] = {}
        for k, (seq, _) in enumerate(work):
            by_addr.setdefault(self.routes.get(seq.req.model, ""), []).append(k)
        futures = {}
        for addr, ks in by_addr.items():
            items = [self._item(*work[k]) for k in ks]
            if not addr:  # its route went away (re-placed) mid-flight
                futures[addr] = _failed(UnknownModelError("the model's next segment is no longer placed"))
                continue
            futures[addr] = self.send(addr, items, pack(torch.cat([parts[k] for k in ks])))
            self._downstream.update(work[k][0] for k in ks)
        if self.speculate:
            self._guess(work)
        tokens: list[int | None] = [None] * len(work)
        failed: list[tuple[list[int], BaseException]] = []
        t0 = time.perf_counter()
        for addr, fut in futures.items():
            try:
                reply = fut.result(self.timeout)
                if reply.get("error"):
                    raise error_from_wire(reply["error"])
                for k, t in zip(by_addr[addr], reply["tokens"], strict=True):
                    tokens[k] = t
            except Exception as e:  # the next worker refused or is gone: these requests fail, typed
                failed.append((by_addr[addr], e))
        self.wait_seconds += time.perf_counter() - t0
        for ks, e in failed:
            seqs = [work[k][0] for k in ks]
            for seq in seqs:
                self._spec.pop(seq, None)
            self._fail(seqs, e if isinstance(e, BlockLLMError) else BlockLLMError(f"hand-off to the next segment failed: {e!r}"))
        lost = {k for ks, _ in failed for k in ks}
        ended = []
        for k, (seq, n) in enumerate(work):
            if k in lost or seq.finished:
                continue
            seq.computed += n
            if seq.computed == len(seq.tokens):
                self._append(seq, int(tokens[k]), None)
                outputs.append(self._output(seq))
                if seq.finished:
                    ended.append(seq)
                    self._spec.pop(seq, None)
        self._release(ended)
        self.steps += 1
        return outputs

    def _work(self, seq: Sequence, n: int) -> Work:
        return Work(seq.model, seq.slot, seq.computed, n, seq.tokens[seq.computed : seq.computed + n])

    def _item(self, seq: Sequence, n: int) -> dict:
        item = {
            "request_id": seq.req.request_id, "model": seq.req.model, "start": seq.computed, "n": n,
            "samples": seq.computed + n == len(seq.tokens),
        }
        if seq.computed == 0:
            import dataclasses

            item["sampling"] = dataclasses.asdict(seq.req.sampling)
            self._epoch[seq] = self._epoch.get(seq, 0) + 1
        item["epoch"] = self._epoch.get(seq, 0)
        return item

    def _guess(self, work: list[tuple[Sequence, int]]) -> None:
        """Run this segment for step t+1 on guessed tokens while step t is downstream."""
        batch = []
        for seq, n in work:
            if seq.computed + n != len(seq.tokens):
                continue  # a prefill chunk: no token comes back this step
            p = seq.req.sampling
            if len(seq.generated) + 1 >= p.max_new_tokens or len(seq.tokens) + 1 >= seq.model.context:
                continue  # the token on its way is the last one
            pos = len(seq.tokens)  # where the token now being sampled downstream will sit
            if not seq.model.lane.pool.ensure(seq.slot, pos + 1):
                continue
            g = self.guess(seq.tokens)
            batch.append((seq, pos, g))
        if not batch:
            return
        h, _ = self.engine.forward([Work(seq.model, seq.slot, pos, 1, [g]) for seq, pos, g in batch])
        for i, (seq, pos, g) in enumerate(batch):
            self._spec[seq] = (pos, g, h[i : i + 1])
        self.guesses += len(batch)

    def _release(self, seqs: list[Sequence]) -> None:
        by_addr: dict[str, list] = {}
        for seq in seqs:
            if seq not in self._downstream:
                continue
            self._downstream.discard(seq)
            epoch = self._epoch.pop(seq, 0) if seq.finished else self._epoch.get(seq, 0)
            addr = self.routes.get(seq.req.model)
            if addr:
                by_addr.setdefault(addr, []).append([seq.req.request_id, epoch])
        for addr, rids in by_addr.items():
            try:
                self.release_remote(addr, rids)
            except Exception as e:  # its KV is freed when the worker unloads the model
                log.warning("could not release %d requests on %s: %s", len(rids), addr, e)

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        for seq in seqs:
            if self._live.get(seq.req.request_id) is seq:
                del self._live[seq.req.request_id]
                self.scheduler.finish(seq)
            seq.finished, seq.reason = True, "error"
        self._release(seqs)
        if self.on_error is not None:
            self.on_error([s.req.request_id for s in seqs], error)
        else:
            log.error("split-chain requests %s failed: %s", [s.req.request_id for s in seqs], error)

    # ------------------------------------------------------------------ the thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="blockllm-split", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=0 if self.has_unfinished() else 0.05)
            except queue.Empty:
                item = False
            while item:
                op, arg = item
                self._admit(arg) if op == "add" else self._abort(arg)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = False
            if item is None:
                break
            if self.has_unfinished():
                try:
                    outputs = self.step()
                except Exception as e:
                    log.exception("split-chain step failed; failing its requests")
                    self._fail(list(self._live.values()), e)
                    continue
                if outputs and self.on_outputs is not None:
                    self.on_outputs(outputs)

    def stats(self) -> dict[str, Any]:
        return {
            "routes": dict(self.routes), "steps": self.steps, "running": len(self._live),
            "speculate": self.speculate, "guesses": self.guesses, "hits": self.hits, "misses": self.misses,
            "wait_seconds": self.wait_seconds,
        }


class HandoffCounters:
    """What crossed this worker's segment boundaries since it started, per model: hand-offs (one
    request's rows in one step's message), rows and hidden-state bytes, sent to the next segment's
    worker and received from the previous one; messages (one per step and next worker) and the
    ones that got no reply. Exported as `blockllm_split_*` series (monitoring/split.py)."""

    FIELDS = ("handoffs_sent", "rows_sent", "bytes_sent", "handoffs_received", "rows_received", "bytes_received")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.per_model: dict[str, dict[str, int]] = {}
        self.messages_sent = self.messages_received = self.messages_failed = 0

    def count(self, direction: str, items: list[dict], hidden: dict | None) -> None:
        """One message of `items` (its rows packed in `hidden`) going "sent" or "received"."""
        shape = list((hidden or {}).get("shape") or [0])
        total = int(shape[0]) if shape else 0
        row_bytes = len((hidden or {}).get("data") or b"") // total if total else 0
        with self._lock:
            if direction == "sent":
                self.messages_sent += 1
            else:
                self.messages_received += 1
            for it in items:
                c = self.per_model.setdefault(str(it.get("model")), dict.fromkeys(self.FIELDS, 0))
                n = int(it.get("n", 0))
                c[f"handoffs_{direction}"] += 1
                c[f"rows_{direction}"] += n
                c[f"bytes_{direction}"] += n * row_bytes

    def failed(self) -> None:
        with self._lock:
            self.messages_failed += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "messages_sent": self.messages_sent, "messages_received": self.messages_received,
                "messages_failed": self.messages_failed, "models": {m: dict(c) for m, c in self.per_model.items()},
            }


def _failed(error: BaseException) -> Future:
    f: Future = Future()
    f.set_exception(error)
    return f


class SplitHost:
    """A worker's part in split chains: its segment engine, the driver, the RPC handlers."""

    def __init__(self, worker: Any, block_host: Any, engine_kwargs: dict | None = None) -> None:
        self.worker, self.block_host = worker, block_host
        self.engine = SegmentEngine(block_host.zoo, **dict(engine_kwargs or {}))
        self.counters = HandoffCounters()
        self.driver = SplitDriver(
            self.engine, self._send, self._release_remote,
            on_outputs=block_host._record, on_error=self._on_error,
        )
        self.driver.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.worker.loop.asyncio_loop

    def _send(self, address: str, items: list[dict], hidden: dict) -> Future:
        async def call():
            return await self.worker.rpc(address).blockllm_segment_step(items=items, hidden=hidden)

        self.counters.count("sent", items, hidden)
        fut = asyncio.run_coroutine_threadsafe(call(), self.loop)
        fut.add_done_callback(self._replied)
        return fut

    def _replied(self, fut: Future) -> None:
        if fut.cancelled() or fut.exception() is not None or (fut.result() or {}).get("error"):
            self.counters.failed()

    def _release_remote(self, address: str, rids: list[str]) -> None:
        async def call():
            await self.worker.rpc(address).blockllm_segment_release(ids=rids)

        asyncio.run_coroutine_threadsafe(call(), self.loop)  # fire and forget

    def _on_error(self, rids: list[str], error: BaseException) -> None:
        host = self.block_host
        with host._lock:
            for rid in rids:
                t = host._tracked.get(rid)
                if t is not None and not t.finished:
                    t.finished, t.error, t.finish_reason = True, error_to_wire(error), "error"
        host._notify(ended=list(rids))

    # ------------------------------------------------------------------ placement (Dask tasks)
    def place(self, segments: list[tuple[str, int, int | None, str | None]]) -> dict[str, Any]:
        """Load segments (model, start, end, next worker or None) and unload the ones not listed."""
        wanted = {m for m, *_ in segments}
        for model in [m for m in self.engine.models if m not in wanted]:
            self.driver.unroute(model)
            self.engine.unload(model)
        for model, start, end, nxt in segments:
            seg = self.engine.models.get(model)
            if seg is not None and (seg.start, seg.end) != (start, end if end is not None else seg.n_layers):
                self.driver.unroute(model)
                self.engine.unload(model)
            self.engine.load(model, start, end)
            if nxt:
                self.driver.route(model, nxt)
        return self.stats()

    def stats(self) -> dict[str, Any]:
        import dataclasses

        return {**dataclasses.asdict(self.engine.stats()), **self.driver.stats(), "handoffs": self.counters.snapshot()}

    def stop(self) -> None:
        self.driver.stop()

    # ------------------------------------------------------------------ RPC handlers
    async def handle_step(self, comm=None, items=None, hidden=None) -> dict[str, Any]:
        self.counters.count("received", list(items or []), hidden)

        def run():
            try:
                return {"tokens": self.engine.step_remote(list(items or []), unpack(hidden, self.engine.device))}
            except (BlockLLMError, ValueError, KeyError) as e:
                return {"error": error_to_wire(e)}

        return await asyncio.get_running_loop().run_in_executor(None, run)

    async def handle_release(self, comm=None, ids=None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.release, list(ids or []))


def install(worker: Any, block_host: Any, engine_kwargs: dict | None = None) -> SplitHost:
    """Give a worker's block host its split-chain part and register the hand-off handlers."""
    split = SplitHost(worker, block_host, engine_kwargs)
    worker.handlers.update({"blockllm_segment_step": split.handle_step, "blockllm_segment_release": split.handle_release})
    worker.extensions["blockllm-split"] = split
    block_host.split = split
    return split


def get_split() -> SplitHost:
    """The split-chain part of the worker running the current task."""
    from distributed import get_worker

    split = get_worker().extensions.get("blockllm-split")
    if split is None:
        raise RuntimeError("this worker has no BlockLLM host; register BlockHostPlugin first")
    return split


def place_segments(segments: list[tuple[str, int, int | None, str | None]]) -> dict[str, Any]:
    """A Dask task (pinned with workers=): load these segments on this worker's block host."""
    return get_split().place(segments)
