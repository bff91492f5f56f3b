"""Registration with SGLang: the config path, the hybrid-model spec, the state pool's size, and the launcher's
refusals, on SGLang's own code paths (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from common_kernels import RingLinearConfigError  # noqa: E402
from common_kernels.config import ARCHITECTURES  # noqa: E402

FRESH_PROCESS_CHECK = """
import json, torch
import ring_linear_sglang
ring_linear_sglang.register()
ring_linear_sglang.register()  # SGLang may load plugins more than once in a process
from sglang.srt.configs.linear_attn_model_registry import _LINEAR_ATTN_MODEL_REGISTRY
from sglang.srt.utils.hf_transformers.common import _CONFIG_REGISTRY
from sglang.srt.models.registry import ModelRegistry
specs = [s for s in _LINEAR_ATTN_MODEL_REGISTRY if s.backend_class_name == ring_linear_sglang.BACKEND_CLASS]
print(json.dumps({
    "config": _CONFIG_REGISTRY["bailing_moe_linear"].__name__,
    "specs": len(specs),
    "archs": specs[0].arch_names,
    "radix": specs[0].uses_mamba_radix_cache,
    "models": sorted({ModelRegistry.models[a].__module__ for a in specs[0].arch_names}),
    "cuda_initialized": torch.cuda.is_initialized(),
}))
"""


def test_register_in_a_fresh_process_is_idempotent_and_touches_no_gpu():
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {
        "config": "RingLinearSGLangConfig",
        "specs": 1,
        "archs": list(ARCHITECTURES),
        "radix": True,
        "models": ["ring_linear_sglang.model"],
        "cuda_initialized": False,
    }


ENTRY_POINT_CHECK = """
import json
from importlib.metadata import entry_points
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.utils.hf_transformers.common import _CONFIG_REGISTRY
print(json.dumps({
    "entry_point": {e.name: e.value for e in entry_points(group="sglang.srt.plugins")}.get("ring_linear"),
    "config": _CONFIG_REGISTRY["bailing_moe_linear"].__module__,
}))
"""


def test_sglangs_plugin_loader_finds_and_runs_register():
    out = subprocess.run([sys.executable, "-c", ENTRY_POINT_CHECK], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"entry_point": "ring_linear_sglang:register", "config": "ring_linear_sglang.config"}


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_sglangs_config_path_parses_the_released_config(sglang_registered, released_dir, trust_remote_code):
    from sglang.srt.configs.linear_attn_model_registry import get_linear_attn_config
    from sglang.srt.utils.hf_transformers.config import get_config

    from common_kernels import RingLinearConfig
    from ring_linear_sglang.config import RingLinearSGLangConfig

    config = get_config(str(released_dir), trust_remote_code=trust_remote_code)
    assert type(config) is RingLinearSGLangConfig
    # a field the released file leaves out has the shim's default (RingLinearConfig.__init__ ran)
    assert config.linear_decay_convention == RingLinearConfig().linear_decay_convention
    assert config.full_attention_layer_ids == [4, 9, 14, 19] and len(config.linear_layer_ids) == 16
    assert config.layers_block_type.count("attention") == 4
    spec, _ = get_linear_attn_config(config)
    assert spec.backend_class_name == sglang_registered.BACKEND_CLASS


def test_the_benchmarks_softmax_twin_is_sglangs_native_model_not_ours(sglang_registered, tmp_path):
    """The serving benchmark's twin (`bench_serve`, offline: its config class is a local file) parses through
    SGLang's config path and resolves to SGLang's `BailingMoeV2ForCausalLM`, with the RoPE SGLang reads."""
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.utils.hf_transformers.config import get_config

    from benchmarks.bench_serve import write_model_dir

    config = get_config(str(write_model_dir("softmax-twin", tmp_path, "sglang")), trust_remote_code=True)
    assert type(config).__name__ == "BailingMoeV2Config"
    assert config.rope_parameters["rope_theta"] == 1_000_000 and config.num_experts == 256
    model_class, _ = ModelRegistry.resolve_model_cls(config.architectures)
    assert model_class.__module__ == "sglang.srt.models.bailing_moe"


@pytest.mark.parametrize(("tp_size", "heads"), [(1, 16), (2, 8), (4, 4)])
def test_the_state_pool_holds_one_fp32_state_per_linear_layer_and_request(
    sglang_registered, released_dir, monkeypatch, tp_size, heads
):
    import torch
    from sglang.srt import runtime_context
    from sglang.srt.utils.hf_transformers.config import get_config

    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(attn_tp_size=tp_size))
    params = get_config(str(released_dir), trust_remote_code=False).mamba2_cache_params
    assert params.shape.temporal == (heads, 128, 128) and params.dtype.temporal == torch.float32
    assert params.layers == [l for l in range(20) if (l + 1) % 5]
    assert params.mamba_cache_per_req == 16 * 2**20 // tp_size  # 16 MiB per request at TP 1


def test_in_aligned_mode_each_slot_also_holds_an_fp32_window_buffer_in_the_conv_state(
    sglang_registered, released_dir, monkeypatch
):
    """The window form's buffer (keys and values of up to 64 tokens a head) rides in SGLang's conv state, fp32, so
    SGLang sizes, clears and copies it with the slot: 32 MiB a request in all at Ring-mini's size."""
    import torch
    from sglang.srt import runtime_context
    from sglang.srt.utils.hf_transformers.config import get_config

    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")
    params = get_config(str(released_dir), trust_remote_code=False).mamba2_cache_params
    assert params.shape.temporal == (16, 128, 128) and params.shape.conv == [(16 * 256, 64)]
    assert params.dtype.conv == torch.float32 and params.dtype.temporal == torch.float32
    assert params.mamba_cache_per_req == 32 * 2**20


def _args(**overrides) -> SimpleNamespace:
    return SimpleNamespace(
        **{
            "tp_size": 1, "pp_size": 1, "speculative_algorithm": None, "enable_dp_attention": False,
            "mamba_radix_cache_strategy": "auto", "disable_radix_cache": False, "mamba_ssm_dtype": None,
            "disaggregation_mode": "null",
        } | overrides
    )  # fmt: skip


def test_the_settings_check_refuses_what_cannot_run_naming_the_choices(sglang_registered, released_dir):
    from sglang.srt.utils.hf_transformers.config import get_config

    from ring_linear_sglang.settings import check_server_args

    config = get_config(str(released_dir), trust_remote_code=False)
    for tp_size in (1, 2, 4):
        assert check_server_args(_args(tp_size=tp_size), config) == {}
    for tp_size in (3, 8):
        with pytest.raises(RingLinearConfigError, match=rf"tensor parallel size {tp_size} .*use one of \[1, 2, 4\]"):
            check_server_args(_args(tp_size=tp_size), config)
    refusals = {
        "pipeline parallel size 2 is not supported": _args(pp_size=2),
        "speculative decoding is not supported.*--speculative-algorithm": _args(speculative_algorithm="EAGLE"),
        "--enable-dp-attention is not supported": _args(enable_dp_attention=True),
        "--mamba-radix-cache-strategy extra_buffer is not supported.*auto, no_buffer": _args(
            mamba_radix_cache_strategy="extra_buffer"
        ),
        "--mamba-ssm-dtype 'float16' is not supported": _args(mamba_ssm_dtype="float16"),
        "disaggregated prefill is not supported.*--disaggregation-mode": _args(disaggregation_mode="prefill"),
    }
    for message, args in refusals.items():
        with pytest.raises(ValueError, match=message):
            check_server_args(args, config)
    assert check_server_args(_args(mamba_radix_cache_strategy="extra_buffer", disable_radix_cache=True), config) == {}
    assert check_server_args(_args(mamba_ssm_dtype="bfloat16"), config) == {}


def test_the_launcher_refuses_tp_3_before_any_worker_starts(sglang_registered, released_dir):
    """Through SGLang's own server-argument resolution (the per-architecture provider), on a CPU device."""
    from ring_linear_sglang.compat import resolve_server_args, resolved

    with pytest.raises(RingLinearConfigError, match=r"use one of \[1, 2, 4\]"):
        resolve_server_args(model_path=str(released_dir), tp_size=3, skip_tokenizer_init=True, device="cpu")
    args = resolve_server_args(model_path=str(released_dir), tp_size=2, skip_tokenizer_init=True, device="cpu")
    settings = resolved(args)
    assert settings.mamba_radix_cache_strategy == "no_buffer"  # a cached prefix's state is restored from its slot
    assert settings.disable_overlap_schedule


def test_aligned_mode_needs_deterministic_inference_whole_prompts_and_one_rank(
    sglang_registered, released_dir, monkeypatch, caplog
):
    import logging

    from sglang.srt.utils.hf_transformers.config import get_config

    from common_kernels.ops import triton_settings
    from ring_linear_sglang.settings import check_server_args

    config = get_config(str(released_dir), trust_remote_code=False)
    aligned = {
        "enable_deterministic_inference": True, "chunked_prefill_size": -1, "disable_radix_cache": True,
        "disable_prefill_cuda_graph": True, "moe_runner_backend": "auto",
    }  # fmt: skip
    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")
    monkeypatch.setattr(triton_settings, "FP32_DOT_PRECISION", "tf32x3")
    caplog.set_level(logging.INFO, logger="ring_linear_sglang.settings")
    assert check_server_args(_args(**aligned), config) == {}
    # the launcher names the product setting its bits follow, as vLLM's server does
    assert "multiplies fp32 operands as tf32x3 (RING_LINEAR_FP32_DOT)" in caplog.text
    with pytest.raises(ValueError, match="needs: add --enable-deterministic-inference; pass --chunked-prefill-size -1"):
        check_server_args(_args(chunked_prefill_size=8192), config)
    refusals = {
        "add --disable-radix-cache": {"disable_radix_cache": False},
        "drop --tp-size 2": {"tp_size": 2},
        "drop --ep-size 2": {"ep_size": 2},
        "drop --quantization fp8": {"quantization": "fp8"},
        "drop --kv-cache-dtype": {"kv_cache_dtype": "fp8_e4m3"},
        "add --disable-prefill-cuda-graph": {"disable_prefill_cuda_graph": False},
        "drop --enable-torch-compile": {"enable_torch_compile": True},
        "use --moe-runner-backend triton \\(not flashinfer_trtllm\\)": {"moe_runner_backend": "flashinfer_trtllm"},
    }
    for message, change in refusals.items():
        with pytest.raises(ValueError, match=message):
            check_server_args(_args(**(aligned | change)), config)
    monkeypatch.setenv("RING_LINEAR_ALIGNED", "0")
    assert check_server_args(_args(), config) == {}
