"""Chains split across workers: segments, hand-offs, speculation, placement, against transformers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from clusters import tenant_clients
from reference import agrees, greedy_refs

from blockllm.demo import members
from blockllm.engine.segment import SegmentEngine, unpack
from blockllm.exceptions import InvalidRequestError, PromptTooLongError
from blockllm.serving.handoff import SplitDriver, guess_next
from blockllm.serving.placement import WorkerInfo, plan_placement
from blockllm.types import Request, SamplingParams
from zoo_store import Manifest

PROMPTS = ["3 + 4 =", "reverse: a b c d e f g ->", "uppercase: c a t ->"]
N = 12
SPLIT_AT = 2  # the tiny family has 4 layers, one per block


@pytest.fixture(scope="module")
def refs(tiny_family, tok):
    """transformers' greedy continuation of every prompt, per member."""
    return greedy_refs(tiny_family, tok, PROMPTS, N)


def test_guess_next_looks_up_the_latest_ngram():
    assert guess_next([5, 6, 7, 1, 5, 6]) == 7  # "5 6" was followed by 7
    assert guess_next([1, 2, 3, 9, 2, 3, 4, 2, 3]) == 4  # the latest match wins
    assert guess_next([8]) == 8  # nothing to look up: repeat


def _split_pair(zoo, family, graphs=False, kv_pages=None, **driver_kw):
    """A first segment [0, SPLIT_AT) driving a last segment [SPLIT_AT, 4) in this process."""
    first, last = (SegmentEngine(zoo, device="cpu", emulate_graphs=graphs, kv_pages=kv_pages) for _ in range(2))
    pool = ThreadPoolExecutor(1)  # the next worker's hand-off handler, one step at a time

    def send(address, items, hidden):
        assert address == "next-worker"
        return pool.submit(lambda: {"tokens": last.step_remote(items, unpack(hidden))})

    driver = SplitDriver(first, send, lambda address, ids: last.release(ids), **driver_kw)
    for m in members(family):
        first.load(m.key, 0, SPLIT_AT)
        last.load(m.key, SPLIT_AT)
        driver.route(m.key, "next-worker")
    return driver, first, last


def _run(driver, requests):
    for r in requests:
        driver.add_request(r)
    done = {}
    for _ in range(10 * N * len(requests)):
        if not driver.has_unfinished():
            break
        for out in driver.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.mark.parametrize("speculate,graphs", [(False, False), (True, False), (True, True)])
def test_split_chain_mixed_batch_matches_transformers(tiny_zoo, tiny_family, tok, refs, speculate, graphs):
    # a prefill chunk of 4 tokens: long prompts cross the hand-off in several pieces; `graphs`:
    # decode steps take the captured-graph path (emulated on the CPU)
    driver, first, last = _split_pair(tiny_zoo, tiny_family, graphs, speculate=speculate, prefill_chunk=4)
    batch = [
        Request(f"{m.key}#{i}", m.key, tuple(tok(p)["input_ids"]), SamplingParams(max_new_tokens=N, ignore_eos=True))
        for m in members(tiny_family)
        for i, p in enumerate(PROMPTS)
    ]  # ignore_eos: N tokens each (speculation, page pressure), however early the model stops
    done = _run(driver, batch)
    for r in batch:
        key, i = r.request_id.split("#")
        assert len(done[r.request_id].token_ids) == N and agrees(done[r.request_id], refs[(key, int(i))]), r.request_id
        assert done[r.request_id].blocks  # the whole chain it passed through, adapters included
    s = driver.stats()
    if speculate:
        assert s["hits"] > 0 and s["misses"] > 0  # both paths taken
        assert s["guesses"] >= s["hits"] + s["misses"]  # guesses of requests that ended are dropped
    else:
        assert s["guesses"] == s["hits"] == s["misses"] == 0
    # sticky KV, freed on both sides when requests end
    assert first.stats().kv_pages_used == 0 and last.stats().kv_pages_used == 0
    assert last.stats().remote_requests == 0
    if graphs:
        assert first.graphs.captures > 0 and last.graphs.captures > 0


def test_first_segment_preempted_for_pages_recomputes_on_both_sides(tiny_zoo, tiny_family, tok, refs):
    # 24 pages of 16 tokens for 2 layers: requests queue for pages and decode growth preempts
    driver, first, last = _split_pair(tiny_zoo, tiny_family, kv_pages=24, speculate=True)
    batch = [
        Request(f"{m.key}#{i}", m.key, tuple(tok(p)["input_ids"]), SamplingParams(max_new_tokens=N, ignore_eos=True))
        for m in members(tiny_family)
        for i, p in enumerate(PROMPTS)
    ]  # ignore_eos: N tokens each (speculation, page pressure), however early the model stops
    done = _run(driver, batch)
    assert driver.scheduler.preemptions > 0
    for r in batch:
        key, i = r.request_id.split("#")
        assert len(done[r.request_id].token_ids) == N and agrees(done[r.request_id], refs[(key, int(i))]), r.request_id
    assert last.stats().remote_requests == 0


def test_a_failed_hand_off_fails_its_requests_typed(tiny_zoo, tiny_family, tok):
    from concurrent.futures import Future

    from blockllm.exceptions import BlockLLMError

    first = SegmentEngine(tiny_zoo, device="cpu")
    failed = {}

    def send(address, items, hidden):
        f = Future()
        f.set_exception(ConnectionError("the next worker is gone"))
        return f

    driver = SplitDriver(first, send, lambda a, ids: None, on_error=lambda ids, e: failed.update(dict.fromkeys(ids, e)))
    key = members(tiny_family)[0].key
    first.load(key, 0, SPLIT_AT)
    driver.route(key, "gone")
    driver.add_request(Request("r1", key, tuple(tok("the")["input_ids"])))
    driver.step()
    assert isinstance(failed["r1"], BlockLLMError) and "hand-off" in str(failed["r1"])
    assert not driver.has_unfinished() and first.stats().kv_pages_used == 0


def test_speculation_keeps_sampled_tokens_identical(tiny_zoo, tiny_family, tok):
    outs = []
    for speculate in (False, True):
        driver, _, _ = _split_pair(tiny_zoo, tiny_family, speculate=speculate)
        batch = [
            Request(f"{m.key}#s", m.key, tuple(tok("the")["input_ids"]), SamplingParams(max_new_tokens=N, temperature=0.9, seed=11))
            for m in members(tiny_family)
        ]
        done = _run(driver, batch)
        outs.append({k: v.token_ids for k, v in done.items()})
    assert outs[0] == outs[1]


def test_split_driver_rejects_bad_requests_typed(tiny_zoo, tiny_family, tok):
    driver, first, _ = _split_pair(tiny_zoo, tiny_family)
    key = members(tiny_family)[0].key
    with pytest.raises(PromptTooLongError):
        driver.add_request(Request("long", key, tuple([5] * 600)))
    with pytest.raises(InvalidRequestError):
        driver.add_request(Request("bad", key, (10**6,)))
    with pytest.raises(InvalidRequestError):  # a first segment cannot also be handed rows
        first.step_remote([{"request_id": "x", "model": key, "start": 0, "n": 1}], None)
    with pytest.raises(InvalidRequestError):  # segments are [a, b) with a < b
        SegmentEngine(tiny_zoo, device="cpu").load(key, 3, 3)
    assert not driver.has_unfinished()


def _fp(i: int) -> str:
    return f"{i:064x}"


def test_placement_splits_a_chain_no_worker_can_hold_and_says_why():
    chain = tuple(_fp(i) for i in range(6))  # embed, 4 layer blocks, head
    manifests = {"p/big": Manifest("p", "big", "llama", chain, {}), "p/small": Manifest("p", "small", "llama", (_fp(0), _fp(10), _fp(5)), {})}
    sizes = {**{fp: 100 for fp in chain}, _fp(10): 100}
    plan = plan_placement(manifests, sizes, [WorkerInfo("w1", 400), WorkerInfo("w2", 400)], {"p/big": 10, "p/small": 1})
    (a, b) = plan.splits["p/big"]
    assert a.start == 0 and b.end is None and a.end == b.start and a.worker != b.worker
    assert plan.workers_for("p/big") == [a.worker]  # requests enter at the first segment
    assert plan.segments_on(a.worker) == [("p/big", 0, a.end, b.worker)]
    why = plan.explain(chain[-1], manifests)
    assert any("fits no single worker" in line for line in why)
    assert a.end in (1, 2, 3, 4) and 100 * (1 + a.end) <= 400 and 100 * (5 - a.end) <= 400  # both halves fit
    # asked for: a split at a given block boundary even where the chain fits whole
    plan = plan_placement(manifests, sizes, [WorkerInfo("w1", 10_000), WorkerInfo("w2", 10_000)], split={"p/big": 3})
    assert [(s.start, s.end) for s in plan.splits["p/big"]] == [(0, 3), (3, None)]
    assert not plan.workers_for("p/small") or "p/small" not in plan.splits
    plan = plan_placement(manifests, sizes, [WorkerInfo("w1", 10_000)], split={"p/big": 3})
    assert "p/big" in plan.unplaced  # one worker: nowhere to split to


# ------------------------------------------------------------------ on a LocalCluster
@pytest.fixture(scope="module")
def cluster_clients(tiny_zoo):
    with tenant_clients(tiny_zoo, 2) as clients:
        yield clients


def _set_speculation(dask, on: bool) -> None:
    def flip(dask_worker, on=on):
        dask_worker.extensions["blockllm-split"].driver.speculate = on

    dask.run(flip)


@pytest.mark.slow
def test_split_across_workers_matches_transformers_and_tasks_stay_flat(cluster_clients, tiny_family, tok, refs):
    from blockllm.client import GenerationRequest

    keys = [m.key for m in members(tiny_family)]
    client = cluster_clients["platform"]
    plan = client.place(keys, split={k: SPLIT_AT for k in keys})
    assert set(plan.splits) == set(keys)
    firsts = {plan.splits[k][0].worker for k in keys}
    lasts = {plan.splits[k][1].worker for k in keys}
    assert len(firsts) == len(lasts) == 1 and firsts != lasts  # shared first halves sit together
    dask = client.dask

    def transitions(dask_scheduler):
        return dask_scheduler.transition_counter

    for speculate in (False, True):
        _set_speculation(dask, speculate)
        futures = {}
        for m in members(tiny_family):
            for i, p in enumerate(PROMPTS):
                req = GenerationRequest(model=m.key, prompt_token_ids=tok(p)["input_ids"], sampling=SamplingParams(max_new_tokens=N, ignore_eos=True))
                futures[(m.key, i)] = cluster_clients[m.tenant].submit([req])[0]
        for key, f in futures.items():
            got = f.result(120)
            assert len(got.token_ids) == N and agrees(got, refs[key]), (speculate, key)
            assert got.worker in firsts
    stats = client.stats()
    split = stats[next(iter(firsts))]["split"]
    assert split["hits"] > 0 and split["steps"] > 0
    assert stats[next(iter(lasts))]["split"]["remote_requests"] == 0  # KV released downstream

    def run(n):
        before = dask.run_on_scheduler(transitions)
        client.generate(["3 + 4 =", "the"], "platform/tiny-base", SamplingParams(max_new_tokens=n, ignore_eos=True))
        return dask.run_on_scheduler(transitions) - before

    assert run(4) == run(32)  # 8x the tokens through the hand-off, not one more task
    with pytest.raises(PromptTooLongError):
        client.generate(["a b c " * 300], "platform/tiny-base")


def test_a_stale_release_does_not_drop_a_restarted_request(tiny_zoo, tiny_family):
    import torch

    key = members(tiny_family)[0].key
    last = SegmentEngine(tiny_zoo, device="cpu")
    last.load(key, SPLIT_AT)
    item = {"request_id": "r", "model": key, "start": 0, "n": 3, "samples": True, "sampling": {}, "epoch": 2}
    (tok,) = last.step_remote([item], torch.zeros(3, 128))
    assert isinstance(tok, int)
    last.release([["r", 1]])  # the release of its first start, overtaken by the restart
    assert last.stats().remote_requests == 1
    last.release([["r", 2]])
    assert last.stats().remote_requests == 0 and last.stats().kv_pages_used == 0


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sum(series: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in series.items() if n == name and all(dict(ls).get(k) == val for k, val in labels.items()))


@pytest.mark.slow
def test_split_chain_prometheus_counters_match_what_ran(cluster_clients, tiny_family, tok):
    """Bounded (~20 s): 18 greedy requests through chains split over two workers, speculation on;
    the workers' /metrics count every request's hand-offs, rows and bytes on both sides, and every
    speculative guess as a hit or a miss; the scheduler's /metrics show the same sums."""
    from blockllm.client import GenerationRequest
    from blockllm.monitoring import install

    keys = [m.key for m in members(tiny_family)]
    client = cluster_clients["platform"]
    dask = client.dask
    install(dask)
    plan = client.place(keys, split={k: SPLIT_AT for k in keys})
    _set_speculation(dask, True)
    info = dask.scheduler_info(n_workers=-1)["workers"]
    urls = {w: f"http://127.0.0.1:{info[w]['services']['dashboard']}/metrics" for w in info}
    scheduler_url = dask.dashboard_link.rsplit("/", 1)[0] + "/metrics"
    firsts = {plan.splits[k][0].worker for k in keys}
    lasts = {plan.splits[k][1].worker for k in keys}

    def counts() -> dict[str, dict]:
        return {w: _scrape(u) for w, u in urls.items()}

    before = counts()
    futures, expected = [], {k: {"tokens": 0, "rows": 0, "guesses": 0} for k in keys}
    for m in members(tiny_family):
        for p in PROMPTS:
            ids = tok(p)["input_ids"]
            req = GenerationRequest(model=m.key, prompt_token_ids=ids, sampling=SamplingParams(max_new_tokens=N, ignore_eos=True))
            futures.append(cluster_clients[m.tenant].submit([req])[0])
            expected[m.key]["tokens"] += N
            expected[m.key]["rows"] += len(ids) + N - 1  # the prompt, then every generated token but the last
            expected[m.key]["guesses"] += N - 1  # a guess at every step but the one sampling the last token
    done = [f.result(120) for f in futures]
    assert all(len(c.token_ids) == N for c in done)
    after = counts()

    def delta(name: str, workers, **labels) -> float:
        return sum(_sum(after[w], name, **labels) - _sum(before[w], name, **labels) for w in workers)

    every = list(urls)
    row_bytes = 128 * 4  # the tiny family's hidden size, float32 on the CPU
    for k in keys:
        e = expected[k]
        sent = delta("blockllm_split_handoffs_sent_total", firsts, model=k)
        # one hand-off per step of a request: its one-chunk prefill, then one per decode step
        assert sent == e["tokens"] >= N * len(PROMPTS), k
        assert delta("blockllm_split_handoffs_received_total", lasts, model=k) == sent
        assert delta("blockllm_split_handoff_rows_sent_total", firsts, model=k) == e["rows"]
        assert delta("blockllm_split_handoff_rows_received_total", lasts, model=k) == e["rows"]
        assert delta("blockllm_split_handoff_bytes_sent_total", firsts, model=k) == e["rows"] * row_bytes
        assert delta("blockllm_split_handoff_bytes_received_total", lasts, model=k) == e["rows"] * row_bytes
        assert delta("blockllm_split_handoffs_sent_total", lasts, model=k) == 0  # the last segment sends none
    messages = delta("blockllm_split_handoff_messages_sent_total", every)
    assert messages == delta("blockllm_split_handoff_messages_received_total", every) == delta("blockllm_split_steps_total", every)
    assert 0 < messages < sum(e["tokens"] for e in expected.values())  # requests share each step's message
    assert delta("blockllm_split_handoff_failures_total", every) == 0
    guesses = delta("blockllm_split_speculation_guesses_total", every)
    hits, misses = delta("blockllm_split_speculation_hits_total", every), delta("blockllm_split_speculation_misses_total", every)
    assert guesses == hits + misses == sum(e["guesses"] for e in expected.values())
    assert hits > 0 and misses > 0
    assert delta("blockllm_split_wait_seconds_total", every) > 0

    # the scheduler's /metrics: the same counters summed over the workers (the monitor polls once a second)
    want = {k: sum(_sum(after[w], "blockllm_split_handoffs_sent_total", model=k) for w in every) for k in keys}
    deadline = time.monotonic() + 15
    while True:
        ss = _scrape(scheduler_url)
        got = {k: _sum(ss, "blockllm_cluster_split_handoffs_sent", model=k) for k in keys}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == want
    assert _sum(ss, "blockllm_cluster_split_speculation_hits") == sum(_sum(after[w], "blockllm_split_speculation_hits_total") for w in every)
