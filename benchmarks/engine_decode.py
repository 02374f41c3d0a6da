"""Decode-step benchmark of the block engine against the memory floor and transformers.

Part 1: Llama-1.1B and Llama-3-8B shapes (random bf16 weights built on the device, no zoo), decode
step time at several batch sizes with 512-token contexts; the floor is (weights + KV read per
step) / measured device copy bandwidth; transformers eager and static-cache + torch.compile
generate per-step times for comparison. Part 2: 8 variants of the 1.1B sharing 16 of 22 layers,
one mixed batch (8 per variant) against 8 separate full copies batched per model.

    python -m benchmarks.engine_decode --preset h100     # on the GPU
    python -m benchmarks.engine_decode --preset cpu      # tiny shapes, seconds, smoke test

Writes benchmarks/results/engine_decode-<preset>[-<tag>].json and .png; `--l2-prefetch off,prefetch:32:8`
and `--gemv 0,1,16,16:fuse` time engine.l2-prefetch and engine.gemv-rows[/gemv-fuse] settings side by
side on the same engine, each right after the default.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("benchmarks.engine_decode")


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def config(self, max_positions: int = 4096) -> dict[str, Any]:
        """A transformers LlamaConfig dict of this shape."""
        return {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden // self.heads, "vocab_size": self.vocab, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": max_positions,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2,
        }  # fmt: skip


@dataclass
class Preset:
    shapes: list[Shape]
    batches: dict[str, list[int]]  # shape name -> batch sizes
    context: int
    steps: int  # timed decode steps
    warmup: int
    hf_eager_tokens: int
    hf_compile: dict[
        str, list[int]
    ]  # shape name -> batches to run transformers' compiled generate at
    variants: int
    shared_layers: int
    variant_batch: int  # requests per variant in the mixed batch
    copy_bytes: int
    compile_budget_s: float = 240.0
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    "h100": Preset(
        shapes=[
            Shape("llama-1.1b", 22, 2048, 5632, 32, 4, 32000),
            Shape("llama3-8b", 32, 4096, 14336, 32, 8, 128256),
        ],
        batches={"llama-1.1b": [1, 8, 32, 64], "llama3-8b": [1, 8, 16, 32, 64]},
        context=512,
        steps=50,
        warmup=5,
        hf_eager_tokens=12,
        hf_compile={"llama-1.1b": [1, 64], "llama3-8b": [1, 16]},
        variants=8,
        shared_layers=16,
        variant_batch=8,
        copy_bytes=2 << 30,
    ),
    "cpu": Preset(
        shapes=[Shape("tiny-a", 2, 64, 128, 4, 2, 256), Shape("tiny-b", 3, 128, 256, 4, 1, 512)],
        batches={"tiny-a": [1, 4], "tiny-b": [1, 4]},
        context=24,
        steps=3,
        warmup=1,
        hf_eager_tokens=3,
        hf_compile={},
        variants=3,
        shared_layers=1,
        variant_batch=2,
        copy_bytes=16 << 20,
    ),
}


# ------------------------------------------------------------------------------------------- weights
def _rand(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, std: float = 0.02
) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32) * std).to(dtype)


def layer_tensors(s: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One decoder layer, named as the Llama family stores it in a block."""
    d, kv = s.hidden // s.heads, s.kv_heads * (s.hidden // s.heads)
    return {
        "0.input_layernorm.weight": torch.ones(s.hidden, device=device, dtype=dtype),
        "0.post_attention_layernorm.weight": torch.ones(s.hidden, device=device, dtype=dtype),
        "0.self_attn.q_proj.weight": _rand((s.heads * d, s.hidden), device, dtype),
        "0.self_attn.k_proj.weight": _rand((kv, s.hidden), device, dtype),
        "0.self_attn.v_proj.weight": _rand((kv, s.hidden), device, dtype),
        "0.self_attn.o_proj.weight": _rand((s.hidden, s.heads * d), device, dtype),
        "0.mlp.gate_proj.weight": _rand((s.intermediate, s.hidden), device, dtype),
        "0.mlp.up_proj.weight": _rand((s.intermediate, s.hidden), device, dtype),
        "0.mlp.down_proj.weight": _rand((s.hidden, s.intermediate), device, dtype),
    }


def register_model(
    source: Any, s: Shape, tenant: str, name: str, layers: list[dict], embed: dict, head: dict
) -> Any:
    """Put a chain of in-memory blocks and its manifest into a TensorSource; returns the manifest."""
    from blockllm.engine.source import make_spec
    from blockllm.families.llama import arch_of
    from zoo_store import Manifest

    cfg = s.config()
    arch = arch_of(cfg)
    chain = [source.put_block(make_spec("embed", arch, 0, 0, embed), embed)]
    for i, t in enumerate(layers):
        chain.append(source.put_block(make_spec("layers", arch, i, i + 1, t), t))
    chain.append(
        source.put_block(
            make_spec("head", arch, s.layers, s.layers, head, tied_embedding=False), head
        )
    )
    manifest = Manifest(tenant=tenant, name=name, family="llama", chain=tuple(chain), config=cfg)
    source.put_manifest(manifest)
    return manifest


def embed_head(s: Shape, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    embed = {"embed_tokens.weight": _rand((s.vocab, s.hidden), device, dtype)}
    head = {
        "norm.weight": torch.ones(s.hidden, device=device, dtype=dtype),
        "lm_head.weight": _rand((s.vocab, s.hidden), device, dtype),
    }
    return embed, head


# ------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a large device-to-device copy, counting the read and the write."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t0)
    del a, b
    return 2 * nbytes / statistics.median(times)


def engine_decode(
    engine: Any, requests: list, steps: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """Prefill `requests`, then time decode steps: wall per step (host + device) and graph replay alone."""
    try:
        return _engine_decode(engine, requests, steps, warmup, device)
    finally:  # a failed run must not leave its requests (and their ids) in the engine
        for r in requests:
            engine.abort(r.request_id)
        engine.step()


def _engine_decode(
    engine: Any, requests: list, steps: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    for r in requests:
        engine.add_request(r)
    t0 = time.perf_counter()
    while (
        any(s.computed < len(s.tokens) - 1 for s in engine.scheduler.all())
        or engine.scheduler.waiting
    ):
        engine.step()
    sync(device)
    prefill_s = time.perf_counter() - t0
    for _ in range(warmup):
        engine.step()
    sync(device)
    wall = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        wall.append(time.perf_counter() - t0)  # a step ends with its tokens on the host
    out: dict[str, Any] = {
        "step_ms": 1e3 * statistics.median(wall),
        "step_ms_mean": 1e3 * statistics.mean(wall),
        "prefill_s": prefill_s,
    }
    entry = engine.last_graph() if engine.cuda_graphs else None
    if entry is not None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        entry.graph.replay()
        start.record()
        for _ in range(steps):
            entry.graph.replay()
        end.record()
        sync(device)
        out["graph_ms"] = start.elapsed_time(end) / steps
        if PROFILE and engine.decode_graphs == "step":
            out["profile"] = profile_step(engine, entry, device)
    return out


PROFILE = False
TAG = ""
# --l2-prefetch / --gemv: (kind, name, apply to the engine) settings timed after the default
SWEEP: list[tuple[str, str, Callable[[Any], None]]] = []


def l2_setting(spec: str) -> tuple[str, str, Callable[[Any], None]]:
    """MODE[:MiB[:PROGRAMS]] -> an engine.l2-prefetch setting of the sweep."""
    f = spec.split(":")
    mode, mb, progs = f[0], float(f[1]) if len(f) > 1 else 32.0, int(f[2]) if len(f) > 2 else 0
    return "l2_prefetch", f"{mode}:{mb:g}:{progs}", lambda eng: eng.set_l2_prefetch(mode, mb, progs)


def gemv_setting(spec: str) -> tuple[str, str, Callable[[Any], None]]:
    """ROWS[:fuse] -> an engine.gemv-rows (0: off) / engine.gemv-fuse setting of the sweep."""
    rows, _, fuse = spec.partition(":")
    if not rows.isdigit() or fuse not in ("", "fuse"):
        raise argparse.ArgumentTypeError(f"--gemv takes ROWS or ROWS:fuse, not {spec!r}")
    return "gemv", spec, lambda eng: eng.set_gemv(int(rows), fuse == "fuse")
COMPILE_T0 = time.perf_counter()  # one compile-time budget for the whole run


def profile_step(engine: Any, entry: Any, device: torch.device) -> list[dict[str, Any]]:
    """Kernel times of one eager run of the captured step's plan (what the graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    from blockllm.engine.forward import run_plan

    lane = engine.lanes[entry.plan.lane]
    with torch.inference_mode():
        run_plan(entry.plan, lane)
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_plan(entry.plan, lane)
            sync(device)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append(
                {
                    "kernel": e.key[:90],
                    "calls": e.count,
                    "us_total": t,
                    "us_each": t / max(e.count, 1),
                }
            )
    rows.sort(key=lambda r: -r["us_total"])
    total = sum(r["us_total"] for r in rows)
    log.info("profile (%d rows, kernels %.0f us total):\n%s", entry.plan.n_rows, total,
             "\n".join(f"{r['us_total']:9.1f} us {r['calls']:5d}x {r['us_each']:7.2f}  {r['kernel']}" for r in rows[:14]))  # fmt: skip
    return rows[:20]


def make_requests(model: str, n: int, context: int, vocab: int, max_new: int, tag: str) -> list:
    from blockllm.types import Request, SamplingParams

    g = torch.Generator().manual_seed(n)
    reqs = []
    for i in range(n):
        ids = torch.randint(3, vocab, (context,), generator=g).tolist()
        reqs.append(
            Request(
                f"{tag}-{i}",
                model,
                tuple(ids),
                SamplingParams(max_new_tokens=max_new, ignore_eos=True),
            )
        )
    return reqs


class _StepClock:
    """A logits processor that timestamps every generation step (after a device sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def hf_per_step(
    model: Any,
    batch: int,
    context: int,
    vocab: int,
    tokens: int,
    device: torch.device,
    **gen_kw: Any,
) -> float:
    """Median milliseconds between decode steps of transformers' generate (greedy)."""
    from transformers import LogitsProcessorList

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, context), generator=g).to(device)
    clock = _StepClock(device)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]), pad_token_id=0, **gen_kw)  # fmt: skip
    deltas = [
        b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)
    ]  # skip the prefill step
    return 1e3 * statistics.median(deltas)


# ------------------------------------------------------------------------------------------- parts
def bench_shape(
    s: Shape, p: Preset, device: torch.device, dtype: torch.dtype, bw: float
) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from blockllm.engine import Engine, TensorSource

    res: dict[str, Any] = {"shape": asdict(s), "batches": {}}
    cfg = s.config()
    hf_cfg = LlamaConfig(
        **{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    )
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM._from_config(hf_cfg, dtype=dtype).eval()
    sd = hf.state_dict()
    source = TensorSource()
    # "model.layers.{i}.self_attn.q_proj.weight" -> "0.self_attn.q_proj.weight" in block i
    layers = [
        {"0." + k.split(".", 3)[3]: v for k, v in sd.items() if k.startswith(f"model.layers.{i}.")}
        for i in range(s.layers)
    ]
    embed = {"embed_tokens.weight": sd["model.embed_tokens.weight"]}
    head = {"norm.weight": sd["model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    manifest = register_model(source, s, "bench", s.name, layers, embed, head)
    d = s.hidden // s.heads
    kv_token_layer = 2 * s.kv_heads * d * torch.empty((), dtype=dtype).element_size()
    total_new = p.warmup + p.steps + 4
    max_b = max(p.batches[s.name])
    pages = max_b * s.layers * (-(-(p.context + total_new + 1) // 16)) + 64
    eng = Engine(source, device=device, dtype=dtype, kv_pages=pages, max_batch_size=max(64, max_b),
                 max_model_len=p.context + total_new + 64, prefill_chunk=max_b * p.context)  # fmt: skip
    eng.load(manifest)
    defaults = (eng.l2_prefetch, eng.l2_prefetch_bytes / 2**20, eng.l2_prefetch_programs), (eng.gemv, eng.gemv_fuse)
    weights = eng.stats().weight_bytes
    embed_bytes = s.vocab * s.hidden * torch.empty((), dtype=dtype).element_size()
    res["weight_bytes"] = weights
    for b in p.batches[s.name]:
        ctx_mean = p.context + p.warmup + p.steps / 2
        read = (weights - embed_bytes) + b * s.hidden * 2 + b * s.layers * ctx_mean * kv_token_layer
        row: dict[str, Any] = {"floor_ms": 1e3 * read / bw, "bytes_read": read}
        try:
            row.update(
                engine_decode(
                    eng,
                    make_requests(manifest.key, b, p.context, s.vocab, total_new, f"b{b}"),
                    p.steps,
                    p.warmup,
                    device,
                )
            )
            row["ratio"] = row["step_ms"] / row["floor_ms"]
            if "graph_ms" in row:
                row["graph_ratio"] = row["graph_ms"] / row["floor_ms"]
        except Exception as e:  # record and go on: one failed size must not lose the others
            row["engine_error"] = f"{type(e).__name__}: {e}"
            log.error("engine %s b=%d failed:\n%s", s.name, b, traceback.format_exc())
        for kind, name, apply in SWEEP:  # other settings side by side on the same engine
            try:
                eng.set_l2_prefetch(*defaults[0])
                eng.set_gemv(*defaults[1])
                apply(eng)
                r = engine_decode(eng, make_requests(manifest.key, b, p.context, s.vocab, total_new, f"b{b}-{name}"),
                                  p.steps, p.warmup, device)  # fmt: skip
                r["ratio"] = r["step_ms"] / row["floor_ms"]
                if "graph_ms" in r:
                    r["graph_ratio"] = r["graph_ms"] / row["floor_ms"]
                row.setdefault(kind, {})[name] = r
                log.info("%s b=%d %s %s: step %.3f ms (%.2fx), graph %s", s.name, b, kind, name,
                         r["step_ms"], r["ratio"], r.get("graph_ms"))  # fmt: skip
            except Exception as e:
                row.setdefault(kind, {})[name] = {"error": f"{type(e).__name__}: {e}"}
                log.error("%s %s b=%d failed:\n%s", kind, name, b, traceback.format_exc())
        if SWEEP:
            eng.set_l2_prefetch(*defaults[0])
            eng.set_gemv(*defaults[1])
        try:
            row["hf_eager_ms"] = hf_per_step(hf, b, p.context, s.vocab, p.hf_eager_tokens, device)
        except Exception as e:
            row["hf_eager_error"] = f"{type(e).__name__}: {e}"
        res["batches"][str(b)] = row
        log.info(
            "%s b=%d: %s",
            s.name,
            b,
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
        )
    if (
        device.type == "cuda" and p.batches[s.name]
    ):  # one eager (no graphs) point: what the graphs buy
        b = p.batches[s.name][0]
        eager = Engine(source, device=device, dtype=dtype, kv_pages=pages, max_batch_size=max(64, max_b), cuda_graphs=False,
                       max_model_len=p.context + total_new + 64, prefill_chunk=max_b * p.context)  # fmt: skip
        eager.instances, eager.adapters = eng.instances, eng.adapters  # share the weights
        eager.load(manifest)
        try:
            res["batches"][str(b)]["eager_step_ms"] = engine_decode(
                eager,
                make_requests(manifest.key, b, p.context, s.vocab, total_new, "eager"),
                p.steps,
                p.warmup,
                device,
            )["step_ms"]
        except Exception as e:
            res["batches"][str(b)]["eager_error"] = f"{type(e).__name__}: {e}"
        del eager
    del eng
    gc.collect()
    compiled = {}
    for b in p.hf_compile.get(s.name, []):
        if time.perf_counter() - COMPILE_T0 > p.compile_budget_s:
            compiled[str(b)] = {"error": "skipped: compile time budget spent"}
            continue
        try:
            t0 = time.perf_counter()
            n = max(p.hf_eager_tokens, 16)
            hf_per_step(
                hf, b, p.context, s.vocab, n, device, cache_implementation="static"
            )  # compiles
            warm = time.perf_counter() - t0
            compiled[str(b)] = {
                "ms": hf_per_step(
                    hf, b, p.context, s.vocab, n, device, cache_implementation="static"
                ),
                "first_call_s": warm,
            }
        except Exception as e:
            compiled[str(b)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log.error("transformers compiled generate %s b=%d failed: %s", s.name, b, e)
        log.info("%s hf compiled b=%d: %s", s.name, b, compiled[str(b)])
    for b, v in compiled.items():
        res["batches"].setdefault(b, {})["hf_compiled_ms" if "ms" in v else "hf_compiled_error"] = (
            v.get("ms", v.get("error"))
        )
        if "first_call_s" in v:
            res["batches"][b]["hf_compiled_first_call_s"] = v["first_call_s"]
    del hf, sd, source
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def bench_variants(
    s: Shape, p: Preset, device: torch.device, dtype: torch.dtype, bw: float
) -> dict[str, Any]:
    """8 variants sharing the first `shared_layers` layers: one mixed batch vs 8 per-model batches."""
    from blockllm.engine import Engine, TensorSource

    torch.manual_seed(1)
    n_var, per = p.variants, p.variant_batch
    total_new = p.warmup + p.steps + 4
    pages_per_req = s.layers * (-(-(p.context + total_new + 1) // 16))
    embed, head = embed_head(s, device, dtype)
    shared = [layer_tensors(s, device, dtype) for _ in range(p.shared_layers)]
    source = TensorSource()
    mixed_models = []
    for v in range(n_var):
        own = [layer_tensors(s, device, dtype) for _ in range(s.layers - p.shared_layers)]
        mixed_models.append(
            register_model(source, s, "bench", f"variant{v}", shared + own, embed, head)
        )
    kw = dict(
        device=device,
        dtype=dtype,
        max_model_len=p.context + total_new + 64,
        prefill_chunk=n_var * per * p.context,
    )
    eng = Engine(
        source, kv_pages=n_var * per * pages_per_req + 64, max_batch_size=max(64, n_var * per), **kw
    )
    for m in mixed_models:
        eng.load(m)
    reqs = [
        r
        for v, m in enumerate(mixed_models)
        for r in make_requests(m.key, per, p.context, s.vocab, total_new, f"mix{v}")
    ]
    mixed = engine_decode(eng, reqs, p.steps, p.warmup, device)
    mixed["weight_bytes"] = eng.stats().weight_bytes
    del eng
    gc.collect()
    # 8 separate full copies (nothing shared), each served alone with its own batch of 8
    separate = []
    copies_bytes = 0
    for v in range(n_var):
        src = TensorSource()
        layers = [{k: t.clone() for k, t in layer.items()} for layer in shared] + [
            source.get_block(fp).tensors for fp in mixed_models[v].chain[1 + p.shared_layers : -1]
        ]
        m = register_model(
            src,
            s,
            "bench",
            f"copy{v}",
            layers,
            {k: t.clone() for k, t in embed.items()},
            {k: t.clone() for k, t in head.items()},
        )
        e = Engine(src, kv_pages=per * pages_per_req + 64, max_batch_size=64, **kw)
        e.load(m)
        copies_bytes += e.stats().weight_bytes
        separate.append(
            engine_decode(
                e,
                make_requests(m.key, per, p.context, s.vocab, total_new, f"sep{v}"),
                p.steps,
                p.warmup,
                device,
            )
        )
        del e, src, layers
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sep_ms = sum(r["step_ms"] for r in separate)
    out = {
        "variants": n_var, "per_variant": per, "shared_layers": p.shared_layers, "own_layers": s.layers - p.shared_layers,
        "mixed_step_ms": mixed["step_ms"], "mixed_graph_ms": mixed.get("graph_ms"), "mixed_weight_bytes": mixed["weight_bytes"],
        "separate_step_ms": sep_ms, "separate_graph_ms": sum(r.get("graph_ms", 0.0) for r in separate) or None,
        "separate_weight_bytes": copies_bytes, "ratio": sep_ms / mixed["step_ms"],
    }  # fmt: skip
    if out["mixed_graph_ms"] and out["separate_graph_ms"]:
        out["graph_ratio"] = out["separate_graph_ms"] / out["mixed_graph_ms"]
    ctx_mean = p.context + p.warmup + p.steps / 2
    kv = (
        n_var
        * per
        * s.layers
        * ctx_mean
        * 2
        * s.kv_heads
        * (s.hidden // s.heads)
        * torch.empty((), dtype=dtype).element_size()
    )
    emb = s.vocab * s.hidden * torch.empty((), dtype=dtype).element_size()
    out["mixed_floor_ms"] = 1e3 * (mixed["weight_bytes"] - emb + kv) / bw
    out["separate_floor_ms"] = 1e3 * (copies_bytes - n_var * emb + kv) / bw
    out["floor_ratio"] = out["separate_floor_ms"] / out["mixed_floor_ms"]
    log.info(
        "variants: %s", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
    )
    return out


# ------------------------------------------------------------------------------------------- report
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = result["shapes"]
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5 * (len(shapes) + 1), 4))
    for ax, sr in zip(axes, shapes, strict=False):  # the last axis is the variants bar chart
        bs = sorted(int(b) for b in sr["batches"])
        for key, label in (("step_ms", "engine step"), ("graph_ms", "engine graph replay"), ("floor_ms", "floor"),
                           ("hf_eager_ms", "transformers eager"), ("hf_compiled_ms", "transformers static+compile")):  # fmt: skip
            pts = [(b, sr["batches"][str(b)].get(key)) for b in bs]
            pts = [(b, v) for b, v in pts if isinstance(v, (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("ms per decode step")
        ax.set_title(sr["shape"]["name"])
        ax.legend(fontsize=7)
    v = result.get("variants")
    ax = axes[-1]
    if v:
        ax.bar(
            ["mixed (shared)", "8 copies"],
            [v["mixed_step_ms"], v["separate_step_ms"]],
            color=["tab:green", "tab:gray"],
        )
        ax.set_ylabel("ms per step, all 64 requests")
        ax.set_title(f"{v['variants']} variants: {v['ratio']:.2f}x")
    fig.suptitle(f"block engine decode — {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(preset_name: str, out_dir: Path, parts: set[str]) -> dict[str, Any]:
    p = PRESETS[preset_name]
    device = torch.device("cuda" if preset_name != "cpu" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import transformers

    result: dict[str, Any] = {
        "preset": preset_name,
        "sweep": {kind: [name for k, name, _ in SWEEP if k == kind] for kind in ("l2_prefetch", "gemv")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
        "config": {k: (v if not isinstance(v, list) else [asdict(x) if hasattr(x, "__dataclass_fields__") else x for x in v])
                   for k, v in asdict(p).items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    bw = copy_bandwidth(device, p.copy_bytes)
    result["copy_bandwidth_GBps"] = bw / 1e9
    log.info("copy bandwidth %.0f GB/s (read + write)", bw / 1e9)
    result["shapes"] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (f"engine_decode-{preset_name}" + (f"-{TAG}" if TAG else ""))

    def save() -> None:  # after every part: a run cut short still leaves what it measured
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))

    if "variants" in parts and "variants-first" in parts:
        result["variants"] = bench_variants(p.shapes[0], p, device, dtype, bw)
        save()
    for s in p.shapes:
        if "shapes" in parts:
            result["shapes"].append(bench_shape(s, p, device, dtype, bw))
            save()
    if "variants" in parts and "variants" not in result:
        result["variants"] = bench_variants(p.shapes[0], p, device, dtype, bw)
    if device.type == "cuda":  # which kernels the engine picked per shape (timed at warm-up)
        from blockllm.engine import ops, triton_ops

        result["gemm_choices"] = {
            str(k): ("triton" if v else "cublas") for k, v in ops._GEMM_CHOICE.items()
        }
        result["attention_splits"] = {str(k): v for k, v in triton_ops._SPLITS.items()}
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    try:
        plot(result, stem.with_suffix(".png"))
    except Exception as e:  # no matplotlib: the JSON still stands
        log.warning("no plot: %s", e)
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [f"{result['device']}  copy bw {result['copy_bandwidth_GBps']:.0f} GB/s"]
    for sr in result["shapes"]:
        for b, r in sorted(sr["batches"].items(), key=lambda kv: int(kv[0])):
            f = lambda k, r=r: f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "-"  # noqa: E731
            lines.append(f"{sr['shape']['name']:>11} b={b:>3} step {f('step_ms')} graph {f('graph_ms')} floor {f('floor_ms')} "
                         f"ratio {f('ratio')} gratio {f('graph_ratio')} hf {f('hf_eager_ms')} hfc {f('hf_compiled_ms')} eager {f('eager_step_ms')}")  # fmt: skip
            for kind, name, q in [(k, n, q) for k in ("l2_prefetch", "gemv") for n, q in r.get(k, {}).items()]:
                lines.append(f"{'':>11}   {kind} {name:>14}: " + (q["error"] if "error" in q else
                             f"step {q['step_ms']:.3f} graph {q.get('graph_ms', float('nan')):.3f} ratio {q['ratio']:.3f} gratio {q.get('graph_ratio', float('nan')):.3f}"))  # fmt: skip
    v = result.get("variants")
    if v:
        lines.append(f"variants: mixed {v['mixed_step_ms']:.3f} ms, separate {v['separate_step_ms']:.3f} ms, ratio {v['ratio']:.2f} "
                     f"(graph {v.get('graph_ratio', float('nan')):.2f}, floor {v['floor_ratio']:.2f})")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--parts", default="shapes,variants", help="comma list of: shapes, variants")
    ap.add_argument("--only", default="", help="comma list of shape names to run (default all)")
    ap.add_argument(
        "--skip-compile",
        action="store_true",
        help="skip transformers' static-cache + torch.compile runs",
    )
    ap.add_argument("--profile", action="store_true", help="log kernel times of each captured step")
    ap.add_argument("--l2-prefetch", default="", help="comma list of engine.l2-prefetch settings MODE[:MiB[:PROGRAMS]] "
                    "(e.g. off,prefetch:32:8), each timed on the same engine right after the default")
    ap.add_argument("--gemv", default="", help="comma list of engine.gemv-rows[:fuse] settings (e.g. 1,16,16:fuse; "
                    "0: cuBLAS only), each timed on the same engine right after the default")
    ap.add_argument("--tag", default="", help="results file suffix: engine_decode-<preset>-<tag>.json")
    ap.add_argument(
        "--compile-budget",
        type=float,
        default=None,
        help="seconds for transformers compile runs, all shapes",
    )
    args = ap.parse_args(argv)
    global PROFILE, COMPILE_T0, SWEEP, TAG
    PROFILE, COMPILE_T0, TAG = args.profile, time.perf_counter(), args.tag
    SWEEP = [l2_setting(x) for x in args.l2_prefetch.split(",") if x] + [gemv_setting(x) for x in args.gemv.split(",") if x]
    if args.compile_budget is not None:
        PRESETS[args.preset].compile_budget_s = args.compile_budget
    if args.skip_compile:
        PRESETS[args.preset].hf_compile = {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.only:
        PRESETS[args.preset].shapes = [
            s for s in PRESETS[args.preset].shapes if s.name in args.only.split(",")
        ]
    result = run(args.preset, args.out, set(args.parts.split(",")))
    print(summary(result))  # the CLI prints; the library logs


if __name__ == "__main__":
    main()


__all__ = ["PRESETS", "Preset", "Shape", "main", "run"]
