"""Serving settings Ring-linear-2.0 cannot run, refused before an engine builds anything, in one wording."""

from __future__ import annotations

from ..config import RingLinearConfig


def check_serving_settings(
    config: RingLinearConfig,
    tp_size: int,
    pp_size: int = 1,
    speculative_flag: str | None = None,
    pipeline_parallel_supported: bool = True,
) -> None:
    """Raise with the fix in the message: a TP size the heads or norm groups cannot split, speculative decoding
    (`speculative_flag`: the engine's option that turned it on), pipeline parallelism where the engine's
    adapter does not support it."""
    config.check_tensor_parallel(tp_size)
    if speculative_flag is not None:
        raise ValueError(
            "ring-linear: speculative decoding is not supported for Ring-linear-2.0 yet (the linear-attention "
            f"state would need one copy per draft token); drop {speculative_flag}"
        )
    if pp_size > 1 and not pipeline_parallel_supported:
        raise ValueError(
            f"ring-linear: pipeline parallel size {pp_size} is not supported by this engine's adapter; "
            "use pipeline parallel size 1 (tensor parallelism splits the model instead)"
        )
