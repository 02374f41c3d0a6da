"""The defaults YAML and its schema stay in sync, and Dask's config machinery reaches them."""

from __future__ import annotations

import subprocess
import sys

import jsonschema
import pytest

from blockllm import config


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def _schema_leaves(s: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in s.get("properties", {}).items():
        if v.get("type") == "object" and "properties" in v:
            out |= _schema_leaves(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def test_defaults_validate_against_schema():
    jsonschema.validate(config.DEFAULTS, config.schema())


def test_every_default_is_in_the_schema_and_back():
    assert _leaves(config.DEFAULTS) == _schema_leaves(config.schema())


def test_every_schema_entry_is_described():
    def walk(s):
        for k, v in s.get("properties", {}).items():
            if "properties" in v:
                yield from walk(v)
            else:
                yield k, v

    undocumented = [k for k, v in walk(config.schema()) if not v.get("description")]
    assert undocumented == []


def test_a_bad_value_is_rejected_by_the_schema():
    bad = {"blockllm": {"engine": {"page-size": 0}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, config.schema())


def test_environment_variables_override_defaults():
    code = "from blockllm import config; print(config.get('engine.page-size'), config.get('zoo.verify'))"
    env = {"DASK_BLOCKLLM__ENGINE__PAGE_SIZE": "32", "DASK_BLOCKLLM__ZOO__VERIFY": "False"}
    import os

    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["32", "False"]


@pytest.mark.parametrize("env, expected", [({}, config.LOST_WORKER_TIMEOUT), ({"DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "7s"}, "7s")])
def test_a_lost_worker_keeps_its_nanny_long_enough_to_restart(env, expected):
    """A LocalCluster closes a lost worker's nanny for good after distributed.deploy.lost-worker-timeout;
    BlockLLM's default (120 s, longer than a block host's 10-20 s restart) holds whichever of the two
    packages is imported first, and a configured value wins."""
    import os

    for first, then in (("blockllm.client", "distributed"), ("distributed", "blockllm.client")):
        code = f"import {first}, {then}, dask.config; print(dask.config.get('distributed.deploy.lost-worker-timeout'))"
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True)
        assert out.stdout.split() == [expected], (first, then)
