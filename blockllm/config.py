"""BlockLLM configuration (re-exported from zoo_store.config, where the defaults are loaded)."""

from zoo_store.config import DEFAULTS, LOST_WORKER_TIMEOUT, cache_dir, default_zoo_url, get, schema

__all__ = ["DEFAULTS", "LOST_WORKER_TIMEOUT", "cache_dir", "default_zoo_url", "get", "schema"]
