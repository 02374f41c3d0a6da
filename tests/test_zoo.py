"""The zoo suite on every backend: file://, memory:// and a live SeaweedFS S3 server."""

from __future__ import annotations

import uuid

import pytest
from zoo_suite import ZooTests

from zoo_store import MissingBackendError, UnsupportedURLError, Zoo


class TestFileZoo(ZooTests):
    def make_zoo(self, request):
        tmp = request.getfixturevalue("tmp_path")
        return Zoo((tmp / "zoo").as_uri())


class TestMemoryZoo(ZooTests):
    def make_zoo(self, request):
        return Zoo(f"memory://zoo-{uuid.uuid4().hex}")


@pytest.mark.s3
class TestS3Zoo(ZooTests):
    def make_zoo(self, request):
        url, self.storage_options = request.getfixturevalue("s3_zoo_url")
        return Zoo(url, storage_options=self.storage_options)


def test_unknown_scheme_is_refused():
    with pytest.raises(UnsupportedURLError, match="file://, memory:// or s3://"):
        Zoo("ftp://example/zoo")


def test_missing_s3fs_names_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "s3fs" else real(name, *a))
    with pytest.raises(MissingBackendError, match=r"blockllm\[s3\]"):
        Zoo("s3://bucket/zoo")


def test_default_zoo_url_follows_dask_config(tmp_path, monkeypatch):
    import dask.config

    with dask.config.set({"blockllm.zoo.url": (tmp_path / "z").as_uri()}):
        assert Zoo().url == (tmp_path / "z").as_uri()
