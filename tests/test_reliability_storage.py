"""Storage faults on real stores: a flipped byte is detected and never served (zoo, engine, block
host; file:// and SeaweedFS S3); SeaweedFS stopped and restarted while blocks load (bounded retries,
then success or ZooUnavailableError); an ingest SIGKILLed at several points never leaves a visible
half model; garbage collection never deletes a referenced block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic_zoo import add_model, random_state, tiny_config

from blockllm.exceptions import UnknownModelError
from blockllm.types import Request, SamplingParams
from zoo_store import BlockSpec, Manifest, TensorSpec, Zoo, ZooCorruptionError, ZooUnavailableError

# botocore retries a refused connection itself for ~5 s; one try each keeps the test short and
# leaves the retrying to the zoo (blockllm.zoo.retry).
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}


def _flip_a_byte(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def _largest_chunk(root: Path, fp: str) -> Path:
    files = [p for p in (root / "blocks" / fp).rglob("*") if p.is_file() and "c" in p.relative_to(root / "blocks" / fp).parts]
    return max(files, key=lambda p: p.stat().st_size)


def _greedy(zoo: Zoo, model: str, n: int = 6) -> list[int]:
    from blockllm.engine import Engine

    engine = Engine(zoo, device="cpu", dtype="float32")
    engine.load(model)
    (out,) = engine.generate([Request("r", model, (1, 2, 3, 4), SamplingParams(max_new_tokens=n, ignore_eos=True))])
    return list(out.token_ids)


# ------------------------------------------------------------------ flipped bytes
def test_a_flipped_byte_on_disk_is_never_served(tmp_path, tiny_family):
    from blockllm.ingest import ingest
    from blockllm.serving.host import BlockHost

    root = tmp_path / "zoo"
    zoo = Zoo(root.as_uri())
    manifest = ingest(zoo, tiny_family.base, tenant="platform", name="tiny-base", visibility="shared").manifest
    victim = manifest.chain[1]
    chunk = _largest_chunk(root, victim)
    chunk.write_bytes(_flip_a_byte(chunk.read_bytes()))

    fresh = Zoo(root.as_uri(), read_only=True)
    with pytest.raises(ZooCorruptionError) as e:
        fresh.get_block(victim)
    assert e.value.fingerprint == victim
    assert set(fresh.verify()) == {victim}
    with pytest.raises(ZooCorruptionError):  # the engine refuses to load the model
        _greedy(fresh, "platform/tiny-base")

    host = BlockHost(root.as_uri())  # and so does a block host: placement fails, typed
    host.start(_loop_thread())
    try:
        with pytest.raises(ZooCorruptionError):
            host.load(["platform/tiny-base"])
        assert host.loaded == set()
        from blockllm.auth import create_key

        key = create_key(zoo, "platform")
        (err,) = host.submit([{"request_id": "x", "model": "platform/tiny-base", "prompt_token_ids": [1, 2], "api_key": key}])
        assert err["type"] == UnknownModelError.__name__  # nothing of the model is served
    finally:
        host.stop()


@pytest.mark.s3
def test_a_flipped_byte_in_s3_is_never_served(s3_zoo_url):
    url, options = s3_zoo_url
    zoo = Zoo(url, storage_options=options)
    cfg = tiny_config()
    manifest = add_model(zoo, "acme", "m", cfg, random_state(cfg, 0))
    victim = manifest.chain[2]
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    prefix = url.removeprefix("s3://")
    chunks = [p for p in fs.find(f"{prefix}/blocks/{victim}") if "/c/" in p]
    target = max(chunks, key=lambda p: fs.info(p)["size"])
    fs.pipe(target, _flip_a_byte(fs.cat(target)))
    fresh = Zoo(url, storage_options=options, read_only=True)
    with pytest.raises(ZooCorruptionError):
        fresh.get_block(victim)
    with pytest.raises(ZooCorruptionError):
        _greedy(fresh, "acme/m")
    assert set(fresh.verify()) == {victim}


def _loop_thread():
    import asyncio

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return loop


# ------------------------------------------------------------------ the object store goes away
@pytest.mark.slow
@pytest.mark.s3
def test_seaweedfs_restarted_while_blocks_load_then_stopped_for_good(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="zoo_store.retry")
    from seaweed import start_seaweed

    server = start_seaweed(tmp_path / "weed")
    try:
        server.filesystem().mkdir("restart")
        options = {**server.storage_options, **FAST_FAIL}
        url = "s3://restart/zoo"
        cfg = tiny_config(hidden=32, layers=6)
        add_model(Zoo(url, storage_options=options), "acme", "m", cfg, random_state(cfg, 1))
        expected = _greedy(Zoo(url, storage_options=options, read_only=True), "acme/m")

        zoo = Zoo(url, storage_options=options, read_only=True)
        manifest = zoo.get_manifest("acme", "m")
        loaded: dict[str, object] = {}

        def load() -> None:  # block by block, as the engine does, with the server going away
            try:
                for fp in manifest.chain:
                    zoo.get_block(fp)
                    time.sleep(0.2)
                loaded["greedy"] = _greedy(zoo, "acme/m")
            except Exception as e:  # reported below
                loaded["error"] = e

        with dask.config.set({"blockllm.zoo.retry.attempts": 20, "blockllm.zoo.retry.max-backoff": 2.0}):
            t = threading.Thread(target=load)
            t.start()
            time.sleep(0.3)
            server.stop(grace=0)  # SIGKILL: the store vanishes mid-read
            time.sleep(2.0)
            server.restart()
            t.join(120)
        assert not t.is_alive()
        assert loaded.get("greedy") == expected, loaded.get("error")
        assert any("unreachable" in r.getMessage() for r in caplog.records)  # the load did meet the outage

        server.stop(grace=0)  # now for good: a typed error after bounded tries, never a hang
        gone = Zoo(url, storage_options=options, read_only=True)
        started = time.monotonic()
        with dask.config.set({"blockllm.zoo.retry.attempts": 3, "blockllm.zoo.retry.backoff": 0.1, "blockllm.zoo.retry.deadline": 20}):
            with pytest.raises(ZooUnavailableError, match="did not answer"):
                gone.get_block(manifest.chain[0])
        assert time.monotonic() - started < 60  # bounded (3 tries), not a hang
    finally:
        server.stop()


# ------------------------------------------------------------------ an ingest killed midway
INGEST = "import sys; from blockllm.ingest import ingest; from zoo_store import Zoo; ingest(Zoo(sys.argv[1]), sys.argv[2], tenant='acme', name='victim')"


@pytest.mark.slow
def test_an_ingest_killed_at_several_points_never_leaves_a_visible_half_model(tmp_path, tiny_family):
    root = tmp_path / "zoo"
    url = root.as_uri()
    Zoo(url)  # the groups exist, so progress can be watched
    env = {**os.environ, "DASK_BLOCKLLM__ZOO__CHUNK_BYTES": "4096"}  # many small writes: a slow ingest to hit
    outcomes = []
    for kill_after in (1, 4, 6):  # block folders begun before the SIGKILL
        proc = subprocess.Popen([sys.executable, "-c", INGEST, url, str(tiny_family.base)], env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list((root / "blocks").iterdir())) >= kill_after:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        zoo = Zoo(url, read_only=True)
        visible = [m.key for m in zoo.list_models()]
        outcomes.append((kill_after, proc.returncode, len(zoo.list_blocks()), len(zoo.list_blocks(include_incomplete=True)), visible))
        assert zoo.verify() == {}  # every visible block hashes right; half-written ones are invisible
        for key in visible:  # a model that is visible is whole
            m = zoo.get_manifest(*key.split("/"))
            assert all(zoo.has_block(fp) for fp in m.chain)
    print("\ningest kills (after n block folders, rc, complete blocks, block folders, models):", outcomes)
    assert any(o[1] == -signal.SIGKILL and not o[4] for o in outcomes)  # at least one was caught midway

    from blockllm.ingest import ingest  # and a new run over the debris completes

    zoo = Zoo(url)
    if not zoo.has_model("acme", "victim"):
        ingest(zoo, tiny_family.base, tenant="acme", name="victim")
    assert zoo.verify() == {}
    assert _greedy(zoo, "acme/victim")


# ------------------------------------------------------------------ garbage collection
def _block(i: int) -> tuple[BlockSpec, dict[str, torch.Tensor]]:
    spec = BlockSpec("layers", "llama", {"hidden_size": 2}, i, i + 1, (TensorSpec("w", (2, 2), "float32"),))
    return spec, {"w": torch.full((2, 2), float(i))}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    models=st.lists(st.sets(st.integers(0, 9), min_size=1, max_size=5), min_size=1, max_size=5),
    removed=st.sets(st.integers(0, 4)),
    extra=st.sets(st.integers(10, 13)),
)
def test_gc_never_deletes_a_referenced_block(models, removed, extra):
    import uuid

    zoo = Zoo(f"memory://gc-{uuid.uuid4().hex}")
    fps = {}
    for i in set().union(*models) | extra:
        spec, tensors = _block(i)
        fps[i] = zoo.put_block(spec, tensors)
    for k, blocks in enumerate(models):
        zoo.put_manifest(Manifest("acme", f"m{k}", "llama", tuple(fps[i] for i in sorted(blocks)), {}))
    for k in removed & set(range(len(models))):
        zoo.delete_model("acme", f"m{k}")
    kept = [blocks for k, blocks in enumerate(models) if k not in removed]
    referenced = {fps[i] for blocks in kept for i in blocks}

    young = zoo.gc(grace_seconds=3600)  # an ingest may be under way: nothing young goes
    assert young.deleted_blocks == ()
    report = zoo.gc(grace_seconds=0)
    assert not set(report.deleted_blocks) & referenced
    assert set(report.deleted_blocks) == set(fps.values()) - referenced
    for fp in referenced:
        zoo.get_block(fp, verify=True)
    assert zoo.verify() == {}
