"""The OpenAI-compatible HTTP API, exercised with the real `openai` SDK against a live server on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time

import openai
import pytest

from blockllm.http import HTTPServer, create_app, parse_bind
from blockllm.http.errors import to_api_error

PROMPT = "3 + 4 ="
MESSAGES = [{"role": "user", "content": "reverse: a b c"}]


# ------------------------------------------------------------------------------------ unit
def test_parse_bind():
    assert parse_bind("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_bind(":0") == ("127.0.0.1", 0) and parse_bind("9000") == ("127.0.0.1", 9000)
    assert parse_bind("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_bind("localhost:http")


def test_typed_errors_map_to_openai_statuses():
    from blockllm.exceptions import (
        AuthenticationError,
        ForbiddenError,
        NoCapacityError,
        OverloadedError,
    )
    from zoo_store import ModelNotFoundError

    cases = {
        AuthenticationError("bad key"): (401, "authentication_error"),
        ForbiddenError("private"): (403, "permission_error"),
        ModelNotFoundError("acme", "x"): (404, "invalid_request_error"),
        ValueError("too long"): (400, "invalid_request_error"),
        OverloadedError("busy", retry_after=2.5): (429, "rate_limit_error"),
        NoCapacityError("full"): (503, "server_error"),
    }
    for error, (status, kind) in cases.items():
        api = to_api_error(error, model="acme/x")
        assert (api.status, api.type) == (status, kind), error
    assert to_api_error(OverloadedError("busy", retry_after=2.5)).headers["Retry-After"] == "3"


# ------------------------------------------------------------------------------ a live server
@pytest.fixture(scope="module")
def cluster():
    import distributed

    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1") as c:
        with distributed.Client(c) as dask:
            dask.wait_for_workers(1, timeout=120)
            yield dask


@pytest.fixture(scope="module")
def keys(tiny_zoo):
    from blockllm.auth import create_key

    return {t: create_key(tiny_zoo, t) for t in ("acme", "globex")}


@pytest.fixture(scope="module")
def client(cluster, tiny_zoo, keys):
    """The blockllm.Client the server runs on (its own key is not used for HTTP callers)."""
    from blockllm.client import Client

    c = Client(cluster, api_key=keys["acme"], zoo=tiny_zoo.url)
    c.place(["acme/tiny-full", "platform/tiny-base", "acme/tiny-lora-b", "globex/tiny-partial-b"])
    return c


@pytest.fixture(scope="module")
def server(client):
    with HTTPServer(create_app(client), "127.0.0.1", 0) as srv:
        yield srv


_open_sdks: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_sdks():
    yield
    while _open_sdks:
        _open_sdks.pop().close()


def sdk(server, key: str) -> openai.OpenAI:
    """The real openai SDK pointed at `server` (no retries: a 429 must reach the test)."""
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)
    _open_sdks.append(api)
    return api


def greedy(n: int):
    from blockllm.types import SamplingParams

    return SamplingParams(max_new_tokens=n, temperature=0.0)




@pytest.mark.slow
def test_list_models_shows_the_tenants_own_and_shared_models(server, keys):
    acme = sorted(m.id for m in sdk(server, keys["acme"]).models.list())
    assert acme == ["acme/tiny-full", "acme/tiny-lora-b", "acme/tiny-partial-a", "platform/tiny-base"]
    globex = sorted(m.id for m in sdk(server, keys["globex"]).models.list())
    assert "globex/tiny-partial-b" in globex and not any(m.startswith("acme/") for m in globex)
    card = sdk(server, keys["acme"]).models.retrieve("acme/tiny-full")
    assert card.owned_by == "acme"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["acme/tiny-full", "platform/tiny-base", "acme/tiny-lora-b"])
def test_greedy_completion_equals_the_client(server, client, keys, model):
    got = sdk(server, keys["acme"]).completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    (want,) = client.generate([PROMPT], model, greedy(8))
    assert got.choices[0].text == want.text
    assert got.model == model and got.object == "text_completion"
    assert got.usage.completion_tokens == len(want.token_ids) and got.usage.prompt_tokens > 0
    assert got.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_greedy_chat_completion_equals_the_client(server, client, keys, tiny_family):
    from transformers import AutoTokenizer

    from blockllm.client import GenerationRequest

    got = sdk(server, keys["acme"]).chat.completions.create(model="acme/tiny-full", messages=MESSAGES, max_tokens=8, temperature=0)
    # The same chat through the Client: the model's chat template, then greedy generation.
    tok = AutoTokenizer.from_pretrained(tiny_family.base)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    want = client.submit([GenerationRequest(model="acme/tiny-full", prompt_token_ids=list(ids), sampling=greedy(8))])[0].result(300)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.object == "chat.completion" and got.usage.completion_tokens == len(want.token_ids)


@pytest.mark.slow
def test_streaming_completion_and_chat(server, client, keys):
    api = sdk(server, keys["acme"])
    (want,) = client.generate([PROMPT], "platform/tiny-base", greedy(10))
    chunks = list(api.completions.create(model="platform/tiny-base", prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    stream = api.chat.completions.create(
        model="acme/tiny-full", messages=MESSAGES, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = api.chat.completions.create(model="acme/tiny-full", messages=MESSAGES, max_tokens=8, temperature=0)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.slow
def test_errors_have_openai_shapes_and_statuses(server, keys):
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(server, "not-a-key").completions.create(model="platform/tiny-base", prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "not-a-key").models.list()
    acme = sdk(server, keys["acme"])
    with pytest.raises(openai.PermissionDeniedError) as e:  # globex's private model
        acme.completions.create(model="globex/tiny-partial-b", prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 403 and "globex" in e.value.message
    with pytest.raises(openai.NotFoundError):  # and it is not listed for acme either
        acme.models.retrieve("globex/tiny-partial-b")
    for unknown in ("acme/no-such-model", "gpt-4"):
        with pytest.raises(openai.NotFoundError) as e:
            acme.chat.completions.create(model=unknown, messages=MESSAGES, max_tokens=2)
        assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        acme.completions.create(model="platform/tiny-base", prompt=PROMPT, max_tokens=2, temperature=5)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):  # PromptTooLongError is a ValueError: 400
        acme.completions.create(model="platform/tiny-base", prompt="a b c " * 2000, max_tokens=2)
    ok = acme.completions.create(model="platform/tiny-base", prompt=PROMPT, max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2  # still serving


@pytest.mark.slow
def test_tenant_over_its_limit_gets_429_with_retry_after(client, keys):
    with HTTPServer(create_app(client, max_inflight_per_tenant=2), "127.0.0.1", 0) as srv:
        acme = sdk(srv, keys["acme"])
        with pytest.raises(openai.RateLimitError) as e:  # three prompts: three requests in flight
            acme.completions.create(model="platform/tiny-base", prompt=[PROMPT, "the", "a"], max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
        assert int(e.value.response.headers["retry-after"]) >= 1
        ok = acme.completions.create(model="platform/tiny-base", prompt=[PROMPT, "the"], max_tokens=2, temperature=0)
        assert len(ok.choices) == 2  # within the limit, and the rejected request left nothing behind
        stream = acme.completions.create(model="platform/tiny-base", prompt=PROMPT, max_tokens=2, temperature=0, stream=True, n=2)
        assert {c.choices[0].index for c in stream if c.choices} == {0, 1}
        stream.close()


# ------------------------------------------------------------------------------ the CLI
@pytest.mark.slow
def test_blockllm_serve_http_and_status(tiny_zoo, keys, tmp_path):
    exe = shutil.which("blockllm")
    assert exe, "the blockllm console script is not installed (pip install -e .)"
    env = {**os.environ, "BLOCKLLM_ZOO": tiny_zoo.url, "BLOCKLLM_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [exe, "serve", "--workers", "1", "--http", "127.0.0.1:0", "--dashboard", "127.0.0.1:0", "-m", "platform/tiny-base", "-m", "acme/tiny-full"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("press Ctrl-C" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        out = "".join(lines)
        url = re.search(r"HTTP API:\s+(http://127\.0\.0\.1:\d+)/v1", out).group(1)
        assert re.search(r"BlockLLM:\s+http://127\.0\.0\.1:\d+/blockllm", out)
        with openai.OpenAI(base_url=f"{url}/v1", api_key=keys["acme"], max_retries=0, timeout=120) as api:
            got = api.completions.create(model="acme/tiny-full", prompt=PROMPT, max_tokens=4, temperature=0)
        assert got.usage.completion_tokens == 4
        time.sleep(1.5)  # one monitor poll
        status = subprocess.run([exe, "status"], capture_output=True, text=True, env=env, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "1 with a block host" in status.stdout
        assert "acme/tiny-full" in status.stdout and "platform/tiny-base" in status.stdout
        assert "load:" in status.stdout and "latency" in status.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(5)
    proc.stdout.close()
    assert proc.returncode == 0, "".join(lines)
    assert "stopped" in "".join(lines)


def test_blockllm_keys_create_and_revoke(tmp_path):
    from blockllm.auth import KeyRing
    from blockllm.exceptions import AuthenticationError
    from zoo_store import Zoo

    url = (tmp_path / "zoo").as_uri()
    env = {**os.environ, "BLOCKLLM_ZOO": url}
    out = subprocess.run([shutil.which("blockllm"), "keys", "create", "acme"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert KeyRing(Zoo(url, read_only=True)).tenant(key) == "acme"
    out = subprocess.run([shutil.which("blockllm"), "keys", "revoke", "acme"], capture_output=True, text=True, env=env, timeout=120)
    assert "revoked 1" in out.stdout
    with pytest.raises(AuthenticationError):
        KeyRing(Zoo(url, read_only=True)).tenant(key)


def test_detokenizer_streams_exactly_the_decoded_text(tiny_family):
    from transformers import AutoTokenizer

    from blockllm.http.app import Detokenizer

    tok = AutoTokenizer.from_pretrained(tiny_family.base)
    ids = tok("reverse: a b c -> c b a, then 3 + 4 = 7.")["input_ids"] + [tok.eos_token_id]
    d = Detokenizer(tok)
    pieces = [d.add([i]) for i in ids]
    assert "".join(pieces) + d.flush() == tok.decode(ids, skip_special_tokens=True)
    assert sum(1 for p in pieces if p) > 5


def test_detokenizer_cuts_at_stop_strings(tiny_family):
    from transformers import AutoTokenizer

    from blockllm.http.app import Detokenizer

    tok = AutoTokenizer.from_pretrained(tiny_family.base)
    ids = tok("a b c -> c b a, then 3 + 4 = 7.")["input_ids"]
    d = Detokenizer(tok, stop=("= 7", "zzz"))
    text = "".join(d.add([i]) for i in ids) + d.flush()
    full = tok.decode(ids, skip_special_tokens=True)
    assert text == full[: full.index("= 7")] and d.stopped
