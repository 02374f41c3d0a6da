"""BlockLLM configuration: defaults from blockllm.yaml merged into dask.config, and common paths.

It lives in zoo_store, the lowest package, so every package reads one config without importing
upward; `blockllm.config` re-exports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.config
import yaml

DEFAULTS_FILE = Path(__file__).with_name("blockllm.yaml")
SCHEMA_FILE = Path(__file__).with_name("blockllm-schema.yaml")

with open(DEFAULTS_FILE) as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(DEFAULTS)

# A LocalCluster (any SpecCluster) closes a worker's nanny for good when no worker of that name has
# registered again within `distributed.deploy.lost-worker-timeout` of its loss (15 s by default). A
# block host's worker takes 10-20 s to come back on a busy 2-core machine (torch, transformers, the
# plugins), so a crashed worker that its nanny was restarting lost its slot in the cluster for good.
# A default only: a value the user configured wins (update_defaults keeps it). distributed is
# imported first: importing it later would lay its own default over this one.
import distributed  # noqa: E402,F401

LOST_WORKER_TIMEOUT = "120s"
dask.config.update_defaults({"distributed": {"deploy": {"lost-worker-timeout": LOST_WORKER_TIMEOUT}}})


def get(key: str, default: Any = None) -> Any:
    """`dask.config.get("blockllm.<key>")`, so DASK_BLOCKLLM__... variables and YAML apply."""
    return dask.config.get(f"blockllm.{key}", default=default)


def schema() -> dict[str, Any]:
    with open(SCHEMA_FILE) as f:
        return yaml.safe_load(f)


def cache_dir() -> Path:
    """Where model sets, downloaded wheels and the default zoo live."""
    configured = get("cache-dir") or os.environ.get("BLOCKLLM_CACHE")
    if configured:
        path = Path(configured).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("blockllm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_zoo_url() -> str:
    url = get("zoo.url") or os.environ.get("BLOCKLLM_ZOO")
    return url or (cache_dir() / "zoo").as_uri()
