"""Batch inference over Dask collections: a column (or Bag, or list) of prompts in, completions out,
run through the block hosts at "batch" priority so that it fills what online traffic leaves idle."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import distributed

from .. import config as _config
from ..exceptions import (
    AuthenticationError,
    BatchInputError,
    BlockLLMError,
    ForbiddenError,
    InvalidPromptError,
    JobCancelledError,
    MissingColumnError,
    NoCapacityError,
    OverloadedError,
)
from ..serving.wire import error_from_wire
from ..types import SamplingParams

if TYPE_CHECKING:
    import dask.bag as db
    import dask.dataframe as dd
    import pandas as pd

    from ..client import Client

log = logging.getLogger(__name__)

OVERLOAD_WAIT = 300.0  # seconds a partition keeps retrying a host that answers OverloadedError


@dataclass(frozen=True)
class BatchSpec:
    """Everything a partition task needs to run its prompts (small, picklable, no connections)."""

    model: str
    api_key: str | None
    sampling: SamplingParams
    hosts: tuple[str, ...]  # workers whose block hosts have the model loaded
    max_inflight: int

    def wire(self, prompt: str) -> dict[str, Any]:
        return {
            "request_id": f"batch-{uuid.uuid4().hex}", "model": self.model, "prompt": prompt,
            "sampling": dataclasses.asdict(self.sampling), "priority": "batch", "api_key": self.api_key,
        }


def _as_client(client: Client | distributed.Client | None, api_key: str | None) -> Client:
    from ..client import Client

    if isinstance(client, Client):
        return client
    if client is None:
        try:
            client = distributed.get_client()
        except ValueError:
            raise BlockLLMError("no Dask client: pass client= (a blockllm.Client or a distributed.Client)") from None
    if isinstance(client, distributed.Client):
        return Client(client, api_key=api_key)
    raise TypeError(f"client must be a blockllm.Client or a distributed.Client, not {type(client).__name__}")


def prepare(
    client: Client | distributed.Client | None,
    model: str,
    *,
    tenant: str | None = None,
    api_key: str | None = None,
    sampling: SamplingParams | dict | None = None,
) -> tuple[Client, BatchSpec]:
    """Check the key, the tenant and the model on a block host, place the model; no generation yet."""
    from ..auth import KeyRing

    if not isinstance(model, str) or model.count("/") != 1:
        raise BatchInputError(f"model must be 'tenant/name', not {model!r}")
    if isinstance(sampling, dict):
        sampling = SamplingParams(**sampling)
    sampling = sampling or SamplingParams()
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be SamplingParams, not {type(sampling).__name__}")
    bl = _as_client(client, api_key)
    key = api_key if api_key is not None else bl.api_key
    if key is None:
        raise AuthenticationError("no API key given; pass api_key= (or a blockllm.Client made with one)")
    owner = KeyRing(bl.zoo).tenant(key)
    if tenant is not None and tenant != owner:
        raise ForbiddenError(f"the API key belongs to tenant {owner!r}, not {tenant!r}")
    workers = bl.workers
    if not workers:
        raise BlockLLMError("the Dask cluster has no workers")

    async def authorize():
        return await bl.dask.rpc(workers[0]).blockllm_authorize(api_key=key, model=model)

    err = bl.dask.sync(authorize)  # ModelNotFoundError / ForbiddenError before any work starts
    if err is not None:
        raise error_from_wire(err)
    if bl.api_key is None:
        bl.api_key = key
    bl._route(model)  # places the model if no worker has it yet
    hosts = tuple(sorted(w for w, models in bl.loaded().items() if model in models))
    if not hosts:
        raise BlockLLMError(f"no block host has {model} loaded after placing it")
    max_inflight = int(_config.get("batch.max-inflight", 256))
    return bl, BatchSpec(model, key, sampling, hosts, max_inflight)


def check_prompts(prompts: Sequence[Any], labels: Sequence[Any] | None = None) -> list[str]:
    """The prompts as strings, or InvalidPromptError naming the first row that is not a non-empty string."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            where = labels[i] if labels is not None else i
            raise InvalidPromptError(f"the prompt of row {where!r} is {p!r} ({type(p).__name__}); prompts must be non-empty strings")
    return list(prompts)


class _Rpc:
    """Calls a block host from wherever this runs: inside a Dask task (the worker's comms) or the driver."""

    def __init__(self, dask_client: distributed.Client | None = None) -> None:
        if dask_client is None:
            try:
                worker = distributed.get_worker()
            except ValueError:
                dask_client = distributed.get_client()
            else:
                self.here = worker.address
                self._pool, self._loop, self._scheduler = worker.rpc, worker.loop, worker.scheduler
                return
        self.here = None
        self._pool, self._loop, self._scheduler = dask_client.rpc, dask_client.loop, dask_client.scheduler

    def __call__(self, host: str, method: str, **kwargs: Any) -> Any:
        async def call():
            return await getattr(self._pool(host), method)(**kwargs)

        return distributed.utils.sync(self._loop, call)

    def live(self, hosts: Sequence[str]) -> list[str]:
        """The `hosts` whose workers the scheduler still has: a lost worker's address is never
        dialled (a refused connection is retried for distributed.comm.timeouts.connect, 30 s)."""

        async def workers():
            return (await self._scheduler.identity(n_workers=-1)).get("workers", {})

        try:
            alive = distributed.utils.sync(self._loop, workers)
        except Exception:  # no answer from the scheduler: try them all, as before
            log.debug("could not ask the scheduler for its workers", exc_info=True)
            return list(hosts)
        return [h for h in hosts if h in alive]


def host_order(hosts: Sequence[str], here: str | None, prompts: Sequence[str]) -> list[str]:
    """The hosts a partition tries in turn: this worker's own first, then the others from a
    starting point that depends on the prompts (partitions spread over the hosts)."""
    others = sorted(h for h in hosts if h != here)
    if others:
        k = int.from_bytes(hashlib.sha256("\n".join(prompts[:4]).encode()).digest()[:4], "big") % len(others)
        others = others[k:] + others[:k]
    return ([here] if here in hosts else []) + others


def run_prompts(
    prompts: Sequence[str],
    spec: BatchSpec,
    *,
    dask_client: distributed.Client | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> list[str]:
    """Complete `prompts` at batch priority on a block host, at most spec.max_inflight at a time.

    Hosts whose workers the scheduler no longer has are skipped; a host that cannot be reached
    (its worker lost) hands what is left to the next host of the model, and with none left the
    call raises NoCapacityError (a batch job then places the model again: jobs.py). A host that
    is full (OverloadedError) is retried after its Retry-After; any other error is raised typed
    after aborting what this call still has in flight. `cancelled()` is asked
    between polls: when it says so, the requests are aborted and JobCancelledError is raised.
    """
    prompts = check_prompts(prompts)
    rpc = _Rpc(dask_client)
    results: list[str | None] = [None] * len(prompts)
    hosts = host_order(rpc.live(spec.hosts), rpc.here, prompts)
    if not hosts:
        raise NoCapacityError(f"none of the block hosts of {spec.model} ({len(spec.hosts)}) is alive")
    last: BaseException | None = None
    for host in hosts:
        try:
            _complete_on(host, rpc, prompts, results, spec, cancelled)
            return [r or "" for r in results]
        except OSError as e:  # comm closed / refused / timed out: the worker is gone
            last = e
            log.warning("block host %s failed (%r); %d prompts go to the next host", host, e, sum(r is None for r in results))
    raise NoCapacityError(f"no block host of {spec.model} answered ({len(hosts)} tried); last: {last!r}")


def _complete_on(host: str, rpc: _Rpc, prompts: list[str], results: list[str | None], spec: BatchSpec, cancelled: Callable[[], bool] | None) -> None:
    """Fill the missing `results` from one host."""
    pending = deque(i for i, r in enumerate(results) if r is None)
    inflight: dict[str, int] = {}
    overloaded_since: float | None = None
    last_check = 0.0
    try:
        while pending or inflight:
            if cancelled is not None and time.monotonic() - last_check > 0.5:
                last_check = time.monotonic()
                if cancelled():
                    raise JobCancelledError("the batch job was cancelled")
            room = spec.max_inflight - len(inflight)
            if pending and room > 0:
                idx = [pending.popleft() for _ in range(min(room, len(pending)))]
                wires = [spec.wire(prompts[i]) for i in idx]
                errors = rpc(host, "blockllm_submit", requests=wires)
                retry = None
                for i, w, err in zip(idx, wires, errors, strict=True):
                    if err is None:
                        inflight[w["request_id"]] = i
                    elif err.get("type") == OverloadedError.__name__:
                        pending.append(i)
                        retry = max(retry or 0.0, float(err.get("retry_after", 1.0)))
                    else:
                        raise error_from_wire(err)
                if retry is None:
                    overloaded_since = None
                else:
                    overloaded_since = overloaded_since or time.monotonic()
                    if time.monotonic() - overloaded_since > OVERLOAD_WAIT:
                        raise OverloadedError(f"block host {host} stayed full for {OVERLOAD_WAIT:.0f} s", retry_after=retry)
                    if not inflight:
                        time.sleep(min(retry, 5.0))
            if inflight:
                states = rpc(host, "blockllm_poll", ids=list(inflight), timeout=1.0, until_finished=True)
                for rid, st in states.items():
                    if not st.get("finished"):
                        continue
                    i = inflight.pop(rid)
                    if st.get("error"):
                        raise error_from_wire(st["error"])
                    results[i] = st.get("text") or ""
    except BaseException:
        if inflight:
            try:
                rpc(host, "blockllm_abort", ids=list(inflight))
            except Exception:  # the host is gone: nothing left to abort there
                log.debug("could not abort %d batch requests on %s", len(inflight), host, exc_info=True)
        raise


# ------------------------------------------------------------------------------ Dask collections
def _text_dtype():
    import pandas as pd

    return pd.Series(["x"]).dtype  # what pandas makes of a list of str ("str" on pandas 3, object before)


def blockllm_batch(df: pd.DataFrame, prompt_column: str, output_column: str, spec: BatchSpec) -> pd.DataFrame:
    """One DataFrame partition: its prompts completed (named for the dashboard's task stream)."""
    import pandas as pd

    prompts = check_prompts(list(df[prompt_column]), list(df.index))
    texts = run_prompts(prompts, spec) if prompts else []
    return df.assign(**{output_column: pd.Series(texts, index=df.index, dtype=_text_dtype())})


def check_prompt_column(meta: pd.DataFrame, prompt_column: str) -> None:
    """MissingColumnError / InvalidPromptError from the DataFrame's meta, before any work starts."""
    import pandas as pd

    if prompt_column not in meta.columns:
        raise MissingColumnError(f"no column {prompt_column!r} in the DataFrame (columns: {list(meta.columns)})")
    dtype = meta[prompt_column].dtype
    if not (pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype)):
        raise InvalidPromptError(f"column {prompt_column!r} holds {dtype} values, not text; prompts must be strings")


def generate_dataframe(
    ddf: dd.DataFrame,
    prompt_column: str,
    model: str,
    *,
    tenant: str | None = None,
    api_key: str | None = None,
    sampling: SamplingParams | dict | None = None,
    output_column: str = "completion",
    client: Client | distributed.Client | None = None,
) -> dd.DataFrame:
    """A new (lazy) Dask DataFrame: `ddf` plus a column of completions of `prompt_column` by `model`.

    Checked before any work starts: the column exists and holds text (object columns are checked
    row by row when computed), the key's tenant (`tenant=` if given) may run `model`. Each partition
    becomes one Dask task that sends its prompts to a block host at batch priority.
    """
    import dask.dataframe as dd
    import pandas as pd

    if not isinstance(ddf, dd.DataFrame):
        raise TypeError(f"generate_dataframe needs a dask DataFrame, not {type(ddf).__name__}")
    check_prompt_column(ddf._meta, prompt_column)
    if output_column == prompt_column:
        raise BatchInputError(f"output_column {output_column!r} would overwrite the prompts; pick another name")
    _, spec = prepare(client, model, tenant=tenant, api_key=api_key, sampling=sampling)
    meta = ddf._meta.assign(**{output_column: pd.Series([], dtype=_text_dtype())})
    return ddf.map_partitions(blockllm_batch, prompt_column, output_column, spec, meta=meta)


def _bag_partition(part: list, spec: BatchSpec) -> list[str]:
    prompts = check_prompts(list(part))
    return run_prompts(prompts, spec) if prompts else []


def generate_bag(
    bag: db.Bag,
    model: str,
    *,
    tenant: str | None = None,
    api_key: str | None = None,
    sampling: SamplingParams | dict | None = None,
    client: Client | distributed.Client | None = None,
) -> db.Bag:
    """A new (lazy) Dask Bag of the completions of a Bag of prompt strings, in order."""
    import dask.bag as db

    if not isinstance(bag, db.Bag):
        raise TypeError(f"generate_bag needs a dask Bag, not {type(bag).__name__}")
    _, spec = prepare(client, model, tenant=tenant, api_key=api_key, sampling=sampling)
    return bag.map_partitions(_bag_partition, spec)


def generate_list(
    prompts: Sequence[str],
    model: str,
    *,
    tenant: str | None = None,
    api_key: str | None = None,
    sampling: SamplingParams | dict | None = None,
    client: Client | distributed.Client | None = None,
) -> list[str]:
    """The completions of a plain list of prompts, run from here at batch priority."""
    if isinstance(prompts, str):
        raise InvalidPromptError("generate_list needs a list of prompts, not one string")
    prompts = check_prompts(list(prompts))
    bl, spec = prepare(client, model, tenant=tenant, api_key=api_key, sampling=sampling)
    if not prompts:
        return []
    return run_prompts(prompts, spec, dask_client=bl.dask)
