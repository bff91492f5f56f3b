"""Named configs of the released models, as data.

`ring-mini-linear-2.0` is the released `config.json` field for field. The flash presets were read from
the configs of mlx-community's 4-bit conversions of the released flash checkpoints (the converter keeps
every original field and adds only its quantization block; copies in GitHub's mortensg/blune-cli at
4b0a86a, `configs/mlx-community/Ring-flash-linear-2.0{,-128k}-4bit/config.json`): they agree with the
parameter counts (104.2B total / 6.1B active), and the two flash checkpoints differ only in `rope_theta`
(600000, and 1000000 for the 128K one). The original files themselves were not reachable from here.

Cross-checked on 2026-11-29 against what else is public (no second copy of the flash config.json exists on
GitHub): the model cards, the paper (arXiv 2510.19338), the authors' SGLang model file (inclusionAI/Ring-V2) and
mlx-lm's confirm the widths, depth, heads, KV heads, head size, layer groups of 8 (7 linear per softmax), 256 experts
with 8 active, partial RoPE 0.5, qk-norm, sigmoid routing with expert bias, one dense layer, 128K positions and the
untied head; the parameter counts computed from these fields give the published 104.2B total and 6.1B active (7.4B
with embeddings). Backed only by sibling models (Ling 2.0) or the authors' engine defaults: `n_group` 8, `topk_group`
4, `routed_scaling_factor` 2.5, `rope_theta` 600000, the vocabulary and EOS id. With no flash-specific source at all:
`group_norm_size` 4, `linear_silu`, `norm_topk_prob`, `router_dtype`, `rms_norm_eps`, `num_nextn_predict_layers` 0,
and the 128K variant's `rope_theta`. Nothing public contradicts any field.
"""

from __future__ import annotations

from typing import Any

from .config import RingLinearConfig

_MINI: dict[str, Any] = {
    "architectures": ["BailingMoeLinearV2ForCausalLM"],
    "vocab_size": 157184,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "layer_group_size": 5,
    "group_norm_size": 4,
    "linear_silu": False,
    "moe_intermediate_size": 512,
    "moe_shared_expert_intermediate_size": 512,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "router_dtype": "fp32",
    "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 0,
    "use_qk_norm": True,
    "partial_rotary_factor": 0.5,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "eos_token_id": 156892,
    "pad_token_id": 156892,
    "torch_dtype": "bfloat16",
}

_FLASH: dict[str, Any] = {
    **_MINI,
    "hidden_size": 4096,
    "intermediate_size": 9216,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "layer_group_size": 8,
    "moe_intermediate_size": 1024,
    "moe_shared_expert_intermediate_size": 1024,
    "rope_theta": 600000,
}

PRESETS: dict[str, dict[str, Any]] = {
    "ring-mini-linear-2.0": _MINI,
    "ring-flash-linear-2.0": _FLASH,
    "ring-flash-linear-2.0-128k": {**_FLASH, "rope_theta": 1000000},
}

# Fields whose preset value is not read from a released config.json (or a field-for-field copy of one); none
# since the flash configs were found (2026-11-29).
RECONSTRUCTED: dict[str, frozenset[str]] = {name: frozenset() for name in PRESETS}


def preset_config(name: str, **overrides: Any) -> RingLinearConfig:
    """Build the config of a released model by preset name, with optional field overrides."""
    return RingLinearConfig(**{**_preset(name), **overrides})


def preset_json(name: str, **overrides: Any) -> dict[str, Any]:
    """A released model's `config.json` contents by preset name (model type included), with optional field
    overrides: what an engine reads from a checkpoint folder (dummy-weight runs write it there)."""
    return {**_preset(name), "model_type": RingLinearConfig.model_type, **overrides}


def _preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def tiny_config(vocab_size: int = 64, **overrides: Any) -> RingLinearConfig:
    """A CPU-sized Ring-linear with every feature of the real one.

    6 layers in groups of 3 (linear, linear, softmax), so 4 linear and 2 softmax layers; layer 0 dense,
    the rest MoE with 8 experts in 4 groups (2 kept), 2 routed experts plus a shared one; GQA 4:2;
    partial RoPE over half of each head; 2 output-norm groups (tensor parallel 1 or 2).
    """
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "layer_group_size": 3,
        "group_norm_size": 2,
        "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "eos_token_id": 2,
        "bos_token_id": 1,
        "torch_dtype": "float32",
    }
    return RingLinearConfig(**{**fields, **overrides})
