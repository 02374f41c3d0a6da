"""Online latency and total throughput on one block engine, with and without a concurrent batch job.

The same steady online load (Poisson arrivals from benchmarks/workload.py) runs twice on one warm
engine: alone, then beside a batch job whose requests wait at "batch" priority in the block
host's admission queues and are handed to the engine by the host's rules (batch only into room
online work leaves). Per phase: total tokens/s, online TTFT, per-token latency (TPOT per request
and inter-token gaps) percentiles, engine step times, and GPU utilisation sampled through NVML.

    python -m benchmarks.batch_online --preset h100   # random-weight Llama-1.1B shape on the GPU
    python -m benchmarks.batch_online --preset cpu    # tiny shape, seconds: a smoke test of the harness

Writes benchmarks/results/batch_online-<preset>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.engine_decode import Shape, embed_head, layer_tensors, register_model
from benchmarks.workload import WorkloadConfig, generate

log = logging.getLogger("benchmarks.batch_online")


@dataclass(frozen=True)
class Preset:
    shape: Shape
    rate: float  # online requests per second
    duration: float  # seconds of arrivals per phase
    prompt_median: float
    output_median: float
    max_prompt: int
    max_output: int
    batch_prompt: int  # tokens per batch prompt
    batch_output: int  # tokens per batch completion
    batch_requests: int  # the batch job (more than a phase can finish: it never runs dry)
    max_batch_size: int = 64
    warmup: float = 3.0  # seconds of online + batch before measuring (CUDA graphs captured)
    # scheduler settings tried beside the configured defaults: (max-running-share, prefill-tokens, prefill-interval)
    sweep: tuple[tuple[float, int, float], ...] = ()


PRESETS = {
    "h100": Preset(Shape("llama-1.1b", 22, 2048, 5632, 32, 4, 32000), rate=12.0, duration=12.0, prompt_median=128, output_median=96,
                   max_prompt=512, max_output=256, batch_prompt=128, batch_output=128, batch_requests=20000, warmup=5.0,
                   sweep=((0.25, 256, 0.05),)),
    "cpu": Preset(Shape("tiny", 2, 64, 128, 4, 2, 256), rate=20.0, duration=1.0, prompt_median=12, output_median=12,
                  max_prompt=32, max_output=24, batch_prompt=12, batch_output=12, batch_requests=400, warmup=0.5,
                  sweep=((0.5, 64, 0.01),)),
}  # fmt: skip


class GpuSampler:
    """GPU utilisation (%) sampled through NVML every `period` seconds while running."""

    def __init__(self, device: torch.device, period: float = 0.05) -> None:
        self.samples: list[int] = []
        self.period = period
        self.error: str | None = None
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type != "cuda":
            self.error = "not a CUDA device"
            return
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as e:  # no NVML here: the rest of the benchmark stands
            self.error = f"{type(e).__name__}: {e}"

    def __enter__(self) -> GpuSampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_error": self.error}
        return {"gpu_util_mean": float(np.mean(self.samples)), "gpu_util_p50": float(np.median(self.samples)), "gpu_util_samples": len(self.samples)}


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def build_engine(p: Preset, device: torch.device):
    from blockllm.engine import Engine, TensorSource

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    source = TensorSource()
    embed, head = embed_head(p.shape, device, dtype)
    layers = [layer_tensors(p.shape, device, dtype) for _ in range(p.shape.layers)]
    manifest = register_model(source, p.shape, "bench", p.shape.name, layers, embed, head)
    eng = Engine(source, device=device, dtype=dtype, max_batch_size=p.max_batch_size, max_model_len=p.max_prompt + p.max_output + 64)
    eng.load(manifest)
    return eng, manifest.key


def run_phase(eng, model: str, p: Preset, with_batch: bool, duration: float, seed: int, device: torch.device) -> dict[str, Any]:
    """Drive the engine in real time as a block host's stepping thread does; measure."""
    from blockllm.serving.admission import Admission, Ticket
    from blockllm.types import BATCH_PRIORITY, ONLINE_PRIORITY, Request, SamplingParams

    rng = np.random.default_rng(seed)
    arrivals = generate(WorkloadConfig(models=(model,), rate=p.rate, duration=duration, prompt_median=p.prompt_median, prompt_sigma=0.5,
                                       output_median=p.output_median, output_sigma=0.5, max_prompt=p.max_prompt, max_output=p.max_output, seed=seed))  # fmt: skip
    vocab = p.shape.vocab
    admission = Admission(max_per_tenant=10**6, max_per_model=10**6)
    from blockllm import config as _config

    engine_waiting = int(_config.get("serving.engine-waiting", 4))  # what the host hands the engine ahead of its batch
    tag = f"s{seed}-{'b' if with_batch else 'o'}"
    if with_batch:
        for i in range(p.batch_requests):
            ids = tuple(int(t) for t in rng.integers(3, vocab, p.batch_prompt))
            sampling = SamplingParams(max_new_tokens=p.batch_output, ignore_eos=True)
            admission.offer(Ticket(Request(f"{tag}-batch{i}", model, ids, sampling, BATCH_PRIORITY), "batch-tenant", model, "batch"))
    online: dict[str, dict[str, Any]] = {}
    tokens_in_window = {"online": 0, "batch": 0}
    seen: dict[str, int] = {}
    steps: list[float] = []
    prefill_steps: list[float] = []  # steps that prefill (eager, no CUDA graph)
    sched = eng.scheduler
    preempt0, captures0 = sched.batch_preemptions, eng.graph_stats()[0]
    fp0 = eng.models[model].block_fps[0]
    next_arrival = 0
    sampler = GpuSampler(device)
    t0 = time.perf_counter()
    with sampler:
        while True:
            now = time.perf_counter() - t0
            while next_arrival < len(arrivals) and arrivals[next_arrival].time <= now:
                a = arrivals[next_arrival]
                rid = f"{tag}-online{next_arrival}"
                ids = tuple(int(t) for t in rng.integers(3, vocab, a.prompt_len))
                req = Request(rid, model, ids, SamplingParams(max_new_tokens=a.output_len, ignore_eos=True), ONLINE_PRIORITY)
                admission.offer(Ticket(req, "online-tenant", model, "online"))
                online[rid] = {"arrival": now, "times": []}
                next_arrival += 1
            waiting_online = sum(not s.is_batch for s in sched.waiting)  # the host's hand-out rule (serving/host.py)
            room = engine_waiting - waiting_online
            if room > 0 and len(admission):
                free = min(engine_waiting - len(sched.waiting), eng.max_batch_size - len(sched.running) - len(sched.waiting))
                batch_room = 0 if waiting_online else max(0, free)
                for t in admission.take(room, batch_room):
                    eng.add_request(t.request)
            if now >= duration and next_arrival >= len(arrivals) and all(o.get("done") for o in online.values()):
                break
            if now >= duration + 60:  # bounded: online requests still open a minute later are reported
                log.warning("%d online requests unfinished 60 s after the phase", sum(not o.get("done") for o in online.values()))
                break
            if not eng.has_unfinished():
                time.sleep(0.0002)
                continue
            tok0 = eng.block_tokens[fp0]
            s0 = time.perf_counter()
            outs = eng.step()
            s1 = time.perf_counter()
            steps.append(s1 - s0)
            if eng.block_tokens[fp0] - tok0 > eng.last_batch.get(fp0, 0):  # more tokens than rows: a prefill
                prefill_steps.append(s1 - s0)
            t_out = s1 - t0
            for out in outs:
                n_new = len(out.token_ids) - seen.get(out.request_id, 0)
                seen[out.request_id] = len(out.token_ids)
                o = online.get(out.request_id)
                if t_out <= duration:
                    tokens_in_window["online" if o is not None else "batch"] += n_new
                if o is not None:
                    o["times"].extend([t_out] * n_new)
                    if out.finished:
                        o["done"] = True
                if out.finished:
                    seen.pop(out.request_id, None)
    for rid in list(sched.running) + list(sched.waiting):  # the rest of the batch job: drop it
        eng.abort(rid.req.request_id)
    while eng.has_unfinished():
        eng.step()
    ttft, tpot, gaps = [], [], []
    for o in online.values():
        ts = o["times"]
        if ts:
            ttft.append(ts[0] - o["arrival"])
        if len(ts) >= 2:
            tpot.append((ts[-1] - ts[0]) / (len(ts) - 1))
            gaps.extend(np.diff(ts).tolist())
    total = tokens_in_window["online"] + tokens_in_window["batch"]
    res = {
        "with_batch": with_batch,
        "online_requests": len(online),
        "online_tokens_per_s": tokens_in_window["online"] / duration,
        "batch_tokens_per_s": tokens_in_window["batch"] / duration,
        "total_tokens_per_s": total / duration,
        "tpot_ms_p50": 1e3 * _pct(tpot, 50), "tpot_ms_p95": 1e3 * _pct(tpot, 95), "tpot_ms_mean": 1e3 * float(np.mean(tpot)),
        "itl_ms_p50": 1e3 * _pct(gaps, 50), "itl_ms_p95": 1e3 * _pct(gaps, 95), "itl_ms_p99": 1e3 * _pct(gaps, 99),
        "ttft_ms_p50": 1e3 * _pct(ttft, 50), "ttft_ms_p95": 1e3 * _pct(ttft, 95),
        "step_ms_p50": 1e3 * _pct(steps, 50), "step_ms_p95": 1e3 * _pct(steps, 95), "steps": len(steps),
        "prefill_steps": len(prefill_steps), "prefill_step_ms_p50": 1e3 * (_pct(prefill_steps, 50) or 0),
        "prefill_time_share": sum(prefill_steps) / max(sum(steps), 1e-9),
        "graph_captures": eng.graph_stats()[0] - captures0,
        "batch_preemptions": sched.batch_preemptions - preempt0,
        "tpot_ms": [1e3 * x for x in tpot],
    }  # fmt: skip
    res.update(sampler.summary())
    return res


def prefill_probe(eng, model: str, p: Preset, device: torch.device, reps: int = 10) -> dict[str, Any]:
    """What one step costs: a decode step of a few running requests, and one that also prefills
    `batch.prefill-tokens` of batch prompt (timed on the warm engine, synchronised)."""
    from blockllm.types import BATCH_PRIORITY, ONLINE_PRIORITY, Request, SamplingParams

    rng = np.random.default_rng(7)
    sched = eng.scheduler
    saved = (sched.batch_share, sched.batch_prefill, sched.batch_interval)
    sched.batch_interval = 0.0
    out: dict[str, Any] = {"prefill_tokens": sched.batch_prefill}
    decode, prefill = [], []

    def timed(n: int = 1) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(n):
            eng.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t) / n

    for k in range(reps):
        for i in range(2):
            ids = tuple(int(t) for t in rng.integers(3, p.shape.vocab, 64))
            eng.add_request(Request(f"probe{k}-o{i}", model, ids, SamplingParams(max_new_tokens=64, ignore_eos=True), ONLINE_PRIORITY))
        while any(len(s.tokens) - s.computed > 1 or s.slot == 0 for s in (*sched.running, *sched.waiting)):
            eng.step()
        decode.append(timed(10))
        n = max(1, sched.batch_prefill // p.batch_prompt)
        for i in range(n):
            ids = tuple(int(t) for t in rng.integers(3, p.shape.vocab, p.batch_prompt))
            eng.add_request(Request(f"probe{k}-b{i}", model, ids, SamplingParams(max_new_tokens=4, ignore_eos=True), BATCH_PRIORITY))
        times = []
        while any(s.req.priority == BATCH_PRIORITY and (s.slot == 0 or s.computed < s.n_prompt) for s in (*sched.running, *sched.waiting)):
            times.append(timed())
        prefill.append(max(times))  # the step that prefilled them (the others finish a pipelined decode)
        for s in list(sched.running) + list(sched.waiting):
            eng.abort(s.req.request_id)
        while eng.has_unfinished():
            eng.step()
    sched.batch_share, sched.batch_prefill, sched.batch_interval = saved
    out.update(decode_step_ms=1e3 * float(np.median(decode)), prefill_step_ms=1e3 * float(np.median(prefill)))
    return out


def run(preset: str, out_dir: Path, repeats: int = 1) -> dict[str, Any]:
    p = PRESETS[preset]
    device = torch.device("cuda" if preset != "cpu" and torch.cuda.is_available() else "cpu")
    if preset != "cpu" and device.type != "cuda":
        raise RuntimeError(f"preset {preset} needs a CUDA device")
    from blockllm import config as _config

    result: dict[str, Any] = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "config": {**asdict(p), "batch.max-running-share": _config.get("batch.max-running-share"),
                   "batch.prefill-tokens": _config.get("batch.prefill-tokens"), "batch.prefill-interval": _config.get("batch.prefill-interval")},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "engine-level: one block engine driven in real time with the block host's admission and hand-out rules; no Dask hops",
    }  # fmt: skip
    t = time.perf_counter()
    eng, model = build_engine(p, device)
    result["build_s"] = time.perf_counter() - t
    sched = eng.scheduler
    defaults = (sched.batch_share, sched.batch_prefill, sched.batch_interval)
    # warm-up on the measured online trace (its prompt shapes, its batch compositions), with and
    # without batch work, so that no phase pays for first-time kernel compiles or graph captures
    run_phase(eng, model, p, False, p.duration, seed=0, device=device)  # the whole trace: every prompt length
    run_phase(eng, model, p, True, p.warmup, seed=0, device=device)
    phases: dict[str, list] = {"online": [], "online+batch": []}
    sweep: dict[str, list] = {}
    for r in range(repeats):  # the same online trace in every phase
        plan = [("online", None), ("online+batch", defaults)]
        plan += [(f"share={a} tokens={b} interval={c}", (a, b, c)) for a, b, c in p.sweep] + [("online", None)]
        for name, settings in plan:
            if settings is not None:
                sched.batch_share, sched.batch_prefill, sched.batch_interval = settings
            res = run_phase(eng, model, p, settings is not None, p.duration, seed=r, device=device)
            (phases if name in phases else sweep).setdefault(name, []).append(res)
            log.info("%s run %d: %s", name, r, {k: v for k, v in res.items() if k != "tpot_ms"})
        sched.batch_share, sched.batch_prefill, sched.batch_interval = defaults
    result["phases"] = phases
    result["prefill_probe"] = prefill_probe(eng, model, p, device)
    result["sweep"] = {name: {k: v for k, v in rows[0].items() if k != "tpot_ms"} for name, rows in sweep.items()}
    result["summary"] = summarize(result)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"batch_online-{preset}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    try:
        plot(result, stem.with_suffix(".png"))
    except Exception as e:  # no matplotlib: the JSON still stands
        log.warning("no plot: %s", e)
    return result


def summarize(result: dict[str, Any], baseline: str = "all") -> dict[str, Any]:
    """Online-only against online+batch (defaults). `baseline`: "all" online phases, or only the
    "last" (when an earlier one still compiled kernels: see its prefill_step_ms_p50)."""
    phases = result["phases"]
    a, b = phases["online"], phases["online+batch"]
    if baseline == "last":
        a = a[-1:]

    def mean(rows, k):
        vals = [x[k] for x in rows if x.get(k) is not None]
        return float(np.mean(vals)) if vals else None

    summary: dict[str, Any] = {"baseline": baseline}
    summary |= {k: {"online": mean(a, k), "online+batch": mean(b, k)} for k in
               ("total_tokens_per_s", "online_tokens_per_s", "batch_tokens_per_s", "tpot_ms_p95", "itl_ms_p95", "ttft_ms_p95", "step_ms_p50", "gpu_util_mean")}  # fmt: skip
    summary["throughput_ratio"] = summary["total_tokens_per_s"]["online+batch"] / summary["total_tokens_per_s"]["online"]
    summary["tpot_p95_rise"] = summary["tpot_ms_p95"]["online+batch"] / summary["tpot_ms_p95"]["online"] - 1
    summary["itl_p95_rise"] = summary["itl_ms_p95"]["online+batch"] / summary["itl_ms_p95"]["online"] - 1
    summary["goal_tpot_p95_rise_le_10pct"] = summary["tpot_p95_rise"] <= 0.10
    summary["online_tpot_ms_p95_each_run"] = [x["tpot_ms_p95"] for x in phases["online"]]  # the baseline's own spread
    summary["online_prefill_step_ms_p50_each_run"] = [x.get("prefill_step_ms_p50") for x in phases["online"]]
    summary["prefill_time_share"] = {"online": mean(a, "prefill_time_share"), "online+batch": mean(b, "prefill_time_share")}
    summary["tpot_ms_mean"] = {"online": mean(a, "tpot_ms_mean"), "online+batch": mean(b, "tpot_ms_mean")}
    return summary


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    names = ["online", "online+batch"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key, label in zip(axes[:3], ("total_tokens_per_s", "tpot_ms_p95", "gpu_util_mean"), ("total tokens/s", "online TPOT p95 (ms)", "GPU utilisation (%)"), strict=True):
        vals = [s[key][n] or 0 for n in names]
        ax.bar(names, vals, color=["tab:blue", "tab:orange"])
        ax.set_title(label)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
    ax = axes[3]
    for n, color in zip(names, ("tab:blue", "tab:orange"), strict=True):
        runs = result["phases"][n][-1:] if n == "online" and s.get("baseline") == "last" else result["phases"][n]
        tp = sorted(x for run in runs for x in run["tpot_ms"])
        if tp:
            ax.plot(tp, np.linspace(0, 1, len(tp)), label=n, color=color)
    ax.set_xlabel("online TPOT per request (ms)")
    ax.set_ylabel("CDF")
    ax.legend()
    fig.suptitle(f"batch beside online: {result['device']} ({result['preset']}), throughput x{s['throughput_ratio']:.2f}, TPOT p95 {100 * s['tpot_p95_rise']:+.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--repeats", type=int, default=1, help="online / online+batch phase pairs")
    ap.add_argument("--resummarize", type=Path, default=None, help="recompute the summary (and plot) of a results JSON")
    ap.add_argument("--baseline", choices=("all", "last"), default="all", help="with --resummarize: which online phases are the baseline")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.resummarize is not None:
        result = json.loads(args.resummarize.read_text())
        result["summary"] = summarize(result, args.baseline)
        args.resummarize.write_text(json.dumps(result, indent=1, default=str))
        plot(result, args.resummarize.with_suffix(".png"))
    else:
        result = run(args.preset, args.out, args.repeats)
    print(json.dumps({k: v for k, v in result["summary"].items()}, indent=1))  # the CLI prints; the library logs


if __name__ == "__main__":
    main()
