"""The equivalence job's tasks: probe states of a chain, sketches of blocks, and pair comparisons.

Each task is a plain function of picklable arguments, run by a Dask worker (or inline without a
cluster). Workers keep the blocks they loaded in a small byte-bounded cache, which is why the job
places tasks where their blocks already are. A comparison has three stages, each cheaper than the
next and each able to reject: weight-space distance, functional metrics on the probe inputs of the
position, and the end-to-end check (swap the block into a chain that holds the original, run the
rest of that chain, compare next-token distributions).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from graphs import check_comparable
from zoo_store import Block, Fingerprint, Zoo
from zoo_store import config as _config
from zoo_store.types import canonical_json

from .lsh import functional_fingerprint, simhash
from .probes import BlockRunner, _embed_weight, next_token_metrics


@dataclass(frozen=True)
class ZooRef:
    """How a worker opens the zoo (a Zoo object itself need not pickle)."""

    url: str
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class Settings:
    """Thresholds and sizes of an equivalence run (defaults: blockllm.yaml `equivalence.*`)."""

    metric: str = (
        "kl_ucb"  # the score: "kl_ucb" (mean + 2 s.e.m. over probe sequences) or "kl" (mean)
    )
    probe_rows: int = 16
    probe_tokens: int = 32
    sketch_bits: int = 256
    sketch_bands: int = 32
    max_candidates: int = 8
    max_weight_distance: float = 1.2
    min_cosine: float = 0.1
    max_relative_error: float = 1.0
    max_score: float = 1.0
    lock_ttl: float = 600.0

    def __post_init__(self) -> None:
        if self.metric not in ("kl", "kl_ucb"):
            raise ValueError(f"equivalence metric must be 'kl' or 'kl_ucb', not {self.metric!r}")
        if self.sketch_bits % self.sketch_bands:
            raise ValueError(
                f"sketch bits {self.sketch_bits} must split evenly into {self.sketch_bands} bands"
            )

    @classmethod
    def from_config(cls, **overrides: Any) -> Settings:
        c = _config.get("equivalence", {}) or {}
        kw = {
            f: c.get(f.replace("_", "-"))
            for f in cls.__dataclass_fields__
            if c.get(f.replace("_", "-")) is not None
        }
        kw.update(overrides)
        return cls(**kw)

    def comparison_key(self) -> dict[str, Any]:
        """What the stored results depend on: a change of any of these recomputes everything."""
        d = dict(self.__dict__)
        d.pop("lock_ttl")
        return d


@dataclass(frozen=True)
class ChainStates:
    """A model's chain run on the probe set: the input of every chain block and the final logits."""

    model: str
    config: dict[str, Any]
    chain: tuple[Fingerprint, ...]
    probe_set: str
    inputs: tuple[torch.Tensor, ...]
    logits: torch.Tensor


@dataclass(frozen=True)
class Direction:
    """One direction of a pair: `substitute` standing in for `original`, checked in `context`."""

    substitute: Fingerprint
    original: Fingerprint
    context: str
    metrics: dict[str, float]
    accepted: bool
    reason: str  # why it was rejected ("" when accepted)

    def score(self, metric: str) -> float:
        return self.metrics.get(metric, math.inf)


@dataclass(frozen=True)
class PairResult:
    """The comparison of blocks `a` and `b` (same group), both directions."""

    a: Fingerprint
    b: Fingerprint
    position: tuple[str, int, int]
    stage: str  # the last stage reached: "prefilter", "functional" or "end-to-end"
    weight_distance: float
    directions: tuple[Direction, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "weight_distance": self.weight_distance,
            "directions": [
                {
                    "substitute": d.substitute,
                    "original": d.original,
                    "context": d.context,
                    "metrics": d.metrics,
                    "accepted": d.accepted,
                    "reason": d.reason,
                }
                for d in self.directions
            ],
        }


# ---------------------------------------------------------------------- per-process worker caches
_lock = threading.Lock()
_zoos: dict[ZooRef, Zoo] = {}
_runners: dict[str, BlockRunner] = {}
_blocks: OrderedDict[tuple[str, Fingerprint], Block] = OrderedDict()
_block_bytes = 0


def clear_caches() -> None:
    """Forget cached zoos, runners and blocks (tests; or to free a worker's memory)."""
    global _block_bytes
    with _lock:
        _zoos.clear()
        _runners.clear()
        _blocks.clear()
        _block_bytes = 0


def _zoo(ref: ZooRef) -> Zoo:
    with _lock:
        zoo = _zoos.get(ref)
        if zoo is None:
            zoo = _zoos[ref] = Zoo(ref.url, storage_options=ref.storage_options, read_only=True)
        return zoo


def get_block(ref: ZooRef, fp: Fingerprint) -> Block:
    """A block from this worker's cache, or read (and hash-verified) from the zoo."""
    global _block_bytes
    key = (ref.url, fp)
    with _lock:
        block = _blocks.get(key)
        if block is not None:
            _blocks.move_to_end(key)
            return block
    block = _zoo(ref).get_block(fp)
    limit = int(_config.get("equivalence.block-cache-bytes", 2 << 30))
    with _lock:
        if key not in _blocks:
            _blocks[key] = block
            _block_bytes += block.spec.nbytes
        while _block_bytes > limit and len(_blocks) > 1:
            _, old = _blocks.popitem(last=False)
            _block_bytes -= old.spec.nbytes
    return block


def cached_blocks() -> set[Fingerprint]:
    with _lock:
        return {fp for _, fp in _blocks}


def _runner(config: dict[str, Any]) -> BlockRunner:
    key = hashlib.sha256(canonical_json(config)).hexdigest()
    with _lock:
        runner = _runners.get(key)
        if runner is None:
            runner = _runners[key] = BlockRunner(config)
        return runner


@contextlib.contextmanager
def _threads_for(config: dict[str, Any]) -> Iterator[None]:
    """One torch thread for small models: their ops are microseconds, and thread hand-offs on a
    busy machine cost more than the op (measured: 85 us vs 10 us per small matmul on 2 loaded cores)."""
    if int(config.get("hidden_size", 0)) > 256:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------- tasks
def chain_states(
    ref: ZooRef,
    model: str,
    config: dict[str, Any],
    chain: Sequence[Fingerprint],
    probe_set: str,
    ids: torch.Tensor,
    reuse: ChainStates | None = None,
) -> ChainStates:
    """Run `chain` on the probe ids; the prefix it shares with `reuse` (same probe set) is not run again."""
    with _threads_for(config):
        return _chain_states(ref, model, config, chain, probe_set, ids, reuse)


def _chain_states(
    ref: ZooRef,
    model: str,
    config: dict[str, Any],
    chain: Sequence[Fingerprint],
    probe_set: str,
    ids: torch.Tensor,
    reuse: ChainStates | None,
) -> ChainStates:
    blocks = [get_block(ref, fp) for fp in chain]
    runner = _runner(config)
    start = 0
    if reuse is not None and reuse.probe_set == probe_set and reuse.config == config:
        while start < min(len(chain), len(reuse.chain)) - 1 and chain[start] == reuse.chain[start]:
            start += 1
    if start == 0:
        inputs, logits = runner.run_chain(blocks, ids)
        return ChainStates(model, config, tuple(chain), probe_set, tuple(inputs), logits)
    assert reuse is not None
    inputs = list(reuse.inputs[: start + 1])
    x = inputs[start]
    embed = _embed_weight(blocks)
    for i, b in enumerate(blocks[start:], start):
        if i > start:
            inputs.append(x)
        x = runner.run(b, x, embed_weight=embed)
    return ChainStates(model, config, tuple(chain), probe_set, tuple(inputs), x)


def _embed_of(ref: ZooRef, states: ChainStates) -> torch.Tensor | None:
    for fp in states.chain:
        b = get_block(ref, fp)
        if b.spec.kind == "embed":
            return b.tensors["embed_tokens.weight"]
    return None


def sketch_block(ref: ZooRef, fp: Fingerprint, probe: ChainStates, index: int, bits: int) -> int:
    """SimHash of the block's functional fingerprint on the probe inputs of its position."""
    with _threads_for(probe.config):
        return _sketch_block(ref, fp, probe, index, bits)


def _sketch_block(ref: ZooRef, fp: Fingerprint, probe: ChainStates, index: int, bits: int) -> int:
    block = get_block(ref, fp)
    x = probe.inputs[index]
    if probe.chain[index] == fp:  # the probe chain's own block: its output is already recorded
        y = probe.inputs[index + 1] if index + 1 < len(probe.inputs) else probe.logits
    else:
        y = _runner(probe.config).run(block, x, embed_weight=_embed_of(ref, probe))
    # one projection per probe set (sketches are only ever compared within a group)
    return simhash(
        functional_fingerprint(block.spec.kind, x, y), bits=bits, seed_text=probe.probe_set
    )


def weight_distance(a: Block, b: Block) -> float:
    """Mean over weight matrices of |A - B| / rms(|A|, |B|): 0 equal, about 1.41 unrelated."""
    names = [t.name for t in a.spec.tensors if len(t.shape) >= 2] or [
        t.name for t in a.spec.tensors
    ]
    total = 0.0
    for name in names:
        x, y = a.tensors[name].float(), b.tensors[name].float()
        scale = math.sqrt((float(x.pow(2).sum()) + float(y.pow(2).sum())) / 2) or 1.0
        total += float((x - y).norm()) / scale
    return total / len(names)


@torch.no_grad()
def compare_pair(
    ref: ZooRef,
    a: Fingerprint,
    b: Fingerprint,
    probe: ChainStates,
    probe_index: int,
    context_a: ChainStates | None,
    index_a: int,
    context_b: ChainStates | None,
    index_b: int,
    settings: Settings,
) -> PairResult:
    """Weight prefilter, functional metrics on the probe inputs, then end-to-end in each direction.

    `context_a`: the chain states of a model holding `a` at `index_a`, where `b` is swapped in to
    check "b stands in for a" (None: no such chain, so that direction is not accepted); same for b.
    """
    check_comparable(
        a, get_block(ref, a).spec, b, get_block(ref, b).spec
    )  # typed error, before any work
    with _threads_for(probe.config):
        return _compare_pair(
            ref, a, b, probe, probe_index, context_a, index_a, context_b, index_b, settings
        )


def _compare_pair(
    ref: ZooRef,
    a: Fingerprint,
    b: Fingerprint,
    probe: ChainStates,
    probe_index: int,
    context_a: ChainStates | None,
    index_a: int,
    context_b: ChainStates | None,
    index_b: int,
    settings: Settings,
) -> PairResult:
    contexts = {
        a: None if context_a is None else (context_a, index_a),
        b: None if context_b is None else (context_b, index_b),
    }
    A, B = get_block(ref, a), get_block(ref, b)
    position = A.spec.position
    wd = weight_distance(A, B)
    if wd > settings.max_weight_distance:
        return PairResult(a, b, position, "prefilter", wd)

    runner = _runner(probe.config)
    embed = _embed_of(ref, probe)
    x = probe.inputs[probe_index]
    ya, yb = runner.run(A, x, embed_weight=embed), runner.run(B, x, embed_weight=embed)
    fa, fb = functional_fingerprint(A.spec.kind, x, ya), functional_fingerprint(B.spec.kind, x, yb)
    cosine = float((fa * fb).sum(-1).mean())
    out_cos = float(
        F.cosine_similarity(ya.flatten(0, -2).float(), yb.flatten(0, -2).float(), dim=-1).mean()
    )

    directions = []
    stage = "functional"
    for sub_fp, sub, orig_fp, y_sub, y_orig in ((a, A, b, ya, yb), (b, B, a, yb, ya)):
        rel = float((y_sub - y_orig).norm() / y_orig.norm().clamp_min(1e-12))
        metrics = {
            "weight_distance": wd,
            "cosine": cosine,
            "output_cosine": out_cos,
            "relative_error": rel,
        }
        ctx = contexts.get(orig_fp)
        if cosine < settings.min_cosine:
            directions.append(
                Direction(
                    sub_fp,
                    orig_fp,
                    "",
                    metrics,
                    False,
                    f"cosine {cosine:.3f} < {settings.min_cosine}",
                )
            )
            continue
        if rel > settings.max_relative_error:
            directions.append(
                Direction(
                    sub_fp,
                    orig_fp,
                    "",
                    metrics,
                    False,
                    f"relative error {rel:.3f} > {settings.max_relative_error}",
                )
            )
            continue
        if ctx is None:
            directions.append(
                Direction(
                    sub_fp, orig_fp, "", metrics, False, "no adapter-free chain holds the original"
                )
            )
            continue
        states, index = ctx
        stage = "end-to-end"
        chain = [get_block(ref, fp) for fp in states.chain]
        chain[index] = sub
        logits = runner.run_from(chain, index, states.inputs[index])
        metrics |= next_token_metrics(states.logits, logits)
        score = metrics[settings.metric]
        ok = score <= settings.max_score
        reason = "" if ok else f"{settings.metric} {score:.3f} > {settings.max_score}"
        directions.append(Direction(sub_fp, orig_fp, states.model, metrics, ok, reason))
    return PairResult(a, b, position, stage, wd, tuple(directions))


def compare_blocks(zoo: Zoo, a: Fingerprint, b: Fingerprint) -> None:
    """Raise IncomparableBlocksError (with the reason) unless `a` and `b` may be compared."""
    check_comparable(a, zoo.block_spec(a), b, zoo.block_spec(b))


__all__ = [
    "ChainStates",
    "Direction",
    "PairResult",
    "Settings",
    "ZooRef",
    "cached_blocks",
    "chain_states",
    "clear_caches",
    "compare_blocks",
    "compare_pair",
    "get_block",
    "sketch_block",
    "weight_distance",
]
