"""A reusable zoo test suite (in the manner of zarr's StoreTests): subclass and provide `make_zoo`."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zarr

from zoo_store import (
    AdapterRef,
    BlockNotFoundError,
    BlockSpec,
    InvalidNameError,
    Manifest,
    ManifestError,
    ModelExistsError,
    ModelNotFoundError,
    Zoo,
    ZooCorruptionError,
    fingerprint,
    tensor_specs,
)


def make_block(seed: int, *, kind: str = "layers", dtype=torch.float32, rows: int = 32, start: int = 0):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "0.self_attn.q_proj.weight": torch.randn(rows, 16, generator=g).to(dtype),
        "0.input_layernorm.weight": torch.randn(16, generator=g).to(dtype),
    }
    spec = BlockSpec(kind, "llama", {"hidden_size": 16}, start, start + 1, tensor_specs(tensors))
    return spec, tensors


def manifest(tenant: str, name: str, chain, **kw) -> Manifest:
    return Manifest(tenant=tenant, name=name, family="llama", chain=tuple(chain), config={"model_type": "llama"}, **kw)


class ZooTests:
    """Behaviour every zoo backend must show."""

    def make_zoo(self, request) -> Zoo:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    def zoo(self, request) -> Zoo:
        return self.make_zoo(request)

    # ---------------------------------------------------------------- blocks
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
    def test_block_roundtrip_is_bit_exact(self, zoo, dtype):
        spec, tensors = make_block(1, dtype=dtype)
        fp = zoo.put_block(spec, tensors)
        assert fp == fingerprint(spec, tensors)
        block = zoo.get_block(fp)
        assert block.spec == spec
        for name, t in tensors.items():
            assert block.tensors[name].dtype == dtype
            assert torch.equal(block.tensors[name].view(torch.uint8), t.view(torch.uint8))

    def test_bf16_is_stored_as_uint16_view(self, zoo):
        spec, tensors = make_block(2, dtype=torch.bfloat16)
        fp = zoo.put_block(spec, tensors)
        arr = zarr.open_array(zoo._store, path=f"blocks/{fp}/0.input_layernorm.weight", mode="r")
        assert arr.dtype == np.uint16
        assert arr.attrs["torch_dtype"] == "bfloat16"

    def test_put_is_idempotent_and_stores_once(self, zoo):
        spec, tensors = make_block(3)
        fp1 = zoo.put_block(spec, tensors)
        fp2 = zoo.put_block(spec, {k: v.clone() for k, v in tensors.items()})
        assert fp1 == fp2
        assert zoo.list_blocks() == [fp1]

    def test_one_flipped_bit_changes_the_fingerprint(self, zoo):
        spec, tensors = make_block(4)
        flipped = {k: v.clone() for k, v in tensors.items()}
        flipped["0.self_attn.q_proj.weight"].view(torch.int32)[0, 0] ^= 1
        assert fingerprint(spec, tensors) != fingerprint(spec, flipped)

    def test_flipped_byte_is_detected_on_read_and_by_verify(self, zoo):
        spec, tensors = make_block(5)
        fp = zoo.put_block(spec, tensors)
        good_spec, good = make_block(6)
        good_fp = zoo.put_block(good_spec, good)
        arr = zarr.open_array(zoo._store, path=f"blocks/{fp}/0.self_attn.q_proj.weight", mode="a")
        data = arr[...]
        data.view(np.uint8).reshape(-1)[7] ^= 0x40
        arr[...] = data
        fresh = Zoo(zoo.url, storage_options=getattr(self, "storage_options", None))
        with pytest.raises(ZooCorruptionError, match=fp):
            fresh.get_block(fp)
        assert fresh.get_block(fp, verify=False).tensors["0.self_attn.q_proj.weight"].shape == (32, 16)
        problems = fresh.verify()
        assert list(problems) == [fp]
        assert fresh.get_block(good_fp).fingerprint == good_fp

    def test_missing_block_and_model_raise_typed_errors(self, zoo):
        with pytest.raises(BlockNotFoundError):
            zoo.get_block("0" * 64)
        with pytest.raises(ModelNotFoundError):
            zoo.get_manifest("nobody", "nothing")
        with pytest.raises(ManifestError):
            zoo.get_block("../../etc/passwd")

    def test_a_block_without_published_spec_is_invisible(self, zoo):
        spec, tensors = make_block(7)
        fp = fingerprint(spec, tensors)
        # Tensors written, spec not yet published: what a crashed writer leaves behind.
        zarr.open_group(zoo._store, path=f"blocks/{fp}", mode="a").attrs.update({"started": "2000-01-01T00:00:00+00:00"})
        zarr.create_array(zoo._store, name=f"blocks/{fp}/x", shape=(2,), dtype="float32")
        assert not zoo.has_block(fp)
        assert zoo.list_blocks() == []
        with pytest.raises(BlockNotFoundError):
            zoo.get_block(fp)
        assert zoo.gc(grace_seconds=60).deleted_blocks == (fp,)

    def test_concurrent_puts_of_the_same_block_leave_one_copy(self, zoo):
        spec, tensors = make_block(8, rows=256)
        errors = []

        def put():
            try:
                zoo.put_block(spec, {k: v.clone() for k, v in tensors.items()})
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=put) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert zoo.list_blocks() == [fingerprint(spec, tensors)]
        zoo.get_block(fingerprint(spec, tensors))  # verifies

    # ---------------------------------------------------------------- models
    def test_manifest_roundtrip_list_and_delete(self, zoo):
        fps = [zoo.put_block(*make_block(i, start=i)) for i in range(3)]
        m = manifest("acme", "m1", fps, visibility="shared", error_budget=0.01)
        zoo.put_manifest(m)
        assert zoo.get_manifest("acme", "m1") .chain == tuple(fps)
        assert [x.key for x in zoo.list_models()] == ["acme/m1"]
        assert zoo.list_models("other") == []
        with pytest.raises(ModelExistsError):
            zoo.put_manifest(m)
        zoo.delete_model("acme", "m1")
        assert zoo.list_models() == []
        with pytest.raises(ModelNotFoundError):
            zoo.delete_model("acme", "m1")

    def test_manifest_naming_missing_blocks_is_refused(self, zoo):
        fp = zoo.put_block(*make_block(10))
        with pytest.raises(ManifestError, match="missing"):
            zoo.put_manifest(manifest("acme", "broken", [fp, "a" * 64]))
        assert zoo.list_models() == []

    @pytest.mark.parametrize("tenant,name", [("..", "m"), ("acme", "../../blocks"), ("a/b", "m"), ("", "m"), ("acme", "x" * 65), ("acme", ".hidden")])
    def test_names_that_could_escape_are_refused(self, zoo, tenant, name):
        fp = zoo.put_block(*make_block(11))
        with pytest.raises(InvalidNameError):
            zoo.put_manifest(manifest(tenant, name, [fp]))
        with pytest.raises(InvalidNameError):
            zoo.get_manifest(tenant, name)
        assert zoo.list_models() == []

    def test_stats_count_logical_and_stored_bytes(self, zoo):
        shared = [zoo.put_block(*make_block(i, start=i)) for i in range(3)]
        own = zoo.put_block(*make_block(99, start=2))
        zoo.put_manifest(manifest("acme", "a", shared))
        zoo.put_manifest(manifest("globex", "b", [*shared[:2], own]))
        size = make_block(0)[0].nbytes
        stats = zoo.stats()
        assert stats.models == 2 and stats.blocks == 4
        assert stats.logical_bytes == 6 * size
        assert stats.stored_bytes == 4 * size
        assert stats.dedup_ratio == pytest.approx(1.5)

    def test_gc_deletes_only_unreferenced_blocks(self, zoo):
        keep = [zoo.put_block(*make_block(i, start=i)) for i in range(2)]
        drop = zoo.put_block(*make_block(50, start=1))
        adapter = zoo.put_block(*make_block(51, kind="adapter"))
        zoo.put_manifest(manifest("acme", "a", keep, adapters=(AdapterRef(0, adapter),)))
        zoo.put_manifest(manifest("acme", "b", [keep[0], drop]))
        assert zoo.gc(grace_seconds=0).deleted_blocks == ()
        zoo.delete_model("acme", "b")
        young = zoo.gc(grace_seconds=3600)
        assert young.deleted_blocks == () and young.kept_young == 1
        report = zoo.gc(grace_seconds=0)
        assert report.deleted_blocks == (drop,)
        assert report.freed_bytes == make_block(0)[0].nbytes
        assert sorted(zoo.list_blocks()) == sorted([*keep, adapter])
        for fp in keep:
            zoo.get_block(fp)

    def test_assets_and_json_documents(self, zoo):
        files = {"tokenizer.json": b'{"a": 1}', "tokenizer_config.json": b"{}"}
        fp = zoo.put_asset(files)
        assert zoo.get_asset(fp) == files
        zoo.put_json("graphs/v1", {"nodes": [1, 2]})
        assert zoo.get_json("graphs/v1") == {"nodes": [1, 2]}
        assert zoo.get_json("graphs/none", default=42) == 42
        assert zoo.list_json("graphs") == ["v1"]

    def test_manifest_validation(self, zoo):
        fp = zoo.put_block(*make_block(12))
        for bad in (-0.1, float("nan"), float("inf"), "0.1", True):
            with pytest.raises(ManifestError, match="error_budget"):
                manifest("acme", "m", [fp], error_budget=bad)
        with pytest.raises(ManifestError):
            manifest("acme", "m", [])
        with pytest.raises(ManifestError):
            manifest("acme", "m", [fp], adapters=(AdapterRef(5, fp),))
        with pytest.raises(ManifestError):
            Manifest.from_dict({"tenant": "acme"})
        with pytest.raises(ManifestError):
            Manifest.from_dict(["not", "a", "dict"])
