from pathlib import Path

import common_kernels
import ring_linear_sglang
import ring_linear_vllm


def test_packages_resolve_outside_tests():
    tests = Path(__file__).resolve().parent
    for package in (common_kernels, ring_linear_vllm, ring_linear_sglang):
        assert tests not in Path(package.__file__).resolve().parents


def test_common_kernels_public_surface():
    assert sorted(common_kernels.__all__) == sorted(
        [
            "PRESETS",
            "RECONSTRUCTED",
            "CheckpointError",
            "InvalidInputError",
            "RingLinearCache",
            "RingLinearConfig",
            "RingLinearConfigError",
            "RingLinearError",
            "RingLinearForCausalLM",
            "alibi_slopes",
            "check_checkpoint",
            "decay_rates",
            "expected_tensor_shapes",
            "layer_decay_factor",
            "preset_config",
            "tiny_config",
        ]
    )
    for name in common_kernels.__all__:
        assert hasattr(common_kernels, name), name


def test_ops_packages_export_reference_and_kernel_side_by_side():
    import common_kernels.ops.linear_attn as linear_attn
    import common_kernels.ops.norm as norm
    import common_kernels.ops.rope as rope

    for package in (linear_attn, norm, rope):
        for name in package.__all__:
            assert callable(getattr(package, name)), name
    assert {"linear_attention_varlen", "linear_attention_varlen_triton", "linear_attention_prefill",
            "linear_attention_decode"} <= set(linear_attn.__all__)  # fmt: skip
    assert {"group_rms_norm_gate", "group_rms_norm_gate_triton"} <= set(norm.__all__)
    assert {"qk_norm_rope", "qk_norm_rope_triton"} <= set(rope.__all__)
