"""A lease lock kept as a document in the zoo, so that job runs on any machine sharing it exclude each other.

The zoo's stores offer no atomic compare-and-swap, so the lock is best effort: a writer claims the
lease, waits `settle` seconds and reads it back; only the claim that survives wins. A lease expires
after `ttl` seconds unless renewed (a heartbeat thread renews it), so a crashed holder blocks no one
for long. What the lock cannot rule out, graph publication's own version check still catches.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

from zoo_store import Zoo

from .exceptions import GraphLockTimeoutError

log = logging.getLogger(__name__)


def _utcnow() -> float:
    return _dt.datetime.now(_dt.timezone.utc).timestamp()


class ZooLock:
    """`with ZooLock(zoo, "equivalence"):` — or `acquire(wait=False)` to skip when it is held."""

    def __init__(
        self, zoo: Zoo, name: str, *, ttl: float = 600.0, settle: float = 0.1, poll: float = 0.25
    ) -> None:
        self.zoo, self.name = zoo, name
        self.path = f"graphs/locks/{name}"
        self.ttl, self.settle, self.poll = ttl, settle, poll
        self.token = uuid.uuid4().hex
        self._held = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"ZooLock({self.name!r}, held={self._held})"

    @property
    def held(self) -> bool:
        return self._held

    def holder(self) -> dict[str, Any] | None:
        doc = self.zoo.get_json(self.path)
        if not isinstance(doc, dict) or doc.get("expires", 0) < _utcnow():
            return None
        return doc

    def _claim(self) -> None:
        self.zoo.put_json(
            self.path,
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "expires": _utcnow() + self.ttl,
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )

    def acquire(self, *, wait: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; False at once (wait=False) or GraphLockTimeoutError after `timeout` s."""
        if self._held:
            raise RuntimeError(f"{self!r} is already held by this object")
        start = time.monotonic()
        while True:
            holder = self.holder()
            if holder is None or holder.get("token") == self.token:
                self._claim()
                time.sleep(self.settle)  # let a racing claim land, then see whose survived
                holder = self.holder()
                if holder is not None and holder.get("token") == self.token:
                    self._held = True
                    self._start_heartbeat()
                    return True
            if not wait:
                return False
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                raise GraphLockTimeoutError(self.name, _describe(holder), waited)
            time.sleep(self.poll)

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        doc = self.zoo.get_json(self.path)
        if isinstance(doc, dict) and doc.get("token") == self.token:
            self.zoo.delete_json(self.path)
        else:
            log.warning("lock %s was taken over while we held it (lease expired?)", self.name)
        self._held = False

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.ttl / 3):
                doc = self.zoo.get_json(self.path)
                if isinstance(doc, dict) and doc.get("token") == self.token:
                    self._claim()

        self._beat = threading.Thread(target=beat, name=f"zoolock-{self.name}", daemon=True)
        self._beat.start()

    def __enter__(self) -> ZooLock:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another run"
    return f"{holder.get('host')} pid {holder.get('pid')} (since {holder.get('since')})"


__all__ = ["ZooLock"]
