"""Admission in front of a block host's engine: bounded queues per tenant and per model, handed
out fairly across tenants (deficit round-robin), online requests before batch ones.

The engine holds only what it could start soon: a few waiting requests (`serving.engine-waiting`),
or, while none it holds is blocked by a block at its limit, as many as its next step can prefill
(up to a batch); everything else waits here, so a flood from one tenant cannot fill the engine's
queue ahead of a quiet tenant.
A host feeds two consumers: its whole-chain engine and, for chains split across workers whose
first segment is here, the split driver (serving/handoff.py). Each takes from its own lane of
queues, fairly within it, but the bounds per tenant and per model count both lanes together: a
split request is admitted, bounded and refused exactly like an unsplit one.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from .. import config as _config
from ..exceptions import InvalidRequestError, OverloadedError
from ..types import Request

PRIORITIES = ("online", "batch")
LANES = ("engine", "split")  # who takes a ticket: the whole-chain engine, or the split-chain driver
# Request.priority in the engine: higher is admitted first and preempted last.
ENGINE_PRIORITY = {"online": 1, "batch": 0}


def parse_priority(value: object) -> str:
    """'online' (the default, also for None) or 'batch'; anything else is an InvalidRequestError."""
    if value is None:
        return "online"
    if not isinstance(value, str) or value not in PRIORITIES:
        raise InvalidRequestError(f"priority must be one of {list(PRIORITIES)}, not {value!r}")
    return value


@dataclass(eq=False)
class Ticket:
    """A request waiting for the engine."""

    request: Request
    tenant: str
    model: str  # the model as asked for (the per-model bound counts it)
    priority: str = "online"
    lane: str = "engine"  # "split": its chain starts with a segment here and the split driver takes it

    @property
    def cost(self) -> int:
        """What a turn spends on it: the tokens it will put through the engine at most."""
        return len(self.request.prompt_token_ids) + self.request.sampling.max_new_tokens


class _RoundRobin:
    """Deficit round-robin over tenants (Shreedhar & Varghese): each turn a tenant may hand out
    `quantum` tokens' worth of requests, so tenants share the engine by tokens, not by arrivals."""

    def __init__(self, quantum: int) -> None:
        self.quantum = quantum
        self.queues: dict[str, deque[Ticket]] = {}
        self.active: deque[str] = deque()  # tenants with queued requests, in turn order
        self.deficit: Counter[str] = Counter()

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def push(self, t: Ticket) -> None:
        q = self.queues.get(t.tenant)
        if q is None:
            q = self.queues[t.tenant] = deque()
            self.active.append(t.tenant)
        q.append(t)

    def pop(self, skip: frozenset[str] = frozenset()) -> Ticket | None:
        skipped = 0
        while self.active:
            tenant = self.active[0]
            if tenant in skip:  # at its share of the engine: its turn passes
                skipped += 1
                if skipped >= len(self.active):
                    return None
                self.active.rotate(-1)
                continue
            q = self.queues[tenant]
            head = q[0]
            if self.deficit[tenant] >= head.cost:
                self.deficit[tenant] -= head.cost
                q.popleft()
                if not q:  # an idle tenant keeps no credit
                    self._drop(tenant)
                elif self.deficit[tenant] < q[0].cost:  # its turn is over; it keeps the rest
                    self.active.rotate(-1)
                return head
            self.deficit[tenant] += max(self.quantum, 1)
            if self.deficit[tenant] < head.cost:
                self.active.rotate(-1)
        return None

    def remove(self, request_id: str) -> Ticket | None:
        for tenant, q in self.queues.items():
            for t in q:
                if t.request.request_id == request_id:
                    q.remove(t)
                    if not q:
                        self._drop(tenant)
                    return t
        return None

    def _drop(self, tenant: str) -> None:
        del self.queues[tenant]
        self.active.remove(tenant)
        self.deficit.pop(tenant, None)


class Admission:
    """Bounded, fair queues of one block host. Thread-safe: RPC threads offer, the stepping thread takes."""

    def __init__(
        self,
        max_per_tenant: int | None = None,
        max_per_model: int | None = None,
        quantum: int | None = None,
    ) -> None:
        self.max_per_tenant = int(max_per_tenant or _config.get("serving.max-queued-per-tenant", 256))
        self.max_per_model = int(max_per_model or _config.get("serving.max-queued-per-model", 1024))
        quantum = int(quantum or _config.get("serving.fair-quantum", 32))
        # one fair queue per lane and priority; the bounds below span them all
        self._lanes = {lane: {p: _RoundRobin(quantum) for p in PRIORITIES} for lane in LANES}
        self._tenants: Counter[str] = Counter()
        self._models: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._rate = 0.0  # requests handed out per second (moving average), for Retry-After
        self._last_take = time.monotonic()
        self.rejected: Counter[str] = Counter()  # per tenant
        self.last_seen: dict[str, float] = {}  # tenant -> when it last queued a request
        self.share = float(_config.get("serving.tenant-share", 0.75))
        self.window = float(_config.get("serving.fair-window", 10.0))

    def at_share(self, in_engine: Counter[str], batch: int) -> frozenset[str]:
        """Tenants holding their share of an engine batch of `batch` while other tenants were seen in
        the last `serving.fair-window` seconds: their next requests wait, so a newcomer finds a free
        slot instead of queueing behind a flood. Alone, a tenant may fill the whole batch."""
        cap = max(1, int(batch * self.share))
        now = time.monotonic()
        with self._lock:
            recent = {t for t, seen in self.last_seen.items() if now - seen < self.window}
        return frozenset(t for t, n in in_engine.items() if n >= cap and recent - {t})

    def __len__(self) -> int:
        with self._lock:
            return sum(len(c) for classes in self._lanes.values() for c in classes.values())

    def pending(self, lane: str = "engine") -> int:
        """Tickets queued for one consumer (`lane`)."""
        with self._lock:
            return sum(len(c) for c in self._lanes[lane].values())

    def queued(self, tenant: str | None = None) -> int:
        with self._lock:
            return self._tenants[tenant] if tenant is not None else sum(self._tenants.values())

    def check(self, tenant: str, model: str) -> None:
        """Raise OverloadedError now if a request of `tenant` for `model` would not fit (a cheap early refusal)."""
        with self._lock:
            self._check(tenant, model)

    def _check(self, tenant: str, model: str) -> None:
        if self._tenants[tenant] >= self.max_per_tenant:
            self.rejected[tenant] += 1
            raise OverloadedError(
                f"tenant {tenant} has {self._tenants[tenant]} requests waiting on this worker "
                f"(limit serving.max-queued-per-tenant = {self.max_per_tenant}); retry later",
                retry_after=self._retry_after(self._tenants[tenant]),
            )
        if self._models[model] >= self.max_per_model:
            self.rejected[tenant] += 1
            raise OverloadedError(
                f"model {model} has {self._models[model]} requests waiting on this worker "
                f"(limit serving.max-queued-per-model = {self.max_per_model}); retry later",
                retry_after=self._retry_after(self._models[model]),
            )

    def offer(self, ticket: Ticket) -> None:
        """Queue a ticket, or raise OverloadedError (with a Retry-After estimate) when a bound is hit."""
        if ticket.priority not in PRIORITIES:
            raise InvalidRequestError(f"priority must be one of {list(PRIORITIES)}, not {ticket.priority!r}")
        if ticket.lane not in LANES:
            raise InvalidRequestError(f"lane must be one of {list(LANES)}, not {ticket.lane!r}")
        with self._lock:
            self._check(ticket.tenant, ticket.model)
            self._lanes[ticket.lane][ticket.priority].push(ticket)
            self.last_seen[ticket.tenant] = time.monotonic()
            self._tenants[ticket.tenant] += 1
            self._models[ticket.model] += 1

    def take(
        self, online: int, batch: int = 0, skip: frozenset[str] = frozenset(), lane: str = "engine", tokens: int = 0, cap: int = 0
    ) -> list[Ticket]:
        """Up to `online` tickets of `lane`, online ones first in fair order; past those, up to `cap`
        online tickets in all while their prompt tokens so far stay under `tokens` (what the
        consumer's next step could prefill). Batch ones only when no online ticket of the lane
        waits, and at most `batch` of them (the capacity online work leaves free). Tenants in
        `skip` (at their share of the consumer) get none this time."""
        out: list[Ticket] = []
        classes = self._lanes[lane]
        prompt = 0
        with self._lock:
            while (len(out) < online or (prompt < tokens and len(out) < cap)) and (t := classes["online"].pop(skip)) is not None:
                out.append(t)
                prompt += len(t.request.prompt_token_ids)
            if not len(classes["online"]):  # batch work only fills what online work left free
                room = min(online, len(out) + max(0, batch - len(out)))
                while len(out) < room and (t := classes["batch"].pop(skip)) is not None:
                    out.append(t)
            for t in out:
                self._forget(t)
            now = time.monotonic()
            if out:
                dt = max(now - self._last_take, 1e-3)
                self._rate = 0.8 * self._rate + 0.2 * (len(out) / dt)
                self._last_take = now
        return out

    def remove(self, request_ids: Iterable[str]) -> list[Ticket]:
        """Take aborted requests out of the queues; returns those that were queued."""
        out = []
        with self._lock:
            for rid in request_ids:
                for rr in (c for classes in self._lanes.values() for c in classes.values()):
                    t = rr.remove(rid)
                    if t is not None:
                        self._forget(t)
                        out.append(t)
                        break
        return out

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "queued": {p: sum(len(classes[p]) for classes in self._lanes.values()) for p in PRIORITIES},
                "queued_split": sum(len(c) for c in self._lanes["split"].values()),
                "per_tenant": dict(+self._tenants),
                "per_model": dict(+self._models),
                "rejected": dict(self.rejected),
            }

    def _forget(self, t: Ticket) -> None:
        self._tenants[t.tenant] -= 1
        self._models[t.model] -= 1

    def _retry_after(self, ahead: int) -> float:
        """Seconds until `ahead` queued requests have likely gone to the engine (0.5 s to 60 s)."""
        if self._rate <= 0:
            return 1.0
        return float(min(60.0, max(0.5, math.ceil(10 * ahead / self._rate) / 10)))
