"""The multi-tenant benchmark harness (cpu preset): every system replays the trace and reports."""

from __future__ import annotations

import json

import pytest

from benchmarks import multitenant


@pytest.mark.slow
def test_cpu_preset_runs_all_four_systems(tmp_path):
    result = multitenant.Bench("cpu", tmp_path, profile=True).run(["blockllm", "per_model", "lora_only", "transformers"])
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
