"""Prefill chunks stop at the last block boundary a resend can resume from, so prompts of whole blocks hit the cache.

vLLM's hybrid "align" prefix caching keeps the linear state only where a prefill chunk ends on a block boundary
(`Scheduler._mamba_block_aligned_split`), and a hit is capped at `num_tokens - 1` tokens: the last token is always
recomputed for its logits. A prompt of whole blocks (4,096 tokens: 8 of Ring-mini's 512-token blocks) runs to its end
in one chunk, so the only state kept is the one at its end, which a resend cannot use; the resend finds no state at
3,584 and recomputes (a hit comes only where the token budget happened to cut the first send, or from the third send
on). This adds the replay boundary `(num_tokens - 1) // block_size * block_size` as a chunk stop, as vLLM's PR #50409
proposes upstream: such a prompt takes one more step (3,584 then 512 tokens), as a 4,000-token prompt already does.

Installed in every vLLM process at registration (the scheduler lives in the engine core), it acts only for our model
type and only on the vLLM releases whose prefix caching we serve (`PREFIX_CACHING_VERIFIED_ON`).
"""

from __future__ import annotations

from typing import Any

import vllm

from common_kernels.config import RingLinearConfig

from .compat import wrap_once
from .engine_config import PREFIX_CACHING_VERIFIED_ON


def replay_stop(start: int, num_new_tokens: int, num_tokens: int, block_size: int) -> int:
    """The chunk `[start, start + num_new_tokens)` cut at the last block boundary before the request's last token."""
    replay = (num_tokens - 1) // block_size * block_size
    return replay - start if start < replay < start + num_new_tokens else num_new_tokens


def serves_ring_linear(scheduler: Any) -> bool:
    hf_config = getattr(scheduler.vllm_config.model_config, "hf_config", None)
    return getattr(hf_config, "model_type", None) == RingLinearConfig.model_type


def install() -> None:
    """Wrap vLLM's align-mode chunk split (idempotent; other releases, or one without the method, are left alone)."""
    if not vllm.__version__.startswith(PREFIX_CACHING_VERIFIED_ON):
        return
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
    except ImportError:
        return

    def make_wrapper(original: Any) -> Any:
        def _mamba_block_aligned_split(
            self: Any,
            request: Any,
            num_new_tokens: int,
            num_new_local_computed_tokens: int = 0,
            num_external_computed_tokens: int = 0,
        ) -> int:
            n = original(self, request, num_new_tokens, num_new_local_computed_tokens, num_external_computed_tokens)
            if not serves_ring_linear(self):
                return n
            start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
            return replay_stop(start, n, request.num_tokens, self.cache_config.block_size)

        return _mamba_block_aligned_split

    wrap_once(Scheduler, "_mamba_block_aligned_split", make_wrapper)
