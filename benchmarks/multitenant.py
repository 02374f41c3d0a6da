"""Multi-tenant benchmark: BlockLLM against per-model serving, LoRA-only sharing and transformers,
one seeded trace (Zipf variants, Poisson arrivals, lognormal lengths) replayed through each, one
after the other on the same device, at several arrival rates.

    python -m benchmarks.multitenant --preset cpu    # tiny shape, seconds: the CI smoke test
    python -m benchmarks.multitenant --preset 1b     # Llama-1.1B shape, 16 variants (H100)
    python -m benchmarks.multitenant --preset 8b     # Llama-3-8B shape, 16 variants (H200)

Writes benchmarks/results/multitenant-<preset>.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import torch
import yaml

from .mt_models import ModelSet, Shape, SyntheticSource, model_tensors, write_zoo
from .mt_systems import (
    DirectSystem,
    GpuSampler,
    GroupEngine,
    RunLog,
    ServingRun,
    SlotSystem,
    drive,
    hf_reference,
    serving_cluster,
    summarize,
    sync,
)
from .workload import WorkloadConfig, generate, zipf_weights

log = logging.getLogger("benchmarks.multitenant")


@dataclass
class Preset:
    shape: Shape
    rates: list[float]  # requests per second
    duration: float  # seconds of arrivals per rate
    drain: float  # at most this long after the last arrival, then the rest counts unfinished
    prompt_median: float
    output_median: float
    max_prompt: int
    max_output: int
    max_batch: int
    kv_bytes: int
    prefill_chunk: int
    hf_requests: int  # transformers replays the first N requests of the lowest rate's trace
    hf_max_new: int
    serving: bool  # BlockLLM through the Dask serving stack (needs its blocks in a zoo)
    blockllm_direct: bool  # also the engine alone, without the serving stack
    own_host_copies: bool  # per-model: each variant's own weights in host memory (else one shared buffer)
    warmup_s: float
    prompt_sigma: float = 1.0
    output_sigma: float = 0.8
    zipf_alpha: float = 1.1
    seed: int = 0
    budget_s: float = 1e9  # stop starting runs after this long (a device call has a hard limit)
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    "cpu": Preset(shape=Shape("tiny", 4, 64, 128, 4, 2, 256), rates=[8.0, 16.0], duration=1.0, drain=10.0, prompt_median=12,
                  output_median=5, max_prompt=48, max_output=12, max_batch=64, kv_bytes=64 << 20, prefill_chunk=512,
                  hf_requests=4, hf_max_new=4, serving=True, blockllm_direct=True, own_host_copies=True, warmup_s=0.5),
    "1b": Preset(shape=Shape("llama-1.1b", 22, 2048, 5632, 32, 4, 32000), rates=[16.0, 32.0, 64.0, 128.0], duration=10.0, drain=15.0,
                 prompt_median=100, output_median=128, max_prompt=1024, max_output=512, max_batch=256, kv_bytes=8 << 30,
                 prefill_chunk=2048, hf_requests=12, hf_max_new=32, serving=True, blockllm_direct=True, own_host_copies=True,
                 warmup_s=2.0, budget_s=555.0),
    "8b": Preset(shape=Shape("llama3-8b", 32, 4096, 14336, 32, 8, 128256), rates=[1.5, 3.0], duration=8.0, drain=8.0,
                 prompt_median=100, output_median=128, max_prompt=1024, max_output=512, max_batch=128, kv_bytes=16 << 30,
                 prefill_chunk=2048, hf_requests=6, hf_max_new=16, serving=False, blockllm_direct=True, own_host_copies=False,
                 warmup_s=2.0, budget_s=200.0),
}  # fmt: skip


def _versions() -> dict[str, Any]:
    import dask
    import distributed
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "dask": dask.__version__, "distributed": distributed.__version__}  # fmt: skip
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
        # a copied working tree (the device machine's) may differ from its HEAD: then the commit is only its base
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout
        out["tree_differs_from_commit"] = bool(changed.strip())
    except Exception:
        out["commit"] = None
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


SYSTEMS = ("blockllm", "blockllm_inproc", "blockllm_direct", "per_model", "lora_only", "transformers")
SCALE_OUT = re.compile(r"(blockllm|per_model)_w([1-9][0-9]*)")  # on N workers, one per GPU


class Bench:
    def __init__(self, preset_name: str, out_dir: Path, profile: str | None = None, preset: Preset | None = None) -> None:
        # `preset`: this run's settings where they differ from PRESETS (a worker process sees only its own PRESETS)
        self.name, self.p, self.profile = preset_name, preset or PRESETS[preset_name], profile
        self.t_start = time.perf_counter()
        self.device = torch.device("cuda" if preset_name != "cpu" else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        p = self.p
        self.max_len = p.max_prompt + p.max_output + 16
        self.source = SyntheticSource(self.device, self.dtype)
        self.ms = ModelSet(p.shape, self.source, max_positions=4096)
        rng = np.random.default_rng(p.seed)
        self.order = [self.ms.variants[i].name for i in rng.permutation(len(self.ms.variants))]  # popularity rank
        self.kind = {v.name: v.kind for v in self.ms.variants}
        self.traces = {r: generate(self._wl(r, p.duration, p.seed)) for r in p.rates}
        from dataclasses import replace

        self.warm = generate(replace(self._wl(max(p.rates), p.warmup_s, p.seed + 1), output_median=16, max_output=32))
        sh = p.shape
        page_bytes = 2 * 16 * sh.kv_heads * (sh.hidden // sh.heads) * torch.empty((), dtype=self.dtype).element_size()
        self.engine_kw = dict(device=str(self.device), dtype=str(self.dtype).removeprefix("torch."), kv_pages=int(p.kv_bytes // page_bytes),
                              max_batch_size=p.max_batch, max_model_len=self.max_len, prefill_chunk=p.prefill_chunk, page_size=16)  # fmt: skip
        self.distinct = self.ms.distinct_bytes()
        self.model_bytes = self.ms.model_bytes()
        self.out_dir = out_dir
        self.result: dict[str, Any] = {
            "preset": preset_name, "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else (platform.processor() or "cpu"),
            "versions": _versions(), "seed": p.seed, "dtype": str(self.dtype),
            "config": {**{k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in asdict(p).items()}, "engine": self.engine_kw},
            "model_set": {"variants": {v.name: v.kind for v in self.ms.variants}, "popularity_order": self.order,
                          "partial_layers_changed": self.ms.partial_layers, "lora_rank": self.ms.lora_rank,
                          "distinct_bytes": self.distinct, "model_bytes": self.model_bytes, "full_copies_bytes": self.model_bytes * len(self.order)},
            "traces": {str(r): len(t) for r, t in self.traces.items()}, "systems": {}, "notes": [],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }  # fmt: skip

    def _wl(self, rate: float, duration: float, seed: int) -> WorkloadConfig:
        p = self.p
        return WorkloadConfig(models=tuple(self.order), rate=rate, duration=duration, zipf_alpha=p.zipf_alpha, prompt_median=p.prompt_median,
                              prompt_sigma=p.prompt_sigma, output_median=p.output_median, output_sigma=p.output_sigma,
                              max_prompt=p.max_prompt, max_output=p.max_output, seed=seed)  # fmt: skip

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t_start > self.p.budget_s

    def save(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"multitenant-{self.name}.json"
        path.write_text(json.dumps(self.result, indent=1, default=str))
        return path

    # ------------------------------------------------------------------ one system, every rate
    def _sweep(self, name: str, run_one: Any, info: dict[str, Any], profiled: Any = None, gpus: int = 1) -> None:
        sysres = {**info, "rates": {}}
        self.result["systems"][name] = sysres
        t0 = time.perf_counter()
        run_one(self.warm, self.p.warmup_s + 10)  # Triton compiles, first graph captures (short outputs)
        sysres["warmup_s"] = time.perf_counter() - t0
        for rate in self.p.rates:
            if self.over_budget():
                sysres["rates"][str(rate)] = {"skipped": "time budget of the run spent"}
                continue
            with GpuSampler(self.device, gpus=gpus) as gpu:
                rl: RunLog = run_one(self.traces[rate], self.p.duration + self.p.drain)
            s = summarize(rl)
            s.update(gpu.result())
            sysres["rates"][str(rate)] = s
            log.info("%s @ %.1f req/s: p95 %.2f s, %.0f tok/s, %d/%d done, util %s, h2d %.1f GB", name, rate, s["e2e_s"]["p95"],
                     s["throughput_tok_s"], s["completed"], s["requests"], s["gpu_util_mean"], s["h2d_bytes"] / 1e9)  # fmt: skip
        sysres["peak_gpu_bytes"] = _peak(self.device)
        if self.profile and profiled is not None and not self.over_budget():
            # a separate, shorter replay of the highest rate: the profiler's overhead stays out of the numbers above
            t0 = min(1.0, self.p.duration / 4)
            rl = profiled(self.traces[max(self.p.rates)], (t0, t0 + 1.5), self.profile)
            sysres["profile"] = {"rate": max(self.p.rates), "window": [t0, t0 + 1.5], **rl.extra.get("profile", {})}
        self.save()

    def serving_zoo(self) -> tuple[str, str, list[str]]:
        """The set's blocks in a real file:// zoo (written once per run, off the clock): its URL, a key, the model keys."""
        if not hasattr(self, "_zoo"):
            import tempfile

            import blockllm
            from zoo_store import Zoo

            self._zoo_dir = Path(tempfile.mkdtemp(prefix="mt-bench-zoo-"))
            url = f"file://{self._zoo_dir}"
            zoo = Zoo(url)
            t0 = time.perf_counter()
            manifests = write_zoo(self.ms, zoo, self.ms.variants)
            self.result["zoo_write_s"] = time.perf_counter() - t0
            self._zoo = (url, blockllm.auth.create_key(zoo, "mt"), [m.key for m in manifests])
        return self._zoo

    def gpu_weight_cap(self) -> int:
        """Weight bytes one GPU of this machine may hold beside the KV pool (90% of its memory, 2 GiB
        kept for activations and graphs); unbounded on the CPU."""
        if self.device.type != "cuda":
            return 1 << 50
        return int(0.9 * torch.cuda.get_device_properties(self.device).total_memory) - self.p.kv_bytes - (2 << 30)

    def popularity(self) -> dict[str, float]:
        """The trace's Zipf weight of every model key (what placement replicates by)."""
        _, _, models = self.serving_zoo()
        by_name = {k.split("/", 1)[1]: k for k in models}
        weights = zipf_weights(len(self.order), self.p.zipf_alpha)
        return {by_name[v]: float(w) for v, w in zip(self.order, weights, strict=True)}

    def blockllm_serving(self, name: str = "blockllm", processes: bool = True, workers: int | None = None) -> None:
        """(1) BlockLLM through its serving stack: blocks in a real file:// zoo, a block host on a
        one-worker LocalCluster (a worker process of its own, or `processes=False` this one), the Client.
        `workers` (blockllm_wN): N worker processes, one per GPU on CUDA, placed by the trace's popularity."""
        url, key, models = self.serving_zoo()
        with dask.config.set({"blockllm.zoo.verify": False}):  # hashed once when written; reads are not re-hashed
            gpus = workers is not None and self.device.type == "cuda"
            run = ServingRun(url, key, models, self.engine_kw, processes=processes, n_workers=workers or 1, gpus=gpus,
                             traffic=self.popularity() if workers else None,
                             capacity_bytes=self.gpu_weight_cap() if workers else 1 << 50)  # fmt: skip
            try:
                where = "a worker process of its own" if processes else "in this process, one GIL with the load generator"
                if workers:
                    where = f"{workers} worker processes" + (", one GPU each" if gpus else " sharing this machine's CPUs")
                info = {"how": f"blockllm.Client -> BlockHost on a {workers or 1}-worker cluster ({where}), file:// zoo",
                        "place_s": run.place_s, "weight_bytes_gpu": run.counters()["weight_bytes"]}  # fmt: skip
                if workers:
                    info["placement"] = run.placement()
                counter = iter(range(1 << 30))
                self._sweep(name, lambda tr, dl: run.replay(tr, self.p.shape.vocab, self.p.seed, dl, f"s{next(counter)}"), info,
                            gpus=workers if gpus else 1)  # fmt: skip
            finally:
                run.close()
        _free(self.device)

    def blockllm_direct(self, name: str) -> None:
        """(1') The same engine, all 16 variants loaded, driven directly (no Dask)."""
        from blockllm.engine import Engine

        eng = Engine(self.source, **self.engine_kw)
        t0 = time.perf_counter()
        for v in self.ms.variants:
            eng.load(v.manifest)
        sync(self.device)
        info = {"how": "blockllm.engine.Engine driven directly (no serving stack)", "load_s": time.perf_counter() - t0,
                "weight_bytes_gpu": eng.stats().weight_bytes}  # fmt: skip
        system = DirectSystem(eng, {v.name: v.manifest.key for v in self.ms.variants})
        self._sweep(name, lambda tr, dl: drive(system, tr, self.p.shape.vocab, self.p.seed, dl), info,
                    lambda tr, w, kind: drive(system, tr, self.p.shape.vocab, self.p.seed, w[1] + 0.1, w, kind))
        system = eng = None  # free the weights before the next system
        _free(self.device)

    def host_copies(self, slot_engine: Any, slot_key: str, variants: list[str]) -> dict[str, list[torch.Tensor]]:
        pin = self.device.type == "cuda"
        if self.p.own_host_copies:
            if not hasattr(self, "_host"):
                t0 = time.perf_counter()
                self._host = {v.name: self.ms.fused_host_copy(v, slot_engine.fold_norms, pin) for v in self.ms.variants}
                self.result["host_copies_build_s"] = time.perf_counter() - t0
            return {v: self._host[v] for v in variants}
        # host RAM cannot hold every variant: one model-sized pinned buffer stands in for each, so the
        # bytes copied per reload are right while the weights copied are not the variant's own
        if not hasattr(self, "_shared"):
            self._shared = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t) for t in model_tensors(slot_engine, slot_key)]
        return dict.fromkeys(variants, self._shared)

    def slots_engine(self, n_slots: int, tenant: str) -> tuple[GroupEngine, list[str]]:
        slots = ModelSet(self.p.shape, self.source, tenant=tenant, n_lora=0, n_partial=0, n_full=n_slots, max_positions=4096)
        eng = GroupEngine(self.source, **self.engine_kw)
        for v in slots.variants:
            eng.load(v.manifest)
        return eng, [v.manifest.key for v in slots.variants]

    def per_model_system(self, variants: list[str] | None = None) -> tuple[SlotSystem, dict[str, Any]]:
        """Per-model serving of `variants` (default all, by popularity) under BlockLLM's weight bytes on this device."""
        variants = list(variants or self.order)
        cap = min(self.distinct, self.gpu_weight_cap())
        n = max(1, min(len(variants), cap // self.model_bytes))
        eng, slots = self.slots_engine(n, "slots")
        eng.use_groups(lambda seq: seq.model.manifest.key)
        host = self.host_copies(eng, slots[0], variants)
        info = {"how": "GroupEngine: one model's requests per step (round robin), full copies in GPU slots, LRU reload from pinned host memory",
                "slots": n, "weight_bytes_gpu": eng.stats().weight_bytes, "weight_cap_bytes": cap,
                "host_copies": "own" if self.p.own_host_copies else "one shared pinned buffer per reload (host RAM cannot hold every variant)"}  # fmt: skip
        return SlotSystem(eng, {}, slots, host, variants[:n]), info

    def per_model(self, name: str = "per_model") -> None:
        """(2) Per-model serving: full copies, per-model batching, LRU eviction under BlockLLM's weight bytes."""
        system, info = self.per_model_system()
        self._sweep(name, lambda tr, dl: drive(system, tr, self.p.shape.vocab, self.p.seed, dl), info,
                    lambda tr, w, kind: drive(system, tr, self.p.shape.vocab, self.p.seed, w[1] + 0.1, w, kind))
        system = None  # free the weights before the next system
        _free(self.device)

    def per_model_scaled(self, name: str, workers: int) -> None:
        """(2) over N workers, one GPU each: worker i serves every N-th variant by popularity (so the
        load is balanced) per-model, in its own slots under BlockLLM's weight bytes per GPU; all
        workers replay their share of the same trace from one shared start."""
        import distributed

        gpus = self.device.type == "cuda"
        parts = [self.order[i::workers] for i in range(workers)]
        with serving_cluster(workers, True, gpus) as cluster, distributed.Client(cluster) as dask_client:
            dask_client.wait_for_workers(workers, timeout=120)
            addresses = sorted(dask_client.scheduler_info()["workers"])
            actors = [dask_client.submit(PerModelPart, self.name, self.p, part, actor=True, workers=[w], pure=False).result()
                      for w, part in zip(addresses, parts, strict=True)]  # fmt: skip
            infos = [a.info().result() for a in actors]
            info = {"how": f"per-model serving on {workers} workers" + (", one GPU each" if gpus else " sharing this machine's CPUs")
                    + ": worker i holds every N-th variant by popularity", "workers": workers, "variants_per_worker": [len(p) for p in parts],
                    "slots": [i["slots"] for i in infos], "weight_bytes_gpu": sum(i["weight_bytes_gpu"] for i in infos),
                    "max_batch_size": [i["max_batch_size"] for i in infos]}  # fmt: skip

            shares = [set(part) for part in parts]

            def run_one(trace: list, deadline: float) -> RunLog:
                split = [[x for x in trace if x.model in share] for share in shares]  # before the clock: not in the head start
                start_at = time.time() + 1.0  # every worker starts its clock at once
                futures = [a.replay(own, deadline, start_at) for a, own in zip(actors, split, strict=True)]
                return merge_logs([f.result() for f in futures])

            self._sweep(name, run_one, info, gpus=workers if gpus else 1)
            actors.clear()  # the actors go before their workers do

    def lora_only(self) -> None:
        """(4) LoRA-only sharing: adapters batch together on one resident base (S-LoRA / vLLM multi-LoRA);
        partial and full fine-tunes are full copies in slots, as in (2)."""
        loras = [v for v in self.ms.variants if v.kind == "lora"]
        resident = self.ms.distinct_bytes(loras)
        n = max(1, (self.distinct - resident) // self.model_bytes)
        eng, slots = self.slots_engine(n, "loslots")
        for v in loras:
            eng.load(v.manifest)
        lora_keys = {v.manifest.key for v in loras}
        eng.use_groups(lambda seq: "lora" if seq.model.manifest.key in lora_keys else seq.model.manifest.key)
        others = [v for v in self.order if self.kind[v] != "lora"]
        host = self.host_copies(eng, slots[0], others)
        system = SlotSystem(eng, {v.name: v.manifest.key for v in loras}, slots, host, others[:n])
        info = {"how": "GroupEngine: the 6 LoRA variants batched together on one base; partial/full fine-tunes as in per_model",
                "slots": n, "weight_bytes_gpu": eng.stats().weight_bytes, "weight_cap_bytes": self.distinct}  # fmt: skip
        self._sweep("lora_only", lambda tr, dl: drive(system, tr, self.p.shape.vocab, self.p.seed, dl), info)
        system = eng = None  # free the weights before the next system
        _free(self.device)

    def transformers_ref(self) -> None:
        """(3) transformers generate per variant: the first N requests of the lowest rate, outputs capped."""
        rate = min(self.p.rates)
        trace = self.traces[rate][: self.p.hf_requests]
        if self.over_budget():
            self.result["systems"]["transformers"] = {"skipped": "time budget of the run spent"}
            return
        with GpuSampler(self.device) as gpu:
            rl = hf_reference(self.ms, trace, self.p.shape.vocab, self.p.seed, self.p.hf_max_new, self.p.max_batch)
        s = summarize(rl)
        s.update(gpu.result())
        self.result["systems"]["transformers"] = {
            "how": f"LlamaForCausalLM.generate per variant (eager, greedy), batch = waiting requests of one variant; first {len(trace)} requests at {rate} req/s, outputs capped at {self.p.hf_max_new} tokens; model builds off the clock",
            "rates": {str(rate): s}, "peak_gpu_bytes": _peak(self.device)}  # fmt: skip
        log.info("transformers: median step %.1f ms, %.0f tok/s", s.get("hf_step_ms_median") or -1, s["throughput_tok_s"])
        _free(self.device)
        self.save()

    # ------------------------------------------------------------------ the comparison
    def ratios(self) -> None:
        sy = self.result["systems"]
        bl_name = "blockllm" if "blockllm" in sy else "blockllm_direct"
        bl, pm, lo = sy.get(bl_name), sy.get("per_model"), sy.get("lora_only")
        out: dict[str, Any] = {"blockllm_row": bl_name, "gpu_weight_bytes_over_distinct": (bl or {}).get("weight_bytes_gpu", 0) / self.distinct}
        for rate in self.p.rates:
            r = str(rate)
            row: dict[str, Any] = {}
            for other_name, other in (("per_model", pm), ("lora_only", lo)):
                a, b = (bl or {}).get("rates", {}).get(r), (other or {}).get("rates", {}).get(r)
                if not a or not b or "skipped" in a or "skipped" in b:
                    continue
                row[other_name] = {
                    "p95_ratio": a["e2e_s"]["p95"] / b["e2e_s"]["p95"], "p99_ratio": a["e2e_s"]["p99"] / b["e2e_s"]["p99"],
                    "ttft_p95_ratio": a["ttft_s"]["p95"] / b["ttft_s"]["p95"],
                    "throughput_ratio": a["throughput_tok_s"] / b["throughput_tok_s"],
                    "gpu_util_diff": (a["gpu_util_mean"] - b["gpu_util_mean"]) if a.get("gpu_util_mean") is not None and b.get("gpu_util_mean") is not None else None,
                }  # fmt: skip
            out[r] = row
        self.result["ratios"] = out

    def _system_spec(self, spec: str) -> tuple[str, str, dict[str, Any]]:
        """`name` or `name@key=value;...` -> (spec, name, engine.* settings), or SystemExit."""
        name, _, over = spec.partition("@")
        if name not in SYSTEMS and not SCALE_OUT.fullmatch(name):
            raise SystemExit(f"unknown system {name!r}: choose from {', '.join(SYSTEMS)}, blockllm_wN, per_model_wN (N >= 1)")
        overrides = engine_overrides(over)
        if overrides and name not in ("blockllm_direct", "per_model"):
            raise SystemExit(f"engine settings (@...) apply to blockllm_direct and per_model only, not {name}")
        fixed = [k for k in overrides if k.removeprefix("blockllm.engine.").replace("-", "_") in self.engine_kw]
        if fixed:
            raise SystemExit(f"{', '.join(fixed)}: the benchmark sets these for every system (see --max-batch and the preset)")
        return spec, name, overrides

    def run(self, systems: list[str]) -> dict[str, Any]:
        steps = {"blockllm": self.blockllm_serving if self.p.serving else (lambda: self.blockllm_direct("blockllm_direct")),
                 "blockllm_inproc": (lambda: self.blockllm_serving("blockllm_inproc", processes=False)) if self.p.serving else (lambda: None),
                 "per_model": self.per_model, "lora_only": self.lora_only, "transformers": self.transformers_ref,
                 "blockllm_direct": (lambda: self.blockllm_direct("blockllm_direct")) if self.p.serving and self.p.blockllm_direct else (lambda: None)}  # fmt: skip
        if not self.p.serving:
            self.result["notes"].append("BlockLLM drives the engine directly: the serving stack reads blocks from a file:// zoo, and this set's "
                                        "distinct blocks (about 100 GB) do not fit the device machine's 64-GiB disk")  # fmt: skip
        if not self.p.own_host_copies:
            self.result["notes"].append("per-model reloads copy a model's bytes from ONE shared pinned host buffer (host RAM cannot "
                                        "hold 16 full copies): the bytes and time of every reload are real, the weights are not the variant's")  # fmt: skip
        runs = [self._system_spec(spec) for spec in systems]  # every spec checked before anything runs
        seen: dict[str, int] = {}
        try:
            for spec, name, overrides in runs:
                _free(self.device)
                seen[spec] = seen.get(spec, 0) + 1
                with dask.config.set(overrides):
                    if overrides:  # the same system, other engine settings: its own row
                        (self.per_model if name == "per_model" else self.blockllm_direct)(spec)
                    elif m := SCALE_OUT.fullmatch(name):
                        workers = int(m.group(2))
                        if self.device.type == "cuda" and workers > torch.cuda.device_count():
                            raise SystemExit(f"{name}: {workers} workers, one per GPU, but this machine has {torch.cuda.device_count()} GPUs")
                        if m.group(1) == "per_model":
                            self.per_model_scaled(name, workers)
                        elif not self.p.serving:
                            raise SystemExit(f"{name} needs the serving stack, which the {self.name} preset leaves out (--serving)")
                        else:
                            self.blockllm_serving(name, workers=workers)
                    elif name == "blockllm_direct" and seen[spec] > 1:  # the engine again, later in the process (order effects)
                        self.blockllm_direct(f"blockllm_direct_{seen[spec]}")
                    else:
                        steps[name]()
                if overrides and spec in self.result["systems"]:
                    self.result["systems"][spec]["engine_settings"] = overrides
                    self.save()
        finally:  # a system that fails leaves no zoo behind in /tmp (its error still ends the run)
            if hasattr(self, "_host"):
                del self._host
            if hasattr(self, "_zoo_dir"):
                import shutil

                shutil.rmtree(self._zoo_dir, ignore_errors=True)
        self.ratios()
        self.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.result["wall_s"] = time.perf_counter() - self.t_start
        path = self.save()
        try:
            plot(self.result, path.with_suffix(".png"))
        except ImportError as e:  # no matplotlib: the JSON still stands
            log.warning("no plot: %s", e)
        return self.result


class PerModelPart:
    """A Dask actor on one worker (one GPU): per-model serving of its share of the variants, built once
    and replayed at every rate."""

    def __init__(self, name: str, preset: Preset, variants: list[str]) -> None:
        import tempfile

        self.bench = Bench(name, Path(tempfile.gettempdir()), preset=preset)  # the driver's settings (--rates, --max-batch...)
        self.system, self._info = self.bench.per_model_system(variants)

    def info(self) -> dict[str, Any]:
        return {**self._info, "max_batch_size": self.system.engine.max_batch_size}

    def replay(self, trace: list, deadline: float, start_at: float) -> RunLog:
        time.sleep(max(0.0, start_at - time.time()))
        return drive(self.system, trace, self.bench.p.shape.vocab, self.bench.p.seed, deadline)


def merge_logs(logs: list[RunLog]) -> RunLog:
    """One run's logs from several workers (clocks started together) as one log."""
    out = RunLog()
    for j, lg in enumerate(logs):
        out.recs.update({f"w{j}-{rid}": r for rid, r in lg.recs.items()})
        out.end = max(out.end, lg.end)
        out.h2d_bytes += lg.h2d_bytes
        out.h2d_seconds += lg.h2d_seconds
        out.reloads += lg.reloads
        for k, v in lg.extra.items():
            if isinstance(v, (int, float)):
                out.extra[k] = out.extra.get(k, 0) + v
    return out


# ------------------------------------------------------------------------------------------- report
def engine_overrides(text: str) -> dict[str, Any]:
    """`overlap-scheduling=false;prefill-graphs=true` -> {"blockllm.engine.overlap-scheduling": False, ...}."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(";")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"engine setting {item!r}: write key=value")
        out[f"blockllm.engine.{key.strip()}"] = yaml.safe_load(value)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    rates = [float(r) for r in result["config"]["rates"]]
    top = str(max(rates))
    for name, sr in result["systems"].items():
        rr = {float(r): v for r, v in sr.get("rates", {}).items() if "skipped" not in v}
        if not rr:
            continue
        cdf_rate = str(max(rr)) if top not in sr["rates"] or "skipped" in sr["rates"][top] else top
        e2e = sr["rates"][cdf_rate]["e2e_sorted_s"]
        axes[0].plot(e2e, np.arange(1, len(e2e) + 1) / len(e2e), label=f"{name} @ {float(cdf_rate):g} req/s")
        xs = sorted(rr)
        axes[1].plot(xs, [rr[x]["e2e_s"]["p95"] for x in xs], marker="o", label=name)
        axes[2].plot(xs, [rr[x]["throughput_tok_s"] for x in xs], marker="o", label=name)
    axes[0].set_xscale("log")
    axes[0].set(xlabel="end-to-end latency (s)", ylabel="fraction of requests", title="latency CDF (highest rate)")
    axes[1].set(xlabel="arrival rate (req/s)", ylabel="p95 end-to-end (s)", title="p95 latency", yscale="log")
    axes[2].set(xlabel="arrival rate (req/s)", ylabel="output tokens / s", title="throughput")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"multi-tenant, {result['preset']}: 16 variants, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    lines = [f"{result['device']}  distinct {result['model_set']['distinct_bytes'] / 1e9:.2f} GB, one model {result['model_set']['model_bytes'] / 1e9:.2f} GB"]
    for name, sr in result["systems"].items():
        for rate, s in sr.get("rates", {}).items():
            if "skipped" in s:
                lines.append(f"{name:>16} @ {rate:>5}: skipped")
                continue
            lines.append(f"{name:>16} @ {rate:>5}: p50 {s['e2e_s']['p50']:.2f} p95 {s['e2e_s']['p95']:.2f} p99 {s['e2e_s']['p99']:.2f} s, "
                         f"ttft p95 {s['ttft_s']['p95']:.3f}, tpot p50 {1e3 * (s['tpot_s']['p50'] or 0):.1f} ms, {s['throughput_tok_s']:.0f} tok/s, "
                         f"{s['completed']}/{s['requests']} done, util {s.get('gpu_util_mean')}, h2d {s['h2d_bytes'] / 1e9:.1f} GB")  # fmt: skip
    lines.append(f"ratios: {json.dumps(result.get('ratios'), default=str)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--systems", default="blockllm,per_model,lora_only,transformers,blockllm_direct",
                    help="comma list, run in this order (blockllm: the serving stack in a worker process; blockllm_inproc: "
                         "in this process; blockllm_wN / per_model_wN: on N worker processes, one GPU each); blockllm_direct may repeat (the later runs are named blockllm_direct_2, ...); "
                         "blockllm_direct@KEY=VALUE;KEY=VALUE (or per_model@...) runs it again under those engine.* settings, as its own row")
    ap.add_argument("--profile", nargs="?", const="device", choices=("device", "host"), default=None,
                    help="profile 1.5 s of an extra replay of the highest rate (engine-driven systems): torch.profiler's ops and "
                         "kernels (device, the default), or cProfile's Python functions of the engine loop (host)")  # fmt: skip
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no new run starts")
    ap.add_argument("--rates", default="", help="comma list of arrival rates, requests/s (default: the preset's)")
    ap.add_argument("--max-batch", type=int, default=None, help="per-block batch limit of every system (default: the preset's)")
    ap.add_argument("--serving", action="store_true", help="run BlockLLM through the serving stack (a file:// zoo on local disk) "
                    "even where the preset leaves it out for want of disk (8b: about 100 GB; the 4/8-GPU machines have 235 GiB)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.rates:
        PRESETS[args.preset].rates = [float(r) for r in args.rates.split(",")]
    for noisy in ("distributed", "blockllm.engine.loading"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.max_batch is not None:
        PRESETS[args.preset].max_batch = args.max_batch
    if args.budget is not None:
        PRESETS[args.preset].budget_s = args.budget
    if args.serving:
        PRESETS[args.preset].serving = True
    result = Bench(args.preset, args.out, args.profile).run(args.systems.split(","))
    print(summary(result))  # the CLI prints; the library logs


if __name__ == "__main__":
    main()


__all__ = ["PRESETS", "Bench", "Preset", "main"]
