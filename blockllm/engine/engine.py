"""The block engine: requests of any loaded model, batched block by block on one device.

Every step, each loaded block instance runs ONE forward over the rows of every scheduled request
whose chain passes through it, whatever model it belongs to (iteration-level batching): requests
merge at shared blocks and split at their own. LoRA adapters add their low-rank delta to their own
rows only. KV lives in a paged pool; decode steps replay CUDA graphs of the whole chain.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import config as _config
from ..exceptions import InvalidRequestError, PromptTooLongError, UnknownModelError
from ..types import Request, RequestOutput, SamplingParams
from . import ops
from .forward import Lane, run_plan
from .graphs import GraphCache
from .kv_cache import KVPool
from .loading import LoadedModel, ModelLoading
from .pipeline import PipelinedDecode, _Inflight
from .plan import ModelClass, Plan, build_plan, fill_inputs
from .prefetch import check_mode
from .sampling import make_generator, sample
from .scheduler import Scheduler, Sequence
from .scheduler import by_lane as _by_lane
from .scheduler import decodes as _decodes
from .staging import Staging
from .stepgraphs import StepGraphs
from .weights import EmbedBlock, HeadBlock, LayerBlock, LoraAdapter

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    weight_bytes: int  # bytes of the distinct loaded blocks and adapters
    blocks_loaded: int
    adapters_loaded: int
    models_loaded: int
    kv_pages_used: int
    kv_pages_total: int
    kv_page_bytes: int
    running: int
    waiting: int
    steps: int
    tokens_generated: int
    preemptions: int
    graphs_captured: int
    # block fingerprint -> requests that ran through it in the last step
    last_batch: dict[str, int] = field(default_factory=dict)
    # block fingerprint -> tokens it processed, all steps
    block_tokens: dict[str, int] = field(default_factory=dict)
    # per block: fingerprint, bytes, batch (last step), tokens, limit (for monitoring)
    blocks: list[dict[str, Any]] = field(default_factory=list)


def gemv_config(device: torch.device, rows: int | None = None, fuse: bool | None = None) -> tuple[int, bool]:
    """(rows, fuse): GEMMs of up to `rows` rows take the Triton GEMV (0: none), and with `fuse` those
    GEMVs also run the RMSNorm before and rope + KV write / SwiGLU after them. Unset arguments come
    from engine.gemv, engine.gemv-rows and engine.gemv-fuse. One row is measured faster than cuBLAS
    on the H200; more rows and the fusion are off by default until measured (benchmarks/NOTES-engine.md)."""
    on = bool(_config.get("engine.gemv", True)) if rows is None else rows > 0
    rows = int(_config.get("engine.gemv-rows", 1)) if rows is None else int(rows)
    if on and not 1 <= rows <= 16:
        raise ValueError(f"engine.gemv-rows must be 1 to 16, not {rows}")
    fuse = bool(_config.get("engine.gemv-fuse", False)) if fuse is None else bool(fuse)
    if not (on and ops.fused_on(device)):
        return 0, False
    return rows, fuse


def _device(device: str | torch.device | None) -> torch.device:
    name = device or _config.get("engine.device", "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    name = dtype or _config.get("engine.dtype", "auto")
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Engine(ModelLoading, PipelinedDecode, StepGraphs):
    """Blocks loaded once each on one device; requests of every loaded model batched per block.

    `load(model)` / `unload(model)`, `add_request(req)`, `step()` (one iteration: the outputs of
    requests that got a token), `abort(id)`, `generate(requests)`, `stats()`. Defaults come from
    `blockllm.config` (engine.*). `zoo` is a `Zoo` or anything with its read methods
    (`engine.source.TensorSource` serves tensors already in memory).
    """

    def __init__(
        self,
        zoo: Any,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        page_size: int | None = None,
        kv_pages: int | str | None = None,
        max_batch_size: int | None = None,
        cuda_graphs: bool | None = None,
        max_model_len: int | None = None,
        prefill_chunk: int | None = None,
        tune_kernels: bool | None = None,
    ) -> None:
        self.zoo = zoo
        self.device = _device(device)
        self.dtype = _dtype(dtype, self.device)
        self.page_size = int(page_size or _config.get("engine.page-size", 16))
        self.kv_pages = kv_pages if kv_pages is not None else _config.get("engine.kv-pages", "auto")
        self.max_batch_size = int(max_batch_size or _config.get("engine.max-batch-size", 64))
        self.max_model_len = int(max_model_len or _config.get("engine.max-model-len", 4096))
        graphs = _config.get("engine.cuda-graphs", True) if cuda_graphs is None else cuda_graphs
        self.cuda_graphs = bool(graphs) and self.device.type == "cuda"
        if self.cuda_graphs and ops._triton_ops() is None:
            log.warning(
                "CUDA graphs need the Triton kernels (the torch attention sizes itself on the host); running eagerly"
            )
            self.cuda_graphs = False
        tune = _config.get("engine.tune-kernels", False) if tune_kernels is None else tune_kernels
        self.tune_kernels = bool(tune) and self.device.type == "cuda"
        # Folding RMSNorm weights into the next GEMM saves two kernels a layer but rounds
        # differently from transformers in bf16; `engine.fold-norms` turns it on.
        self.fold_norms = bool(_config.get("engine.fold-norms", True)) and ops.fused_on(self.device)
        self.gemv, self.gemv_fuse = gemv_config(self.device)
        # engine.l2-prefetch: in captured steps each GEMM forks its successor's weight into L2
        self.l2_prefetch = check_mode(_config.get("engine.l2-prefetch", "off"))
        self.l2_prefetch_bytes = int(float(_config.get("engine.l2-prefetch-mb", 32)) * 2**20)
        self.l2_prefetch_programs = int(_config.get("engine.l2-prefetch-programs", 0))
        self.instances: dict[str, EmbedBlock | LayerBlock | HeadBlock] = {}
        self.adapters: dict[str, LoraAdapter] = {}
        self._refs: Counter[str] = Counter()
        self.models: dict[str, LoadedModel] = {}
        self._classes: dict[tuple, ModelClass] = {}
        self.lanes: dict[tuple, Lane] = {}
        self.pools: dict[tuple, KVPool] = {}
        self.block_limits: dict[str, int] = {}
        self.scheduler = Scheduler(
            int(prefill_chunk or _config.get("engine.prefill-chunk", 512)), self._limit
        )
        self._live: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []
        self._arrivals = itertools.count()
        self._plans: dict[tuple, tuple[Plan, np.ndarray, torch.Tensor | None]] = {}
        self._inflight: _Inflight | None = None
        self.graphs = GraphCache(int(_config.get("engine.graph-cache", 48)))
        self.decode_graphs = str(_config.get("engine.decode-graphs", "segments"))
        if self.decode_graphs not in ("segments", "step"):
            raise ValueError(f"engine.decode-graphs must be 'segments' or 'step', not {self.decode_graphs!r}")
        self._init_step_graphs(int(_config.get("engine.segment-graph-cache", 1024)))
        self.split_mixed = bool(_config.get("engine.split-mixed-steps", True))
        # prefill chunks ride the segment graphs as one row per token (stepgraphs.py)
        self.prefill_graphs = bool(_config.get("engine.prefill-graphs", True))
        # a step whose batch changed launches before the last step's tokens reach the host (pipeline.py)
        self.overlap = bool(_config.get("engine.overlap-scheduling", True))
        self.steps = 0
        # host seconds spent waiting for steps' tokens (the pipeline's event, the eager path's
        # sampling copy): the rest of a step's wall time is host work the GPU may wait on
        self.wait_s = 0.0
        self.staging = Staging(self.device)  # reused pinned buffers for the pipeline's small transfers
        self.tokens_generated = 0
        self.last_batch: dict[str, int] = {}
        self.block_tokens: Counter[str] = Counter()

    def loaded_models(self) -> list[str]:
        return sorted(self.models)

    def tokenizer(self, model: str) -> Any:
        return self._model(model).tokenizer

    def set_block_batch_limit(self, fingerprint: str, limit: int) -> None:
        """At most `limit` requests run through block `fingerprint` in one step."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"a block's batch limit must be an integer >= 1, not {limit!r}")
        self.block_limits[fingerprint] = limit

    def _limit(self, fingerprint: str) -> int:
        return self.block_limits.get(fingerprint, self.max_batch_size)

    def _model(self, key: str) -> LoadedModel:
        m = self.models.get(key)
        if m is None:
            raise UnknownModelError(
                f"model {key!r} is not loaded on this engine; load it first (engine.load)"
            )
        return m

    # ------------------------------------------------------------------ requests
    def add_request(self, req: Request) -> None:
        """Validate and queue a request; a bad one raises a typed error and disturbs nothing."""
        m = self.check_request(req)
        seq = Sequence(
            req,
            m,
            [int(t) for t in req.prompt_token_ids],
            len(req.prompt_token_ids),
            make_generator(req.sampling),
            next(self._arrivals),
        )
        self._live[req.request_id] = seq
        self.scheduler.add(seq)

    def check_request(self, req: Request) -> LoadedModel:
        """The typed error `add_request` would raise for `req`, without queueing it (admission)."""
        if not isinstance(req, Request):
            raise InvalidRequestError(f"expected a Request, not {type(req).__name__}")
        if not isinstance(req.sampling, SamplingParams):
            raise InvalidRequestError("sampling must be a SamplingParams")
        if not isinstance(req.request_id, str) or not req.request_id:
            raise InvalidRequestError("request_id must be a non-empty string")
        if req.request_id in self._live:
            raise InvalidRequestError(
                f"request id {req.request_id!r} is already in use; pick another"
            )
        m = self._model(req.model)
        ids = req.prompt_token_ids
        if not isinstance(ids, (tuple, list)) or not ids:
            raise InvalidRequestError("the prompt is empty: give at least one token id")
        if any(
            isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < m.vocab
            for t in ids
        ):
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {m.vocab}) for {req.model}"
            )
        if len(ids) >= m.context:
            raise PromptTooLongError(
                f"a prompt of {len(ids)} tokens leaves no room in {req.model}'s context of {m.context} tokens; shorten it"
            )
        if req.sampling.stop and m.tokenizer is None:
            raise InvalidRequestError(
                f"stop strings need a tokenizer, and {req.model} was loaded without one; use stop_token_ids"
            )
        pool = m.lane.pool
        need = pool.pages_for(min(len(ids) + req.sampling.max_new_tokens, m.context))
        if need > pool.num_pages - 1:
            raise PromptTooLongError(
                f"request needs {need} KV pages at full length, more than the pool's {pool.num_pages - 1}; "
                "shorten it, lower max_new_tokens, or raise engine.kv-pages"
            )
        return m

    def abort(self, request_id: str) -> None:
        """Stop a request now; its final output (finish_reason "abort") comes with the next step."""
        seq = self._live.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.finish(seq)
        seq.finished, seq.reason = True, "abort"
        self._pending.append(self._output(seq))

    def has_unfinished(self) -> bool:
        return bool(self._live or self._pending or self._inflight)

    def generate(self, requests: list[Request]) -> list[RequestOutput]:
        """Run steps until every given request is done; final outputs in input order."""
        for r in requests:
            self.add_request(r)
        wanted = {r.request_id for r in requests}
        done: dict[str, RequestOutput] = {}
        while wanted - done.keys():
            if not self.has_unfinished():
                raise RuntimeError(
                    f"requests {sorted(wanted - done.keys())} vanished without finishing"
                )
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
        return [done[r.request_id] for r in requests]

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One iteration: every scheduled request advances by a decode token or a prefill chunk."""
        outputs, self._pending = self._pending, []
        prev = self._inflight
        if prev is not None:  # a step is in flight: launch the next one first, then read it
            self._inflight = None
            with torch.inference_mode():
                if self._chainable(prev):
                    self._inflight = self._chain(prev)
                else:
                    self._inflight = self._relaunch(prev)
            outputs.extend(self._collect(prev))
            return outputs
        work = self.scheduler.schedule()
        if not work:
            if self.scheduler.waiting and not self.scheduler.running:
                log.warning(
                    "%d requests wait: a block limit or the KV pool admits none",
                    len(self.scheduler.waiting),
                )
            return outputs
        lanes = _by_lane(work)
        self._count(work)
        if len(lanes) == 1 and self._pipelined(next(iter(lanes.values()))):
            ((lane_key, groups),) = lanes.items()
            with torch.inference_mode():
                self._inflight = self._launch(self.lanes[lane_key], groups)
            self.steps += 1
            return outputs
        with torch.inference_mode():
            results = []
            for lane_key, groups in lanes.items():
                lane = self.lanes[lane_key]
                for part in self._split_mixed(groups):
                    results.append(self._run_lane(lane, part))
        self.steps += 1
        for groups, toks, lps in results:
            k = 0
            for _cls, members in groups:
                for seq, n in members:
                    seq.computed += n
                    if seq.computed == len(seq.tokens):
                        self._append(seq, toks[k], lps[k])
                        outputs.append(self._output(seq))
                        k += 1
        return outputs

    def _split_mixed(self, groups: list) -> list[list]:
        """A step that mixes decodes with prefill chunks, as two forwards (`engine.split-mixed-steps`).

        One mixed forward cannot replay a captured graph, so every arrival would run the whole
        batch eagerly, every class's blocks launched from Python. Split, the decode rows replay
        their decode graph and only the prefilling classes run eagerly. Each row's math is the same
        either way; a shared block then runs twice in such a step, once per part, so without
        decode graphs (CPU) there is nothing to gain and the step stays one forward.
        """
        if not (self.split_mixed and self.cuda_graphs) or self._prefill_on_graphs(groups):
            return [groups]
        decode, prefill = [], []
        for cls, members in groups:
            d = [(seq, n) for seq, n in members if _decodes(seq, n)]
            p = [(seq, n) for seq, n in members if not _decodes(seq, n)]
            if d:
                decode.append((cls, d))
            if p:
                prefill.append((cls, p))
        return [part for part in (decode, prefill) if part] if decode and prefill else [groups]

    def _prefill_on_graphs(self, groups: list) -> bool:
        """Whether a step with prefill chunks runs on the segment graphs (`engine.prefill-graphs`):
        one row per token, so its tokens must fit the graphs' rows (and the lane must have the
        Triton attention, which sizes itself on the device)."""
        return (
            self._prefills_on_graphs()
            and self.cuda_graphs
            and ops._pow2(self.lanes[groups[0][0].lane].pool.head_dim)
            and sum(n for _, members in groups for _, n in members) <= self.graph_rows()
        )

    def _count(self, work: list[tuple[Sequence, int]]) -> None:
        per_cls: dict[int, list] = {}
        for seq, n in work:
            e = per_cls.setdefault(id(seq.model), [seq.model, 0, 0])
            e[1] += 1
            e[2] += n
        last: Counter[str] = Counter()
        for m, reqs, toks in per_cls.values():
            for fp in m.block_fps:
                last[fp] += reqs
                self.block_tokens[fp] += toks
        self.last_batch = dict(last)

    def _run_lane(self, lane: Lane, groups: list) -> tuple[list, list[int], list[float | None]]:
        """Plan, run (graph replay or eager) and sample one lane's share of the step."""
        lane.pool.sync()
        item_groups = [(cls, [seq.item(n) for seq, n in members]) for cls, members in groups]
        decode = all(_decodes(seq, n) for _, members in groups for seq, n in members)
        on_graphs = decode or self._prefill_on_graphs(groups)
        if on_graphs and self.cuda_graphs and ops._pow2(lane.pool.head_dim):  # the torch attention sizes itself on the host
            plan, entry = self._graph_step(lane, groups, item_groups)
            logits, greedy = entry.outputs
        elif decode:
            _, plan = self._decode_plan(lane, groups, item_groups)
            logits, greedy = run_plan(plan, lane)
        else:
            plan = build_plan(item_groups, padded=False, device=self.device)
            plan.inputs.copy_(torch.from_numpy(fill_inputs(plan, item_groups)))
            logits, greedy = run_plan(plan, lane)
        rows, params, gens = [], [], []
        k = 0
        for _cls, members in groups:
            for seq, _n in members:
                if plan.item_sample[k] >= 0:
                    rows.append(plan.item_sample[k])
                    params.append(seq.req.sampling)
                    gens.append(seq.generator)
                k += 1
        t0 = time.perf_counter()
        toks, lps = sample(logits, greedy, rows, params, gens)
        self.wait_s += time.perf_counter() - t0
        return groups, toks, lps

    def _append(self, seq: Sequence, tok: int, lp: float | None) -> None:
        """A new token; then the stop checks: EOS, stop ids, stop strings, length, context."""
        seq.tokens.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        self.tokens_generated += 1
        p, m = seq.req.sampling, seq.model
        if not p.ignore_eos and tok in m.eos:
            seq.reason = "eos"
        elif tok in p.stop_token_ids:
            seq.reason = "stop"
        elif p.stop:
            text = m.tokenizer.decode(seq.generated, skip_special_tokens=True)
            hits = [text.index(s) for s in p.stop if s in text]
            if hits:
                seq.reason, seq.text = "stop", text[: min(hits)]
        if seq.reason is None and (
            len(seq.tokens) - seq.n_prompt >= p.max_new_tokens or len(seq.tokens) >= m.context
        ):
            seq.reason = "length"
        if seq.reason is not None:
            seq.finished = True
            self.scheduler.finish(seq)
            self._live.pop(seq.req.request_id, None)

    def _output(self, seq: Sequence) -> RequestOutput:
        if seq.finished and seq.text is None and seq.model.tokenizer is not None:
            seq.text = seq.model.tokenizer.decode(seq.generated, skip_special_tokens=True)
        return RequestOutput(
            seq.req.request_id,
            seq.req.model,
            tuple(seq.generated),
            seq.finished,
            seq.reason,
            seq.text if seq.finished else None,
            tuple(seq.logprobs) if seq.req.sampling.logprobs else None,
            seq.model.path,
        )

    # ------------------------------------------------------------------ stats
    def graph_stats(self) -> tuple[int, float]:
        """Decode graphs captured so far and the seconds spent capturing them (both kinds)."""
        return (
            self.graphs.captures + self.seg_graphs.captures,
            self.graphs.capture_seconds + self.seg_graphs.capture_seconds,
        )

    def set_l2_prefetch(self, mode: str, mb: float | None = None, programs: int | None = None) -> None:
        """Switch `engine.l2-prefetch` on a running engine (benchmarks compare modes side by side):
        every captured graph is dropped and recaptured with the new mode when next met."""
        self.l2_prefetch = check_mode(mode)
        if mb is not None:
            self.l2_prefetch_bytes = int(mb * 2**20)
        if programs is not None:
            self.l2_prefetch_programs = int(programs)
        for lane in self.lanes.values():
            lane.prefetch = self._prefetcher()
        self._drop_captures()

    def set_gemv(self, rows: int, fuse: bool = False) -> None:
        """Switch engine.gemv-rows (0: no GEMV) and engine.gemv-fuse on a running engine, as
        set_l2_prefetch does: benchmarks time the settings side by side on one engine."""
        self.gemv, self.gemv_fuse = gemv_config(self.device, rows, fuse)
        for lane in self.lanes.values():
            lane.gemv, lane.fuse = self.gemv, self.gemv_fuse
        self._drop_captures()

    def _drop_captures(self) -> None:
        """Forget every plan and captured graph: they hold the kernels of the settings they met."""
        self._plans.clear()
        self.graphs.clear()
        self._reset_step_graphs()

    def last_graph(self) -> Any:
        """The decode step replayed last (`.graph.replay()` repeats it; benchmarks time it alone)."""
        if self.decode_graphs == "segments":
            return self._last_seg_step
        return self.graphs.last_used()

    def stats(self) -> EngineStats:
        sizes: dict[str, int] = {}
        for key, inst in self.instances.items():
            fp = key.split("@")[0]
            sizes[fp] = max(sizes.get(fp, 0), inst.nbytes)
        for fp, ad in self.adapters.items():
            sizes[fp] = ad.nbytes
        pools = list(self.pools.values())
        return EngineStats(
            weight_bytes=sum(sizes.values()),
            blocks_loaded=len(self.instances),
            adapters_loaded=len(self.adapters),
            models_loaded=len(self.models),
            kv_pages_used=sum(p.used_pages for p in pools),
            kv_pages_total=sum(p.num_pages - 1 for p in pools),
            kv_page_bytes=pools[0].page_bytes if pools else 0,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            steps=self.steps,
            tokens_generated=self.tokens_generated,
            preemptions=self.scheduler.preemptions,
            graphs_captured=self.graph_stats()[0],
            last_batch=dict(self.last_batch),
            block_tokens=dict(self.block_tokens),
            blocks=[
                {
                    "fingerprint": fp,
                    "bytes": n,
                    "batch": self.last_batch.get(fp, 0),
                    "tokens": self.block_tokens.get(fp, 0),
                    "limit": self._limit(fp),
                }
                for fp, n in sizes.items()
            ],
        )
