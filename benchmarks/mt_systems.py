"""The systems the multi-tenant benchmark replays one trace through: the block engine driven directly,
per-model serving (full copies in GPU slots, per-model batching, LRU eviction and reload from host
memory), LoRA-only sharing, BlockLLM through its Dask serving stack, and transformers' generate.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blockllm.engine import Engine
from blockllm.engine.scheduler import Scheduler
from blockllm.types import Request, SamplingParams

from .engine_decode import _StepClock, sync
from .mt_models import model_tensors

log = logging.getLogger("benchmarks.multitenant")


# ------------------------------------------------------------------------------------------- records
@dataclass
class Rec:
    variant: str
    arrival: float  # scheduled, seconds from the run's start
    prompt_len: int
    output_len: int
    first: float | None = None
    done: float | None = None
    tokens: int = 0


@dataclass
class RunLog:
    recs: dict[str, Rec] = field(default_factory=dict)
    end: float = 0.0  # seconds from start when the run stopped
    h2d_bytes: int = 0
    h2d_seconds: float = 0.0
    reloads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def token(self, rid: str, t: float, n: int, finished: bool) -> None:
        r = self.recs[rid]
        if n and r.first is None:
            r.first = t
        r.tokens = max(r.tokens, n)
        if finished and r.done is None:
            r.done = t


def _pct(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def summarize(log_: RunLog) -> dict[str, Any]:
    """Latency percentiles (unfinished requests count with their time so far: a lower bound)."""
    recs = list(log_.recs.values())
    done = [r for r in recs if r.done is not None]
    e2e = [(r.done if r.done is not None else log_.end) - r.arrival for r in recs]
    ttft = [(r.first if r.first is not None else log_.end) - r.arrival for r in recs]
    tpot = [(r.done - r.first) / (r.tokens - 1) for r in done if r.first is not None and r.tokens > 1]
    tokens = sum(r.tokens for r in recs)
    last = max([r.done for r in done] + [log_.end if len(done) < len(recs) else 0.0] + [1e-9])
    return {
        "requests": len(recs), "completed": len(done), "unfinished": len(recs) - len(done),
        "e2e_s": _pct(e2e), "ttft_s": _pct(ttft), "tpot_s": _pct(tpot), "tokens": tokens,
        "makespan_s": last, "throughput_tok_s": tokens / last,
        "h2d_bytes": log_.h2d_bytes, "h2d_seconds": log_.h2d_seconds, "reloads": log_.reloads,
        "e2e_sorted_s": sorted(e2e), **log_.extra,
    }  # fmt: skip


def prompt_ids(i: int, n: int, vocab: int, seed: int) -> tuple[int, ...]:
    return tuple(int(x) for x in np.random.default_rng((seed, i)).integers(3, vocab, n))


# ------------------------------------------------------------------------------------------- GPU sampler
class GpuSampler:
    """GPU utilisation and memory in use, sampled through NVML from a thread (None without NVML):
    `device`'s GPU, or GPUs 0..gpus-1 for a system spread over several (their mean utilisation, each
    GPU's, and the peak of their summed memory)."""

    def __init__(self, device: torch.device, interval: float = 0.05, gpus: int = 1) -> None:
        self.interval, self.handles, self.samples = interval, [], []
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            first = (device.index or 0) if gpus == 1 else 0
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(first + i) for i in range(gpus)]
        except Exception as e:  # no NVML: the numbers are reported as missing, never invented
            log.warning("no NVML (%s): GPU utilisation not sampled", e)

    def __enter__(self) -> GpuSampler:
        self.samples, self._stop = [], threading.Event()
        if self.handles:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        nv = self._nvml
        while not self._stop.wait(self.interval):
            self.samples.append([(nv.nvmlDeviceGetUtilizationRates(h).gpu, nv.nvmlDeviceGetMemoryInfo(h).used) for h in self.handles])

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.handles:
            self._thread.join()

    def result(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_mem_used_max": None, "nvml_samples": 0}
        util = np.array([[u for u, _ in row] for row in self.samples], dtype=float)  # samples x GPUs
        out = {"gpu_util_mean": float(util.mean()), "gpu_mem_used_max": max(sum(m for _, m in row) for row in self.samples),
               "nvml_samples": len(self.samples)}  # fmt: skip
        if len(self.handles) > 1:
            out["gpu_util_mean_per_gpu"] = [float(x) for x in util.mean(axis=0)]
        return out


# ------------------------------------------------------------------------------------------- engine systems
class GroupScheduler(Scheduler):
    """Per-model batching: each step runs the requests of ONE group (a model, or the LoRA group),
    groups taken round robin; the rest keep their KV and wait for their turn."""

    def __init__(self, prefill_chunk: int, limit_of: Any, group_of: Any) -> None:
        super().__init__(prefill_chunk, limit_of)
        self._group_of = group_of
        self._groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a sequence's group, worked out once
        self._last: str | None = None

    def group_of(self, seq: Any) -> str:
        g = self._groups.get(seq)
        if g is None:
            g = self._groups[seq] = self._group_of(seq)
        return g

    def groups(self) -> list[str]:
        return sorted({self.group_of(s) for s in (*self.running, *self.waiting)})

    def schedule(self, frozen: Any = ()) -> list:
        groups = self.groups()
        if not groups:
            return []
        later = [g for g in groups if self._last is None or g > self._last]
        g = self._last = (later or groups)[0]
        others_r = [s for s in self.running if self.group_of(s) != g]
        others_w = [s for s in self.waiting if self.group_of(s) != g]
        self.running = [s for s in self.running if self.group_of(s) == g]
        self.waiting = [s for s in self.waiting if self.group_of(s) == g]
        try:
            return super().schedule(frozen)
        finally:
            self.running += others_r
            self.waiting += others_w


class GroupEngine(Engine):
    """The block engine with per-model batching; a decode chain runs on only while no other group waits."""

    def use_groups(self, group_of: Any) -> None:
        self.scheduler = GroupScheduler(self.scheduler.prefill_chunk, self._limit, group_of)

    def _chainable(self, prev: Any) -> bool:
        return len(self.scheduler.groups()) <= 1 and super()._chainable(prev)


class DirectSystem:
    """Requests go straight into the engine (BlockLLM without the serving stack)."""

    def __init__(self, engine: Engine, keys: dict[str, str]) -> None:
        self.engine, self.keys = engine, keys  # variant name -> model key in the engine

    def reset(self) -> None:
        pass

    def arrive(self, rid: str, variant: str, ids: tuple[int, ...], out: int, now: float) -> None:
        self.engine.add_request(Request(rid, self.keys[variant], ids, SamplingParams(max_new_tokens=out, ignore_eos=True)))

    def pump(self, now: float, log_: RunLog) -> None:
        pass

    def release(self, rid: str) -> None:
        pass

    def queued(self) -> int:
        return 0


class SlotSystem(DirectSystem):
    """Per-model serving: models that are not always resident (`keys`) live in GPU slots, each a full
    copy; an evicted model (least recently used, idle) is reloaded from host memory on demand."""

    def __init__(self, engine: Engine, keys: dict[str, str], slots: list[str], host: dict[str, list[torch.Tensor]],
                 initial: list[str]) -> None:  # fmt: skip
        super().__init__(engine, keys)
        self.slots, self.host, self.initial = slots, host, initial
        self.tensors = {s: model_tensors(engine, s) for s in slots}
        self.reset()

    def reset(self) -> None:
        """Every run starts from the same resident set (the most popular models), not timed."""
        self.in_slot: dict[str, str | None] = dict.fromkeys(self.slots)
        self.slot_of: dict[str, str] = {}
        self.used = dict.fromkeys(self.slots, 0.0)
        self.live: dict[str, int] = dict.fromkeys(self.slots, 0)
        self.owner: dict[str, str] = {}
        self.queue: dict[str, deque] = {}
        for v, s in zip(self.initial, self.slots, strict=False):
            self._copy(v, s)
        sync(self.engine.device)

    def _copy(self, variant: str, slot: str) -> int:
        old = self.in_slot[slot]
        if old is not None:
            self.slot_of.pop(old, None)
        n = 0
        with torch.inference_mode():  # the engine's weights are inference tensors
            for dst, src in zip(self.tensors[slot], self.host[variant], strict=True):
                dst.copy_(src, non_blocking=True)
                n += src.numel() * src.element_size()
        self.in_slot[slot], self.slot_of[variant] = variant, slot
        return n

    def arrive(self, rid: str, variant: str, ids: tuple[int, ...], out: int, now: float) -> None:
        if variant in self.keys:
            return super().arrive(rid, variant, ids, out, now)
        self.queue.setdefault(variant, deque()).append((rid, ids, out))

    def pump(self, now: float, log_: RunLog) -> None:
        waiting = sorted((q[0][0], v) for v, q in self.queue.items() if q)  # oldest request first
        for _, v in waiting:
            slot = self.slot_of.get(v)
            if slot is None:
                free = [s for s in self.slots if self.live[s] == 0]
                if not free:
                    continue  # every slot serves requests: wait for one to drain
                slot = min(free, key=lambda s: self.used[s])
                t0 = time.perf_counter()
                n = self._copy(v, slot)
                sync(self.engine.device)  # the model must be on the device before its requests run
                log_.h2d_seconds += time.perf_counter() - t0
                log_.h2d_bytes += n
                log_.reloads += 1
            q = self.queue[v]
            while q:
                rid, ids, out = q.popleft()
                self.engine.add_request(Request(rid, slot, ids, SamplingParams(max_new_tokens=out, ignore_eos=True)))
                self.owner[rid] = slot
                self.live[slot] += 1
            self.used[slot] = now

    def release(self, rid: str) -> None:
        slot = self.owner.pop(rid, None)
        if slot is not None:
            self.live[slot] -= 1

    def queued(self) -> int:
        return sum(len(q) for q in self.queue.values())


def _profile_rows(prof: Any) -> dict[str, list[dict[str, Any]]]:
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
        rows.append({"op": e.key[:90], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3, "self_device_ms": dev / 1e3})
    return {"by_cpu": sorted(rows, key=lambda r: -r["self_cpu_ms"])[:15], "by_device": sorted(rows, key=lambda r: -r["self_device_ms"])[:15]}


def _host_rows(prof: Any) -> dict[str, list[dict[str, Any]]]:
    """cProfile's functions by own time and by time with callees (the host's Python hot spots)."""
    import pstats

    st = pstats.Stats(prof)
    rows = [{"fn": f"{Path(f).name}:{line}:{name}"[:90], "calls": nc, "own_ms": tt * 1e3, "cum_ms": ct * 1e3}
            for (f, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items()]  # fmt: skip
    return {"by_own": sorted(rows, key=lambda r: -r["own_ms"])[:25], "by_cum": sorted(rows, key=lambda r: -r["cum_ms"])[:25]}


class _Profiler:
    """One profiling window of a replay: torch.profiler ("device": ops and kernels) or cProfile
    ("host": the Python functions of the engine loop), with the engine's steps and host wait in it."""

    def __init__(self, kind: str, engine: Engine, now: float) -> None:
        device = engine.device
        if kind == "host":
            import cProfile

            self.prof: Any = cProfile.Profile()
        else:
            from torch.profiler import ProfilerActivity

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            self.prof = torch.profiler.profile(activities=acts)
        self.kind, self.engine = kind, engine
        self.t0, self.steps0, self.wait0 = now, engine.steps, engine.wait_s
        self.prof.enable() if kind == "host" else self.prof.__enter__()

    def stop(self, now: float) -> dict[str, Any]:
        sync(self.engine.device)
        if self.kind == "host":
            self.prof.disable()
            rows = _host_rows(self.prof)
        else:
            self.prof.__exit__(None, None, None)
            rows = _profile_rows(self.prof)
        eng = self.engine
        return {"kind": self.kind, "window_s": now - self.t0, "steps": eng.steps - self.steps0, "host_wait_s": eng.wait_s - self.wait0, **rows}


def drive(system: DirectSystem, trace: list, vocab: int, seed: int, deadline: float, profile: tuple[float, float] | None = None,
          profile_kind: str = "device") -> RunLog:  # fmt: skip
    """Replay `trace` (workload.Arrival) in real time through an engine-side system; stop at `deadline`.
    `profile=(t0, t1)`: a profiler over that window of the run, torch.profiler (`profile_kind`
    "device": host ops and device kernels) or cProfile ("host": the engine loop's Python)."""
    engine = system.engine
    prof = None
    system.reset()
    log_ = RunLog()
    g0, c0 = engine.graph_stats()
    s0, w0 = engine.steps, engine.wait_s
    t0 = time.perf_counter()
    i, n = 0, len(trace)
    while True:
        now = time.perf_counter() - t0
        while i < n and trace[i].time <= now:
            a = trace[i]
            rid = f"r{i}"
            log_.recs[rid] = Rec(a.model, a.time, a.prompt_len, a.output_len)
            system.arrive(rid, a.model, prompt_ids(i, a.prompt_len, vocab, seed), a.output_len, now)
            i += 1
        if profile is not None and prof is None and now >= profile[0]:
            prof = _Profiler(profile_kind, engine, now)
        if prof is not None and profile is not None and now >= profile[1] and "profile" not in log_.extra:
            log_.extra["profile"] = prof.stop(now)
        system.pump(now, log_)
        if engine.has_unfinished():
            outs = engine.step()
            t = time.perf_counter() - t0
            for o in outs:
                log_.token(o.request_id, t, len(o.token_ids), o.finished and o.finish_reason != "abort")
                if o.finished:
                    system.release(o.request_id)
        elif i < n:
            time.sleep(min(max(trace[i].time - now, 0.0), 0.002))
        elif not system.queued():
            break
        if now > deadline:
            break
    log_.end = time.perf_counter() - t0
    if prof is not None and "profile" not in log_.extra:
        log_.extra["profile"] = prof.stop(log_.end)
    for rid, r in log_.recs.items():  # past the deadline: abort what is left (counted unfinished)
        if r.done is None:
            engine.abort(rid)
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            if o.finished:
                system.release(o.request_id)
    if hasattr(system, "queue"):
        system.queue.clear()
    log_.extra.update(graph_captures=engine.graph_stats()[0] - g0, graph_capture_s=engine.graph_stats()[1] - c0,
                      engine_steps=engine.steps - s0, host_wait_s=engine.wait_s - w0)  # fmt: skip
    return log_


# ------------------------------------------------------------------------------------------- serving stack
def _engine_counters(dask_worker: Any) -> dict[str, Any]:
    """Run on the worker (Client.run): the block host's engine counters the replay reports."""
    eng = dask_worker.extensions["blockllm"].engine
    captures, capture_s = eng.graph_stats()
    return {"captures": captures, "capture_s": capture_s, "steps": eng.steps, "wait_s": eng.wait_s, "weight_bytes": eng.stats().weight_bytes}


def serving_cluster(n_workers: int, processes: bool = True, gpus: bool = False) -> Any:
    """A cluster on 127.0.0.1 of `n_workers` block-host workers. `gpus`: one worker process per GPU,
    each seeing only its own (CUDA_VISIBLE_DEVICES set by its nanny, as dask-cuda does), so every
    engine's "cuda" is a GPU of its own; otherwise a LocalCluster (processes or this process)."""
    import distributed

    if not gpus:
        return distributed.LocalCluster(n_workers=n_workers, processes=processes, threads_per_worker=2, dashboard_address="127.0.0.1:0",
                                        host="127.0.0.1", silence_logs=logging.WARNING)  # fmt: skip
    # a free port for the scheduler's HTTP server (its default, 8787, may be taken: the fallback leaks a socket)
    scheduler = {"cls": distributed.Scheduler, "options": {"dashboard_address": "127.0.0.1:0", "dashboard": False, "host": "127.0.0.1"}}
    workers = {f"gpu{i}": {"cls": distributed.Nanny, "options": {"nthreads": 2, "host": "127.0.0.1", "silence_logs": logging.WARNING,
                                                                "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
               for i in range(n_workers)}  # fmt: skip
    return distributed.SpecCluster(scheduler=scheduler, workers=workers, silence_logs=logging.WARNING)


class ServingRun:
    """BlockLLM through its serving stack: a LocalCluster (one worker by default; `n_workers` block
    hosts, one per GPU with `gpus`), its block hosts reading the zoo, placement (by `traffic` where
    given: hot models get replicas), and blockllm.Client. `processes=True`: each worker is a process
    of its own, as `dask worker` runs one per GPU, so the load generator and the client here share no
    GIL with the block hosts; False: the worker runs in this process (inproc:// comms, one GIL)."""

    def __init__(self, zoo_url: str, api_key: str, models: list[str], engine_kwargs: dict, tenant: str = "mt", processes: bool = True,
                 n_workers: int = 1, gpus: bool = False, traffic: dict[str, float] | None = None,
                 capacity_bytes: int = 1 << 50) -> None:  # fmt: skip
        import distributed

        import blockllm

        self.cluster = serving_cluster(n_workers, processes, gpus)
        self.dask = distributed.Client(self.cluster)
        self.dask.wait_for_workers(n_workers, timeout=120)
        self.tenant = tenant
        self.client = blockllm.Client(self.dask, api_key=api_key, zoo=zoo_url, engine=engine_kwargs, capacity_bytes=capacity_bytes)
        t0 = time.perf_counter()
        self.plan = self.client.place(models, traffic=traffic)
        self.place_s = time.perf_counter() - t0
        self.workers = sorted(self.client.workers)

    def _per_worker(self) -> dict[str, dict[str, Any]]:
        return self.dask.run(_engine_counters, workers=self.workers)

    def placement(self) -> dict[str, Any]:
        """How the plan spread the set: models per worker, replicas per model, weight bytes per worker."""
        per = self._per_worker()
        models = sorted({m for ms in self.plan.assignments.values() for m in ms})
        return {"workers": len(self.workers),
                "models_per_worker": [len(self.plan.assignments.get(w, ())) for w in self.workers],
                "weight_bytes_per_worker": [per[w]["weight_bytes"] for w in self.workers],
                "replicas": {m: len(self.plan.workers_for(m)) for m in models}, "unplaced": dict(self.plan.unplaced)}  # fmt: skip

    def counters(self) -> dict[str, Any]:
        """The workers' engine counters (graph captures, steps, host wait, weight bytes), summed."""
        per = self._per_worker()
        return {k: sum(c[k] for c in per.values()) for k in ("captures", "capture_s", "steps", "wait_s", "weight_bytes")}

    def replay(self, trace: list, vocab: int, seed: int, deadline: float, tag: str) -> RunLog:
        from blockllm.client import GenerationRequest

        log_ = RunLog()
        c0 = self.counters()
        futures = {}
        t0 = time.perf_counter()
        n_done, all_done, lock = [0], threading.Event(), threading.Lock()  # counted as they end: no scan of every future

        def done(rid: str, fut: Any) -> None:
            t = time.perf_counter() - t0
            r = log_.recs[rid]
            with lock:  # the client's loop thread, or this one for a future already done when the callback was added
                n_done[0] += 1
                if n_done[0] == len(trace):
                    all_done.set()
            if fut.exception() is not None:
                return
            c = fut.result()
            r.tokens = len(c.token_ids)
            r.done = t
            # the host timed first token -> done; the client timed arrival -> done
            if c.ttft is not None and c.latency is not None:
                r.first = t - (c.latency - c.ttft)

        for i, a in enumerate(trace):
            wait = a.time - (time.perf_counter() - t0)
            if wait > 0:
                time.sleep(wait)
            rid = f"{tag}-{i}"
            log_.recs[rid] = Rec(a.model, a.time, a.prompt_len, a.output_len)
            req = GenerationRequest(model=f"{self.tenant}/{a.model}", prompt_token_ids=list(prompt_ids(i, a.prompt_len, vocab, seed)), request_id=rid,
                                    sampling=SamplingParams(max_new_tokens=a.output_len, ignore_eos=True))  # fmt: skip
            (f,) = self.client.submit([req])
            f.add_done_callback(lambda fut, rid=rid: done(rid, fut))
            futures[rid] = f
        all_done.wait(max(0.0, deadline - (time.perf_counter() - t0)))
        log_.end = time.perf_counter() - t0
        left = [rid for rid, f in futures.items() if not f.done()]
        if left:

            async def abort() -> None:  # a request lives on one worker; the others ignore its id
                for w in self.workers:
                    await self.dask.rpc(w).blockllm_abort(ids=left)

            self.dask.sync(abort)
        for f in futures.values():
            try:
                f.exception(timeout=15)
            except Exception:
                pass
        for r in log_.recs.values():  # streamed tokens of unfinished requests are not seen: count the floor
            if r.done is None:
                r.tokens = 0
        c1 = self.counters()
        log_.extra.update(graph_captures=c1["captures"] - c0["captures"], graph_capture_s=c1["capture_s"] - c0["capture_s"],
                          engine_steps=c1["steps"] - c0["steps"], host_wait_s=c1["wait_s"] - c0["wait_s"])  # fmt: skip
        return log_

    def close(self) -> None:
        self.client.close()
        self.dask.close()
        self.cluster.close()


# ------------------------------------------------------------------------------------------- transformers
def hf_reference(ms: Any, trace: list, vocab: int, seed: int, max_new: int, max_batch: int) -> RunLog:
    """transformers' generate, one model per variant (eager, batched per variant, FCFS by oldest
    request), replaying `trace` in real time; building a model is kept off the clock."""
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

    device, dtype = ms.source.device, ms.source.dtype
    cfg = LlamaConfig(**{k: v for k, v in ms.config.items() if k not in ("model_type", "architectures")})
    variants = {v.name: v for v in ms.variants}
    log_ = RunLog()
    for i, a in enumerate(trace):
        log_.recs[f"hf{i}"] = Rec(a.model, a.time, a.prompt_len, a.output_len)
    pending = list(range(len(trace)))
    offset = 0.0  # seconds of model building, taken off the clock
    t0 = time.perf_counter()
    build_s, steps = 0.0, []
    while pending:
        now = time.perf_counter() - t0 - offset
        ready = [i for i in pending if trace[i].time <= now]
        if not ready:
            time.sleep(max(0.0, trace[pending[0]].time - now))
            continue
        name = trace[ready[0]].model
        batch = [i for i in ready if trace[i].model == name][:max_batch]
        tb = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
        model.load_state_dict(ms.hf_state_dict(variants[name]))
        sync(device)
        build_s += time.perf_counter() - tb
        offset += time.perf_counter() - tb
        want = [min(trace[i].output_len, max_new) for i in batch]
        prompts = [prompt_ids(i, trace[i].prompt_len, vocab, seed) for i in batch]
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, p in enumerate(prompts):  # left padding
            ids[k, width - len(p) :] = torch.tensor(p)
            mask[k, width - len(p) :] = 1
        clock = _StepClock(device)
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(want), min_new_tokens=max(want),
                           do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=0)  # fmt: skip
        sync(device)
        end = time.perf_counter()
        steps.extend(b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False))
        for k, i in enumerate(batch):
            r = log_.recs[f"hf{i}"]
            r.first = clock.times[0] - t0 - offset
            r.done = end - t0 - offset
            r.tokens = want[k]
            pending.remove(i)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log_.end = time.perf_counter() - t0 - offset
    log_.extra.update(model_build_s=build_s, hf_step_ms_median=1e3 * float(np.median(steps)) if steps else None, hf_max_new_tokens=max_new)
    return log_


__all__ = ["GpuSampler", "GroupEngine", "RunLog", "ServingRun", "SlotSystem", "DirectSystem", "drive", "hf_reference", "summarize"]
