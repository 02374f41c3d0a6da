"""A real LocalCluster of worker processes with one blockllm.Client per tenant (tests' shared setup)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def tenant_clients(zoo, n_workers: int, tenants=("acme", "globex", "platform"), threads_per_worker: int = 2) -> Iterator[dict]:
    """{tenant: Client} sharing one distributed.Client to a fresh LocalCluster on 127.0.0.1."""
    import distributed
    from distributed import LocalCluster

    from blockllm.auth import create_key
    from blockllm.client import Client

    with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1") as cluster:
        dask = distributed.Client(cluster)
        try:
            yield {t: Client(dask, api_key=create_key(zoo, t), zoo=zoo.url) for t in tenants}
        finally:
            dask.close()
