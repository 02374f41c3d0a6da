"""Admission: bounded per-tenant and per-model queues, fair hand-out across tenants, online before
batch; and a block host (real engine, tiny family) under a short flood from one tenant."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest

from blockllm.exceptions import InvalidRequestError, OverloadedError
from blockllm.serving.admission import Admission, Ticket, parse_priority
from blockllm.types import Request, SamplingParams


def ticket(tenant: str, i: int, *, model: str = "acme/m", priority: str = "online", prompt: int = 4, new: int = 4) -> Ticket:
    req = Request(f"{tenant}-{priority}-{i}", model, tuple(range(1, prompt + 1)), SamplingParams(max_new_tokens=new))
    return Ticket(req, tenant, model, priority)


def test_priority_values():
    assert parse_priority(None) == "online" and parse_priority("batch") == "batch"
    for bad in ("urgent", 1, "", "ONLINE", ["online"]):
        with pytest.raises(InvalidRequestError):
            parse_priority(bad)


def test_bounds_per_tenant_and_per_model_raise_overloaded_with_retry_after():
    adm = Admission(max_per_tenant=3, max_per_model=5, quantum=8)
    for i in range(3):
        adm.offer(ticket("a", i, model="a/x"))
    with pytest.raises(OverloadedError) as e:
        adm.offer(ticket("a", 3, model="a/y"))
    assert e.value.retry_after > 0 and "max-queued-per-tenant" in str(e.value)
    adm.offer(ticket("b", 0, model="a/x"))
    adm.offer(ticket("c", 0, model="a/x"))
    with pytest.raises(OverloadedError, match="max-queued-per-model"):
        adm.offer(ticket("d", 0, model="a/x"))
    assert adm.queued("a") == 3 and len(adm) == 5
    assert len(adm.take(2)) == 2  # handing out frees room
    adm.offer(ticket("d", 0, model="a/x"))
    assert adm.snapshot()["rejected"] == {"a": 1, "d": 1}


def test_fair_hand_out_across_tenants_whatever_the_arrival_order():
    adm = Admission(max_per_tenant=1000, max_per_model=10_000, quantum=8)
    for i in range(100):  # the flooder arrives first, all of it
        adm.offer(ticket("flood", i))
    for i in range(3):
        adm.offer(ticket("quiet", i))
    first = adm.take(6)
    assert Counter(t.tenant for t in first) == {"flood": 3, "quiet": 3}  # turns alternate
    assert adm.take(200) and len(adm) == 0


def test_turns_are_shared_by_tokens_not_by_requests():
    adm = Admission(max_per_tenant=1000, max_per_model=10_000, quantum=16)
    for i in range(50):
        adm.offer(ticket("big", i, prompt=28, new=4))  # 32 tokens each
        adm.offer(ticket("small", i, prompt=4, new=4))  # 8 tokens each
    out = adm.take(40)
    tokens = Counter()
    for t in out:
        tokens[t.tenant] += t.cost
    n = Counter(t.tenant for t in out)
    assert n["small"] > 2 * n["big"]  # same share of tokens, so more small requests
    assert abs(tokens["small"] - tokens["big"]) <= 32


def test_online_first_and_batch_only_into_free_room():
    adm = Admission(max_per_tenant=100, max_per_model=100, quantum=8)
    for i in range(5):
        adm.offer(ticket("a", i, priority="batch"))
    for i in range(2):
        adm.offer(ticket("b", i))
    got = adm.take(3, batch=4)
    assert [t.priority for t in got] == ["online", "online", "batch"]  # batch only after online work
    assert adm.take(4, batch=0) == []  # no room for batch work: it waits
    got = adm.take(4, batch=3)
    assert [t.priority for t in got] == ["batch"] * 3
    for i in range(2):
        adm.offer(ticket("b", 10 + i))
    assert [t.priority for t in adm.take(1, batch=4)] == ["online"]  # online waits: no batch at all
    adm.offer(ticket("c", 9))
    assert sorted(t.tenant for t in adm.take(2, batch=2)) == ["b", "c"]  # online goes ahead of queued batch
    assert [t.priority for t in adm.take(5, batch=5)] == ["batch"] and len(adm) == 0


def test_removed_tickets_leave_the_counts():
    adm = Admission(max_per_tenant=2, max_per_model=10, quantum=8)
    adm.offer(ticket("a", 0))
    adm.offer(ticket("a", 1))
    assert [t.request.request_id for t in adm.remove(["a-online-0", "nope"])] == ["a-online-0"]
    adm.offer(ticket("a", 2))  # room again
    assert [t.request.request_id for t in adm.take(5)] == ["a-online-1", "a-online-2"]
    assert adm.snapshot()["per_tenant"] == {}


# ------------------------------------------------------------------ a block host under a flood
class LiveHost:
    """A BlockHost in this process (real engine on the tiny family), its event loop on a thread."""

    def __init__(self, zoo_url: str, models: list[str]) -> None:
        from blockllm.serving.host import BlockHost

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.host = BlockHost(zoo_url, engine_kwargs={"max_batch_size": 8})
        self.host.start(self.loop)
        self.host.load(models)

    def poll(self, ids: list[str], timeout: float = 5.0) -> dict:
        return asyncio.run_coroutine_threadsafe(self.host.poll(ids, None, timeout, True), self.loop).result(timeout + 5)

    def wait(self, ids: list[str], timeout: float = 60.0) -> dict:
        deadline, done = time.monotonic() + timeout, {}
        while set(ids) - done.keys() and time.monotonic() < deadline:
            for rid, st in self.poll(sorted(set(ids) - done.keys()), 2.0).items():
                if st["finished"]:
                    done[rid] = st
        return done

    def close(self) -> None:
        self.host.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def live(tiny_zoo):
    import dask

    from blockllm.auth import create_key

    keys = {t: create_key(tiny_zoo, t) for t in ("acme", "globex")}
    with dask.config.set({"blockllm.serving.max-queued-per-tenant": 24, "blockllm.serving.engine-waiting": 2}):
        h = LiveHost(tiny_zoo.url, ["platform/tiny-base", "acme/tiny-full"])
    yield h, keys
    h.close()


def wire(rid: str, key: str, model: str = "platform/tiny-base", n: int = 6, priority: str = "online") -> dict:
    return {"request_id": rid, "model": model, "prompt": "3 + 4 =", "sampling": {"max_new_tokens": n, "ignore_eos": True}, "priority": priority, "api_key": key}


@pytest.mark.slow
def test_a_flooding_tenant_is_refused_and_a_quiet_one_still_served(live):
    """Bounded (<= 15 s): acme floods 4x its admission bound, globex sends a few; globex's requests
    all finish, acme's beyond the bound get OverloadedError, the engine holds only a few waiting."""
    lh, keys = live
    host = lh.host
    flood = [wire(f"flood-{i}", keys["acme"], "acme/tiny-full", n=48) for i in range(96)]
    errors = host.submit(flood)
    refused = [e for e in errors if e is not None]
    assert refused and all(e["type"] == "OverloadedError" and e["retry_after"] > 0 for e in refused)
    accepted = [w["request_id"] for w, e in zip(flood, errors, strict=True) if e is None]
    assert 24 <= len(accepted) < 96
    waiting = []
    quiet = []
    for i in range(4):
        w = wire(f"quiet-{i}", keys["globex"])
        assert host.submit([w]) == [None]  # never refused: its own queue is empty
        quiet.append(w["request_id"])
        waiting.append(host.engine.stats().waiting)
    assert max(waiting) <= 2 + 1  # the engine sees few waiting requests, the rest wait in admission
    done = lh.wait(quiet, timeout=10)
    assert set(done) == set(quiet) and all(not st["error"] and len(st["token_ids"]) == 6 for st in done.values())
    rest = lh.wait(accepted, timeout=60)
    assert set(rest) == set(accepted)  # the flooder's admitted requests are served too, none lost
    assert host.admission.snapshot()["per_tenant"] == {}


def test_bad_priority_and_malformed_requests_are_typed_errors(live):
    lh, keys = live
    bad = [
        wire("p1", keys["acme"], priority="urgent"),
        {"request_id": "x", "model": "platform/tiny-base", "prompt": "hi", "sampling": {"max_tokens": 3}, "api_key": keys["acme"]},
        {"request_id": "y", "model": "../etc/passwd", "prompt": "hi", "api_key": keys["acme"]},
        "not a dict",
    ]
    errs = lh.host.submit(bad)
    assert [e["type"] for e in errs] == ["InvalidRequestError", "InvalidSamplingError", "InvalidRequestError", "InvalidRequestError"]


def test_batch_requests_run_after_online_ones(live):
    lh, keys = live
    batch = [wire(f"b-{i}", keys["acme"], n=4, priority="batch") for i in range(6)]
    online = [wire(f"o-{i}", keys["globex"], n=4) for i in range(2)]
    assert lh.host.submit(batch + online) == [None] * 8
    done = lh.wait([w["request_id"] for w in batch + online], timeout=30)
    assert len(done) == 8 and all(not st["error"] for st in done.values())
