"""The Python client: submit request batches to a BlockLLM cluster on Dask, get futures or streams.

`Client()` with no address starts a LocalCluster (CPU workers when there is no GPU); an address
or an existing `distributed.Client` connects to a running cluster. Requests go straight to the
block hosts on the workers over distributed's comms; placement runs as Dask tasks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import distributed

from zoo_store import Zoo

from . import config as _config
from .exceptions import BlockLLMError, NoCapacityError, OverloadedError
from .serving.host import PLUGIN_NAME, BlockHostPlugin, get_host
from .serving.placement import PlacementPlan, WorkerInfo, plan_placement
from .serving.wire import error_from_wire
from .types import SamplingParams

log = logging.getLogger(__name__)

MAX_BATCH = 10_000  # requests per submit() call


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
    priority: int = 0

    def to_wire(self, api_key: str | None) -> dict[str, Any]:
        import dataclasses

        if sum(x is not None for x in (self.prompt, self.messages, self.prompt_token_ids)) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, not {type(self.sampling).__name__}")
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
    def place(self, models: Sequence[str] | None = None, traffic: dict[str, float] | None = None) -> PlacementPlan:
        """Plan where models live and load them there, as Dask tasks pinned to workers."""
        manifests = {m.key: m for m in self.zoo.list_models()}
        wanted = list(models) if models is not None else sorted(manifests)
        unknown = [m for m in wanted if m not in manifests]
        if unknown:
            raise BlockLLMError(f"cannot place unknown models {unknown}")
        chosen = {k: manifests[k] for k in wanted}
        sizes = {fp: self.zoo.block_spec(fp).nbytes for m in chosen.values() for fp in m.fingerprints()}
        current = self.loaded()  # the cluster's actual state: other clients may have placed models too
        plan = plan_placement(chosen, sizes, [WorkerInfo(w, self.capacity_bytes) for w in self.workers], traffic, current)
        futures = []
        for worker, models_here in plan.assignments.items():
            drop = sorted(current.get(worker, set()) - set(models_here))
            futures.append(self.dask.submit(
                _place_on_host, list(models_here), drop, workers=[worker], allow_other_workers=False,
                pure=False, key=f"blockllm-place-{uuid.uuid4().hex[:8]}",
            ))
        self.dask.gather(futures)
        self.plan = plan
        return plan

    def loaded(self) -> dict[str, set[str]]:
        """worker -> models its block host has loaded now."""
        return {w: set(st["models"]) for w, st in self.stats().items()}

    def _route(self, model: str) -> str:
        if self.plan is None or not self.plan.workers_for(model):
            where = [w for w, models in self.loaded().items() if model in models]
            if where:  # placed by another client of this cluster
                return min(where, key=lambda w: (self._inflight[w], next(self._rr)))
            # Placing on demand: first make sure this tenant may run the model at all.
            workers = self.workers
            if not workers:
                raise NoCapacityError("the cluster has no workers")

            async def authorize():
                return await self.dask.rpc(workers[0]).blockllm_authorize(api_key=self.api_key, model=model)

            err = self.dask.sync(authorize)
            if err is not None:
                raise error_from_wire(err)
            models = sorted({model} | {m for ms in (self.plan.assignments.values() if self.plan else []) for m in ms})
            plan = self.place(models)
            if not plan.workers_for(model):
                raise NoCapacityError(f"no worker can host {model}: {plan.unplaced.get(model, 'unknown reason')}")
        candidates = self.plan.workers_for(model)
        return min(candidates, key=lambda w: (self._inflight[w], next(self._rr)))

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
        for i, r in enumerate(requests):
            by_worker.setdefault(self._route(r.model), []).append(i)
        futures: list[Future] = [Future() for _ in requests]
        for worker, idx in by_worker.items():
            self._inflight[worker] += len(idx)
            self.dask.loop.add_callback(self._drive, worker, [wires[i] for i in idx], [futures[i] for i in idx])
        return futures

    async def _drive(self, worker: str, wires: list[dict], futures: list[Future]) -> None:
        try:
            errors = await self.dask.rpc(worker).blockllm_submit(requests=wires)
            pending = {}
            for w, f, err in zip(wires, futures, errors):
                if err is not None:
                    f.set_exception(error_from_wire(err))
                else:
                    pending[w["request_id"]] = (w, f)
            while pending:
                states = await self.dask.rpc(worker).blockllm_poll(ids=list(pending), timeout=5.0, until_finished=True)
                for rid, st in states.items():
                    if not st.get("finished"):
                        continue
                    w, f = pending.pop(rid)
                    if st.get("error"):
                        f.set_exception(error_from_wire(st["error"]))
                    else:
                        f.set_result(Completion(rid, w["model"], st.get("text") or "", tuple(st["token_ids"]), st["finish_reason"], worker, tuple(st.get("blocks", ())), st.get("ttft"), st.get("latency"), tuple(st.get("substitutions", ()))))
        except Exception as e:  # worker lost or comm broken: fail what is left, typed
            for f in futures:
                if not f.done():
                    f.set_exception(e if isinstance(e, BlockLLMError) else BlockLLMError(f"worker {worker} failed: {e!r}"))
        finally:
            self._inflight[worker] -= len(futures)

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
        """Yield lists of new token ids as the request produces them."""
        worker = self._route(request.model)
        wire = request.to_wire(self.api_key)

        async def submit():
            return await self.dask.rpc(worker).blockllm_submit(requests=[wire])

        async def poll(offset):
            return await self.dask.rpc(worker).blockllm_poll(ids=[request.request_id], offsets=[offset], timeout=5.0)

        (err,) = self.dask.sync(submit)
        if err is not None:
            raise error_from_wire(err)
        offset = 0
        while True:
            st = self.dask.sync(poll, offset)[request.request_id]
            if st.get("error"):
                raise error_from_wire(st["error"])
            if st["token_ids"]:
                offset += len(st["token_ids"])
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

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while any(self._inflight.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
