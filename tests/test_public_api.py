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
            "RingLinearCache",
            "RingLinearConfig",
            "RingLinearConfigError",
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
