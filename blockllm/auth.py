"""Tenants and API keys: keys are stored hashed in the zoo (tenants/keys) and map to one tenant."""

from __future__ import annotations

import hashlib
import secrets
import threading

from zoo_store import Manifest, Zoo, validate_name

from .exceptions import AuthenticationError, ForbiddenError

KEYS_DOC = "tenants/keys"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(zoo: Zoo, tenant: str, key: str | None = None) -> str:
    """Register a new API key for `tenant` and return it (only its hash is stored)."""
    validate_name(tenant, "tenant")
    key = key or f"bl-{tenant}-{secrets.token_urlsafe(24)}"
    keys = dict(zoo.get_json(KEYS_DOC, default={}))
    keys[_digest(key)] = tenant
    zoo.put_json(KEYS_DOC, keys)
    return key


def revoke_tenant(zoo: Zoo, tenant: str) -> int:
    keys = dict(zoo.get_json(KEYS_DOC, default={}))
    kept = {h: t for h, t in keys.items() if t != tenant}
    zoo.put_json(KEYS_DOC, kept)
    return len(keys) - len(kept)


class KeyRing:
    """Resolves API keys to tenants, re-reading the zoo when it meets a key it does not know."""

    def __init__(self, zoo: Zoo) -> None:
        self._zoo = zoo
        self._keys: dict[str, str] = {}
        self._lock = threading.Lock()

    def tenant(self, key: str | None) -> str:
        if not key or not isinstance(key, str):
            raise AuthenticationError("no API key given; pass api_key= (HTTP: Authorization: Bearer <key>)")
        digest = _digest(key)
        with self._lock:
            if digest not in self._keys:
                self._keys = dict(self._zoo.get_json(KEYS_DOC, default={}))
            tenant = self._keys.get(digest)
        if tenant is None:
            raise AuthenticationError("invalid API key")
        return tenant


def check_access(manifest: Manifest, tenant: str) -> None:
    """A tenant may run its own models and shared ones, never another tenant's private model."""
    if manifest.tenant != tenant and manifest.visibility != "shared":
        raise ForbiddenError(f"model {manifest.key} is private to tenant {manifest.tenant}")
