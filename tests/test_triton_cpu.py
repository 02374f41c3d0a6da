"""The Triton kernels without a GPU: Triton's interpreter runs them on CPU tensors (a subprocess with
TRITON_INTERPRET=1, read when triton is imported), against the torch ops and transformers' tokens;
and Triton compiles them for Hopper (sm_90), where their registers and spills show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reference import greedy, reference_model

from blockllm.demo import members

pytest.importorskip("triton")  # a test extra on Linux x86_64 (pyproject); CI has it

PROMPTS = ["3 + 4 =", "reverse: a b c d e f g ->", "the"]
N = 3


def _interpret(what: dict, timeout: int = 600) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("triton_checks.py")
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(what)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_row_bucket_gemv_kernels_match_torch_ops():
    """gemv (plain, + residual, + RMSNorm), qkv_rope_kv and gate_up_silu on 1-16 rows, with the GPU
    tiles and the interpreter's wide ones, against rms_norm -> F.linear -> rope/KV write or SwiGLU."""
    errs = _interpret({"kernels": True})["kernels"]
    kinds = {k.split("/")[0] for k in errs}
    assert kinds == {"gemv", "residual", "norm", "qkv_q", "qkv_k", "qkv_v", "gate_up_silu"}
    for case, err in errs.items():
        tol = 1e-5 if "float32" in case else 3e-3  # fp16: a few roundings of 2^-11 on the way
        assert err <= tol, (case, err)


def test_engine_with_fused_gemvs_matches_transformers(tiny_zoo, tiny_family, tok):
    """Every tiny-family member (partial, full, LoRA) with GEMVs of up to 16 rows fused with the norm
    before and rope + KV write / SwiGLU after them, alone and in one mixed batch: the same greedy
    tokens as transformers, and the fused kernels really ran (LoRA rows take the unfused path)."""
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    got = _interpret({"engine": {"zoo": tiny_zoo.url, "prompts": ids, "n": N}})["engine"]
    assert all(n > 0 for n in got["calls"].values()), got["calls"]
    ms = members(tiny_family)
    for case in (*got["alone"], *got["mixed"]):
        key, i = case.split("|")
        model = reference_model(next(m for m in ms if m.key == key), tiny_family)
        want = greedy(model, ids[int(i)], N, tok.pad_token_id)
        for part in ("alone", "mixed"):
            if case in got[part]:
                assert got[part][case] == want, (part, case)
    assert len(got["mixed"]) == len(ms) * 2


def test_gpu_tiles_compile_for_hopper_without_spills():
    """Every row-bucket kernel on every GPU tile (1-16 rows, with and without the norm prologue)
    compiles for sm_90 and fits in registers: no local-memory spills, no stack, <= 255 registers
    (what the interpreter cannot tell: tl.dot shapes, layouts, register pressure)."""
    from triton_checks import ROWS, hopper_resources

    res = hopper_resources()
    assert len(res) == 3 * 2 * len(ROWS)
    for name, r in res.items():
        assert r["LOCAL"] == 0 and r["STACK"] == 0 and 0 < r["REG"] <= 255, (name, r)
