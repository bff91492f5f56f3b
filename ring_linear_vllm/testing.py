"""vLLM on a machine without a GPU, for tests and host-side probes: vLLM's PyPI (CUDA) wheel detects no platform there
(0.26: "Device string must not be empty"), and its stock CPU platform needs the `+cpu` build's ops."""

from __future__ import annotations

import torch


def install_cpu_platform() -> None:
    """A minimal CPU platform that answers what config creation, model construction and the scheduler ask; no
    forward pass runs on it."""
    import vllm.platforms as platforms
    from vllm.platforms.interface import Platform, PlatformEnum

    class CpuTestPlatform(Platform):
        _enum = PlatformEnum.OOT
        device_name = "cpu"
        device_type = "cpu"
        dispatch_key = "CPU"
        dist_backend = "gloo"
        supported_dtypes = [torch.bfloat16, torch.float16, torch.float32]

        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
            return "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"

        @classmethod
        def num_compute_units(cls, device_id: int = 0) -> int:
            return 1

        @classmethod
        def is_pin_memory_available(cls) -> bool:
            return False

        @classmethod
        def support_hybrid_kv_cache(cls) -> bool:  # as CUDA answers: the scheduler groups the layers' caches
            return True

    platforms.current_platform = CpuTestPlatform()
