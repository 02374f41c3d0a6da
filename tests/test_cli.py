"""The `blockllm` command line, run as a user would (a subprocess of the installed script)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import zarr

from zoo_store import Zoo


def blockllm(*args: str, zoo: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("blockllm")
    assert exe, "the blockllm console script is not installed (pip install -e .)"
    env = {**os.environ, "COLUMNS": "200"}
    if zoo:
        env["BLOCKLLM_ZOO"] = zoo
    out = subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"blockllm {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def test_help_lists_the_commands():
    out = blockllm("--help").stdout
    for cmd in ("zoo", "demo"):
        assert cmd in out
    zoo_help = blockllm("zoo", "--help").stdout
    for cmd in ("ingest", "ls", "stats", "verify", "rm", "gc"):
        assert cmd in zoo_help


def test_ingest_ls_stats_verify_rm(tmp_path, tiny_family):
    url = (tmp_path / "zoo").as_uri()
    out = blockllm("zoo", "ingest", str(tiny_family.base), "--tenant", "platform", "--name", "base", "--shared", zoo=url)
    assert "ingested platform/base" in out.stdout
    out = blockllm("zoo", "ingest", str(tiny_family.partial_a), "--tenant", "acme", "--name", "pa", zoo=url)
    assert "1 new" in out.stdout
    blockllm("zoo", "ingest", str(tiny_family.lora_a), "--tenant", "acme", "--name", "la", "--base", "platform/base", zoo=url)
    listing = blockllm("zoo", "ls", zoo=url).stdout
    assert "platform/base" in listing and "acme/pa" in listing and "acme/la" in listing
    stats = blockllm("zoo", "stats", zoo=url).stdout
    assert "3 models" in stats and "dedup" in stats
    assert "ok" in blockllm("zoo", "verify", zoo=url).stdout

    zoo = Zoo(url)
    victim = zoo.get_manifest("acme", "pa").chain[-2]
    name = zoo.block_spec(victim).tensors[0].name
    arr = zarr.open_array(zoo._store, path=f"blocks/{victim}/{name}", mode="a")
    data = arr[...]
    data.view(np.uint8).reshape(-1)[3] ^= 1
    arr[...] = data
    bad = blockllm("zoo", "verify", zoo=url, check=False)
    assert bad.returncode == 1 and victim in bad.stdout

    out = blockllm("zoo", "rm", "acme/pa", "--gc", zoo=url)
    assert "collected 1 blocks" in out.stdout
    assert "ok" in blockllm("zoo", "verify", zoo=url).stdout


def test_typed_errors_exit_cleanly(tmp_path):
    url = (tmp_path / "zoo").as_uri()
    out = blockllm("zoo", "ingest", str(tmp_path), "--tenant", "acme", "--name", "x", zoo=url, check=False)
    assert out.returncode == 2
    assert "CheckpointError" in out.stderr and "config.json" in out.stderr
    assert "Traceback" not in out.stderr
    out = blockllm("zoo", "rm", "acme/nothing", zoo=url, check=False)
    assert out.returncode == 2 and "ModelNotFoundError" in out.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, tiny_family):
    out = blockllm("demo", zoo=(tmp_path / "zoo").as_uri()).stdout
    assert "dedup" in out
    for key in ("platform/tiny-base", "acme/tiny-partial-a", "globex/tiny-partial-b", "acme/tiny-full", "globex/tiny-lora-a", "acme/tiny-lora-b"):
        assert key in out
