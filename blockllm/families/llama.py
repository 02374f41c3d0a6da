"""The Llama family (Llama, Mistral, Qwen2, Qwen3): cut into embed / decoder-layer runs / head."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from zoo_store import Block, BlockSpec, tensor_specs

from ..exceptions import AdapterError, CheckpointError
from .base import BlockParts

log = logging.getLogger(__name__)

# Config values a block's computation depends on; they enter its spec and so its fingerprint.
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "max_position_embeddings",
    "vocab_size",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LORA_RE = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_SUPPORTED_LORA_TARGETS = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
}


def hf_config(config: dict[str, Any]) -> PretrainedConfig:
    cfg = dict(config)
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def arch_of(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in ARCH_KEYS if config.get(k) is not None}


def _meta_model(cfg: PretrainedConfig) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


class LlamaFamily:
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    # ------------------------------------------------------------------ partition
    def partition(
        self, config: dict[str, Any], state_dict: dict[str, torch.Tensor], layers_per_block: int
    ) -> list[BlockParts]:
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, not {layers_per_block}")
        self._check_against_config(config, state_dict)
        n = int(config["num_hidden_layers"])
        tied = bool(config.get("tie_word_embeddings", False))
        arch = arch_of(config)

        def make(kind: str, start: int, end: int, tensors: dict[str, torch.Tensor], **extra: Any) -> BlockParts:
            spec = BlockSpec(kind, self.name, arch, start, end, tensor_specs(tensors), extra)
            return BlockParts(spec, tensors)

        parts = [make("embed", 0, 0, {"embed_tokens.weight": state_dict["model.embed_tokens.weight"]})]
        per_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(n)}
        for key, t in state_dict.items():
            m = _LAYER_RE.match(key)
            if m:
                per_layer[int(m.group(1))][m.group(2)] = t
        for start in range(0, n, layers_per_block):
            end = min(n, start + layers_per_block)
            tensors = {
                f"{i - start}.{name}": t for i in range(start, end) for name, t in per_layer[i].items()
            }
            parts.append(make("layers", start, end, tensors))
        head = {"norm.weight": state_dict["model.norm.weight"]}
        if not tied:
            head["lm_head.weight"] = state_dict["lm_head.weight"]
        parts.append(make("head", n, n, head, tied_embedding=tied))
        return parts

    def _check_against_config(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
        """Every tensor the config implies must be there with its shape, and nothing else."""
        try:
            expected = {k: tuple(v.shape) for k, v in _meta_model(hf_config(config)).state_dict().items()}
        except Exception as e:  # a config transformers itself rejects
            raise CheckpointError(f"config.json does not describe a valid model: {e}") from e
        if config.get("tie_word_embeddings", False):
            expected.pop("lm_head.weight", None)
            state_dict.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
        missing = sorted(set(expected) - set(state_dict))
        extra = sorted(set(state_dict) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
        if missing or extra or wrong:
            detail = []
            if missing:
                detail.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
            if extra:
                detail.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[:3]}")
            if wrong:
                k = wrong[0]
                detail.append(
                    f"{len(wrong)} tensor(s) with shapes that do not fit config.json, e.g. {k}: "
                    f"{tuple(state_dict[k].shape)} vs {expected[k]}"
                )
            raise CheckpointError("checkpoint does not match its config: " + "; ".join(detail))

    # ------------------------------------------------------------------ adapters
    def partition_adapter(
        self,
        config: dict[str, Any],
        adapter_config: dict[str, Any],
        adapter_state: dict[str, torch.Tensor],
        chain: list[tuple[str, BlockSpec]],
    ) -> list[tuple[int, BlockParts]]:
        if adapter_config.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"only LoRA adapters are supported, not {adapter_config.get('peft_type')}")
        for flag in ("use_dora", "modules_to_save", "layers_to_transform", "trainable_token_indices"):
            if adapter_config.get(flag):
                raise AdapterError(f"LoRA adapters with {flag}={adapter_config[flag]!r} are not supported")
        if adapter_config.get("bias", "none") != "none":
            raise AdapterError("LoRA adapters with trained biases are not supported (bias must be 'none')")
        r = adapter_config.get("r")
        alpha = adapter_config.get("lora_alpha")
        if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
            raise AdapterError(f"adapter_config.json needs an integer r >= 1 and a numeric lora_alpha, got r={r!r}, lora_alpha={alpha!r}")
        layer_block = {}
        for index, (_fp, spec) in enumerate(chain):
            if spec.kind == "layers":
                for layer in range(spec.layer_start, spec.layer_end):
                    layer_block[layer] = index
        per_block: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in adapter_state.items():
            m = _LORA_RE.match(key)
            if not m:
                raise AdapterError(f"adapter tensor {key!r} is not a LoRA weight of a decoder layer")
            layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
            if module not in _SUPPORTED_LORA_TARGETS:
                raise AdapterError(f"LoRA on {module!r} is not supported; targets: {sorted(_SUPPORTED_LORA_TARGETS)}")
            if layer not in layer_block:
                raise AdapterError(f"adapter touches layer {layer}, which the base model does not have")
            index = layer_block[layer]
            start = chain[index][1].layer_start
            per_block.setdefault(index, {})[f"{layer - start}.{module}.lora_{ab}"] = t
        if not per_block:
            raise AdapterError("the adapter has no LoRA weights")
        hidden = int(config["hidden_size"])
        out = []
        for index, tensors in sorted(per_block.items()):
            base_fp, base_spec = chain[index]
            shapes = {ts.name: ts.shape for ts in base_spec.tensors}
            for name, t in tensors.items():
                stem = name.rsplit(".lora_", 1)[0]
                w = shapes.get(f"{stem}.weight")
                partner = f"{stem}.lora_{'B' if name.endswith('A') else 'A'}"
                if w is None or partner not in tensors:
                    raise AdapterError(f"adapter tensor {name} has no base weight or no partner {partner}")
                ok = t.shape == (t.shape[0], w[1]) if name.endswith("A") else t.shape == (w[0], t.shape[1])
                if t.dim() != 2 or not ok:
                    raise AdapterError(f"adapter tensor {name} has shape {tuple(t.shape)}, which does not fit base weight {w}")
            modules = sorted({n.split(".", 1)[1].rsplit(".lora_", 1)[0] for n in tensors})
            extra = {
                "base": base_fp,
                "r": r,
                "lora_alpha": alpha,
                "use_rslora": bool(adapter_config.get("use_rslora", False)),
                "rank_pattern": adapter_config.get("rank_pattern") or {},
                "alpha_pattern": adapter_config.get("alpha_pattern") or {},
                "target_modules": modules,
                "hidden_size": hidden,
            }
            spec = BlockSpec("adapter", self.name, base_spec.arch, base_spec.layer_start, base_spec.layer_end, tensor_specs(tensors), extra)
            out.append((index, BlockParts(spec, tensors)))
        return out

    # ------------------------------------------------------------------ assembly
    def state_dict_of(self, blocks: list[Block]) -> dict[str, torch.Tensor]:
        """Hugging Face parameter names for a chain's tensors."""
        sd: dict[str, torch.Tensor] = {}
        for b in blocks:
            if b.spec.kind == "embed":
                sd["model.embed_tokens.weight"] = b.tensors["embed_tokens.weight"]
            elif b.spec.kind == "layers":
                for name, t in b.tensors.items():
                    rel, rest = name.split(".", 1)
                    sd[f"model.layers.{b.spec.layer_start + int(rel)}.{rest}"] = t
            elif b.spec.kind == "head":
                sd["model.norm.weight"] = b.tensors["norm.weight"]
                if "lm_head.weight" in b.tensors:
                    sd["lm_head.weight"] = b.tensors["lm_head.weight"]
            else:
                raise CheckpointError(f"block {b.fingerprint} of kind {b.spec.kind} cannot be in a chain")
        return sd

    def assemble(
        self,
        config: dict[str, Any],
        blocks: list[Block],
        adapters: list[tuple[int, Block]] = (),
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> PreTrainedModel:
        cfg = hf_config(config)
        model = _meta_model(cfg)
        sd = self.state_dict_of(blocks)
        tied = bool(config.get("tie_word_embeddings", False))
        if tied:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
            raise CheckpointError(f"chain does not fill the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if tied:
            model.tie_weights()
        # Non-persistent buffers (rotary inv_freq) were made on the meta device: rebuild them.
        for parent in list(model.modules()):
            for child_name, child in parent.named_children():
                if any(b.is_meta for b in child.buffers(recurse=False)):
                    with torch.device(device):  # rotary modules take (config) or (config, device)
                        setattr(parent, child_name, type(child)(config=cfg))
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        model.eval()
        if adapters:
            model = self._apply_lora(model, adapters)
        return model

    def _apply_lora(self, model: PreTrainedModel, adapters: list[tuple[int, Block]]) -> PreTrainedModel:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        extras = [b.spec.extra for _, b in adapters]
        first = extras[0]
        modules = sorted({m.rsplit(".", 1)[1] for e in extras for m in e["target_modules"]})
        layers = sorted(
            {b.spec.layer_start + int(n.split(".", 1)[0]) for _, b in adapters for n in b.tensors}
        )
        lcfg = LoraConfig(
            r=first["r"],
            lora_alpha=first["lora_alpha"],
            use_rslora=first["use_rslora"],
            rank_pattern=first["rank_pattern"],
            alpha_pattern=first["alpha_pattern"],
            target_modules=modules,
            layers_to_transform=layers,
            lora_dropout=0.0,
        )
        peft_model = get_peft_model(model, lcfg)
        sd = {}
        for _, b in adapters:
            for name, t in b.tensors.items():
                rel, rest = name.split(".", 1)
                stem, ab = rest.rsplit(".lora_", 1)
                layer = b.spec.layer_start + int(rel)
                sd[f"base_model.model.model.layers.{layer}.{stem}.lora_{ab}.weight"] = t
        result = set_peft_model_state_dict(peft_model, sd)
        if result.unexpected_keys:
            raise AdapterError(f"adapter tensors did not fit the model: {result.unexpected_keys[:3]}")
        peft_model.eval()
        return peft_model
