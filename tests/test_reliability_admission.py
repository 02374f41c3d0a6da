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


def test_take_hands_out_past_the_few_while_prompt_tokens_fit_and_never_past_the_cap():
    adm = Admission(max_per_tenant=64, quantum=1000)
    for i in range(10):
        adm.offer(ticket("a", i, prompt=10))
    assert len(adm.take(1, tokens=35, cap=8)) == 4  # the one it always takes, then while 10/20/30 < 35 prompt tokens
    assert len(adm.take(1, tokens=1000, cap=3)) == 3  # the budget would take all six left: the cap stops it
    assert len(adm.take(2, tokens=0, cap=8)) == 2  # no budget: only the few
    assert adm.queued() == 1


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
    assert max(waiting) <= 8  # the engine holds at most a batch (max_batch_size) waiting; the rest wait in admission
    done = lh.wait(quiet, timeout=10)
    assert set(done) == set(quiet) and all(not st["error"] and len(st["token_ids"]) == 6 for st in done.values())
    rest = lh.wait(accepted, timeout=60)
    assert set(rest) == set(accepted)  # the flooder's admitted requests are served too, none lost
    assert host.admission.snapshot()["per_tenant"] == {}


def test_an_idle_engine_gets_its_whole_prefill_budget_in_one_hand_out(live):
    """engine-waiting is 2 here, yet six short prompts reach the engine in one hand-out: they all fit
    its next step's prefill budget (two per step throttled arrivals to two per step)."""
    lh, keys = live
    host = lh.host

    def on_the_stepping_thread(engine):
        assert not engine.has_unfinished()
        errors = host.submit([wire(f"hb-{i}", keys["globex"], n=3) for i in range(6)])
        host._hand_out()
        return errors, len(engine.scheduler.waiting)

    errors, waiting = host._call(on_the_stepping_thread).result(30)
    assert errors == [None] * 6 and waiting == 6
    done = lh.wait([f"hb-{i}" for i in range(6)], timeout=30)
    assert len(done) == 6 and all(not st["error"] and len(st["token_ids"]) == 3 for st in done.values())


def test_a_poll_answers_at_once_when_its_request_is_aborted_and_leaves_no_waiter(live):
    """A long poll waits on its own requests only; aborting one answers it now (unknown request),
    not at its timeout, and no waiter is left registered afterwards."""
    lh, keys = live
    host = lh.host
    gate = threading.Event()
    host._call(lambda engine: gate.wait(10))  # the stepping thread holds still: the request stays queued
    try:
        assert host.submit([wire("pw-1", keys["globex"], n=4)]) == [None]

        async def scenario():
            polling = asyncio.ensure_future(host.poll(["pw-1"], None, 20.0, True))
            await asyncio.sleep(0.2)
            assert not polling.done()
            t0 = time.monotonic()
            host.abort(["pw-1"])
            out = await asyncio.wait_for(polling, 5)
            return out, time.monotonic() - t0

        out, waited = asyncio.run_coroutine_threadsafe(scenario(), lh.loop).result(10)
    finally:
        gate.set()
    assert out["pw-1"]["finished"] and out["pw-1"]["error"]["type"] == "KeyError" and waited < 2
    assert host._end_waiters == {} and host._token_waiters == {}


def test_the_host_reads_a_manifest_once_per_cache_period(live, monkeypatch):
    from zoo_store import ModelNotFoundError

    host = live[0].host
    calls = []
    real = host.zoo.get_manifest
    monkeypatch.setattr(host.zoo, "get_manifest", lambda t, n: calls.append((t, n)) or real(t, n))
    host._manifests.clear()
    assert all(host.manifest("acme", "tiny-full").key == "acme/tiny-full" for _ in range(5))
    assert calls == [("acme", "tiny-full")]
    monkeypatch.setattr(host, "manifest_ttl", 0.0)  # serving.manifest-cache: 0 reads every time
    host.manifest("acme", "tiny-full")
    assert len(calls) == 2
    for _ in range(2):  # an unknown model is never cached: once ingested it is found at once
        with pytest.raises(ModelNotFoundError):
            host.manifest("acme", "no-such-model")
    assert len(calls) == 4


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


def test_split_tickets_share_the_bounds_but_wait_in_their_own_lane():
    adm = Admission(max_per_tenant=3, max_per_model=4, quantum=8)
    adm.offer(ticket("a", 0))
    split = [Ticket(ticket("a", i).request, "a", "acme/m", "online", "split") for i in (1, 2)]
    for t in split:
        adm.offer(t)
    with pytest.raises(OverloadedError, match="max-queued-per-tenant"):  # split or not, one tenant bound
        adm.offer(Ticket(ticket("a", 3).request, "a", "acme/m", "online", "split"))
    adm.offer(Ticket(ticket("b", 0).request, "b", "acme/m", "online", "split"))
    with pytest.raises(OverloadedError, match="max-queued-per-model"):  # and one model bound
        adm.offer(ticket("c", 0))
    assert adm.pending("engine") == 1 and adm.pending("split") == 3 and len(adm) == 4
    assert [t.request.request_id for t in adm.take(5)] == ["a-online-0"]  # the engine takes only its own
    assert sorted(t.tenant for t in adm.take(5, lane="split")) == ["a", "a", "b"]
    assert adm.snapshot()["per_tenant"] == {} and adm.snapshot()["rejected"] == {"a": 1, "c": 1}
    with pytest.raises(InvalidRequestError):
        adm.offer(Ticket(ticket("a", 9).request, "a", "acme/m", "online", "elsewhere"))


@pytest.mark.slow
def test_a_flood_of_a_split_chain_is_refused_typed_and_the_cluster_keeps_serving(tiny_zoo):
    """Bounded (~30 s), a real LocalCluster of two workers with platform/tiny-base split over them:
    acme sends 96 requests at once to the split chain (its bound on the first segment's worker is
    8 queued, with a batch of 4); the excess gets OverloadedError in the caller, counted by the
    first worker's admission; globex's requests to the same chain, sent into the flood, are never
    refused and finish before the flood does; every request served has the unloaded run's tokens,
    and the chain serves normally afterwards."""
    import dask
    import distributed

    from blockllm.auth import create_key
    from blockllm.client import Client, GenerationRequest

    model, n = "platform/tiny-base", 16
    sampling = SamplingParams(max_new_tokens=n, ignore_eos=True)

    def reqs(tag: str, k: int, prompt: str = "3 + 4 =") -> list[GenerationRequest]:
        return [GenerationRequest(model=model, prompt=prompt, sampling=sampling, request_id=f"{tag}-{i}") for i in range(k)]

    with dask.config.set({"blockllm.serving.max-queued-per-tenant": 8, "blockllm.serving.engine-waiting": 2}), distributed.LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1"
    ) as cluster, distributed.Client(cluster) as dc:
        dc.wait_for_workers(2, timeout=120)
        flooder = Client(dc, api_key=create_key(tiny_zoo, "acme"), zoo=tiny_zoo.url, engine={"max_batch_size": 4})
        quiet = Client(dc, api_key=create_key(tiny_zoo, "globex"), zoo=tiny_zoo.url, engine={"max_batch_size": 4})
        plan = flooder.place([model], split={model: 2})
        first = plan.splits[model][0].worker
        assert plan.splits[model][1].worker != first
        expected = flooder.submit(reqs("ref", 1))[0].result(60).token_ids
        quiet_expected = quiet.submit(reqs("qref", 1, "the"))[0].result(60).token_ids

        t0 = time.monotonic()
        finished_at: dict[str, float] = {}

        def track(futures, requests):
            for f, r in zip(futures, requests, strict=True):
                f.add_done_callback(lambda _f, rid=r.request_id: finished_at.setdefault(rid, time.monotonic()))
            return futures

        flood_reqs = reqs("flood", 96)
        flood = track(flooder.submit(flood_reqs), flood_reqs)
        quiet_reqs = reqs("quiet", 4, "the")
        quiet_futures = track(quiet.submit(quiet_reqs), quiet_reqs)
        served, refused = [], []
        for f in flood:
            try:
                served.append(f.result(120))
            except OverloadedError as e:
                refused.append(e)
        quiet_done = [f.result(120) for f in quiet_futures]  # never refused
        stats = flooder.stats()[first]
        after = flooder.submit(reqs("after", 2))
        after_done = [f.result(60) for f in after]
        print(f"\nsplit-chain flood: {len(served)} of 96 served, {len(refused)} refused (OverloadedError); "
              f"globex 4 of 4 served; {time.monotonic() - t0:.1f} s")

    assert refused and 8 <= len(served) < 96
    assert all(e.retry_after > 0 and "max-queued-per-tenant" in str(e) for e in refused)
    assert stats["admission"]["rejected"].get("acme") == len(refused)  # refused by the same admission as unsplit requests
    assert stats["admission"]["per_tenant"] == {} and stats["split"]["routes"] == {model: plan.splits[model][1].worker}
    assert all(c.token_ids == expected and c.worker == first for c in served + after_done)
    assert all(c.token_ids == quiet_expected for c in quiet_done)
    assert max(finished_at[r.request_id] for r in quiet_reqs) < max(finished_at[c.request_id] for c in served)


def test_a_block_host_whose_stepping_thread_died_fails_calls_at_once(tiny_zoo):
    """A host whose engine cannot start answers every call with a typed error, never a hang (the
    placement task waiting on it would otherwise wait for ever)."""
    from blockllm.exceptions import BlockLLMError
    from blockllm.serving.host import BlockHost

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        host = BlockHost(tiny_zoo.url, engine_kwargs={"dtype": "no_such_dtype"})
        host.start(loop)
        t0 = time.monotonic()
        with pytest.raises(BlockLLMError, match="block host stopped"):
            host.load(["platform/tiny-base"])
        with pytest.raises(BlockLLMError, match="block host stopped"):
            host.load(["platform/tiny-base"])  # and so does every later call
        assert time.monotonic() - t0 < 30
        host.stop()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
