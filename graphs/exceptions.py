"""Typed errors of the block graph, chain planning and graph publication; each says what to do next."""

from __future__ import annotations

from zoo_store.exceptions import ManifestError


class GraphError(Exception):
    """Base class of every block-graph error."""


class GraphFormatError(GraphError, ValueError):
    """A saved graph document that is not node-link JSON of a BlockGraph (or of a newer schema)."""


class GraphNotFoundError(GraphError, LookupError):
    """No published graph (or no such version) in the zoo."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} is not in the zoo; run `blockllm jobs equivalence` to publish a graph "
            "(or list the versions with `blockllm graph show`)"
        )


class GraphVersionConflictError(GraphError, RuntimeError):
    """Another writer published a graph version since this one was read: reload, merge, retry."""

    def __init__(self, expected: int | None, found: int | None) -> None:
        self.expected, self.found = expected, found
        super().__init__(
            f"graph version conflict: expected current version {expected}, found {found}; "
            "reload the current graph, apply your changes to it and publish again"
        )


class GraphLockTimeoutError(GraphError, TimeoutError):
    """A job lock in the zoo stayed held by another run for longer than we were willing to wait."""

    def __init__(self, name: str, holder: object, waited: float) -> None:
        self.name, self.holder = name, holder
        super().__init__(
            f"lock {name!r} is still held by {holder} after {waited:.0f} s; wait for that run to end, "
            "or, if it died, for its lease to expire (the lock document names its host and pid)"
        )


class InvalidErrorBudgetError(GraphError, ManifestError):
    """An error budget that is not a finite number >= 0 (raised when a model is registered)."""


class IncomparableBlocksError(GraphError, ValueError):
    """Two blocks that equivalence must never compare (other family, shape, position or kind)."""

    def __init__(self, a: str, b: str, reason: str) -> None:
        self.a, self.b, self.reason = a, b, reason
        super().__init__(f"blocks {a[:12]}… and {b[:12]}… are not comparable: {reason}")


class PlanningError(GraphError, ValueError):
    """A chain-planning request that cannot be served as asked (e.g. a chain that is not the model's)."""


class PlanForbiddenError(GraphError, PermissionError):
    """A tenant asked to plan a model it may not use (another tenant's private model)."""

    def __init__(self, tenant: str, model: str) -> None:
        self.tenant, self.model = tenant, model
        super().__init__(
            f"tenant {tenant!r} may not use model {model}: it is private to its owner; "
            "ask the owner to share it or use one of your own models"
        )


__all__ = [
    "GraphError",
    "GraphFormatError",
    "GraphLockTimeoutError",
    "GraphNotFoundError",
    "GraphVersionConflictError",
    "IncomparableBlocksError",
    "InvalidErrorBudgetError",
    "PlanForbiddenError",
    "PlanningError",
]
