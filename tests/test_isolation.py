"""Tenant isolation through blockllm.Client and through HTTP (the openai SDK): a tenant cannot list,
run, ingest onto or be served another tenant's private models; names cannot walk out of the
zoo; checkpoints are safetensors or GGUF only and nothing is ever unpickled.

(Substitution never picks another tenant's private block: tests/test_planner.py and
tests/test_serving_substitution.py.)"""

from __future__ import annotations

import ast
import pickle
import shutil
from pathlib import Path

import openai
import pytest

from blockllm.auth import create_key
from blockllm.client import Client, GenerationRequest
from blockllm.exceptions import ForbiddenError, InvalidRequestError, UnsafeCheckpointError
from blockllm.types import SamplingParams
from zoo_store import InvalidNameError

ROOT = Path(__file__).resolve().parents[1]
PLACED = ["acme/tiny-full", "globex/tiny-partial-b", "platform/tiny-base"]


@pytest.fixture(scope="module")
def cluster(tiny_zoo):
    import dask
    import distributed

    # In-process workers, so this config reaches the block host: 4 queued requests per tenant.
    with dask.config.set({"blockllm.serving.max-queued-per-tenant": 4, "blockllm.serving.engine-waiting": 1}):
        with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0") as c:
            with distributed.Client(c) as dask_client:
                operator = Client(dask_client, zoo=tiny_zoo.url)  # no key: the operator places models
                operator.place(PLACED)
                yield dask_client, operator


@pytest.fixture(scope="module")
def tenants(cluster, tiny_zoo):
    dask_client, _ = cluster
    keys = {t: create_key(tiny_zoo, t) for t in ("acme", "globex")}
    return keys, {t: Client(dask_client, api_key=k, zoo=tiny_zoo.url) for t, k in keys.items()}


@pytest.fixture(scope="module")
def server(cluster):
    from blockllm.http import HTTPServer, create_app

    with HTTPServer(create_app(cluster[1], max_inflight_per_tenant=1000), "127.0.0.1", 0) as srv:
        yield srv


def sdk(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


# ------------------------------------------------------------------ through blockllm.Client
def test_a_client_lists_and_runs_only_its_tenants_models(tenants):
    _, clients = tenants
    globex = clients["globex"]
    assert not any(m.startswith("acme/") for m in globex.models())
    assert "globex/tiny-partial-b" in globex.models() and "platform/tiny-base" in globex.models()
    with pytest.raises(ForbiddenError):
        globex.generate(["3 + 4 ="], "acme/tiny-full", SamplingParams(max_new_tokens=2))
    with pytest.raises(ForbiddenError):
        list(globex.stream(GenerationRequest(model="acme/tiny-full", prompt="3 + 4 =")))
    ok = globex.generate(["3 + 4 ="], "platform/tiny-base", SamplingParams(max_new_tokens=2))
    assert len(ok[0].token_ids) == 2


@pytest.mark.parametrize("model", ["acme/../globex/tiny-partial-b", "../acme/tiny-full", "acme/..", "acme/tiny-full/", "acme\\tiny-full"])
def test_names_cannot_walk_out_of_the_zoo_through_the_client(tenants, model):
    _, clients = tenants
    with pytest.raises((InvalidRequestError, InvalidNameError)):
        clients["acme"].submit([GenerationRequest(model=model, prompt="x")])[0].result(60)


# ------------------------------------------------------------------ through HTTP
def test_http_tenants_see_and_run_only_their_own_and_shared_models(server, tenants):
    keys, _ = tenants
    with sdk(server, keys["globex"]) as api:
        assert not any(m.id.startswith("acme/") for m in api.models.list())
        with pytest.raises(openai.NotFoundError):  # another tenant's private model does not exist for it
            api.models.retrieve("acme/tiny-full")
        with pytest.raises(openai.PermissionDeniedError):
            api.completions.create(model="acme/tiny-full", prompt="3 + 4 =", max_tokens=2)
        for model in ("acme/../globex/tiny-partial-b", "../acme/tiny-full", "..%2Facme%2Ftiny-full", "acme/.."):
            with pytest.raises((openai.NotFoundError, openai.BadRequestError)):
                api.completions.create(model=model, prompt="3 + 4 =", max_tokens=2)
            with pytest.raises((openai.NotFoundError, openai.BadRequestError)):
                api.models.retrieve(model)


@pytest.mark.slow
def test_http_flood_past_the_workers_admission_bound_gets_429_and_others_are_served(server, tenants):
    keys, _ = tenants
    with sdk(server, keys["acme"]) as acme, sdk(server, keys["globex"]) as globex:
        with pytest.raises(openai.RateLimitError) as e:  # 64 prompts at once; 4 may wait per tenant
            acme.completions.create(model="acme/tiny-full", prompt=[f"{i} + 4 =" for i in range(64)], max_tokens=64)
        assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
        ok = globex.completions.create(model="globex/tiny-partial-b", prompt="3 + 4 =", max_tokens=3, temperature=0)
        assert ok.usage.completion_tokens >= 1


# ------------------------------------------------------------------ ingest
def test_no_tenant_ingests_an_adapter_onto_another_tenants_private_base(tiny_zoo, tiny_family):
    from blockllm.ingest import ingest

    before = tiny_zoo.list_blocks(include_incomplete=True)
    with pytest.raises(ForbiddenError):
        ingest(tiny_zoo, tiny_family.lora_a, tenant="globex", name="stolen-lora", base="acme/tiny-full")
    assert not tiny_zoo.has_model("globex", "stolen-lora")
    assert tiny_zoo.list_blocks(include_incomplete=True) == before  # nothing written
    for name in ("../acme", "acme/x", "", ".hidden", "a" * 65):
        with pytest.raises(InvalidNameError):
            ingest(tiny_zoo, tiny_family.lora_a, tenant="globex", name=name, base="platform/tiny-base")


class _Canary:
    """Unpickling this writes a file: the proof that something unpickled a checkpoint."""

    path = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled!"))


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "adapter_model.bin"])
def test_pickle_checkpoints_are_refused_and_never_unpickled(tmp_path, tiny_family, weights):
    from blockllm.ingest import ingest
    from zoo_store import Zoo

    src = tmp_path / "ckpt"
    if weights == "adapter_model.bin":
        shutil.copytree(tiny_family.lora_a, src)
        (src / "adapter_model.safetensors").unlink()
    else:
        src.mkdir()
        shutil.copy(Path(tiny_family.base) / "config.json", src / "config.json")
    canary = tmp_path / "canary.txt"
    _Canary.path = str(canary)
    (src / weights).write_bytes(pickle.dumps({"weight": _Canary()}))
    zoo = Zoo((tmp_path / "zoo").as_uri())
    with pytest.raises(UnsafeCheckpointError, match="never unpickle"):
        ingest(zoo, src, tenant="acme", name="pickled", base="platform/tiny-base" if weights == "adapter_model.bin" else None)
    assert not canary.exists()
    assert zoo.list_models() == []


UNPICKLERS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cloudpickle", "load"),
              ("cloudpickle", "loads"), ("joblib", "load"), ("dill", "load"), ("dill", "loads"), ("marshal", "loads")}


def test_no_code_of_ours_calls_an_unpickler():
    hits = []
    for pkg in ("blockllm", "zoo_store", "graphs", "jobs", "benchmarks"):
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (node.value.id, node.attr) in UNPICKLERS:
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
                if isinstance(node, ast.ImportFrom) and node.module in {m for m, _ in UNPICKLERS}:
                    hits += [f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {a.name}" for a in node.names if (node.module, a.name) in UNPICKLERS]
                if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno} allow_pickle")
    assert hits == [], hits
