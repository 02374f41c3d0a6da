"""Shared fixtures: zoos on every backend (a live SeaweedFS for s3://), the tiny model family."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/seaweed.py, tests/zoo_suite.py

from seaweed import SeaweedS3, start_seaweed  # noqa: E402

torch.set_num_threads(min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly where there is no CUDA device (CI never has one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> SeaweedS3:
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_bucket(seaweed) -> str:
    fs = seaweed.filesystem()
    bucket = "blockllm-tests"
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return bucket


@pytest.fixture
def s3_zoo_url(seaweed, s3_bucket) -> tuple[str, dict]:
    return f"s3://{s3_bucket}/{uuid.uuid4().hex}", seaweed.storage_options


@pytest.fixture(scope="session")
def tiny_family():
    from blockllm.model_sets import build_tiny_family

    return build_tiny_family()


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory, tiny_family):
    """A file:// zoo holding the whole tiny family (tenants acme and globex)."""
    from blockllm.demo import ingest_family
    from zoo_store import Zoo

    zoo = Zoo((tmp_path_factory.mktemp("tinyzoo") / "zoo").as_uri())
    ingest_family(zoo, tiny_family)
    return zoo


@pytest.fixture(scope="session")
def tok(tiny_zoo):
    """The tiny family's tokenizer, as the engine loads it from the zoo."""
    from blockllm.chain import load_tokenizer

    return load_tokenizer(tiny_zoo, "platform/tiny-base")


def _self_pipes() -> dict[str, tuple[int, int, int]]:
    """The self-pipe sockets of the process-wide asyncio loops that zarr and fsspec run their IO on:
    if anyone closes one of those file descriptors, every later zarr or s3fs call hangs for ever."""
    pipes = {}
    try:
        from zarr.core import sync as zarr_sync

        loops = {"zarr": zarr_sync.loop[0]}
    except ImportError:
        loops = {}
    try:
        import fsspec.asyn

        loops["fsspec"] = fsspec.asyn.loop[0]
    except (ImportError, AttributeError):
        pass
    for name, loop in loops.items():
        if loop is None or loop.is_closed():
            continue
        for end in ("_ssock", "_csock"):
            sock = getattr(loop, end, None)
            if sock is None or sock.fileno() < 0:
                continue
            try:
                st = os.fstat(sock.fileno())
                pipes[f"{name}{end}"] = (sock.fileno(), st.st_dev, st.st_ino)
            except OSError:
                pipes[f"{name}{end}"] = (sock.fileno(), -1, -1)
    return pipes


@pytest.fixture(autouse=True)
def _io_loops_intact():
    """Fail the test that closes a file descriptor it does not own out from under zarr's or
    fsspec's IO loop (found as a hang in a later test, minutes after the real culprit)."""
    before = _self_pipes()
    yield
    after = _self_pipes()
    broken = {k: (before[k], after.get(k)) for k in before if after.get(k) != before[k]}
    if broken:
        pytest.fail(f"this test closed or replaced the self-pipe of a process-wide IO loop: {broken}")
