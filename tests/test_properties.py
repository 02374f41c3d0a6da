"""Property tests (hypothesis) for what arrives from outside: wire request dicts and model manifests.

Any input either parses or raises one of our typed errors, never a stray TypeError or KeyError;
valid inputs survive a round trip unchanged. (The chain planner's properties: tests/test_planner.py.)
"""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from blockllm.client import GenerationRequest
from blockllm.exceptions import BlockLLMError
from blockllm.serving.wire import WireRequest, parse_request
from blockllm.types import SamplingParams
from zoo_store import Manifest
from zoo_store.exceptions import ZooError
from zoo_store.types import AdapterRef

NAME = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,20}\Z")
FP = st.binary(min_size=32, max_size=32).map(bytes.hex)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
REQUEST_KEYS = ["request_id", "model", "prompt", "messages", "prompt_token_ids", "sampling", "priority", "api_key", "resume_token_ids"]


@st.composite
def valid_sampling(draw) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=draw(st.integers(1, 4096)),
        temperature=draw(st.floats(0, 5)),
        top_k=draw(st.integers(0, 100)),
        top_p=draw(st.floats(0.01, 1.0)),
        seed=draw(st.none() | st.integers(0, 2**31)),
        stop_token_ids=tuple(draw(st.lists(st.integers(0, 50_000), max_size=3))),
        stop=tuple(draw(st.lists(st.text(min_size=1, max_size=5), max_size=2))),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.booleans()),
    )


@st.composite
def valid_requests(draw) -> GenerationRequest:
    kind = draw(st.sampled_from(["prompt", "messages", "prompt_token_ids"]))
    value = {
        "prompt": st.text(min_size=1, max_size=40),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=20)}), min_size=1, max_size=3),
        "prompt_token_ids": st.lists(st.integers(0, 50_000), min_size=1, max_size=20),
    }[kind]
    return GenerationRequest(
        model=f"{draw(NAME)}/{draw(NAME)}", sampling=draw(valid_sampling()), request_id=draw(st.text(min_size=1, max_size=40)),
        priority=draw(st.sampled_from(["online", "batch"])), **{kind: draw(value)},
    )


@settings(max_examples=200, deadline=None)
@given(valid_requests(), st.none() | st.text(min_size=1, max_size=30))
def test_a_valid_request_survives_the_wire(req, key):
    wire = json.loads(json.dumps(req.to_wire(key)))  # as it travels (lists for tuples)
    parsed = parse_request(wire)
    assert isinstance(parsed, WireRequest)
    assert (parsed.request_id, parsed.model, parsed.priority, parsed.api_key) == (req.request_id, req.model, req.priority, key)
    assert parsed.sampling == req.sampling
    assert parsed.prompt == req.prompt
    assert parsed.prompt_token_ids == (tuple(req.prompt_token_ids) if req.prompt_token_ids else None)
    assert parsed.messages == (tuple(req.messages) if req.messages else None)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(REQUEST_KEYS) | st.text(max_size=6), JSON, max_size=8) | JSON)
def test_any_request_dict_parses_or_gets_a_typed_error(raw):
    try:
        parse_request(raw)
    except (BlockLLMError, ZooError):
        pass


@settings(max_examples=200, deadline=None)
@given(valid_requests(), st.sampled_from(REQUEST_KEYS), JSON)
def test_one_bad_field_in_a_valid_request_is_a_typed_error(req, key, junk):
    wire = json.loads(json.dumps(req.to_wire(None)))
    wire[key] = junk
    try:
        parse_request(wire)
    except (BlockLLMError, ZooError):
        pass


@st.composite
def manifests(draw) -> Manifest:
    chain = tuple(draw(st.lists(FP, min_size=1, max_size=6)))
    adapters = tuple(AdapterRef(draw(st.integers(0, len(chain) - 1)), draw(FP)) for _ in range(draw(st.integers(0, 2))))
    return Manifest(
        tenant=draw(NAME), name=draw(NAME), family="llama", chain=chain,
        config=draw(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8) | st.booleans(), max_size=4)),
        adapters=adapters, tokenizer=draw(st.none() | FP), visibility=draw(st.sampled_from(["private", "shared"])),
        base=draw(st.none() | st.builds(lambda a, b: f"{a}/{b}", NAME, NAME)),
        error_budget=draw(st.floats(0, 10)), source=draw(st.text(max_size=20)), created=draw(st.text(max_size=25)),
    )


@settings(max_examples=100, deadline=None)
@given(manifests())
def test_a_manifest_survives_a_json_round_trip(m):
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m


@settings(max_examples=150, deadline=None)
@given(manifests(), st.sampled_from([f.name for f in dataclasses.fields(Manifest)]), JSON)
def test_a_manifest_with_one_bad_field_is_a_manifest_error_or_still_valid(m, field, junk):
    d = m.to_dict()
    d[field] = junk
    try:
        again = Manifest.from_dict(d)
    except ZooError:  # ManifestError or InvalidNameError
        return
    assert Manifest.from_dict(again.to_dict()) == again


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_any_json_is_a_manifest_or_a_manifest_error(d):
    try:
        Manifest.from_dict(d)
    except ZooError:
        pass
