"""The multi-tenant benchmark harness (cpu preset): every system replays the trace and reports."""

from __future__ import annotations

import json

import pytest

from benchmarks import multitenant


@pytest.mark.slow
def test_cpu_preset_runs_all_four_systems(tmp_path):
    result = multitenant.Bench("cpu", tmp_path, profile="device").run(["blockllm", "per_model", "lora_only", "transformers"])
    saved = json.loads((tmp_path / "multitenant-cpu.json").read_text())
    assert saved["device"] and saved["versions"]["torch"] and saved["seed"] == 0
    systems = saved["systems"]
    assert set(systems) == {"blockllm", "per_model", "lora_only", "transformers"}
    for name, sr in systems.items():
        for rate, s in sr["rates"].items():
            # a loaded CI box may leave a few past the deadline: they are counted, never dropped
            assert s["completed"] > 0 and s["completed"] + s["unfinished"] == s["requests"], (name, rate)
            assert s["tokens"] > 0 and s["throughput_tok_s"] > 0
            assert s["e2e_s"]["p50"] <= s["e2e_s"]["p95"] <= s["e2e_s"]["p99"]
            assert 0 < s["ttft_s"]["p50"] <= s["e2e_s"]["p99"]
            assert len(s["e2e_sorted_s"]) == s["requests"]
    # every rate of the sweep ran for the engine-side systems, on the same trace
    for name in ("blockllm", "per_model", "lora_only"):
        assert [systems[name]["rates"][r]["requests"] for r in map(str, multitenant.PRESETS["cpu"].rates)] == list(saved["traces"].values())
    # BlockLLM holds each distinct block once; per-model serving holds fewer models than it serves and reloads
    assert result["ratios"]["gpu_weight_bytes_over_distinct"] == pytest.approx(1.0)
    pm = systems["per_model"]
    assert pm["slots"] < len(saved["model_set"]["variants"])
    assert sum(s["reloads"] for s in pm["rates"].values()) > 0
    assert all(s["h2d_bytes"] == s["reloads"] * saved["model_set"]["model_bytes"] for s in pm["rates"].values())
    assert systems["per_model"]["profile"]["by_cpu"]  # the profiled extra replay left its tables
    assert set(result["ratios"][str(multitenant.PRESETS["cpu"].rates[0])]) == {"per_model", "lora_only"}
    assert (tmp_path / "multitenant-cpu.png").stat().st_size > 0


@pytest.mark.slow
def test_the_engine_alone_can_be_measured_again_later_in_the_same_process(tmp_path):
    """`--systems blockllm_direct,per_model,blockllm_direct,per_model@...`: the later run is kept beside
    the first (how an order effect is checked), a run under other engine settings gets its own row
    with the settings, and the ratios stay those of the first."""
    spec = "per_model@overlap-scheduling=false;split-mixed-steps=false"
    result = multitenant.Bench("cpu", tmp_path, profile="host").run(["blockllm_direct", "per_model", "blockllm_direct", spec])
    systems = result["systems"]
    assert list(systems) == ["blockllm_direct", "per_model", "blockllm_direct_2", spec]
    # --profile host: cProfile's view of the engine loop; every run says how long the host waited on steps
    prof = systems["blockllm_direct"]["profile"]
    assert prof["kind"] == "host" and prof["steps"] > 0 and 0 <= prof["host_wait_s"] < prof["window_s"]
    assert any(r["fn"].endswith(":step") for r in prof["by_cum"]), prof["by_cum"]
    for s in systems["blockllm_direct"]["rates"].values():
        assert 0 < s["host_wait_s"] < s["makespan_s"]
    assert systems[spec]["engine_settings"] == {"blockllm.engine.overlap-scheduling": False, "blockllm.engine.split-mixed-steps": False}
    with pytest.raises(SystemExit, match="key=value"):
        multitenant.engine_overrides("overlap-scheduling")
    with pytest.raises(SystemExit, match="sets these for every system"):  # engine arguments the benchmark passes itself
        multitenant.Bench("cpu", tmp_path).run(["blockllm_direct@max-batch-size=8"])
    refused = tmp_path / "refused"
    with pytest.raises(SystemExit, match="blockllm_direct and per_model only"):  # checked before per_model runs
        multitenant.Bench("cpu", refused).run(["per_model", "lora_only@overlap-scheduling=false"])
    assert not list(refused.glob("*.json"))
    for name in ("blockllm_direct", "blockllm_direct_2", spec):
        assert [s["requests"] for s in systems[name]["rates"].values()] == list(result["traces"].values())
    rate = str(multitenant.PRESETS["cpu"].rates[0])
    first, pm = systems["blockllm_direct"]["rates"][rate], systems["per_model"]["rates"][rate]
    assert result["ratios"]["blockllm_row"] == "blockllm_direct"
    assert result["ratios"][rate]["per_model"]["p95_ratio"] == pytest.approx(first["e2e_s"]["p95"] / pm["e2e_s"]["p95"])


def test_prefill_probe_reports_each_prompt_mix(tmp_path):
    from benchmarks import prefill_probe

    prefill_probe.main(["--preset", "cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "prefill_probe-cpu.json").read_text())
    rows = saved["rows"]
    assert [(r["prompts"], r["running_decodes"]) for r in rows] == [(n, d) for n, _, d in prefill_probe.MIXES]
    for r in rows:
        assert r["wall_ms_median"] > 0 and len(r["wall_ms_all"]) == 4 and r["steps"] >= 1
        assert r["top_cpu_ops"]  # the profiled rep's host ops (no kernels on a CPU)


@pytest.mark.slow
def test_blockllm_on_two_workers_is_placed_by_popularity_and_serves_every_request(tmp_path):
    """`blockllm_w2`: the serving stack on two worker processes (one GPU each on CUDA; here both
    share the CPUs): placement by the trace's Zipf popularity spreads the models over both, every
    worker holds weights, and the replay finishes its requests on them."""
    bench = multitenant.Bench("cpu", tmp_path)
    result = bench.run(["blockllm_w2"])
    sr = result["systems"]["blockllm_w2"]
    placement = sr["placement"]
    assert placement["workers"] == 2 and not placement["unplaced"]
    assert all(b > 0 for b in placement["weight_bytes_per_worker"])
    # every model placed, on both workers between them (no model's share of a Zipf trace over 16 is
    # high enough for a replica at 2 workers: placement.replicate_above)
    assert set(placement["replicas"]) == set(bench.popularity())
    assert min(placement["models_per_worker"]) > 0 and sum(placement["models_per_worker"]) >= len(bench.popularity())
    for rate, s in sr["rates"].items():
        assert s["completed"] > 0 and s["completed"] + s["unfinished"] == s["requests"], rate
    with pytest.raises(SystemExit, match="unknown system"):
        multitenant.Bench("cpu", tmp_path).run(["blockllm_w0"])


@pytest.mark.slow
def test_per_model_serving_on_two_workers_splits_the_variants_and_merges_one_run(tmp_path):
    """`per_model_w2`: each worker serves every other variant by popularity, per-model, from its own
    slots; both replay their share of each rate's trace from one start, and the merged row counts
    every request of the trace once. The workers run under this run's settings (here a batch limit
    of 8 against the preset's 64), not the ones their own processes import."""
    from dataclasses import replace

    bench = multitenant.Bench("cpu", tmp_path, preset=replace(multitenant.PRESETS["cpu"], max_batch=8))
    result = bench.run(["per_model_w2"])
    sr = result["systems"]["per_model_w2"]
    assert sr["max_batch_size"] == [8, 8]
    assert sr["workers"] == 2 and sum(sr["variants_per_worker"]) == len(bench.order)
    assert all(n >= 1 for n in sr["slots"]) and sr["weight_bytes_gpu"] > 0
    for rate, s in sr["rates"].items():
        assert s["requests"] == result["traces"][rate], rate  # each request once, from one of the workers
        assert s["completed"] > 0 and s["completed"] + s["unfinished"] == s["requests"], rate
        assert s["throughput_tok_s"] > 0


def test_scale_out_cluster_gives_each_worker_its_own_gpu():
    """serving_cluster(gpus=True): one nanny-started worker process per GPU, each seeing only its own
    (CUDA_VISIBLE_DEVICES 0, 1, ...), so every block host's "cuda" is a different GPU. The variable
    is checked here on the CPU; on a GPU machine it is what selects the device."""
    import os

    import distributed

    from benchmarks.mt_systems import serving_cluster

    with serving_cluster(2, gpus=True) as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["0", "1"], seen
