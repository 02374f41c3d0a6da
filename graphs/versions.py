"""Publishing block graphs in the zoo: versioned node-link JSON documents and a pointer written last.

Layout: ``graphs/v<NNNNNN>-<token>`` holds one whole graph (one atomic JSON write); ``graphs/current``
names the published one. A reader follows the pointer, so it sees the old graph or the new one, never
half of one. Publishing is compare-and-swap-like: the writer names the version it built on
(`parent`); if the pointer moved meanwhile it gets `GraphVersionConflictError` and must rebuild on
the newer graph (jobs re-apply their edge changes, so no other run's edges are lost).
Old versions stay for rollback; `prune` keeps the newest few.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from zoo_store import Zoo
from zoo_store import config as _config

from .block_graph import BlockGraph
from .exceptions import GraphNotFoundError, GraphVersionConflictError

log = logging.getLogger(__name__)

ROOT = "graphs"
POINTER = f"{ROOT}/current"
_VERSION_RE = re.compile(r"^v(\d{6,})-([0-9a-f]{8})$")


@dataclass(frozen=True)
class GraphVersion:
    version: int
    path: str
    current: bool


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_pointer(zoo: Zoo) -> dict[str, Any] | None:
    doc = zoo.get_json(POINTER)
    return doc if isinstance(doc, dict) and "version" in doc and "path" in doc else None


def current_version(zoo: Zoo) -> int:
    """The published version number (0 when no graph was ever published)."""
    ptr = read_pointer(zoo)
    return int(ptr["version"]) if ptr else 0


def list_versions(zoo: Zoo) -> list[GraphVersion]:
    ptr = read_pointer(zoo)
    out = []
    for name in zoo.list_json(ROOT):
        m = _VERSION_RE.match(name)
        if m:
            path = f"{ROOT}/{name}"
            out.append(GraphVersion(int(m.group(1)), path, bool(ptr and ptr["path"] == path)))
    return sorted(out, key=lambda v: (v.version, v.path))


def load_graph(zoo: Zoo, version: int | None = None) -> BlockGraph:
    """The published graph (or the stored `version`); GraphNotFoundError when there is none."""
    if version is not None:
        # the published document of that number first (a lost publish race may have left a sibling)
        for v in sorted(list_versions(zoo), key=lambda v: not v.current):
            if v.version == version:
                doc = zoo.get_json(v.path)
                if doc is not None:
                    return BlockGraph.from_json(doc)
        raise GraphNotFoundError(f"graph version {version}")
    for _ in range(5):  # a pruner may delete the document between our two reads: read again
        ptr = read_pointer(zoo)
        if ptr is None:
            raise GraphNotFoundError("a published block graph")
        doc = zoo.get_json(ptr["path"])
        if doc is not None:
            return BlockGraph.from_json(doc)
    raise GraphNotFoundError(f"graph document {ptr['path']}")


def load_or_build(zoo: Zoo) -> BlockGraph:
    """The published graph, or (none yet) one built from the manifests with no equiv edges."""
    try:
        return load_graph(zoo)
    except GraphNotFoundError:
        return BlockGraph.from_zoo(zoo)


def publish(
    zoo: Zoo, graph: BlockGraph, *, parent: int | None, run: str = "", keep: int | None = None
) -> int:
    """Write `graph` as the next version and point `graphs/current` at it; returns its number.

    `parent` is the version `graph` was built on (None: publish whatever is current). If another
    writer published since, nothing is published and GraphVersionConflictError is raised.
    """
    found = current_version(zoo)
    if parent is not None and parent != found:
        raise GraphVersionConflictError(parent, found)
    version, token = found + 1, uuid.uuid4().hex[:8]
    path = f"{ROOT}/v{version:06d}-{token}"
    data = graph.to_json()
    data["graph"].update(version=version, parent=found, published=_now(), run=run)
    zoo.put_json(path, data)  # the whole graph in one write, before the pointer names it
    now = current_version(zoo)
    if now != found:  # someone published while we wrote: do not overwrite their pointer
        zoo.delete_json(path)
        raise GraphVersionConflictError(found, now)
    zoo.put_json(
        POINTER, {"version": version, "path": path, "token": token, "published": _now(), "run": run}
    )
    ptr = read_pointer(zoo)
    if ptr is None or ptr.get("token") != token:  # lost a race for the pointer itself
        raise GraphVersionConflictError(version, int(ptr["version"]) if ptr else None)
    graph.g.graph.update(version=version, parent=found, run=run)
    log.info("published block graph v%d (%s)", version, graph.summary())
    prune(zoo, keep=keep)
    return version


def prune(zoo: Zoo, keep: int | None = None) -> list[str]:
    """Delete all but the newest `keep` versions (never the current one); returns deleted paths."""
    keep = int(keep if keep is not None else _config.get("graph.keep-versions", 5))
    versions = list_versions(zoo)
    current = [v for v in versions if v.current]
    others = [v for v in versions if not v.current]
    cur_no = current[0].version if current else None
    # losers of a publish race (same number as the current one) are never worth keeping
    doomed = [v for v in others if v.version == cur_no]
    rest = [v for v in others if v.version != cur_no]
    room = max(0, keep - len(current))
    doomed += rest[: max(0, len(rest) - room)]
    for v in doomed:
        zoo.delete_json(v.path)
    return [v.path for v in doomed]


def rollback(zoo: Zoo, version: int, *, run: str = "rollback") -> int:
    """Publish a copy of an older version as the newest one (history stays linear)."""
    old = load_graph(zoo, version)
    return publish(zoo, old, parent=None, run=f"{run} to v{version}")


class PublishedGraph:
    """Serving's view of the graph: it keeps the graph it has until a new one is fully published.

    `graph` is loaded on first use; `refresh()` swaps in a newer published version (one read of
    the pointer when nothing changed). With no published graph, it serves one built from the
    manifests (every model on its own chain).
    """

    def __init__(self, zoo: Zoo) -> None:
        self._zoo = zoo
        self._graph: BlockGraph | None = None
        self._path: str | None = None
        self._lock = threading.Lock()

    @property
    def graph(self) -> BlockGraph:
        if self._graph is None:
            self.refresh()
        assert self._graph is not None
        return self._graph

    @property
    def version(self) -> int:
        return self.graph.version

    def refresh(self) -> bool:
        """Load the published graph if it is newer than ours; True when it changed."""
        ptr = read_pointer(self._zoo)
        with self._lock:
            if ptr is None:
                if self._graph is None:
                    self._graph = BlockGraph.from_zoo(self._zoo)
                    return True
                return False
            if ptr["path"] == self._path:
                return False
            doc = self._zoo.get_json(ptr["path"])
            if doc is None:  # pruned under us: keep what we have, the next refresh catches up
                return False
            self._graph = BlockGraph.from_json(doc)  # built fully before it replaces the old one
            self._path = ptr["path"]
            return True


__all__ = [
    "GraphVersion",
    "PublishedGraph",
    "current_version",
    "list_versions",
    "load_graph",
    "load_or_build",
    "prune",
    "publish",
    "read_pointer",
    "rollback",
]
