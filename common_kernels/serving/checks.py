"""Serving settings Ring-linear-2.0 cannot run, refused before an engine builds anything, in one wording."""

from __future__ import annotations

from ..config import RingLinearConfig


def check_serving_settings(
    config: RingLinearConfig,
    tp_size: int,
    pp_size: int = 1,
    speculative_flag: str | None = None,
    pipeline_parallel_supported: bool = True,
    kv_transfer_flag: str | None = None,
) -> None:
    """Raise with the fix in the message: a TP size the heads or norm groups cannot split, speculative decoding
    (`speculative_flag`: the engine's option that turned it on), pipeline parallelism where the engine's
    adapter does not support it, disaggregated prefill (`kv_transfer_flag`: the engine's connector option),
    whose KV transfer does not carry the linear-attention state. The config is validated again first: an engine
    applies its overrides (`--hf-overrides`, `--json-model-override-args`) after the config was built."""
    config.validate()
    config.check_tensor_parallel(tp_size)
    if speculative_flag is not None:
        raise ValueError(
            "ring-linear: speculative decoding is not supported for Ring-linear-2.0 yet (the linear-attention "
            f"state would need one copy per draft token); drop {speculative_flag}"
        )
    if kv_transfer_flag is not None:
        raise ValueError(
            "ring-linear: disaggregated prefill is not supported for Ring-linear-2.0: the engine's KV transfer does "
            f"not carry the linear-attention state, so the decode side would start from a wrong state; drop "
            f"{kv_transfer_flag}"
        )
    if pp_size > 1 and not pipeline_parallel_supported:
        raise ValueError(
            f"ring-linear: pipeline parallel size {pp_size} is not supported by this engine's adapter; "
            "use pipeline parallel size 1 (tensor parallelism splits the model instead)"
        )
