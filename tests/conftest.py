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
