"""Batch inference on a real LocalCluster: Dask DataFrames / Bags / lists through the block hosts,
jobs over Parquet and JSON lines (file:// and SeaweedFS s3://), cancel and resume, bad inputs."""

from __future__ import annotations

import json

import dask
import dask.bag as db
import dask.dataframe as dd
import pandas as pd
import pytest

from blockllm.auth import create_key
from blockllm.batch import (
    cancel_job,
    generate_bag,
    generate_dataframe,
    generate_list,
    job_status,
    read_output,
    submit_job,
)
from blockllm.client import Client
from blockllm.exceptions import (
    AuthenticationError,
    ForbiddenError,
    InvalidPromptError,
    JobCancelledError,
    MissingColumnError,
    OutputNotWritableError,
)
from blockllm.types import SamplingParams
from zoo_store import ModelNotFoundError

pytestmark = pytest.mark.slow

VARIANTS = ("acme/tiny-full", "acme/tiny-lora-b", "platform/tiny-base")
SAMPLING = SamplingParams(max_new_tokens=6)
TEMPLATES = ("next number after {} is ->", "{} + 3 =", "reverse: {} a b ->", "uppercase: {} c a t ->", "double {} ->")


def prompts(n: int, offset: int = 0) -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(i + offset) for i in range(n)]


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def acme(cluster, tiny_zoo):
    import distributed

    dask_client = distributed.Client(cluster)
    client = Client(dask_client, api_key=create_key(tiny_zoo, "acme"), zoo=tiny_zoo.url)
    client.place(list(VARIANTS))
    yield client
    dask_client.close()


@pytest.fixture(autouse=True)
def jobs_dir(tmp_path):
    with dask.config.set({"blockllm.batch.jobs-dir": str(tmp_path / "jobs")}):
        yield


def _traffic(client: Client) -> int:
    return sum(sum(s["traffic"].values()) for s in client.stats().values())


def test_dataframe_of_210_prompts_over_3_variants_matches_the_online_client(acme):
    frames = []
    for k, model in enumerate(VARIANTS):  # 70 prompts per variant, 3 partitions each
        pdf = pd.DataFrame({"id": range(70 * k, 70 * (k + 1)), "prompt": prompts(70, 70 * k)})
        frames.append(generate_dataframe(dd.from_pandas(pdf, npartitions=3), "prompt", model, tenant="acme", sampling=SAMPLING, client=acme))
    ddf = dd.concat(frames)
    assert "completion" in ddf.columns  # lazy: nothing has run yet
    got = ddf.compute().set_index("id")
    assert len(got) == 210
    for k, model in enumerate(VARIANTS):
        ids = range(70 * k, 70 * (k + 1))
        online = acme.generate(list(got.loc[ids, "prompt"]), model, SAMPLING)
        assert list(got.loc[ids, "completion"]) == [c.text for c in online], model


def test_bag_and_list(acme):
    ps = prompts(12)
    want = [c.text for c in acme.generate(ps, "acme/tiny-full", SAMPLING)]
    bag = generate_bag(db.from_sequence(ps, npartitions=3), "acme/tiny-full", sampling=SAMPLING, client=acme)
    assert bag.compute() == want
    assert generate_list(ps, "acme/tiny-full", sampling=SAMPLING, client=acme) == want


def test_prompts_move_to_the_next_host_when_one_is_gone(acme):
    from blockllm.batch.api import BatchSpec, host_order, run_prompts

    live = tuple(sorted(w for w, models in acme.loaded().items() if "acme/tiny-full" in models))
    hosts = ("tcp://127.0.0.1:9", *live)  # nothing listens on port 9: a lost worker
    ps = next(prompts(6, k) for k in range(50) if host_order(hosts, None, prompts(6, k))[0] == hosts[0])
    spec = BatchSpec("acme/tiny-full", acme.api_key, SAMPLING, hosts, max_inflight=4)
    pool, saved = acme.dask.rpc, acme.dask.rpc.timeout
    pool.timeout = 1.0  # seconds to give up connecting (the client's default is 30)
    try:
        got = run_prompts(ps, spec, dask_client=acme.dask)
    finally:
        pool.timeout = saved
    assert got == [c.text for c in acme.generate(ps, "acme/tiny-full", SAMPLING)]


def test_bad_inputs_are_typed_errors_before_any_work(acme, tmp_path, tiny_zoo):
    ddf = dd.from_pandas(pd.DataFrame({"prompt": prompts(4), "n": range(4)}), npartitions=2)
    before = _traffic(acme)
    with pytest.raises(MissingColumnError, match="text"):
        generate_dataframe(ddf, "text", "acme/tiny-full", client=acme)
    with pytest.raises(InvalidPromptError, match="int64"):
        generate_dataframe(ddf, "n", "acme/tiny-full", client=acme)
    with pytest.raises(ModelNotFoundError):
        generate_dataframe(ddf, "prompt", "acme/no-such-model", client=acme)
    with pytest.raises(ForbiddenError):  # another tenant's private model
        generate_dataframe(ddf, "prompt", "globex/tiny-partial-b", client=acme)
    with pytest.raises(ForbiddenError):  # the key is acme's
        generate_dataframe(ddf, "prompt", "acme/tiny-full", tenant="globex", client=acme)
    with pytest.raises(AuthenticationError):
        generate_dataframe(ddf, "prompt", "acme/tiny-full", api_key="not-a-key", client=acme)
    with pytest.raises(InvalidPromptError):
        generate_list(["ok", 7], "acme/tiny-full", client=acme)
    src = tmp_path / "in.parquet"
    pd.DataFrame({"prompt": prompts(4)}).to_parquet(src)
    (tmp_path / "afile").write_text("x")
    for bad in ((tmp_path / "afile" / "out").as_uri(), "nosuchprotocol://x/y"):
        with pytest.raises(OutputNotWritableError):
            submit_job(str(src), "acme/tiny-full", client=acme, output=bad)
    assert _traffic(acme) == before  # nothing was generated
    # an object column with a non-string row: typed when its partition runs
    mixed = dd.from_pandas(pd.DataFrame({"prompt": pd.Series(["a b", None, "c"], dtype=object)}), npartitions=1)
    with pytest.raises(InvalidPromptError, match="row 1"):
        generate_dataframe(mixed, "prompt", "acme/tiny-full", sampling=SAMPLING, client=acme).compute()


def test_job_cancelled_midway_and_resumed_writes_every_row_once(acme, tmp_path):
    src = tmp_path / "prompts"
    src.mkdir()
    for f in range(12):  # 12 files: 12 partitions of 8 rows
        pd.DataFrame({"id": range(8 * f, 8 * f + 8), "prompt": prompts(8, 8 * f)}).to_parquet(src / f"part{f:02d}.parquet")
    args = dict(client=acme, tenant="acme", sampling=SamplingParams(max_new_tokens=8, ignore_eos=True))
    first: list[int] = []

    def cancel_after_first(i: int, rows: int) -> None:
        first.append(i)
        if len(first) == 1:
            cancel_job(job_id)

    job_id = "cancel-resume"
    with pytest.raises(JobCancelledError):
        submit_job(f"{src}/*.parquet", "acme/tiny-full", job_id=job_id, on_part=cancel_after_first, **args)
    state = job_status(job_id)
    assert state["status"] == "cancelled"
    assert 1 <= state["parts_done"] < 12
    out = src / f"completions-{job_id}"  # next to the input
    markers_before = {p.name: p.read_text() for p in (out / "_parts").iterdir()}

    resumed: list[int] = []
    state = submit_job(f"{src}/*.parquet", "acme/tiny-full", job_id=job_id, on_part=lambda i, r: resumed.append(i), **args)
    assert state["status"] == "done" and state["parts_done"] == 12 and state["rows_done"] == 96
    assert len(resumed) == 12 - len(markers_before)  # only the missing partitions ran again
    for name, text in markers_before.items():  # parts written before the cancel were not rewritten
        assert (out / "_parts" / name).read_text() == text
    result = read_output(job_id)
    assert sorted(result["id"]) == list(range(96))  # every row exactly once
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    online = acme.generate(list(result["prompt"][:8]), "acme/tiny-full", SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert list(result["completion"][:8]) == [c.text for c in online]  # the online client's completions


def test_cli_job_on_s3_with_status_and_cancel(acme, seaweed, s3_bucket, tmp_path):
    from typer.testing import CliRunner

    from blockllm.cli import app

    fs = seaweed.filesystem()
    rows = [{"id": i, "prompt": p} for i, p in enumerate(prompts(30))]
    fs.pipe(f"{s3_bucket}/batch/in.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    opts = json.dumps(seaweed.storage_options)
    key = acme.api_key
    address = acme.dask.scheduler.address
    runner = CliRunner()
    common = ["--model", "acme/tiny-full", "--api-key", key, "--scheduler", address, "--storage-options", opts, "--max-new-tokens", "4", "--zoo", acme.zoo_url]
    with dask.config.set({"blockllm.batch.jobs-dir": str(tmp_path / "jobs")}):
        res = runner.invoke(app, ["batch", "submit", f"s3://{s3_bucket}/batch/in.jsonl", *common, "--job-id", "s3job"])
        assert res.exit_code == 0, res.output
        assert "done" in res.output
        res = runner.invoke(app, ["batch", "status", "s3job", "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)[0]["rows_done"] == 30, res.output  # stdout alone: logs from other threads go to stderr
        out = read_output("s3job")
        assert sorted(out["id"]) == list(range(30))
        # greedy, 4 tokens: what the online client gives for the same prompts (an early EOS may
        # leave a completion empty, so the check is equality, not length)
        out = out.sort_values("id")
        want = acme.generate(list(out["prompt"]), "acme/tiny-full", SamplingParams(max_new_tokens=4))
        assert list(out["completion"]) == [c.text for c in want]
        assert fs.exists(f"{s3_bucket}/batch/in.completions/_job.json")  # next to the input
        res = runner.invoke(app, ["batch", "cancel", "nosuchjob"])
        assert res.exit_code != 0 and "JobNotFoundError" in res.output
        res = runner.invoke(app, ["batch", "submit", f"s3://{s3_bucket}/batch/in.jsonl", *common, "--prompt-column", "nope"])
        assert res.exit_code != 0 and "MissingColumnError" in res.output
        res = runner.invoke(app, ["batch", "cancel", "s3job"])  # a finished job: stays done
        assert res.exit_code == 0 and "done" in res.output
    with pytest.raises(OutputNotWritableError):  # not a valid bucket name
        submit_job(f"s3://{s3_bucket}/batch/in.jsonl", "acme/tiny-full", client=acme, output="s3://Not_A_Bucket!/out", storage_options=seaweed.storage_options)


def test_batch_jobs_of_two_tenants_share_a_host_by_tenant():
    """Two tenants' batch work queued on one host is handed out alternately (admission's
    deficit round-robin), however much one of them queued first."""
    from blockllm.serving.admission import Admission, Ticket
    from blockllm.types import BATCH_PRIORITY, Request

    adm = Admission(max_per_tenant=1000, max_per_model=1000, quantum=16)

    def ticket(tenant: str, i: int) -> Ticket:
        return Ticket(Request(f"{tenant}{i}", "platform/tiny-base", (1, 2, 3, 4), SamplingParams(max_new_tokens=12), BATCH_PRIORITY), tenant, "platform/tiny-base", "batch")

    for i in range(60):
        adm.offer(ticket("acme", i))
    for i in range(10):
        adm.offer(ticket("globex", i))
    order = []
    while len(adm):
        order += [t.tenant for t in adm.take(4, 4)]
    first20 = order[:20]
    assert first20.count("globex") == 10 and first20.count("acme") == 10  # equal shares while both wait


def test_resubmitting_with_other_input_is_refused(acme, tmp_path):
    src = tmp_path / "in.parquet"
    pd.DataFrame({"prompt": prompts(3)}).to_parquet(src)
    submit_job(str(src), "acme/tiny-full", client=acme, sampling=SamplingParams(max_new_tokens=2), job_id="j1")
    pd.DataFrame({"prompt": prompts(5)}).to_parquet(src)  # the input changed under the job
    from blockllm.exceptions import BatchInputError

    with pytest.raises(BatchInputError, match="different input"):
        submit_job(str(src), "acme/tiny-full", client=acme, sampling=SamplingParams(max_new_tokens=2), job_id="j1")
