"""The Python client: submit request batches to a BlockLLM cluster on Dask, get futures or streams.

`Client()` with no address starts a LocalCluster (CPU workers when there is no GPU); an address
or an existing `distributed.Client` connects to a running cluster. Requests go straight to the
block hosts on the workers over distributed's comms; placement runs as Dask tasks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import distributed

from zoo_store import Zoo, ZooError

from . import config as _config
from .auth import KeyRing
from .exceptions import BlockLLMError, NoCapacityError, OverloadedError, UnknownModelError
from .serving.admission import parse_priority
from .serving.handoff import place_segments
from .serving.host import PLUGIN_NAME, BlockHostPlugin, get_host
from .serving.placement import PlacementPlan, WorkerInfo, plan_placement
from .serving.wire import error_from_wire
from .types import SamplingParams

log = logging.getLogger(__name__)

MAX_BATCH = 10_000  # requests per submit() call
# How long a failed request of a split chain waits for distributed to report one of its segments'
# workers gone before its error stands (the first worker may see the hand-off break first).
SEGMENT_LOSS_WAIT = 10.0


def _maybe_lost_segment(plan: PlacementPlan | None, model: str, error: BaseException) -> bool:
    """Whether `error` may be a split chain's first worker reporting its next segment lost: a
    hand-off broken by a comm error (plain BlockLLMError), or its route dropped by a re-placement
    after a loss (UnknownModelError). Typed errors of the request itself are never failed over."""
    return plan is not None and model in plan.splits and type(error) in (BlockLLMError, UnknownModelError)


def _segment_workers(plan: PlacementPlan | None, model: str) -> set[str]:
    return {s.worker for s in plan.splits.get(model, ())} if plan is not None else set()


@dataclass(frozen=True)
class Completion:
    """The final result of one request."""

    request_id: str
    model: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    worker: str
    blocks: tuple[str, ...] = ()
    ttft: float | None = None
    latency: float | None = None
    substitutions: tuple[dict, ...] = ()  # blocks served by an equivalent, with their scores


@dataclass
class GenerationRequest:
    model: str  # "tenant/name"
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    priority: str = "online"  # "online" or "batch" (batch fills the capacity online work leaves)

    def to_wire(self, api_key: str | None) -> dict[str, Any]:
        import dataclasses

        if sum(x is not None for x in (self.prompt, self.messages, self.prompt_token_ids)) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, not {type(self.sampling).__name__}")
        parse_priority(self.priority)
        return {
            "request_id": self.request_id, "model": self.model, "prompt": self.prompt,
            "messages": self.messages, "prompt_token_ids": self.prompt_token_ids,
            "sampling": dataclasses.asdict(self.sampling), "priority": self.priority, "api_key": api_key,
        }


def _place_on_host(models: list[str], drop: list[str]) -> dict[str, Any]:
    """A Dask task: load `models` on this worker's block host (and unload `drop`)."""
    host = get_host()
    if drop:
        host.unload(drop)
    return host.load(models)


class Client:
    """A BlockLLM client for one tenant (its API key) on a Dask cluster."""

    def __init__(
        self,
        address: str | distributed.Client | None = None,
        *,
        api_key: str | None = None,
        zoo: str | None = None,
        storage_options: dict | None = None,
        n_workers: int = 2,
        engine: dict | None = None,
        capacity_bytes: int | None = None,
    ) -> None:
        self.zoo_url = zoo or _config.default_zoo_url()
        self.zoo = Zoo(self.zoo_url, storage_options=storage_options, read_only=True)
        self.api_key = api_key
        self._own_cluster = None
        if isinstance(address, distributed.Client):
            self.dask = address
            self._own_dask = False
        else:
            if address is None:
                self._own_cluster = distributed.LocalCluster(
                    n_workers=n_workers, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0",
                    host="127.0.0.1", silence_logs=logging.WARNING,
                )
                address = self._own_cluster
            self.dask = distributed.Client(address)
            self._own_dask = True
        self.dask.register_plugin(BlockHostPlugin(self.zoo_url, storage_options, engine), name=PLUGIN_NAME)
        self.capacity_bytes = capacity_bytes or int(_config.get("serving.capacity-bytes", 0) or 0) or (1 << 40)
        self.plan: PlacementPlan | None = None
        self._inflight: Counter[str] = Counter()
        self._rr = itertools.count()
        self._replace_lock = threading.Lock()
        self._keys: KeyRing | None = None
        self._tasks: set[asyncio.Task] = set()  # split-chain resumptions under way (held: the loop keeps weak refs)

    # ------------------------------------------------------------------ cluster
    @property
    def workers(self) -> list[str]:
        return sorted(self.dask.scheduler_info(n_workers=-1)["workers"])

    @property
    def dashboard_link(self) -> str:
        return self.dask.dashboard_link

    def close(self) -> None:
        if self._own_dask:
            self.dask.close()
        if self._own_cluster is not None:
            self._own_cluster.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ placement
    def place(
        self, models: Sequence[str] | None = None, traffic: dict[str, float] | None = None, *, split: dict[str, int] | None = None
    ) -> PlacementPlan:
        """Plan where models live and load them there, as Dask tasks pinned to workers.

        A model no worker can hold whole is split over two workers; `split` (model -> layer) asks
        for that split explicitly (see serving/placement.py and serving/handoff.py).
        """
        manifests = {m.key: m for m in self.zoo.list_models()}
        wanted = list(models) if models is not None else sorted(manifests)
        unknown = [m for m in wanted if m not in manifests]
        if unknown:
            raise BlockLLMError(f"cannot place unknown models {unknown}")
        chosen = {k: manifests[k] for k in wanted}
        sizes = {fp: self.zoo.block_spec(fp).nbytes for m in chosen.values() for fp in m.fingerprints()}
        answering = self._host_stats()  # workers whose block host answers (one that has just joined may not yet)
        # the cluster's actual state: other clients may have placed models too
        current = {w: set(st["models"]) | set((st.get("split") or {}).get("routes", ())) for w, st in answering.items()}
        starts = {k: [self.zoo.block_spec(fp).layer_start for fp in m.chain[1:-1]] for k, m in chosen.items()}
        plan = plan_placement(
            chosen, sizes, [WorkerInfo(w, self.capacity_bytes) for w in sorted(answering)], traffic, current,
            split=split, layer_starts=starts,
        )
        futures = []
        for worker in plan.assignments:  # every worker: segments it no longer holds are unloaded
            futures.append(self.dask.submit(
                place_segments, plan.segments_on(worker), workers=[worker], allow_other_workers=False,
                pure=False, key=f"blockllm-place-segments-{uuid.uuid4().hex[:8]}",
            ))
        for worker, models_here in plan.assignments.items():
            drop = sorted(current.get(worker, set()) - set(models_here))
            futures.append(self.dask.submit(
                _place_on_host, list(models_here), drop, workers=[worker], allow_other_workers=False,
                pure=False, key=f"blockllm-place-{uuid.uuid4().hex[:8]}",
            ))
        self.dask.gather(futures)
        self.plan = plan
        return plan

    def _tenant(self) -> str:
        """The tenant of this client's API key (AuthenticationError if it is not a valid key)."""
        if self._keys is None:
            self._keys = KeyRing(self.zoo)
        return self._keys.tenant(self.api_key)

    def models(self) -> list[str]:
        """The models this client's tenant may run: its own and the shared ones (all, with no key)."""
        tenant = self._tenant() if self.api_key is not None else None
        return sorted(m.key for m in self.zoo.list_models() if tenant is None or m.tenant == tenant or m.visibility == "shared")

    def loaded(self) -> dict[str, set[str]]:
        """worker -> models its block host takes requests for now (whole, or a split chain's first segment)."""
        return {w: set(st["models"]) | set((st.get("split") or {}).get("routes", ())) for w, st in self.stats().items()}

    def _least_loaded(self, workers: Sequence[str], pending: Counter | None = None) -> str:
        """The worker with the fewest requests in flight, counting `pending` (those this submit has
        routed already); ties go round the workers, so replicas share a burst."""
        start, n, pending = next(self._rr), len(workers), pending or Counter()
        return min(enumerate(workers), key=lambda iw: (self._inflight[iw[1]] + pending[iw[1]], (iw[0] - start) % n))[1]

    def _route(self, model: str, pending: Counter | None = None) -> str:
        if self.plan is None or not self.plan.workers_for(model):
            where = [w for w, models in self.loaded().items() if model in models]
            if where:  # placed by another client of this cluster
                return self._least_loaded(where, pending)
            # Placing on demand: first make sure this tenant may run the model at all.
            workers = self.workers
            if not workers:
                raise NoCapacityError("the cluster has no workers")

            async def authorize():
                return await self.dask.rpc(workers[0]).blockllm_authorize(api_key=self.api_key, model=model)

            err = self.dask.sync(authorize)
            if err is not None:
                raise error_from_wire(err)
            plan = self._replace(self._plan_models(self.plan) | {model})
            if not plan.workers_for(model):
                raise NoCapacityError(f"no worker can host {model}: {plan.unplaced.get(model, 'unknown reason')}")
        return self._least_loaded(self.plan.workers_for(model), pending)

    # ------------------------------------------------------------------ requests
    def submit(self, requests: Sequence[GenerationRequest]) -> list[Future]:
        """Submit a batch; one concurrent.futures.Future[Completion] per request, in order."""
        requests = list(requests)
        if not requests:
            raise ValueError("submit() needs at least one request")
        if len(requests) > MAX_BATCH:
            raise OverloadedError(f"a batch of {len(requests)} requests exceeds the limit of {MAX_BATCH}; split it", retry_after=0.0)
        wires = [r.to_wire(self.api_key) for r in requests]  # malformed requests fail here, in the caller
        by_worker: dict[str, list[int]] = {}
        pending: Counter = Counter()  # routed by this call, not yet in flight
        for i, r in enumerate(requests):
            worker = self._route(r.model, pending)
            pending[worker] += 1
            by_worker.setdefault(worker, []).append(i)
        futures: list[Future] = [Future() for _ in requests]
        for worker, idx in by_worker.items():
            self._inflight[worker] += len(idx)
            self.dask.loop.add_callback(self._drive, worker, [wires[i] for i in idx], [futures[i] for i in idx])
        return futures

    async def _drive(self, worker: str, wires: list[dict], futures: list[Future], received: list[list[int]] | None = None) -> None:
        """Submit to one worker and poll until every request is done; on the loss of the worker
        (distributed says it left), resubmit what is unfinished elsewhere with the tokens so far."""
        received = received if received is not None else [[] for _ in wires]
        pending: dict[str, tuple[dict, Future, list[int]]] = {}
        plan = self.plan  # the placement these requests were routed by (split chains: their segments)
        try:
            try:
                sent = [dict(w, resume_token_ids=list(toks)) if toks else w for w, toks in zip(wires, received, strict=True)]
                errors = await self.dask.rpc(worker).blockllm_submit(requests=sent)
                for w, f, toks, err in zip(wires, futures, received, errors, strict=True):
                    if err is not None:
                        f.set_exception(error_from_wire(err))
                    else:
                        pending[w["request_id"]] = (w, f, toks)
                while pending:
                    ids = list(pending)
                    states = await self.dask.rpc(worker).blockllm_poll(
                        ids=ids, offsets=[len(pending[r][2]) for r in ids], timeout=5.0, until_finished=True
                    )
                    suspects = []
                    for rid, st in states.items():
                        w, f, toks = pending[rid]
                        if st.get("offset", len(toks)) == len(toks):  # tokens so far: what a failover resumes from
                            toks.extend(st.get("token_ids") or ())
                        if not st.get("finished"):
                            continue
                        del pending[rid]
                        if st.get("error"):
                            err = error_from_wire(st["error"])
                            if _maybe_lost_segment(plan, w["model"], err):
                                suspects.append((w, f, toks, err))
                            else:
                                f.set_exception(err)
                        else:
                            f.set_result(Completion(rid, w["model"], st.get("text") or "", tuple(toks), st["finish_reason"], worker, tuple(st.get("blocks", ())), st.get("ttft"), st.get("latency"), tuple(st.get("substitutions", ()))))
                    if suspects:  # off this loop: the others here keep being polled meanwhile
                        task = asyncio.ensure_future(self._resume_split(worker, plan, suspects))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
            except OSError as e:  # distributed's CommClosedError and connect failures are OSErrors
                left = [(w, f, toks) for w, f, toks in zip(wires, futures, received, strict=True) if not f.done()]
                if not left or not await self._worker_left(worker):
                    raise
                log.warning("worker %s was lost with %d requests in flight (%r); resubmitting them elsewhere", worker, len(left), e)
                await self._failover(worker, left)
        except Exception as e:  # worker lost for good or comm broken: fail what is left, typed
            for f in futures:
                if not f.done():
                    f.set_exception(e if isinstance(e, BlockLLMError) else BlockLLMError(f"worker {worker} failed: {e!r}"))
        finally:
            self._inflight[worker] -= len(futures)

    async def _worker_left(self, worker: str, timeout: float = 30.0) -> bool:
        """Whether the scheduler has removed `worker` (its own failure detection), waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self.dask.scheduler.identity(n_workers=-1)
            if worker not in info.get("workers", {}):
                return True
            await asyncio.sleep(0.2)
        return False

    async def _segment_lost(self, workers: set[str], timeout: float = SEGMENT_LOSS_WAIT) -> str | None:
        """One of `workers` that the scheduler has removed, waiting up to `timeout`; None if all stay."""
        if not workers:
            return None
        deadline = time.monotonic() + timeout
        while True:
            info = await self.dask.scheduler.identity(n_workers=-1)
            gone = sorted(workers - set(info.get("workers", {})))
            if gone:
                return gone[0]
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.2)

    async def _resume_split(self, worker: str, plan: PlacementPlan | None, items: list[tuple[dict, Future, list[int], BaseException]]) -> None:
        """Requests of split chains that failed on `worker` (their first segment's): if a worker of
        one of their segments is gone, re-place and resume them from their tokens so far, as for a
        lost worker; otherwise their errors stand."""
        try:
            lost = await self._segment_lost(set().union(*(_segment_workers(plan, w["model"]) for w, *_ in items)) - {worker})
            left = []
            for w, f, toks, err in items:
                if lost is not None and lost in _segment_workers(plan, w["model"]):
                    left.append((w, f, toks))
                else:
                    f.set_exception(err)
            if left:
                log.warning("worker %s of a split chain was lost with %d requests in flight through it; resuming them", lost, len(left))
                await self._failover(lost, left)
        except Exception as e:
            for _, f, _, _ in items:
                if not f.done():
                    f.set_exception(e if isinstance(e, BlockLLMError) else BlockLLMError(f"resuming split-chain requests failed: {e!r}"))

    async def _failover(self, lost: str, left: list[tuple[dict, Future, list[int]]]) -> None:
        """Re-place the models of `left` on surviving workers and drive each request from its tokens so far."""
        loop = asyncio.get_running_loop()
        routes = {}
        for model in sorted({w["model"] for w, _, _ in left}):
            routes[model] = await loop.run_in_executor(None, self._reroute, model, lost)
        groups: dict[str, list[tuple[dict, Future, list[int]]]] = {}
        for item in left:
            groups.setdefault(routes[item[0]["model"]], []).append(item)
        for worker, items in groups.items():
            self._inflight[worker] += len(items)
        await asyncio.gather(*(
            self._drive(worker, [w for w, _, _ in items], [f for _, f, _ in items], [toks for _, _, toks in items])
            for worker, items in groups.items()
        ))

    @staticmethod
    def _plan_models(plan: PlacementPlan | None) -> set[str]:
        """Every model a plan placed: whole on some worker, or split."""
        if plan is None:
            return set()
        return {m for ms in plan.assignments.values() for m in ms} | set(plan.splits)

    def _replace(self, models: set[str]) -> PlacementPlan:
        """Place `models` again, keeping the chains the current plan split split at the same layer
        (over the workers there are now); one that can no longer be split is placed as placement can."""
        split = {m: segs[0].end for m, segs in (self.plan.splits.items() if self.plan is not None else ()) if m in models}
        plan = self.place(sorted(models), split=split or None)
        stuck = {m for m in split if m in plan.unplaced}
        if stuck:  # too few workers left to split them there
            plan = self.place(sorted(models), split={m: k for m, k in split.items() if m not in stuck} or None)
        return plan

    def _reroute(self, model: str, lost: str) -> str:
        """A surviving worker for `model` (on a thread: placement blocks); re-places once per lost worker."""
        with self._replace_lock:
            if self.plan is not None and any(lost == w for w in self.plan.assignments):
                models = self._plan_models(self.plan) | {model}
                for attempt in range(3):  # a worker that has just joined may not answer yet
                    try:
                        self._replace(models)
                        break
                    except OSError:
                        if attempt == 2:
                            raise
                        time.sleep(1.0)
            return self._route(model)

    def generate(
        self,
        prompts: Sequence[str] | str,
        model: str,
        sampling: SamplingParams | None = None,
        *,
        timeout: float | None = 600,
    ) -> list[Completion]:
        """Plain results for a batch of prompts to one model (raises the first typed error)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        reqs = [GenerationRequest(model=model, prompt=p, sampling=sampling or SamplingParams()) for p in prompts]
        return [f.result(timeout) for f in self.submit(reqs)]

    def stream(self, request: GenerationRequest) -> Iterator[list[int]]:
        """Yield lists of new token ids as the request produces them; if its worker is lost midway,
        the stream goes on from a surviving worker, resumed from the tokens already yielded."""
        wire = request.to_wire(self.api_key)
        received: list[int] = []
        worker = self._route(request.model)
        while True:
            plan = self.plan  # the placement it was routed by
            try:
                yield from self._stream_from(worker, wire, received)
                return
            except (OSError, BlockLLMError) as e:  # distributed's comm errors; failover only once the scheduler says so
                if _maybe_lost_segment(plan, request.model, e):  # a split chain's later segment may be lost
                    lost = self.dask.sync(self._segment_lost, _segment_workers(plan, request.model) - {worker})
                    if lost is None:
                        raise
                    log.warning("worker %s of a split chain was lost during a stream (%r); resuming it", lost, e)
                    worker = self._reroute(request.model, lost)
                    continue
                if not isinstance(e, OSError) or isinstance(e, (BlockLLMError, ZooError)):  # a typed error from the host
                    raise
                if not self.dask.sync(self._worker_left, worker):
                    raise BlockLLMError(f"worker {worker} failed: {e!r}") from e
                log.warning("worker %s was lost during a stream (%r); resuming it elsewhere", worker, e)
                worker = self._reroute(request.model, worker)

    def _stream_from(self, worker: str, wire: dict, received: list[int]) -> Iterator[list[int]]:
        rid = wire["request_id"]
        sent = dict(wire, resume_token_ids=list(received)) if received else wire

        async def submit():
            return await self.dask.rpc(worker).blockllm_submit(requests=[sent])

        async def poll(offset):
            return await self.dask.rpc(worker).blockllm_poll(ids=[rid], offsets=[offset], timeout=5.0)

        (err,) = self.dask.sync(submit)
        if err is not None:
            raise error_from_wire(err)
        while True:
            st = self.dask.sync(poll, len(received))[rid]
            if st.get("error"):
                raise error_from_wire(st["error"])
            if st["token_ids"]:
                received.extend(st["token_ids"])
                yield list(st["token_ids"])
            if st["finished"]:
                return

    def stats(self) -> dict[str, Any]:
        """Per worker: engine stats, traffic, block transitions."""
        async def one(w):
            return w, await self.dask.rpc(w).blockllm_stats()

        workers = self.workers  # not inside the coroutine: scheduler_info() is sync-only

        async def all_():
            return dict(await asyncio.gather(*(one(w) for w in workers)))

        return self.dask.sync(all_)

    def _host_stats(self) -> dict[str, Any]:
        """stats(), leaving out workers whose block host does not answer: a worker the scheduler
        lists runs its plugins only after it registered (a nanny's restarted worker, for a few
        seconds), and one that is dying may be listed a moment longer."""
        workers = self.workers

        async def one(w):
            try:
                return w, await self.dask.rpc(w).blockllm_stats()
            except Exception as e:  # "No handler blockllm_stats" (plugin not set up yet), comm errors
                log.info("leaving worker %s out of placement: its block host did not answer (%r)", w, e)
                return w, None

        async def all_():
            return {w: st for w, st in await asyncio.gather(*(one(w) for w in workers)) if st is not None}

        return self.dask.sync(all_)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while any(self._inflight.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
