"""Registration: entry point, architectures, config class, engine-config hook, without trust_remote_code."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from common_kernels import RingLinearConfig  # noqa: E402
from ring_linear_vllm import ARCHITECTURES, MODEL_CLASS  # noqa: E402

RELEASED_CONFIG = Path(__file__).parents[1] / "data" / "ring-mini-linear-2.0.config.json"

FRESH_PROCESS_CHECK = """
import json
import logging
from importlib.metadata import entry_points
plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
from vllm.plugins import load_general_plugins
load_general_plugins()
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from vllm import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
archs = ModelRegistry.get_supported_archs()
print(json.dumps({
    "entry_point": plugins.get("ring_linear"),
    "registered": [a for a in %r if a in archs],
    "config_class": CONFIG_MAPPING["bailing_moe_linear"].__name__,
    "hook": {a: MODELS_CONFIG_MAP[a].__name__ for a in %r if a in MODELS_CONFIG_MAP},
    "lazy": str(ModelRegistry.models["BailingMoeLinearV2ForCausalLM"]),
}))
"""


def test_fresh_process_discovers_the_entry_point_and_registers_everything():
    """What every vLLM process (API server, engine core, workers) does at start-up, in a new interpreter."""
    code = FRESH_PROCESS_CHECK % (ARCHITECTURES, ARCHITECTURES)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["entry_point"] == "ring_linear_vllm:register"
    assert report["registered"] == list(ARCHITECTURES)
    assert report["config_class"] == "RingLinearConfig"
    assert set(report["hook"].values()) == {"RingLinearEngineConfig"} and len(report["hook"]) == len(ARCHITECTURES)
    assert "ring_linear_vllm.model" in report["lazy"]  # registered lazily: no model import at start-up


def test_register_is_idempotent_and_never_overrides_a_known_architecture(vllm_env, monkeypatch):
    from vllm import ModelRegistry

    from ring_linear_vllm import register

    before = dict(ModelRegistry.models)
    register()
    register()
    assert dict(ModelRegistry.models) == before
    # an architecture vLLM already serves (say, a future native registration) is left alone, hook included
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    monkeypatch.setitem(ModelRegistry.models, ARCHITECTURES[0], before["BailingMoeV2_5ForCausalLM"])
    monkeypatch.delitem(MODELS_CONFIG_MAP, ARCHITECTURES[0])
    register()
    assert ModelRegistry.models[ARCHITECTURES[0]] is before["BailingMoeV2_5ForCausalLM"]
    assert ARCHITECTURES[0] not in MODELS_CONFIG_MAP
    assert MODEL_CLASS.count(":") == 1


def test_model_inspection_reports_a_hybrid_pp_model_with_inner_state(vllm_env):
    """vLLM inspects the lazy class in a subprocess (no CUDA); what it learns drives the hybrid cache."""
    from vllm import ModelRegistry

    info = ModelRegistry.models["BailingMoeLinearV2ForCausalLM"].inspect_model_cls()
    assert info.is_hybrid and info.has_inner_state and info.supports_pp


@pytest.fixture
def released_dir(tmp_path):
    """The released Ring-mini-linear-2.0 config.json, verbatim (auto_map and all), with no modeling code."""
    shutil.copy(RELEASED_CONFIG, tmp_path / "config.json")
    assert "auto_map" in json.loads(RELEASED_CONFIG.read_text())
    return tmp_path


def test_released_config_parses_through_vllm_without_trust_remote_code(vllm_tools, released_dir):
    cfg = vllm_tools.engine_config(released_dir, dtype="bfloat16", trust_remote_code=False)
    assert isinstance(cfg.model_config.hf_config, RingLinearConfig)
    assert cfg.model_config.architecture == "BailingMoeLinearV2ForCausalLM"
    assert cfg.model_config.is_hybrid
    assert cfg.model_config.head_dtype == torch.float32  # fp32 LM head by default (paper, RL consistency)

    from ring_linear_vllm.model import RingLinearForCausalLM

    # caching off: the 16 linear layers' states 4 to an entry (`test_stacked_states.py`)
    assert RingLinearForCausalLM.get_mamba_state_shape_from_config(cfg) == ((4, 16, 128, 128),)
    assert RingLinearForCausalLM.get_mamba_state_dtype_from_config(cfg) == (torch.float32,)  # "auto" means fp32


def test_state_dtype_follows_an_explicit_mamba_cache_dtype(vllm_tools, released_dir):
    from ring_linear_vllm.model import RingLinearForCausalLM

    cfg = vllm_tools.engine_config(released_dir, dtype="bfloat16", mamba_cache_dtype="bfloat16")
    assert RingLinearForCausalLM.get_mamba_state_dtype_from_config(cfg) == (torch.bfloat16,)


def test_mamba_ssm_cache_dtype_is_honoured_and_float16_is_refused_at_start_up(vllm_tools, released_dir):
    """The linear state is vLLM's "ssm" state: `--mamba-ssm-cache-dtype` wins; float16 (which the kernels do
    not keep) fails while the config is built, naming the flag, instead of at the first forward."""
    from ring_linear_vllm.model import RingLinearForCausalLM

    cfg = vllm_tools.engine_config(released_dir, dtype="bfloat16", mamba_ssm_cache_dtype="bfloat16")
    assert RingLinearForCausalLM.get_mamba_state_dtype_from_config(cfg) == (torch.bfloat16,)
    for flag in ("mamba_cache_dtype", "mamba_ssm_cache_dtype"):
        dashed = "--" + flag.replace("_", "-")
        with pytest.raises(ValueError, match=f"{dashed} 'float16' is not supported.*auto, float32, bfloat16"):
            vllm_tools.engine_config(released_dir, dtype="bfloat16", **{flag: "float16"})


def test_prefix_caching_runs_in_align_mode_with_the_state_cached_per_block(vllm_tools, released_dir, monkeypatch):
    import vllm

    if not vllm.__version__.startswith("0.26."):
        pytest.skip("verified on vLLM 0.26 only: other versions keep it off (the next test)")
    monkeypatch.delenv("RING_LINEAR_ALIGNED", raising=False)
    cfg = vllm_tools.engine_config(
        released_dir, dtype="bfloat16", enable_prefix_caching=True, max_num_batched_tokens=512
    )
    assert cfg.cache_config.enable_prefix_caching
    assert cfg.cache_config.mamba_cache_mode == "align"
    assert cfg.cache_config.mamba_block_size == cfg.cache_config.block_size
    assert not vllm_tools.engine_config(
        released_dir, dtype="bfloat16", enable_prefix_caching=False
    ).cache_config.enable_prefix_caching


@pytest.mark.parametrize(
    "settings, flag",
    [
        ({"max_num_batched_tokens": 256}, "--max-num-batched-tokens 256"),
        ({"max_num_batched_tokens": 2048, "long_prefill_token_threshold": 256}, "--long-prefill-token-threshold 256"),
    ],
)
def test_prefix_caching_refuses_a_token_budget_below_one_block(vllm_tools, released_dir, monkeypatch, settings, flag):
    """vLLM picks 512-token blocks for Ring-mini only later, after the weights load, and then fails a bare assert."""
    import vllm

    if not vllm.__version__.startswith("0.26."):
        pytest.skip("prefix caching is served on vLLM 0.26 only")
    monkeypatch.delenv("RING_LINEAR_ALIGNED", raising=False)
    with pytest.raises(ValueError, match=f"at least 512 tokens .*more than {flag}: raise it to 512"):
        vllm_tools.engine_config(
            released_dir, dtype="bfloat16", enable_prefix_caching=True, max_model_len=4096, **settings
        )
    # a bf16 state halves the page, and the bound with it
    cfg = vllm_tools.engine_config(
        released_dir, dtype="bfloat16", enable_prefix_caching=True, max_num_batched_tokens=256,
        mamba_cache_dtype="bfloat16",
    )  # fmt: skip
    assert cfg.cache_config.enable_prefix_caching


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"layer_group_size": 0}, "layer_group_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ],
)
def test_hf_overrides_are_validated_like_the_config_file(vllm_tools, released_dir, overrides, field):
    """vLLM applies `--hf-overrides` after the config is built: a broken override is refused by name, not at model
    build (or never: gelu and linear RoPE would have served other numerics)."""
    with pytest.raises(ValueError, match=f"RingLinearConfig.{field}"):
        vllm_tools.engine_config(released_dir, dtype="bfloat16", hf_overrides=overrides)


def test_a_head_dtype_that_is_not_a_dtype_is_refused_by_name(vllm_tools, released_dir):
    with pytest.raises(ValueError, match=r"head_dtype 'banana' \(--hf-overrides\) is not a dtype"):
        vllm_tools.engine_config(released_dir, dtype="bfloat16", hf_overrides={"head_dtype": "banana"})
    assert vllm_tools.engine_config(released_dir, dtype="bfloat16", hf_overrides={"head_dtype": "model"})


def test_prefill_context_parallelism_is_refused_before_the_build(vllm_tools, released_dir):
    from ring_linear_vllm.engine_config import check_context_parallel

    with pytest.raises(ValueError, match="drop --prefill-context-parallel-size 2"):
        check_context_parallel(SimpleNamespace(parallel_config=SimpleNamespace(prefill_context_parallel_size=2)))
    check_context_parallel(SimpleNamespace(parallel_config=SimpleNamespace(prefill_context_parallel_size=1)))


def test_our_info_lines_reach_vllms_own_handler(vllm_tools, released_dir, monkeypatch):
    """vLLM hands its handler to the `vllm` logger alone: the start-up line naming the cache layout must arrive there
    (a logger outside `vllm.` had no handler, and every served log lacked that line: RESULTS.md run AI)."""
    import logging

    vllm_root = logging.getLogger("vllm")
    monkeypatch.setattr(vllm_root, "propagate", False)  # as a served engine has it
    arrived = []
    catcher = logging.Handler(logging.INFO)
    catcher.emit = arrived.append
    level = vllm_root.level
    vllm_root.setLevel(logging.INFO)  # vLLM's default (the tests' conftest quiets it); setLevel clears the caches
    vllm_root.addHandler(catcher)
    try:
        vllm_tools.engine_config(released_dir, dtype="bfloat16")
    finally:
        vllm_root.removeHandler(catcher)
        vllm_root.setLevel(level)
    assert any("states are stacked 4 to a cache entry" in r.getMessage() for r in arrived)


def test_prefix_caching_stays_off_with_a_warning_on_a_vllm_it_is_not_verified_on(
    vllm_tools, released_dir, monkeypatch, caplog
):
    from ring_linear_vllm import engine_config

    monkeypatch.setattr(engine_config.vllm, "__version__", "0.33.0")
    cfg = vllm_tools.engine_config(released_dir, dtype="bfloat16", enable_prefix_caching=True)
    assert not cfg.cache_config.enable_prefix_caching
    assert "verified exact on vLLM 0.26.x only, and this is vLLM 0.33.0" in caplog.text


def test_the_retired_prefix_caching_switch_is_named_in_a_warning_and_changes_nothing(
    vllm_tools, released_dir, monkeypatch, caplog
):
    from ring_linear_vllm import engine_config

    monkeypatch.setattr(engine_config.vllm, "__version__", "0.26.0")  # where caching is served
    monkeypatch.setenv("RING_LINEAR_PREFIX_CACHING", "0")
    cfg = vllm_tools.engine_config(
        released_dir, dtype="bfloat16", enable_prefix_caching=True, max_num_batched_tokens=512
    )
    assert cfg.cache_config.enable_prefix_caching
    assert "RING_LINEAR_PREFIX_CACHING is no longer read" in caplog.text


def test_hits_finer_than_a_block_are_served_and_say_where_they_resume(vllm_tools, released_dir, monkeypatch, caplog):
    """Verified exact on the GPU (`test_prefix_caching_gpu.py`'s fine-grained tests): served with one info line, no
    warning; a unit that is not finer than the block says nothing."""
    from vllm.config import CacheConfig

    from ring_linear_vllm import engine_config

    if "prefix_match_unit" not in CacheConfig.__dataclass_fields__:
        pytest.skip("this vLLM has no --prefix-match-unit")
    monkeypatch.setattr(engine_config.vllm, "__version__", "0.26.0")  # where caching is served
    caplog.set_level(logging.INFO, logger="vllm.ring_linear_vllm.engine_config")
    cfg = vllm_tools.engine_config(
        released_dir, dtype="bfloat16", enable_prefix_caching=True, max_num_batched_tokens=512, prefix_match_unit=16
    )
    assert cfg.cache_config.enable_prefix_caching and cfg.cache_config.prefix_match_unit == 16
    said = [r for r in caplog.records if "--prefix-match-unit" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    assert "--prefix-match-unit 16: a hit inside a 512-token block resumes" in said[0].getMessage()
    caplog.clear()
    vllm_tools.engine_config(
        released_dir, dtype="bfloat16", enable_prefix_caching=True, max_num_batched_tokens=512, prefix_match_unit=512
    )
    assert "--prefix-match-unit" not in caplog.text


def test_prefix_caching_refuses_the_all_mode_it_cannot_serve(vllm_tools, released_dir):
    import vllm

    if not vllm.__version__.startswith("0.26"):
        pytest.skip("vLLM 0.33 has no 'all' mode")
    with pytest.raises(ValueError, match="--mamba-cache-mode all is not supported.*use --mamba-cache-mode align"):
        vllm_tools.engine_config(released_dir, dtype="bfloat16", enable_prefix_caching=True, mamba_cache_mode="all")


def test_prefix_caching_without_chunked_prefill_is_refused_naming_the_flag(vllm_tools, released_dir, monkeypatch):
    from ring_linear_vllm import engine_config

    monkeypatch.setattr(engine_config.vllm, "__version__", "0.26.0")  # where caching is served
    with pytest.raises(ValueError, match="prefix caching needs chunked prefill.*--no-enable-chunked-prefill"):
        vllm_tools.engine_config(
            released_dir, dtype="bfloat16", enable_prefix_caching=True, enable_chunked_prefill=False
        )


def test_a_tensor_parallel_size_the_model_cannot_split_is_refused(vllm_tools, released_dir):
    from common_kernels import RingLinearConfigError
    from ring_linear_vllm.engine_config import RingLinearEngineConfig

    cfg = vllm_tools.engine_config(released_dir, dtype="bfloat16")
    cfg.parallel_config.tensor_parallel_size = 8  # 16 heads split, but 4 output-norm groups do not
    with pytest.raises(RingLinearConfigError, match=r"group_norm_size=4.*use one of \[1, 2, 4\]"):
        RingLinearEngineConfig.verify_and_update_config(cfg)
    cfg.parallel_config.tensor_parallel_size = 3
    with pytest.raises(RingLinearConfigError, match=r"num_attention_heads=16"):
        RingLinearEngineConfig.verify_and_update_config(cfg)


def test_a_tensor_parallel_size_that_would_hang_vllms_kv_cache_write_is_refused_on_cuda(
    vllm_tools, tiny_dir, released_dir, monkeypatch
):
    from vllm import platforms

    from common_kernels import tiny_config
    from ring_linear_vllm.compat import check_kv_cache_write_width
    from ring_linear_vllm.engine_config import RingLinearEngineConfig

    for tp in (1, 2, 4):  # the released shapes (4 KV heads of 128) never meet it
        check_kv_cache_write_width(vllm_tools.engine_config(released_dir).model_config.hf_config, tp)
    check_kv_cache_write_width(tiny_config(), 1)  # 2 KV heads of 16: 32 values
    refusal = r"size 2 leaves 16 KV values.*num_key_value_heads=2 / 2, head_dim=16.*in \[1\]"
    with pytest.raises(ValueError, match=refusal):
        check_kv_cache_write_width(tiny_config(), 2)
    # only sizes that also split the heads and norm groups are offered (3 and 4 would leave 32 KV values, but
    # cannot split 2 norm groups)
    with pytest.raises(ValueError, match=r"in \[1, 2\] \("):
        check_kv_cache_write_width(tiny_config(num_attention_heads=8, num_key_value_heads=8), 8)
    with pytest.raises(ValueError, match="No tensor parallel size works"):  # 1 KV head of 16 at any size
        check_kv_cache_write_width(tiny_config(num_key_value_heads=1), 1)
    cfg = vllm_tools.engine_config(tiny_dir)
    cfg.parallel_config.tensor_parallel_size = 2
    RingLinearEngineConfig.verify_and_update_config(cfg)  # other platforms write the cache with other kernels
    monkeypatch.setattr(platforms.current_platform, "is_cuda", lambda: True)
    with pytest.raises(ValueError, match="reshape_and_cache_flash"):
        RingLinearEngineConfig.verify_and_update_config(cfg)


def test_speculative_decoding_is_refused_with_the_reason(vllm_tools, released_dir):
    from ring_linear_vllm.engine_config import RingLinearEngineConfig

    cfg = vllm_tools.engine_config(released_dir, dtype="bfloat16")
    cfg.speculative_config = object()  # any draft method: the state has no per-draft-token copies yet
    with pytest.raises(ValueError, match="speculative decoding is not supported.*--speculative-config"):
        RingLinearEngineConfig.verify_and_update_config(cfg)


def test_disaggregated_prefill_is_refused_with_the_reason(vllm_tools, released_dir):
    from ring_linear_vllm.engine_config import RingLinearEngineConfig

    cfg = vllm_tools.engine_config(released_dir, dtype="bfloat16")
    cfg.kv_transfer_config = object()  # any connector: none transfers the linear-attention state
    with pytest.raises(ValueError, match="disaggregated prefill is not supported.*--kv-transfer-config"):
        RingLinearEngineConfig.verify_and_update_config(cfg)
