"""Partial chains: layers [a, b) of a model on one engine, for chains split across workers.

A first segment (a == 0) embeds token ids and runs its layers; a later one runs its layers on the
hidden states handed over by the previous segment; the last one (b == all layers) adds the final
norm + LM head and samples. Requests of several models batch per block as in the whole-chain
engine; each segment keeps the KV of its own layers (sticky: it never leaves this engine).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from zoo_store import Manifest

from .. import config as _config
from ..exceptions import (
    InvalidRequestError,
    OverloadedError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from ..types import SamplingParams
from . import ops
from .engine import _device, _dtype, gemv_config
from .forward import Lane, _take, head_logits, run_segment
from .graphs import GraphCache
from .kv_cache import KVPool, auto_pages
from .plan import Item, ModelClass, Plan, bucket, build_plan, fill_inputs
from .rope import cos_sin_table
from .sampling import make_generator, sample
from .weights import (
    EmbedBlock,
    HeadBlock,
    LayerBlock,
    embed_block,
    head_block,
    layer_block,
    lora_adapter,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class SegmentModel:
    """One model's layers [start, end) loaded here, with what a request's owner needs of it."""

    manifest: Manifest
    cls: ModelClass
    lane: Lane
    start: int
    end: int
    n_layers: int  # of the whole chain
    block_fps: tuple[str, ...]
    path: tuple[str, ...]  # the whole chain with its adapters (RequestOutput.blocks)
    tokenizer: Any
    eos: frozenset[int]
    vocab: int
    context: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.n_layers


@dataclass
class Work:
    """One request's share of a segment step: rows [start, start + n) of its sequence."""

    model: SegmentModel
    slot: int
    start: int
    n: int
    tokens: list[int] | None = None  # first segments: the token ids of those rows
    samples: bool = False  # last segments: its last row picks the next token
    sampling: SamplingParams | None = None
    generator: torch.Generator | None = None


@dataclass
class _Remote:
    """A request whose earlier layers run on another worker: its KV slot and sampling state here."""

    model: SegmentModel
    slot: int
    sampling: SamplingParams
    generator: torch.Generator | None
    computed: int = 0
    epoch: int = 0  # its owner's count of starts from position 0 (see release)


@dataclass
class SegmentStats:
    segments: dict[str, tuple[int, int]] = field(default_factory=dict)
    weight_bytes: int = 0
    kv_pages_used: int = 0
    remote_requests: int = 0
    steps: int = 0
    rows: int = 0


def _logits(plan: Plan, lane: Lane, h: torch.Tensor) -> torch.Tensor:
    hs = h if plan.sample_rows is None else h.index_select(0, plan.sample_rows)  # (S, C)
    logits = torch.empty(plan.n_sample, lane.vocab, dtype=lane.dtype, device=lane.device)
    for st in plan.heads:
        head = st.block
        part = head_logits(head, _take(hs, st.rows), lane)
        if isinstance(st.rows, slice):
            logits[st.rows] = part
        else:
            logits.index_copy_(0, st.rows, part)
    return logits


class SegmentEngine:
    """Segments of models on one device; `forward` runs one batched step over any mix of them.

    Thread-safe: one lock serialises loads and forwards (a worker's split driver and its RPC
    handler share the engine).
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
        max_model_len: int | None = None,
        cuda_graphs: bool | None = None,
        emulate_graphs: bool = False,
        **_ignored: Any,  # whole-chain engine options (prefill_chunk, ...) do not apply
    ) -> None:
        self.zoo = zoo
        self.device = _device(device)
        self.dtype = _dtype(dtype, self.device)
        self.page_size = int(page_size or _config.get("engine.page-size", 16))
        self.kv_pages = kv_pages if kv_pages is not None else _config.get("engine.kv-pages", "auto")
        self.max_batch_size = int(max_batch_size or _config.get("engine.max-batch-size", 64))
        self.max_model_len = int(max_model_len or _config.get("engine.max-model-len", 4096))
        graphs = _config.get("engine.cuda-graphs", True) if cuda_graphs is None else cuda_graphs
        # decode steps replay one captured graph per (classes, bucket) signature, as the whole-chain
        # engine does; `emulate_graphs` runs that path on the CPU (tests)
        self.graphs: GraphCache | None = None
        if emulate_graphs:
            self.graphs = GraphCache(emulate=True)
        elif graphs and ops.fused_on(self.device):
            self.graphs = GraphCache()
        self._plans: dict[tuple, tuple[Plan, np.ndarray, torch.Tensor | None]] = {}
        self.lock = threading.RLock()
        self.models: dict[str, SegmentModel] = {}
        self.instances: dict[tuple[str, int], Any] = {}  # (fingerprint, layer base) -> block
        self.adapters: dict[tuple[str, int], Any] = {}
        self.pools: dict[tuple, KVPool] = {}
        self.lanes: dict[tuple, Lane] = {}
        self._remote: dict[str, _Remote] = {}
        self.steps = 0
        self.rows = 0

    # ------------------------------------------------------------------ loading
    def load(self, model: str | Manifest, start: int, end: int | None = None) -> SegmentModel:
        """Load layers [start, end) of `model` (end None: to the last layer); idempotent."""
        with self.lock:
            manifest = model if isinstance(model, Manifest) else self.zoo.get_manifest(*str(model).split("/", 1))
            have = self.models.get(manifest.key)
            specs = [self.zoo.block_spec(fp) for fp in manifest.chain]
            if [s.kind for s in specs[:1] + specs[-1:]] != ["embed", "head"] or {s.kind for s in specs[1:-1]} != {"layers"}:
                raise UnsupportedArchitectureError(f"model {manifest.key}: chain is not embed, layers..., head")
            n_layers = specs[-2].layer_end
            end = n_layers if end is None else end
            bounds = {s.layer_start for s in specs[1:-1]} | {n_layers}
            if not (0 <= start < end <= n_layers) or start not in bounds or end not in bounds:
                raise InvalidRequestError(
                    f"model {manifest.key}: a segment must be [a, b) on block boundaries {sorted(bounds)}, not [{start}, {end})"
                )
            if have is not None:
                if (have.start, have.end) == (start, end):
                    return have
                raise InvalidRequestError(
                    f"model {manifest.key} already has layers [{have.start}, {have.end}) here; unload it first"
                )
            idx = [i for i, s in enumerate(specs) if s.kind == "layers" and start <= s.layer_start < end]
            with torch.inference_mode():
                layers = [self._layer(manifest.chain[i], start) for i in idx]
                embed = self._embed(manifest.chain[0]) if start == 0 else None
                head = None
                if end == n_layers:
                    head = self._head(manifest.chain[-1], specs[-1], manifest.chain[0])
                adapters = {}
                for ref in manifest.adapters:
                    if ref.index in idx:
                        key = (ref.fingerprint, start)
                        if key not in self.adapters:
                            base = layers[idx.index(ref.index)]
                            self.adapters[key] = lora_adapter(self.zoo.get_block(ref.fingerprint), base, self.device, self.dtype)
                        adapters[idx.index(ref.index)] = self.adapters[key]
            arch = layers[0].arch
            vocab = head.weight.shape[0] if head is not None else embed.weight.shape[0] if embed is not None else 0
            lane = self._lane(arch, int(vocab), start, end - start)
            blocks = [manifest.chain[i] for i in idx] + ([manifest.chain[0]] if embed else []) + ([manifest.chain[-1]] if head else [])
            cls_key = ("segment", start, end, tuple(blocks), tuple(sorted((i, a.fingerprint) for i, a in adapters.items())))
            head_key = f"{manifest.chain[-1]}@{manifest.chain[0]}" if head is not None else ""
            cls = ModelClass(cls_key, lane.key, embed, layers, head, head_key, adapters, end - start)
            path: list[str] = []
            for i, fp in enumerate(manifest.chain):
                path.append(fp)
                path.extend(a.fingerprint for a in manifest.adapters if a.index == i)
            tokenizer = None
            if start == 0 and manifest.tokenizer is not None and hasattr(self.zoo, "get_asset"):
                from ..chain import load_tokenizer

                try:
                    tokenizer = load_tokenizer(self.zoo, manifest)
                except Exception as e:  # token ids still work
                    log.warning("model %s: tokenizer unavailable (%s)", manifest.key, e)
            eos = manifest.config.get("eos_token_id")
            eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            vocab = int(embed.weight.shape[0]) if embed is not None else int(manifest.config.get("vocab_size") or 0)
            ctx = min(self.max_model_len, int(manifest.config.get("max_position_embeddings") or self.max_model_len))
            seg = SegmentModel(manifest, cls, lane, start, end, n_layers, tuple(dict.fromkeys(blocks)), tuple(path), tokenizer, eos_ids, vocab, ctx)
            self.models[manifest.key] = seg
            log.info("loaded %s layers [%d, %d) as a segment", manifest.key, start, end)
            return seg

    def _embed(self, fp: str) -> EmbedBlock:
        key = (fp, 0)
        if key not in self.instances:
            self.instances[key] = embed_block(self.zoo.get_block(fp), self.device, self.dtype)
        return self.instances[key]

    def _layer(self, fp: str, base: int) -> LayerBlock:
        key = (fp, base)
        if key not in self.instances:
            block = layer_block(self.zoo.get_block(fp), self.device, self.dtype)
            block.layer_start -= base  # KV pool layers are counted from the segment's first layer
            self.instances[key] = block
        return self.instances[key]

    def _head(self, fp: str, spec: Any, embed_fp: str) -> HeadBlock:
        tied = spec.extra.get("tied_embedding") or not any(t.name == "lm_head.weight" for t in spec.tensors)
        key = (f"{fp}@{embed_fp}" if tied else fp, -1)
        if key not in self.instances:
            # a tied head needs the embedding matrix, even on a segment that does not embed
            embed = embed_block(self.zoo.get_block(embed_fp), self.device, self.dtype) if tied else None
            self.instances[key] = head_block(self.zoo.get_block(fp), embed, self.device, self.dtype)
        return self.instances[key]

    def _lane(self, arch: Any, vocab: int, base: int, n_layers: int) -> Lane:
        pool_key = (arch.n_kv, arch.head_dim)
        pool = self.pools.get(pool_key)
        if pool is None:
            page_bytes = 2 * self.page_size * arch.n_kv * arch.head_dim * torch.empty((), dtype=self.dtype).element_size()
            wanted = 8 * self.max_batch_size * n_layers * -(-self.max_model_len // self.page_size) + 1
            pages = self.kv_pages if self.kv_pages != "auto" else auto_pages(self.device, page_bytes, wanted)
            pool = self.pools[pool_key] = KVPool(
                int(pages), self.page_size, n_layers, arch.n_kv, arch.head_dim, self.max_model_len,
                self.dtype, self.device, slots=max(8, self.max_batch_size),
            )
        pool.ensure_layers(n_layers)
        key = (*pool_key, arch.hidden, vocab, arch.rope_key, base)
        lane = self.lanes.get(key)
        if lane is None:
            table = cos_sin_table(arch.raw, arch.head_dim, max(self.max_model_len, 1), self.device)
            gemv, fuse = gemv_config(self.device)
            lane = self.lanes[key] = Lane(key, pool, table, arch.hidden, vocab, self.dtype, self.device, gemv=gemv, fuse=fuse)
        return lane

    def unload(self, model: str) -> None:
        """Forget a model's segment (its remote requests are dropped); blocks no segment uses are freed."""
        with self.lock:
            seg = self.models.pop(model, None)
            if seg is None:
                return
            for rid in [r for r, st in self._remote.items() if st.model is seg]:
                self.release([rid])
            used = {id(b) for m in self.models.values() for b in [m.cls.embed, m.cls.head, *m.cls.layers] if b is not None}
            used |= {id(a) for m in self.models.values() for a in m.cls.adapters.values()}
            for table in (self.instances, self.adapters):
                for k in [k for k, v in table.items() if id(v) not in used]:
                    del table[k]

    def segment(self, model: str) -> SegmentModel:
        seg = self.models.get(model)
        if seg is None:
            raise UnknownModelError(f"model {model!r} has no segment loaded on this worker")
        return seg

    # ------------------------------------------------------------------ steps
    def forward(self, work: list[Work], hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int | None]]:
        """One batched step over `work` (any mix of models of one lane).

        `hidden` (T, C): the previous segment's rows, item after item in `work` order (None for
        first segments). Returns this segment's output rows in the same packing (T, C), and for
        last segments the sampled token of each item that samples (None for the others).
        """
        with self.lock, torch.inference_mode():
            lanes = {w.model.lane.key for w in work}
            if len(lanes) != 1:
                raise InvalidRequestError("a segment step runs models of one lane (hidden width, KV geometry, layer base)")
            lane = work[0].model.lane
            lane.pool.sync()
            groups: dict[tuple, tuple[ModelClass, list[Item], list[int]]] = {}
            for i in range(len(work)):
                w = work[i]
                g = groups.setdefault(w.model.cls.key, (w.model.cls, [], []))
                g[1].append(Item(w.tokens if w.tokens is not None else [0] * w.n, w.start, w.slot, w.samples))
                g[2].append(i)
            item_groups = [(cls, items) for cls, items, _ in groups.values()]
            owners = [i for _, _, idx in groups.values() for i in idx]  # plan item k is work[owners[k]]
            graph = self.graphs is not None and all(w.n == 1 for w in work) and ops._pow2(lane.pool.head_dim)
            if graph:
                sig = (lane.key, lane.pool.generation, tuple((cls.key, bucket(len(items))) for cls, items in item_groups))
                cached = self._plans.get(sig)
                if cached is None:
                    plan = build_plan(item_groups, padded=True, device=self.device)
                    static_in = None
                    if hidden is not None:
                        static_in = torch.zeros(plan.n_rows, lane.hidden, dtype=lane.dtype, device=lane.device)
                    cached = self._plans[sig] = (plan, np.zeros((3, plan.n_rows), dtype=np.int64), static_in)
                plan, host, static_in = cached
                fill_inputs(plan, item_groups, host)
                plan.inputs.copy_(torch.from_numpy(host))
            else:
                plan = build_plan(item_groups, padded=False, device=self.device)
                plan.inputs.copy_(torch.from_numpy(fill_inputs(plan, item_groups)))
            # plan rows of work item i, in work order: the hand-off packing
            starts = {owners[k]: plan.item_rows[k] for k in range(len(owners))}
            idx = torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i] + work[i].n) for i in range(len(work))])).to(self.device)
            h = logits = None
            if graph:
                if static_in is not None:
                    static_in.zero_()
                    static_in.index_copy_(0, idx, hidden.to(device=lane.device, dtype=lane.dtype))
                entry = self.graphs.get(sig) or self.graphs.capture(sig, plan, lambda: self._captured(plan, lane, static_in))
                entry.graph.replay()
                entry.replays += 1
                if plan.heads:
                    logits, greedy = entry.outputs
                else:
                    h = entry.outputs[0]
            else:
                if hidden is not None:
                    h = torch.empty(plan.n_rows, lane.hidden, dtype=lane.dtype, device=lane.device)
                    h.index_copy_(0, idx, hidden.to(device=lane.device, dtype=lane.dtype))
                h = run_segment(plan, lane, h)
                if plan.heads:
                    logits = _logits(plan, lane, h)
                    greedy = logits.argmax(-1)
            tokens: list[int | None] = [None] * len(work)
            if plan.heads:
                rows, params, gens, who = [], [], [], []
                for k, i in enumerate(owners):
                    if plan.item_sample[k] >= 0:
                        rows.append(plan.item_sample[k])
                        params.append(work[i].sampling or SamplingParams())
                        gens.append(work[i].generator)
                        who.append(i)
                toks, _ = sample(logits, greedy, rows, params, gens)
                for i, t in zip(who, toks, strict=True):
                    tokens[i] = t
            self.steps += 1
            self.rows += plan.n_rows
            return (h.index_select(0, idx) if h is not None else None), tokens

    def _captured(self, plan: Plan, lane: Lane, static_in: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """What a decode graph computes: hidden states out, or (last segment) logits and greedy picks."""
        # layers update their rows in place: work on a copy, so the warm-up leaves the input intact
        h = run_segment(plan, lane, static_in.clone() if static_in is not None else None)
        if plan.heads:
            logits = _logits(plan, lane, h)
            return logits, logits.argmax(-1)
        return (h,)

    # ------------------------------------------------------------------ requests from the previous worker
    def step_remote(self, items: list[dict], hidden: torch.Tensor) -> list[int | None]:
        """A hand-off: rows of requests whose earlier layers ran elsewhere; their next tokens here.

        Each item: request_id, model, start, n, samples, sampling (a dict; needed when start is 0).
        A request's KV slot is opened on its first rows and kept until `release` (sticky).
        """
        with self.lock:
            work = []
            for it in items:
                rid, start, n = str(it["request_id"]), int(it["start"]), int(it["n"])
                seg = self.segment(str(it["model"]))
                if seg.first:
                    raise InvalidRequestError(f"model {seg.manifest.key}: layers [0, ...) start here; hand-offs go to later segments")
                st = self._remote.get(rid)
                epoch = int(it.get("epoch", 0))
                if st is not None and start == 0 and st.computed:  # recomputed from scratch upstream (preempted)
                    st.model.lane.pool.release(st.slot)
                    st.slot, st.computed = seg.lane.pool.acquire_slot(), 0
                if st is None:
                    if start != 0:
                        raise InvalidRequestError(f"request {rid}: first hand-off at position {start}, expected 0")
                    sampling = SamplingParams(**dict(it.get("sampling") or {}))
                    st = self._remote[rid] = _Remote(seg, seg.lane.pool.acquire_slot(), sampling, make_generator(sampling))
                st.epoch = max(st.epoch, epoch)
                if start != st.computed:
                    raise InvalidRequestError(f"request {rid}: rows from {start}, but {st.computed} are cached here")
                if not st.model.lane.pool.ensure(st.slot, start + n):
                    raise OverloadedError(f"the KV pool of layers [{seg.start}, {seg.end}) on this worker is full", retry_after=1.0)
                work.append(Work(seg, st.slot, start, n, None, bool(it.get("samples")), st.sampling, st.generator))
            _, tokens = self.forward(work, hidden)
            for it, w in zip(items, work, strict=True):
                self._remote[str(it["request_id"])].computed += w.n
            return tokens

    def release(self, request_ids: list) -> None:
        """Free the KV of requests that ended (or were preempted upstream): ids, or [id, epoch]
        pairs, where a release of an earlier start than the one held here is stale and ignored."""
        with self.lock:
            for entry in request_ids:
                rid, epoch = (entry, None) if isinstance(entry, str) else (str(entry[0]), int(entry[1]))
                st = self._remote.get(rid)
                if st is None or (epoch is not None and st.epoch > epoch):
                    continue
                del self._remote[rid]
                st.model.lane.pool.release(st.slot)

    def stats(self) -> SegmentStats:
        with self.lock:
            sizes = {}
            for v in [*self.instances.values(), *self.adapters.values()]:
                sizes[id(v)] = v.nbytes
            return SegmentStats(
                {k: (m.start, m.end) for k, m in self.models.items()},
                sum(sizes.values()),
                sum(p.used_pages for p in self.pools.values()),
                len(self._remote),
                self.steps,
                self.rows,
            )


def pack(hidden: torch.Tensor) -> dict[str, Any]:
    """Hidden states as a wire message: raw bytes (bf16 included), dtype and shape."""
    t = hidden.detach().contiguous()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.view(torch.uint8).reshape(-1).cpu().numpy().tobytes()}


def unpack(msg: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
    dtype = getattr(torch, str(msg["dtype"]))
    shape = [int(s) for s in msg["shape"]]
    data = bytearray(msg["data"])  # writable; torch.frombuffer warns on read-only buffers
    if not data:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape).to(device)
