"""Prometheus metrics: the recorder and collectors, then blockllm_* series scraped from a live cluster."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blockllm.metrics import (
    Histogram,
    HostMetrics,
    SchedulerCollector,
    WorkerCollector,
    engine_view,
    percentile,
)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def total(series: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in series.items() if n == name and all(dict(ls).get(k) == val for k, val in labels.items()))


def test_histogram_and_percentiles():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.counts == [2, 1, 1] and h.count == 4 and h.sum == pytest.approx(3.65)
    assert h.cumulative() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    h.merge(Histogram.from_dict(h.to_dict()))
    assert h.count == 8
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 95) == pytest.approx(1.95)


def test_host_metrics_records_requests_tokens_latencies_and_steps():
    now = [1000.0]
    m = HostMetrics(clock=lambda: now[0])
    m.admitted("acme/a", "acme", prompt_tokens=5)
    m.rejected("globex/b", "acme", "ForbiddenError")
    now[0] += 2
    m.step(0.01, batch=3)
    m.finished("acme/a", "acme", n_tokens=5, ttft=0.2, latency=1.0, finish_reason="length", substituted=1)
    s = m.snapshot()
    assert ["acme/a", "acme", "finished", 1] in s["requests"] and ["globex/b", "acme", "rejected:ForbiddenError", 1] in s["requests"]
    assert s["tokens"] == [["acme/a", "acme", 5]] and s["substitutions"] == {"acme/a": 1} and s["steps"] == 1
    w = s["window"]
    assert w["arrivals"] == 1 and w["finished"] == 1 and w["tokens"] == 5 and w["tenants"] == ["acme"]
    assert w["ttft"] == [0.2] and w["latency"] == [1.0] and w["tpot"] == [pytest.approx(0.2)]  # (1.0 - 0.2) / 4
    now[0] += 120  # the window forgets, the counters do not
    s = m.snapshot()
    assert s["window"]["finished"] == 0 and s["ttft"]["acme/a"]["count"] == 1


def test_engine_view_reads_what_the_engine_offers():
    v = engine_view({"weight_bytes": 10, "kv_pages_used": 2, "kv_pages_total": 8, "blocks": [{"fingerprint": "ab", "bytes": 4, "batch_size": 3, "queue_depth": 1}]})
    assert (v["weight_bytes"], v["kv_used"], v["kv_total"]) == (10, 2, 8)
    assert v["blocks"] == [{"fingerprint": "ab", "bytes": 4, "batch": 3.0, "queue": 1.0}]
    assert engine_view(None)["blocks"] == [] and engine_view({"blocks": {"cd": 7}})["blocks"][0]["bytes"] == 7
    v = engine_view({"last_batch": {"ab": 5}, "block_queue": {"ab": 2, "cd": 1}})  # EngineStats style
    assert {b["fingerprint"]: (b["batch"], b["queue"]) for b in v["blocks"]} == {"ab": (5.0, 2.0), "cd": (None, 1.0)}


def test_collectors_export_blockllm_series():
    m = HostMetrics()
    m.admitted("acme/a", "acme")
    m.step(0.02, batch=2)
    m.finished("acme/a", "acme", n_tokens=4, ttft=0.1, latency=0.4, finish_reason="length")
    view = {
        "host": True, "models": ["acme/a"], "running": 1, "waiting": 0,
        "engine": {"weight_bytes": 1000, "kv_used": 3, "kv_total": 64},
        "blocks": [{"fingerprint": "f" * 64, "kind": "layers", "bytes": 1000, "batch": 2, "queue": 0}],
        "metrics": m.snapshot(),
    }
    registry = CollectorRegistry()
    registry.register(WorkerCollector(lambda: [view, view]))  # two hosts in one process add up
    s = samples(generate_latest(registry).decode())
    assert total(s, "blockllm_requests_total", outcome="finished") == 2
    assert total(s, "blockllm_generated_tokens_total") == 8
    assert total(s, "blockllm_time_to_first_token_seconds_count") == 2
    assert total(s, "blockllm_weight_bytes") == 2000 and total(s, "blockllm_kv_pages_total") == 128
    assert total(s, "blockllm_engine_batch_size_sum") == 4 and total(s, "blockllm_blocks_loaded") == 2

    registry = CollectorRegistry()
    registry.register(SchedulerCollector(lambda: {
        "workers": {"a": {"host": True}}, "replicas": {"f" * 64: 2}, "model_replicas": {"acme/a": 1},
        "totals": {"weight_bytes": 5, "request_rate": 1.5}, "finished": {("acme/a", "acme"): 3},
        "percentiles": {"ttft": {"0.50": 0.1, "0.95": None}}, "polls": 4,
    }))
    s = samples(generate_latest(registry).decode())
    assert total(s, "blockllm_workers") == 1 and total(s, "blockllm_block_replicas") == 2
    assert total(s, "blockllm_cluster_requests", model="acme/a") == 3 and total(s, "blockllm_cluster_request_rate") == 1.5
    assert total(s, "blockllm_cluster_latency_seconds", kind="ttft", quantile="0.50") == 0.1


@pytest.mark.slow
def test_metrics_endpoints_of_a_live_cluster(tiny_zoo):
    import distributed

    from blockllm.auth import create_key
    from blockllm.client import Client
    from blockllm.monitoring import install
    from blockllm.types import SamplingParams

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1") as cluster:
        with distributed.Client(cluster) as dask:
            dask.wait_for_workers(1, timeout=120)
            install(dask)
            client = Client(dask, api_key=create_key(tiny_zoo, "acme"), zoo=tiny_zoo.url)
            client.place(["acme/tiny-full"])
            done = client.generate(["3 + 4 =", "the", "reverse: a b ->"], "acme/tiny-full", SamplingParams(max_new_tokens=5, ignore_eos=True))
            assert all(len(c.token_ids) == 5 for c in done)
            (worker,) = dask.scheduler_info(n_workers=-1)["workers"].values()
            worker_url = f"http://127.0.0.1:{worker['services']['dashboard']}/metrics"
            scheduler_url = dask.dashboard_link.rsplit("/", 1)[0] + "/metrics"
            deadline = time.monotonic() + 30
            while True:  # the monitor polls once a second
                ws, ss = samples(fetch(worker_url)), samples(fetch(scheduler_url))
                if total(ss, "blockllm_cluster_requests") >= 3 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
    # the worker's own /metrics
    assert total(ws, "blockllm_requests_total", model="acme/tiny-full", tenant="acme", outcome="finished") == 3
    assert total(ws, "blockllm_generated_tokens_total", model="acme/tiny-full", tenant="acme") == 15
    assert total(ws, "blockllm_time_to_first_token_seconds_count") == 3 and total(ws, "blockllm_time_to_first_token_seconds_sum") > 0
    assert total(ws, "blockllm_request_latency_seconds_sum") > 0 and total(ws, "blockllm_time_per_output_token_seconds_count") == 3
    assert total(ws, "blockllm_engine_steps_total") >= 5 and total(ws, "blockllm_engine_batch_size_count") > 0
    assert total(ws, "blockllm_weight_bytes") > 0 and total(ws, "blockllm_blocks_loaded") > 0 and total(ws, "blockllm_models_loaded") >= 1
    assert ("blockllm_kv_pages_total", ()) in ws
    assert total(ws, "dask_worker_threads") == 1  # distributed's own series are still there
    # the scheduler's /metrics
    assert total(ss, "blockllm_workers") == 1 and total(ss, "blockllm_cluster_weight_bytes") > 0
    assert total(ss, "blockllm_cluster_requests", model="acme/tiny-full", tenant="acme") == 3
    assert total(ss, "blockllm_block_replicas") > 0 and total(ss, "blockllm_model_replicas", model="acme/tiny-full") == 1
    assert total(ss, "blockllm_cluster_latency_seconds", kind="latency", quantile="0.50") > 0
    assert total(ss, "dask_scheduler_workers") >= 1


def test_public_model_strips_the_substituted_chain_suffix():
    from blockllm.monitoring.worker import public_model

    assert public_model("acme/bot.sub-0123456789") == "acme/bot" and public_model("acme/bot") == "acme/bot"
