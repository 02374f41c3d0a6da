"""The block engine: requests of any model in the zoo, batched block by block on one device.

Every step, each loaded block runs ONE forward over the rows of every scheduled request whose
chain passes through it (continuous, iteration-level batching over a flattened token batch):
requests of different models merge at shared blocks and split at their own. LoRA adapters add
their low-rank delta only to their own requests' rows, grouped by adapter.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from zoo_store import Manifest, ModelNotFoundError, Zoo

from .. import config as _config
from ..exceptions import InvalidRequestError, PromptTooLongError, UnknownModelError
from ..types import Request, RequestOutput, SamplingParams
from .blocks import AdapterWeights, EngineBlock, LoRA, Rotary, load_adapter, rms_norm, rotate_half
from .kv_cache import PagePool, pool_pages
from .sampling import make_generator, sample

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    weight_bytes: int  # distinct loaded blocks + adapters
    blocks_loaded: int
    adapters_loaded: int
    models_loaded: int
    kv_pages_used: int
    kv_pages_total: int
    running: int
    waiting: int
    steps: int
    tokens_generated: int
    preemptions: int
    last_batch: dict[str, int] = field(default_factory=dict)  # block fp -> rows last step
    block_tokens: dict[str, int] = field(default_factory=dict)  # block fp -> tokens processed


@dataclass
class _Model:
    manifest: Manifest
    chain: tuple[str, ...]
    adapters: dict[int, str]
    rotary: Rotary
    tokenizer: Any
    eos: frozenset[int]
    vocab: int
    max_len: int
    pool_key: tuple[int, int]


@dataclass
class _Seq:
    req: Request
    model: _Model
    tokens: list[int]
    n_prompt: int
    generator: torch.Generator | None
    arrival: float
    computed: int = 0  # tokens whose KV is cached
    pages: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (chain idx, layer) -> pages
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    reason: str | None = None
    text: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    name = device or _config.get("engine.device", "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    name = dtype or _config.get("engine.dtype", "auto")
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Engine:
    """Blocks loaded once each on one device; requests of any loaded model batched per block."""

    def __init__(
        self,
        zoo: Zoo,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        page_size: int | None = None,
        kv_pages: int | None = None,
        max_batch_size: int | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.zoo = zoo
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.page_size = int(page_size or _config.get("engine.page-size", 16))
        self.kv_pages = kv_pages if kv_pages is not None else _config.get("engine.kv-pages", "auto")
        self.max_batch_size = int(max_batch_size or _config.get("engine.max-batch-size", 64))
        self.max_model_len = int(max_model_len or _config.get("engine.max-model-len", 4096))
        self.blocks: dict[str, EngineBlock] = {}
        self.adapters: dict[str, AdapterWeights] = {}
        self.models: dict[str, _Model] = {}
        self.pools: dict[tuple[int, int], PagePool] = {}
        self.block_limits: dict[str, int] = {}
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._ids: set[str] = set()
        self._finished_out: list[RequestOutput] = []
        self.steps = 0
        self.tokens_generated = 0
        self.preemptions = 0
        self.last_batch: dict[str, int] = {}
        self.block_tokens: Counter[str] = Counter()

    # ------------------------------------------------------------------ loading
    def load(self, model: str | Manifest) -> None:
        """Load a model's blocks and adapters (each distinct fingerprint once); idempotent."""
        manifest = model if isinstance(model, Manifest) else self._manifest(model)
        if manifest.key in self.models:
            return
        for fp in manifest.chain:
            if fp not in self.blocks:
                self.blocks[fp] = EngineBlock(self.zoo.get_block(fp), self.device, self.dtype)
        adapters = {}
        for ref in manifest.adapters:
            if ref.fingerprint not in self.adapters:
                self.adapters[ref.fingerprint] = load_adapter(self.zoo.get_block(ref.fingerprint), self.device, self.dtype)
            adapters[ref.index] = ref.fingerprint
        layer = next(self.blocks[fp] for fp in manifest.chain if self.blocks[fp].kind == "layers")
        key = (layer.n_kv, layer.head_dim)
        if key not in self.pools:
            page_bytes = 2 * self.page_size * key[0] * key[1] * torch.tensor([], dtype=self.dtype).element_size()
            self.pools[key] = PagePool(pool_pages(self.device, page_bytes, self.kv_pages), self.page_size, key[0], key[1], self.dtype, self.device)
        cfg = manifest.config
        eos = cfg.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        tokenizer = None
        if manifest.tokenizer:
            from ..chain import load_tokenizer

            tokenizer = load_tokenizer(self.zoo, manifest)
        self.models[manifest.key] = _Model(
            manifest, manifest.chain, adapters, Rotary(cfg, self.device), tokenizer, frozenset(eos_ids),
            int(cfg["vocab_size"]), min(self.max_model_len, int(cfg.get("max_position_embeddings", self.max_model_len))), key,
        )

    def _manifest(self, key: str) -> Manifest:
        tenant, _, name = str(key).partition("/")
        try:
            return self.zoo.get_manifest(tenant, name)
        except ModelNotFoundError:
            raise UnknownModelError(f"unknown model {key!r}: not in the zoo") from None

    def unload(self, model: str) -> None:
        """Forget a model; blocks no other loaded model uses are freed. Its requests are aborted."""
        m = self.models.pop(model, None)
        if m is None:
            return
        for s in [s for s in [*self.running, *self.waiting] if s.model is m]:
            self.abort(s.req.request_id)
        used = {fp for other in self.models.values() for fp in other.chain}
        used_adapters = {fp for other in self.models.values() for fp in other.adapters.values()}
        for fp in set(m.chain) - used:
            self.blocks.pop(fp, None)
        for fp in set(m.adapters.values()) - used_adapters:
            self.adapters.pop(fp, None)

    def loaded_models(self) -> list[str]:
        return sorted(self.models)

    def tokenizer(self, model: str) -> Any:
        return self._model(model).tokenizer

    def set_block_batch_limit(self, fingerprint: str, limit: int) -> None:
        if limit < 1:
            raise ValueError("a block's batch limit must be >= 1")
        self.block_limits[fingerprint] = limit

    def _model(self, key: str) -> _Model:
        m = self.models.get(key)
        if m is None:
            raise UnknownModelError(f"model {key!r} is not loaded on this engine; load it first")
        return m

    # ------------------------------------------------------------------ requests
    def add_request(self, req: Request) -> None:
        """Validate and queue a request; a bad one raises a typed error and disturbs nothing."""
        if not isinstance(req.sampling, SamplingParams):
            raise InvalidRequestError("sampling must be SamplingParams")
        if req.request_id in self._ids:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        m = self._model(req.model)
        ids = list(req.prompt_token_ids)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if any(not isinstance(t, int) or t < 0 or t >= m.vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {m.vocab})")
        if len(ids) + req.sampling.max_new_tokens > m.max_len:
            raise PromptTooLongError(
                f"prompt of {len(ids)} tokens + max_new_tokens {req.sampling.max_new_tokens} exceeds the "
                f"model's context of {m.max_len} tokens"
            )
        pool = self.pools[m.pool_key]
        need = self._slots(m) * pool.pages_for(len(ids) + req.sampling.max_new_tokens)
        if need > pool.num_pages:
            raise PromptTooLongError(f"this request needs {need} KV pages, more than the pool's {pool.num_pages}")
        self._ids.add(req.request_id)
        self.waiting.append(_Seq(req, m, ids, len(ids), make_generator(req.sampling, self.device), time.monotonic()))

    def abort(self, request_id: str) -> None:
        for group in (self.running, self.waiting):
            for s in list(group):
                if s.req.request_id == request_id:
                    group.remove(s)
                    self._free(s)
                    self._ids.discard(request_id)
                    s.finished, s.reason = True, "abort"
                    self._finished_out.append(self._output(s))

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting or self._finished_out)

    def generate(self, requests: list[Request]) -> list[RequestOutput]:
        """Run steps until every given request is done; final outputs in input order."""
        for r in requests:
            self.add_request(r)
        wanted = {r.request_id for r in requests}
        done: dict[str, RequestOutput] = {}
        while wanted - done.keys():
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
        return [done[r.request_id] for r in requests]

    def stats(self) -> EngineStats:
        return EngineStats(
            weight_bytes=sum(b.nbytes for b in self.blocks.values()) + sum(a.nbytes for a in self.adapters.values()),
            blocks_loaded=len(self.blocks), adapters_loaded=len(self.adapters), models_loaded=len(self.models),
            kv_pages_used=sum(p.used for p in self.pools.values()), kv_pages_total=sum(p.num_pages for p in self.pools.values()),
            running=len(self.running), waiting=len(self.waiting), steps=self.steps, tokens_generated=self.tokens_generated,
            preemptions=self.preemptions, last_batch=dict(self.last_batch), block_tokens=dict(self.block_tokens),
        )

    # ------------------------------------------------------------------ scheduling
    def _slots(self, m: _Model) -> int:
        return sum(self.blocks[fp].n_layers for fp in m.chain)

    def _free(self, s: _Seq) -> None:
        pool = self.pools[s.model.pool_key]
        for pages in s.pages.values():
            pool.release(pages)
        s.pages.clear()
        s.computed = 0

    def _ensure_pages(self, s: _Seq, length: int) -> bool:
        pool = self.pools[s.model.pool_key]
        need_each = pool.pages_for(length)
        slots = [(i, j) for i, fp in enumerate(s.model.chain) for j in range(self.blocks[fp].n_layers)]
        have = len(next(iter(s.pages.values()), []))
        missing = (need_each - have) * len(slots)
        if missing <= 0:
            return True
        if missing > pool.free:
            return False
        for slot in slots:
            s.pages.setdefault(slot, []).extend(pool.alloc(need_each - have))
        return True

    def _schedule(self) -> list[_Seq]:
        """Admit waiting requests while KV pages last; preempt (recompute later) if decode runs dry."""
        # Decode growth first: every running request needs room for one more token.
        for s in sorted(self.running, key=lambda s: (-s.req.priority, s.arrival)):
            while s in self.running and not self._ensure_pages(s, len(s.tokens)):
                victim = min(self.running, key=lambda v: (v.req.priority, -v.arrival))
                self.running.remove(victim)
                self._free(victim)
                self.waiting.appendleft(victim)
                self.preemptions += 1
        ordered = sorted(self.waiting, key=lambda s: (-s.req.priority, s.arrival))
        for s in ordered:
            if not self._ensure_pages(s, len(s.tokens)):
                break  # admission waits for pages
            self.waiting.remove(s)
            self.running.append(s)
        # Per-block batch limits: requests beyond a block's limit sit this step out.
        counts: Counter[str] = Counter()
        batch = []
        for s in sorted(self.running, key=lambda s: (-s.req.priority, s.arrival)):
            fps = set(s.model.chain)
            if all(counts[fp] < self.block_limits.get(fp, self.max_batch_size) for fp in fps):
                counts.update(fps)
                batch.append(s)
        return batch

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        outputs, self._finished_out = self._finished_out, []
        batch = self._schedule()
        if not batch:
            if self.waiting and not self.running:
                log.warning("KV pool too small for the next request; it waits")
            return outputs
        with torch.inference_mode():
            logits = self._forward(batch)
            tokens, lps = sample(logits, [s.req.sampling for s in batch], [s.generator for s in batch])
        self.steps += 1
        for s, tok, lp in zip(batch, tokens, lps):
            s.computed = len(s.tokens)
            s.tokens.append(tok)
            s.logprobs.append(lp)
            self.tokens_generated += 1
            self._check_stop(s, tok)
            if s.finished:
                self.running.remove(s)
                self._free(s)
                self._ids.discard(s.req.request_id)
            outputs.append(self._output(s))
        return outputs

    def _check_stop(self, s: _Seq, tok: int) -> None:
        p = s.req.sampling
        if not p.ignore_eos and tok in s.model.eos:
            s.finished, s.reason = True, "eos"
        elif tok in p.stop_token_ids:
            s.finished, s.reason = True, "stop"
        elif len(s.generated) >= p.max_new_tokens:
            s.finished, s.reason = True, "length"
        if p.stop and s.model.tokenizer is not None:
            text = s.model.tokenizer.decode(s.generated, skip_special_tokens=True)
            hits = [text.index(x) for x in p.stop if x in text]
            if hits:
                s.finished, s.reason, s.text = True, "stop", text[: min(hits)]

    def _output(self, s: _Seq) -> RequestOutput:
        if s.finished and s.text is None and s.model.tokenizer is not None:
            s.text = s.model.tokenizer.decode(s.generated, skip_special_tokens=True)
        blocks = (*s.model.chain, *sorted(s.model.adapters.values())) if s.finished else ()
        return RequestOutput(
            s.req.request_id, s.req.model, tuple(s.generated), s.finished, s.reason, s.text if s.finished else None,
            tuple(s.logprobs) if s.req.sampling.logprobs else None, blocks,
        )

    def _forward(self, batch: list[_Seq]) -> torch.Tensor:
        """One flattened forward: the new tokens of every request, block by block. -> (B, V) logits."""
        dev = self.device
        spans, ids, pos = [], [], []
        row = 0
        for s in batch:
            new = s.tokens[s.computed:]
            spans.append((row, row + len(new)))
            ids.extend(new)
            pos.extend(range(s.computed, s.computed + len(new)))
            row += len(new)
        ids_t = torch.tensor(ids, device=dev)
        pos_t = torch.tensor(pos, device=dev)
        n_pos = len(batch[0].model.chain)
        self.last_batch = {}
        x = torch.empty(len(ids), self.blocks[batch[0].model.chain[0]].hidden, device=dev, dtype=self.dtype)
        for p in range(n_pos):
            groups: dict[tuple[str, str | None], list[int]] = {}
            for i, s in enumerate(batch):
                groups.setdefault((s.model.chain[p], s.model.adapters.get(p)), []).append(i)
            by_block: dict[str, list[int]] = {}
            for (fp, _a), members in groups.items():
                by_block.setdefault(fp, []).extend(members)
            for fp, members in by_block.items():
                block = self.blocks[fp]
                self.last_batch[fp] = len(members)
                rows = _rows(spans, members, dev)  # None = every row
                if len(members) == len(batch):
                    rows = None
                self.block_tokens[fp] += len(ids) if rows is None else rows.numel()
                if block.kind == "embed":
                    idx = ids_t if rows is None else ids_t[rows]
                    out = F.embedding(idx, block.embed)
                    _put(x, rows, out)
                elif block.kind == "layers":
                    seqs = [batch[i] for i in members]
                    local = _local_spans(spans, members)
                    adapter_rows = _adapter_groups(groups, fp, spans, members, self.adapters, dev)
                    h = x if rows is None else x[rows]
                    h = self._layers(block, p, h, pos_t if rows is None else pos_t[rows], seqs, local, adapter_rows)
                    _put(x, rows, h)
        # Head: the last row of each request only.
        last = torch.tensor([e - 1 for _, e in spans], device=dev)
        xl = x[last]
        vocab = batch[0].model.vocab
        logits = torch.empty(len(batch), vocab, device=dev, dtype=torch.float32)
        by_head: dict[tuple[str, str], list[int]] = {}
        for i, s in enumerate(batch):
            by_head.setdefault((s.model.chain[-1], s.model.chain[0]), []).append(i)
        for (fp, embed_fp), members in by_head.items():
            head = self.blocks[fp]
            idx = torch.tensor(members, device=dev)
            h = rms_norm(xl[idx], head.norm, head.eps)
            w = self.blocks[embed_fp].embed if head.tied else head.lm_head
            logits[idx] = (h @ w.T).float()
        return logits

    def _layers(self, block: EngineBlock, p: int, x: torch.Tensor, pos: torch.Tensor, seqs: list[_Seq], spans: list[tuple[int, int]], adapter_rows: list[tuple[AdapterWeights, torch.Tensor]]) -> torch.Tensor:
        """A run of decoder layers over rows x (N, H) of `seqs`, whose rows are `spans` of x."""
        nh, nkv, hd = block.n_heads, block.n_kv, block.head_dim
        rotary = seqs[0].model.rotary
        cos, sin = rotary.cos_sin(pos, x.dtype)  # (N, D)
        cos, sin = cos[:, None, :], sin[:, None, :]
        pool = self.pools[seqs[0].model.pool_key]
        for j, L in enumerate(block.layers):
            h = rms_norm(x, L.input_norm, block.eps)
            qkv = h @ L.qkv.T  # (N, (nh + 2nkv) * hd)
            if L.qkv_bias is not None:
                qkv = qkv + L.qkv_bias
            q_end, k_end = nh * hd, (nh + nkv) * hd
            for a, rows in adapter_rows:
                lo = a.layers.get(j, {})
                for name, (s0, s1) in (("q", (0, q_end)), ("k", (q_end, k_end)), ("v", (k_end, qkv.shape[1]))):
                    if name in lo:
                        qkv[rows, s0:s1] += _delta(h[rows], lo[name])
            q = qkv[:, :q_end].view(-1, nh, hd)
            k = qkv[:, q_end:k_end].view(-1, nkv, hd)
            v = qkv[:, k_end:].view(-1, nkv, hd)
            if L.q_norm is not None:
                q, k = rms_norm(q, L.q_norm, block.eps), rms_norm(k, L.k_norm, block.eps)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            attn = self._attention(pool, (p, j), q, k, v, seqs, spans)  # (N, nh * hd)
            o = attn @ L.o.T
            for a, rows in adapter_rows:
                lo = a.layers.get(j, {}).get("o")
                if lo is not None:
                    o[rows] += _delta(attn[rows], lo)
            x = x + o
            h = rms_norm(x, L.post_norm, block.eps)
            gu = h @ L.gate_up.T
            inter = gu.shape[1] // 2
            for a, rows in adapter_rows:
                lo = a.layers.get(j, {})
                if "gate" in lo:
                    gu[rows, :inter] += _delta(h[rows], lo["gate"])
                if "up" in lo:
                    gu[rows, inter:] += _delta(h[rows], lo["up"])
            m = block.act(gu[:, :inter]) * gu[:, inter:]
            d = m @ L.down.T
            for a, rows in adapter_rows:
                lo = a.layers.get(j, {}).get("down")
                if lo is not None:
                    d[rows] += _delta(m[rows], lo)
            x = x + d
        return x

    def _attention(self, pool: PagePool, slot: tuple[int, int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: list[_Seq], spans: list[tuple[int, int]]) -> torch.Tensor:
        """Write the new K/V into each request's pages, then attend over its whole cached context."""
        nh, hd, nkv = q.shape[1], q.shape[2], k.shape[1]
        rep = nh // nkv
        out = torch.empty(q.shape[0], nh * hd, device=q.device, dtype=q.dtype)
        decode = []
        for s, (a, b) in zip(seqs, spans):
            pages = s.pages[slot]
            idx = pool.slots(pages, s.computed, s.computed + (b - a), q.device)
            pool.k[idx] = k[a:b]
            pool.v[idx] = v[a:b]
            if b - a == 1 and s.computed > 0:
                decode.append((s, a))
                continue
            ctx = pool.slots(pages, 0, s.computed + (b - a), q.device)
            kk = _repeat(pool.k[ctx], rep).transpose(0, 1)[None]  # (1, nh, T, hd)
            vv = _repeat(pool.v[ctx], rep).transpose(0, 1)[None]
            qq = q[a:b].transpose(0, 1)[None]  # (1, nh, t, hd)
            if s.computed == 0:
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
            else:  # chunk after a cached prefix
                t, T = b - a, s.computed + b - a
                mask = torch.ones(t, T, dtype=torch.bool, device=q.device).tril(T - t)
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
            out[a:b] = o[0].transpose(0, 1).reshape(b - a, nh * hd)
        if decode:
            lens = [s.computed + 1 for s, _ in decode]
            T = max(lens)
            idx = torch.stack([F.pad(pool.slots(s.pages[slot], 0, n, q.device), (0, T - n)) for (s, _), n in zip(decode, lens)])  # (B, T)
            kk = _repeat(pool.k[idx.flatten()], rep).view(len(decode), T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
            vv = _repeat(pool.v[idx.flatten()], rep).view(len(decode), T, nh, hd).transpose(1, 2)
            rows = torch.tensor([a for _, a in decode], device=q.device)
            qq = q[rows][:, :, None, :]  # (B, nh, 1, hd)
            if all(n == T for n in lens):
                o = F.scaled_dot_product_attention(qq, kk, vv)
            else:
                mask = (torch.arange(T, device=q.device)[None, :] < torch.tensor(lens, device=q.device)[:, None])[:, None, None, :]
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
            out[rows] = o[:, :, 0, :].reshape(len(decode), nh * hd)
        return out


def _repeat(t: torch.Tensor, rep: int) -> torch.Tensor:
    """(T, nkv, hd) -> (T, nkv * rep, hd), as transformers' repeat_kv lays the heads out."""
    if rep == 1:
        return t
    T, nkv, hd = t.shape
    return t[:, :, None, :].expand(T, nkv, rep, hd).reshape(T, nkv * rep, hd)


def _delta(x: torch.Tensor, lora: LoRA) -> torch.Tensor:
    return (x @ lora.a.T) @ lora.b.T * lora.scale


def _rows(spans: list[tuple[int, int]], members: list[int], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(*spans[i]) for i in members]).to(device)


def _local_spans(spans: list[tuple[int, int]], members: list[int]) -> list[tuple[int, int]]:
    out, row = [], 0
    for i in members:
        n = spans[i][1] - spans[i][0]
        out.append((row, row + n))
        row += n
    return out


def _adapter_groups(groups: dict, fp: str, spans: list[tuple[int, int]], members: list[int], adapters: dict[str, AdapterWeights], device: torch.device) -> list[tuple[AdapterWeights, torch.Tensor]]:
    """For a block's rows: (adapter, local row indices) per adapter present (segmented LoRA)."""
    pos_in_group = {i: k for k, i in enumerate(members)}
    local = _local_spans(spans, members)
    out = []
    for (gfp, afp), idx in groups.items():
        if gfp != fp or afp is None:
            continue
        rows = torch.cat([torch.arange(*local[pos_in_group[i]]) for i in idx]).to(device)
        out.append((adapters[afp], rows))
    return out


def _put(x: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor) -> None:
    if rows is None:
        x.copy_(value)
    else:
        x[rows] = value
