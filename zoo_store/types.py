"""Shared vocabulary of the zoo: tensor and block specs, adapter references, model manifests."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .exceptions import InvalidNameError, ManifestError

Fingerprint = str  # hex sha256 of a block's canonical spec and exact tensor bytes
BlockKind = Literal["embed", "layers", "head", "adapter"]
BLOCK_KINDS: tuple[str, ...] = ("embed", "layers", "head", "adapter")
Visibility = Literal["private", "shared"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FP_RE = re.compile(r"^[0-9a-f]{64}$")


def validate_name(value: str, what: str = "name") -> str:
    """Tenant and model names: 1-64 of [A-Za-z0-9_.-], starting alphanumeric, no '..'."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise InvalidNameError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a "
            "letter or digit, and no '..'"
        )
    return value


def validate_fingerprint(value: str) -> str:
    if not isinstance(value, str) or not _FP_RE.match(value):
        raise ManifestError(f"{value!r} is not a block fingerprint (64 lowercase hex digits)")
    return value


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, no spaces; the input of every fingerprint."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"

    @property
    def nbytes(self) -> int:
        from .tensors import dtype_itemsize

        return math.prod(self.shape) * dtype_itemsize(self.dtype)


@dataclass(frozen=True)
class BlockSpec:
    """What a block is: enough to rebuild its module and to decide what it may stand in for.

    `arch` holds the config values its computation depends on (hidden size, heads, rope, ...);
    `layer_start:layer_end` is its range of decoder layers (embed: 0:0, head: n:n).
    `extra` carries kind-specific facts (head: tied to the embedding; adapter: rank, alpha,
    target modules and the fingerprint of the base block it attaches to).
    """

    kind: str
    family: str
    arch: dict[str, Any]
    layer_start: int
    layer_end: int
    tensors: tuple[TensorSpec, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in BLOCK_KINDS:
            raise ManifestError(f"unknown block kind {self.kind!r}; expected one of {BLOCK_KINDS}")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ManifestError(f"duplicate tensor names in block spec: {names}")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def position(self) -> tuple[str, int, int]:
        """Blocks with equal positions (and arch) are candidates for equivalence."""
        return (self.kind, self.layer_start, self.layer_end)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensors"] = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockSpec:
        try:
            return cls(
                kind=d["kind"],
                family=d["family"],
                arch=dict(d["arch"]),
                layer_start=int(d["layer_start"]),
                layer_end=int(d["layer_end"]),
                tensors=tuple(
                    TensorSpec(t["name"], tuple(int(s) for s in t["shape"]), t["dtype"])
                    for t in d["tensors"]
                ),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"malformed block spec: {e!r}") from e


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter block attached to the chain block at `index`."""

    index: int
    fingerprint: Fingerprint


@dataclass(frozen=True)
class Manifest:
    """A model (variant): its tenant, name and ordered chain of blocks, published last."""

    tenant: str
    name: str
    family: str
    chain: tuple[Fingerprint, ...]
    config: dict[str, Any]
    adapters: tuple[AdapterRef, ...] = ()
    tokenizer: Fingerprint | None = None
    visibility: str = "private"
    base: str | None = None  # "tenant/name" of the model it was derived from, if known
    error_budget: float = 0.0  # max quality loss its owner accepts from block substitution
    source: str = ""
    created: str = ""

    def __post_init__(self) -> None:
        validate_name(self.tenant, "tenant")
        validate_name(self.name, "model name")
        if not self.chain:
            raise ManifestError(f"model {self.key}: empty chain")
        for fp in self.chain:
            validate_fingerprint(fp)
        for a in self.adapters:
            validate_fingerprint(a.fingerprint)
            if not 0 <= a.index < len(self.chain):
                raise ManifestError(f"model {self.key}: adapter index {a.index} outside the chain")
        if self.visibility not in ("private", "shared"):
            raise ManifestError(f"visibility must be 'private' or 'shared', not {self.visibility!r}")
        budget = self.error_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
            raise ManifestError(f"error_budget must be a finite number >= 0, not {budget!r}")

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.name}"

    def fingerprints(self) -> set[Fingerprint]:
        """Every block (and the tokenizer asset) this model needs."""
        fps = set(self.chain) | {a.fingerprint for a in self.adapters}
        return fps

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chain"] = list(self.chain)
        d["adapters"] = [{"index": a.index, "fingerprint": a.fingerprint} for a in self.adapters]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"a manifest must be a JSON object, not {type(d).__name__}")
        try:
            return cls(
                tenant=d["tenant"],
                name=d["name"],
                family=d["family"],
                chain=tuple(d["chain"]),
                config=dict(d["config"]),
                adapters=tuple(AdapterRef(int(a["index"]), a["fingerprint"]) for a in d.get("adapters", [])),
                tokenizer=d.get("tokenizer"),
                visibility=d.get("visibility", "private"),
                base=d.get("base"),
                error_budget=d.get("error_budget", 0.0),
                source=d.get("source", ""),
                created=d.get("created", ""),
            )
        except (ManifestError, InvalidNameError):
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"malformed manifest: {e!r}") from e
