"""The block host: one per Dask worker, owning the block engine and answering direct worker RPCs.

The scheduler never sits on the per-token path: clients (and other workers) call the host's
handlers (`blockllm_submit`, `blockllm_poll`, ...) over distributed's own comms, and a thread
steps the engine. Placement reaches the host as ordinary Dask tasks (see placement.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import queue
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from distributed import WorkerPlugin

from zoo_store import Zoo, ZooError

from .. import config as _config
from ..auth import KeyRing, check_access
from ..exceptions import BlockLLMError, OverloadedError
from ..types import Request
from .admission import ENGINE_PRIORITY, Admission, Ticket

# imported here, not in the plugin's setup: the engine package must not be imported by two threads at once
from .handoff import install as install_split
from .wire import WireRequest, error_to_wire, parse_request

log = logging.getLogger(__name__)

PLUGIN_NAME = "blockllm-host"

# CPython 3.11 before 3.11.9 can deadlock the whole process (every thread waiting for the
# GIL) when sys._current_frames() runs a garbage collection while another thread creates or ends
# (python/cpython#106883, dask/distributed#8616). A Dask worker calls it every 10 ms while tasks
# run (its statistical task profiler); block hosts run placement and batch tasks and start and end
# IO threads all the time, which froze workers in CI. Where the bug exists, hosts stop that profiler.
PROFILER_DEADLOCKS = sys.implementation.name == "cpython" and (3, 11) <= sys.version_info < (3, 11, 9)


def stop_task_profiler(worker) -> bool:
    """Stop the worker's statistical task profiler where CPython can deadlock in it; True if stopped."""
    if not PROFILER_DEADLOCKS:
        return False
    stopped = False
    for name in ("profile", "profile-cycle"):
        pc = worker.periodic_callbacks.pop(name, None)
        if pc is not None:
            pc.stop()
            stopped = True
    if stopped:
        log.info("stopped this worker's task profiler: CPython %s can deadlock in sys._current_frames (cpython#106883)", sys.version.split()[0])
    return stopped


@dataclass
class _Tracked:
    """What the host remembers of a request until its client has read the end of it."""

    model: str  # the model as served (a substituted chain runs under a derived key)
    tenant: str
    submitted: float
    requested: str = ""  # the model the client asked for
    prompt_tokens: int = 0
    token_ids: tuple[int, ...] = ()  # every token so far (the engine's own tuple while nothing precedes it)
    text: str | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: dict | None = None
    blocks: tuple[str, ...] = ()
    substitutions: list[dict] = field(default_factory=list)
    first_token: float | None = None
    done_at: float | None = None
    prefix: tuple[int, ...] = ()  # tokens generated before a failover (resume_token_ids), counted as output
    stop: tuple[str, ...] = ()

    def view(self, start: int = 0) -> dict[str, Any]:
        return {
            "token_ids": list(self.token_ids[start:]),
            "offset": start,
            "text": self.text if self.finished else None,
            "finished": self.finished,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "blocks": list(self.blocks) if self.finished else [],
            "substitutions": self.substitutions,
            "ttft": (self.first_token - self.submitted) if self.first_token else None,
            "latency": (self.done_at - self.submitted) if self.done_at else None,
        }


class BlockHost:
    """Owns an Engine on this worker's device; all engine calls happen on one stepping thread."""

    def __init__(self, zoo_url: str, storage_options: dict | None = None, engine_kwargs: dict | None = None, max_queued: int | None = None) -> None:
        self.zoo = Zoo(zoo_url, storage_options=storage_options, read_only=True)
        self.keys = KeyRing(self.zoo)
        self.engine_kwargs = dict(engine_kwargs or {})
        self.max_queued = int(max_queued or _config.get("serving.max-queued", 4096))
        # Requests wait in admission; the engine holds `engine_waiting` of them ahead of its batch, or
        # a prefill budget's worth while none it holds is blocked by a full block (_hand_out).
        self.admission = Admission()
        self.engine_waiting = int(_config.get("serving.engine-waiting", 2))
        self.manifest_ttl = float(_config.get("serving.manifest-cache", 1.0))
        self._manifests: dict[tuple[str, str], tuple[Any, float]] = {}  # (tenant, name) -> (manifest, read at)
        self.engine = None  # made on the stepping thread
        self.split = None  # handoff.SplitHost: chains split across workers (set by the plugin)
        self._inbox: queue.Queue = queue.Queue()
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        # long polls waiting on the event loop, per request id: for new tokens, for the end
        self._token_waiters: dict[str, set[asyncio.Future]] = {}
        self._end_waiters: dict[str, set[asyncio.Future]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blockllm-host", daemon=True)
        from ..metrics import HostMetrics

        self.metrics = HostMetrics()  # exported by blockllm.monitoring (dashboard, /metrics)
        self.traffic: Counter[str] = Counter()  # requests per model since start
        self.transitions: Counter[tuple[str, str]] = Counter()  # block -> next block, per request
        self.steps = 0
        self.loaded: set[str] = set()
        self._graph = None  # graphs.PublishedGraph, made on first use
        self._graph_checked = 0.0
        self._tokenizers: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _call(self, fn, *args) -> Future:
        """Run fn(engine, *args) on the stepping thread (failed at once if that thread has died)."""
        fut: Future = Future()
        dead = getattr(self, "_died", None)
        if dead is not None:
            fut.set_exception(BlockLLMError(f"this worker's block host stopped: {dead!r}; its requests go to other workers"))
            return fut
        self._inbox.put((fn, args, fut))
        dead = getattr(self, "_died", None)
        if dead is not None and not fut.done():  # it died between the check and the put
            fut.set_exception(BlockLLMError(f"this worker's block host stopped: {dead!r}"))
        return fut

    def _notify(self, changed: list[str] | tuple[str, ...] = (), ended: list[str] | tuple[str, ...] = ()) -> None:
        """Wake the long polls of these requests (from any thread): those waiting for tokens when
        theirs `changed` or `ended`, those waiting for the end when it `ended`. Only their own
        polls wake, so a finish costs the event loop one wake-up, not one per request in flight."""
        changed = changed if self._token_waiters else ()  # nobody streams: a step with no end wakes nothing
        if self._loop is not None and (changed or ended):
            self._loop.call_soon_threadsafe(self._wake, changed, ended)

    def _wake(self, changed: list[str] | tuple[str, ...], ended: list[str] | tuple[str, ...]) -> None:
        for waiters, ids in ((self._token_waiters, changed), (self._token_waiters, ended), (self._end_waiters, ended)):
            if not waiters:
                continue
            for rid in ids:
                for fut in waiters.pop(rid, ()):
                    if not fut.done():
                        fut.set_result(None)

    def _run(self) -> None:
        try:
            self._steps()
        except BaseException as e:  # every waiting and later call fails, typed, instead of hanging
            log.exception("block host's stepping thread stopped")
            self._died = e
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item and not item[2].done():
                    item[2].set_exception(BlockLLMError(f"this worker's block host stopped: {e!r}"))

    def _steps(self) -> None:
        from ..engine import Engine

        self.engine = Engine(self.zoo, **self.engine_kwargs)
        while not self._stop.is_set():
            busy = self.engine.has_unfinished() or self.admission.pending("engine") > 0
            # split requests queued here wait for room in the split driver, which steps on its own thread
            idle = 0.005 if self.admission.pending("split") else 0.05
            try:
                item = self._inbox.get(timeout=0 if busy else idle)
            except queue.Empty:
                item = False
            while item:
                fn, args, fut = item
                try:
                    fut.set_result(fn(self.engine, *args))
                except BaseException as e:  # handed back to the caller, typed
                    fut.set_exception(e)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = False
            if item is None:
                break
            self._hand_out()
            try:
                self._hand_out_split()
            except Exception:  # never let the stepping thread die of it: every later call would hang
                log.exception("handing split-chain requests to the split driver failed")
            if self.engine.has_unfinished():
                started = time.perf_counter()
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    log.exception("engine step failed; failing its requests")
                    self._fail_all(e)
                    continue
                self.metrics.step(time.perf_counter() - started, len(outputs))
                self.steps += 1
                self._record(outputs)

    def _hand_out(self) -> None:
        """Move requests from admission into the engine, fairly: always a few ahead of its batch
        (`serving.engine-waiting`), and while it would start all it holds, as many as its next
        step's prefill budget takes, up to a batch (a few a step throttled arrivals to a few a
        step); batch ones only into the room that online work leaves in the engine's batch."""
        if not len(self.admission):  # the common case of a busy step: nothing to judge
            return
        sched = self.engine.scheduler
        online = [s for s in sched.waiting if s.req.priority >= ENGINE_PRIORITY["online"]]
        # batch sequences the engine holds back (its batch caps) never block an online hand-out
        room = self.engine_waiting - len(online)
        # past those few, only while the engine would start everything it holds: none of its
        # waiting online requests is held back by a block at its limit (a full batch stays fair)
        held = sched.held_back(online)
        tokens = 0 if held else sched.prefill_chunk - sum(len(s.tokens) - s.computed for s in online)
        cap = 0 if held else self.engine.max_batch_size - len(online)
        if room <= 0 and (tokens <= 0 or cap <= 0):
            return
        free = min(self.engine_waiting - len(sched.waiting), self.engine.max_batch_size - len(sched.running) - len(sched.waiting))
        batch_room = 0 if online else max(0, free)
        in_engine: Counter[str] = Counter()
        with self._lock:
            for seq in (*sched.running, *sched.waiting):
                t = self._tracked.get(seq.req.request_id)
                if t is not None:
                    in_engine[t.tenant] += 1
        skip = self.admission.at_share(in_engine, self.engine.max_batch_size)
        for t in self.admission.take(max(room, 0), batch_room, skip, tokens=tokens, cap=cap):
            try:
                self.engine.add_request(t.request)
            except Exception as e:  # e.g. its model was unloaded while it waited: fail it, typed
                self._fail_ticket(t, e)

    def _hand_out_split(self) -> None:
        """The same for requests whose chain starts with a segment here: from admission's split lane
        into the split driver, a few at a time (`serving.engine-waiting` ahead of its batch)."""
        if self.split is None or not self.admission.pending("split"):
            return
        driver = self.split.driver
        sched = driver.scheduler
        running, waiting = list(sched.running), list(sched.waiting)  # the driver's thread changes them
        handed = driver.queued_adds()  # handed out, not yet picked up by its thread: counted as online
        waiting_online = handed + sum(s.req.priority >= ENGINE_PRIORITY["online"] for s in waiting)
        room = self.engine_waiting - waiting_online
        if room <= 0:
            return
        queued = handed + len(waiting)
        free = min(self.engine_waiting - queued, driver.engine.max_batch_size - len(running) - queued)
        batch_room = 0 if waiting_online else max(0, free)
        in_driver: Counter[str] = Counter()
        with self._lock:
            for seq in (*running, *waiting):
                tr = self._tracked.get(seq.req.request_id)
                if tr is not None:
                    in_driver[tr.tenant] += 1
        skip = self.admission.at_share(in_driver, driver.engine.max_batch_size)
        for t in self.admission.take(room, batch_room, skip, lane="split"):
            try:
                driver.add_request(t.request)
            except Exception as e:  # e.g. its segment was re-placed while it waited
                self._fail_ticket(t, e)

    def _fail_ticket(self, t: Ticket, error: Exception) -> None:
        with self._lock:
            tr = self._tracked.get(t.request.request_id)
            if tr is not None and not tr.finished:
                tr.finished, tr.error, tr.finish_reason = True, error_to_wire(error), "error"
        self._notify(ended=[t.request.request_id])

    def _record(self, outputs) -> None:
        now = time.monotonic()
        changed, ended = [], []
        with self._lock:
            for out in outputs:
                t = self._tracked.get(out.request_id)
                if t is None:
                    continue
                changed.append(out.request_id)
                if out.token_ids and t.first_token is None:
                    t.first_token = now
                t.token_ids = (*t.prefix, *out.token_ids) if t.prefix else out.token_ids  # the engine's tuple, not a copy a step
                if out.finished:
                    ended.append(out.request_id)
                    text = out.text
                    if t.prefix and out.finish_reason != "abort":
                        text = self._resumed_text(t)
                    t.finished, t.finish_reason, t.text, t.done_at = True, out.finish_reason, text, now
                    t.blocks = tuple(out.blocks)
                    self.metrics.finished(
                        t.requested or t.model, t.tenant, n_tokens=len(t.token_ids), ttft=(t.first_token - t.submitted) if t.first_token is not None else None,
                        latency=now - t.submitted, finish_reason=t.finish_reason, substituted=len(t.substitutions),
                    )
                    for a, b in pairwise(out.blocks):
                        self.transitions[(a, b)] += 1
        self._notify(changed, ended)

    def _resumed_text(self, t: _Tracked) -> str | None:
        """The text of a resumed request: all its tokens decoded at once, cut at a stop string."""
        try:
            text = self.tokenizer(t.requested or t.model).decode(t.token_ids, skip_special_tokens=True)
        except Exception:  # no tokenizer in the zoo for it: token ids only
            return None
        hits = [text.index(s) for s in t.stop if s in text]
        return text[: min(hits)] if hits else text

    def _fail_all(self, error: Exception) -> None:
        failed = []
        with self._lock:
            for rid, t in self._tracked.items():
                if not t.finished:
                    t.finished, t.error, t.finish_reason = True, error_to_wire(error), "error"
                    self.engine.abort(rid)
                    failed.append(rid)
        self._notify(ended=failed)

    # ------------------------------------------------------------------ operations
    def load(self, models: list[str]) -> dict[str, Any]:
        """Load models' blocks (blocking); used by placement tasks."""
        result = self._call(_load_models, models).result()
        self.loaded.update(models)
        return result

    def unload(self, models: list[str]) -> dict[str, Any]:
        with self._lock:
            busy = {t.model for t in self._tracked.values() if not t.finished}
        for m in sorted(busy & set(models)):  # never abort requests in flight; a later round drops it
            log.info("not unloading %s: it has requests in flight", m)
        result = self._call(_unload_models, [m for m in models if m not in busy]).result()
        self.loaded = set(self._call(lambda e: e.loaded_models()).result())
        return result

    def tokenizer(self, model: str):
        tok = self._tokenizers.get(model)
        if tok is None:
            from ..chain import load_tokenizer

            tok = self._tokenizers[model] = load_tokenizer(self.zoo, model)
        return tok

    def stats(self) -> dict[str, Any]:
        engine_stats = self._call(lambda e: e.stats()).result()
        with self._lock:
            running = sum(not t.finished for t in self._tracked.values())
        return {
            "engine": _asdict(engine_stats),
            "running": running,
            "steps": self.steps,
            "traffic": dict(self.traffic),
            "transitions": [[a, b, n] for (a, b), n in self.transitions.items()],
            "models": sorted(self.loaded),
            "admission": self.admission.snapshot(),
            "split": self.split.stats() if self.split is not None else None,
        }

    def submit(self, requests: list[dict]) -> list[dict | None]:
        """Admit requests; returns per request None (accepted) or a wire error.

        Each request is checked (shape, key, access, the engine's own checks) and queued in
        admission; the stepping thread hands it to the engine when its tenant's turn comes.
        """
        results: list[dict | None] = []
        with self._lock:
            queued = sum(not t.finished for t in self._tracked.values())
        for raw in requests:
            model = str(raw.get("model", "")) if isinstance(raw, dict) else ""
            tenant = ""
            try:
                if queued >= self.max_queued:
                    raise OverloadedError(f"this worker holds {queued} requests already (serving.max-queued)", retry_after=1.0)
                wire = parse_request(raw)
                tenant = self.keys.tenant(wire.api_key)
                self.admission.check(tenant, wire.model)  # a flood is refused before any work on it
                req, tenant, substitutions = self._prepare(wire)
                split = self.split.driver if self.split is not None and self.split.driver.serves(req.model) else None
                if split is not None:  # its chain starts with a segment here (handoff.py)
                    split.check_request(req)
                else:
                    engine = self.engine
                    if engine is not None:  # its checks only read: no hop to the stepping thread
                        engine.check_request(req)
                    else:
                        self._call(lambda e, r=req: e.check_request(r)).result()
                with self._lock:
                    if req.request_id in self._tracked:
                        raise BlockLLMError(f"request id {req.request_id} is already in use")
                    self._tracked[req.request_id] = _Tracked(
                        req.model, tenant, time.monotonic(), wire.model, len(req.prompt_token_ids), substitutions=substitutions,
                        prefix=wire.resume_token_ids, stop=wire.sampling.stop,
                    )
                try:  # split or not, it waits in the same bounded, fair queues
                    self.admission.offer(Ticket(req, tenant, wire.model, wire.priority, "split" if split is not None else "engine"))
                except BaseException:
                    with self._lock:
                        self._tracked.pop(req.request_id, None)
                    raise
                self._inbox.put((lambda e: None, (), Future()))  # wake the stepping thread
                self.traffic[wire.model] += 1
                self.metrics.admitted(wire.model, tenant, prompt_tokens=len(req.prompt_token_ids))
                queued += 1
                results.append(None)
            except (BlockLLMError, ZooError, ValueError, KeyError, PermissionError) as e:
                self.metrics.rejected(model, tenant, type(e).__name__)
                results.append(error_to_wire(e))
        return results

    def _prepare(self, wire: WireRequest) -> tuple[Request, str, list[dict]]:
        tenant = self.keys.tenant(wire.api_key)
        manifest = self.manifest(wire.owner, wire.name)
        check_access(manifest, tenant)
        serve_as, substitutions = self._plan_chain(manifest, tenant)
        ids = wire.prompt_token_ids
        if ids is None:
            ids = _tokenize(self.tokenizer(wire.model), wire.prompt, list(wire.messages) if wire.messages else None)
        sampling = wire.sampling
        if wire.resume_token_ids:  # continue a request another worker began: its tokens so far are prompt now
            ids = (*ids, *wire.resume_token_ids)
            sampling = dataclasses.replace(sampling, max_new_tokens=sampling.max_new_tokens - len(wire.resume_token_ids))
        req = Request(wire.request_id, serve_as, tuple(int(i) for i in ids), sampling, ENGINE_PRIORITY[wire.priority])
        return req, tenant, substitutions

    def manifest(self, tenant: str, name: str):
        """A model's manifest, read from the zoo at most once per `serving.manifest-cache` seconds
        (a changed visibility or chain is seen that much later; an unknown model is never cached)."""
        key, now = (tenant, name), time.monotonic()
        hit = self._manifests.get(key)
        if hit is not None and now - hit[1] < self.manifest_ttl:
            return hit[0]
        manifest = self.zoo.get_manifest(tenant, name)
        self._manifests[key] = (manifest, now)
        return manifest

    def _plan_chain(self, manifest, tenant: str) -> tuple[str, list[dict]]:
        """The model key to run: its own chain, or (within its owner's error budget) a substituted one."""
        if not manifest.error_budget:
            return manifest.key, []
        from graphs import ChainPlanner, PublishedGraph

        if self._graph is None:
            self._graph = PublishedGraph(self.zoo)
        if time.monotonic() - self._graph_checked > 10:
            self._graph.refresh()
            self._graph_checked = time.monotonic()
        resident = {fp for key in self.loaded for fp in self.manifest(*key.split("/", 1)).fingerprints()}
        plan = ChainPlanner(self._graph.graph).plan(manifest, tenant, resident=resident)
        if not plan.substituted:
            return manifest.key, []
        digest = hashlib.sha256("".join(plan.chain).encode()).hexdigest()[:10]
        derived = dataclasses.replace(plan.manifest(manifest), name=f"{manifest.name[:50]}.sub-{digest}")
        self._call(lambda e: e.load(derived)).result()
        return derived.key, plan.report()["substitutions"]

    def authorize(self, api_key: str | None, model: str) -> dict | None:
        """None if the key's tenant may run `model`, else a wire error (checked before placing it)."""
        try:
            tenant = self.keys.tenant(api_key)
            owner, _, name = model.partition("/")
            check_access(self.manifest(owner, name), tenant)
        except (BlockLLMError, ZooError, ValueError, KeyError, PermissionError) as e:
            return error_to_wire(e)
        return None

    def abort(self, ids: list[str]) -> None:
        self.admission.remove(ids)
        for rid in ids:
            self._call(lambda e, r=rid: e.abort(r))
            if self.split is not None:
                self.split.driver.abort(rid)
            with self._lock:
                self._tracked.pop(rid, None)
        self._notify(ended=list(ids))  # a poll waiting on them answers now (unknown request)

    async def poll(self, ids: list[str], offsets: list[int] | None = None, timeout: float = 5.0, until_finished: bool = False) -> dict[str, Any]:
        """Long poll: the new tokens of `ids` (from `offsets`), once any changed (or, with
        `until_finished`, once any finished) or `timeout` passed. Runs on the event loop."""
        offsets = offsets or [0] * len(ids)
        deadline = time.monotonic() + timeout
        waiters = self._end_waiters if until_finished else self._token_waiters
        loop = asyncio.get_running_loop()
        while True:
            # registered before the check: the stepping thread records a change, then looks for
            # waiters (`_notify`), so a change this check misses always finds this waiter
            fut = loop.create_future()
            for rid in ids:
                waiters.setdefault(rid, set()).add(fut)
            try:
                with self._lock:
                    states = {rid: self._tracked.get(rid) for rid in ids}
                    ready = any(
                        t is None or t.finished or (not until_finished and len(t.token_ids) > off)
                        for (rid, t), off in zip(states.items(), offsets, strict=True)
                    )
                    if ready or time.monotonic() >= deadline:
                        out = {}
                        for (rid, t), off in zip(states.items(), offsets, strict=True):
                            out[rid] = {"error": {"type": "KeyError", "message": f"unknown request {rid}"}, "finished": True} if t is None else t.view(off)
                            if t is not None and t.finished:
                                self._tracked.pop(rid, None)  # delivered: forget it
                        return out
                timer = loop.call_later(max(0.0, deadline - time.monotonic()), lambda f=fut: f.done() or f.set_result(None))
                try:
                    await fut
                finally:
                    timer.cancel()
            finally:
                for rid in ids:
                    s = waiters.get(rid)
                    if s is not None:
                        s.discard(fut)
                        if not s:
                            del waiters[rid]


def _asdict(obj: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _load_models(engine, models: list[str]) -> dict[str, Any]:
    for m in models:
        engine.load(m)
    return {"weight_bytes": engine.stats().weight_bytes}


def _unload_models(engine, models: list[str]) -> dict[str, Any]:
    for m in models:
        engine.unload(m)
    return {"weight_bytes": engine.stats().weight_bytes}


def _tokenize(tok, prompt: str | None, messages: list | None) -> list[int]:
    if messages is not None:
        # distributed's msgpack hands lists over as tuples
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...}")
        chat = [dict(m) for m in messages]
        return list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, not {type(prompt).__name__}")
    return list(tok(prompt)["input_ids"])


class BlockHostPlugin(WorkerPlugin):
    """Installs a BlockHost on every worker (present and future) and its RPC handlers."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, zoo_url: str, storage_options: dict | None = None, engine_kwargs: dict | None = None) -> None:
        self.zoo_url = zoo_url
        self.storage_options = storage_options
        self.engine_kwargs = engine_kwargs

    def setup(self, worker) -> None:
        stop_task_profiler(worker)
        host = BlockHost(self.zoo_url, self.storage_options, self.engine_kwargs)
        host.start(asyncio.get_running_loop() if _in_loop() else worker.loop.asyncio_loop)
        worker.extensions["blockllm"] = host

        async def submit(comm=None, requests=None):
            return await asyncio.get_running_loop().run_in_executor(None, host.submit, requests or [])

        async def poll(comm=None, ids=None, offsets=None, timeout=5.0, until_finished=False):
            return await host.poll(list(ids or []), list(offsets or []) or None, float(timeout), bool(until_finished))

        async def abort(comm=None, ids=None):
            host.abort(list(ids or []))

        async def authorize(comm=None, api_key=None, model=None):
            return await asyncio.get_running_loop().run_in_executor(None, host.authorize, api_key, model)

        async def stats(comm=None):
            return await asyncio.get_running_loop().run_in_executor(None, host.stats)

        worker.handlers.update(
            {"blockllm_submit": submit, "blockllm_poll": poll, "blockllm_abort": abort, "blockllm_stats": stats, "blockllm_authorize": authorize}
        )
        install_split(worker, host, self.engine_kwargs)  # split chains: segment engine, hand-off handlers

    def teardown(self, worker) -> None:
        host = worker.extensions.pop("blockllm", None)
        split = worker.extensions.pop("blockllm-split", None)
        if split is not None:
            split.stop()
        if host is not None:
            host.stop()


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def get_host() -> BlockHost:
    """The block host of the worker running the current task."""
    from distributed import get_worker

    worker = get_worker()
    host = worker.extensions.get("blockllm")
    if host is None:
        raise RuntimeError("this worker has no BlockLLM host; register BlockHostPlugin first")
    return host
