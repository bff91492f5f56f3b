"""Prefill chunks stop where a resend can resume, so a resent prompt hits the cache on its second send.

vLLM's hybrid "align" prefix caching keeps the linear state only where a prefill chunk ends on a block boundary
(`Scheduler._mamba_block_aligned_split`), and a hit is capped at `num_tokens - 1` tokens: the last token is always
recomputed for its logits. A prompt of whole blocks (4,096 tokens: 8 of Ring-mini's 512-token blocks) runs to its end
in one chunk, so the only state kept is the one at its end, which a resend cannot use; the resend finds no state at
3,584 and recomputes (a hit comes only where the token budget happened to cut the first send, or from the third send
on). This adds the replay boundary `(num_tokens - 1) // block_size * block_size` as a chunk stop, as vLLM's PR #50409
proposes upstream: such a prompt takes one more step (3,584 then 512 tokens), as a 4,000-token prompt already does.

With fine-grained hits (`--prefix-match-unit U` below the block size) vLLM also keeps one state inside the prompt's
last block, a "partial tail" at `num_prompt_tokens // U * U`, which is the prompt's end whenever its length is a
multiple of U: again a state no resend can use. For our model the tail moves to `(num_prompt_tokens - 1) // U * U`,
the last point a resend can resume from, and the chunks stop there too, so a resent 4,096-token prompt can resume at
4,080 instead of 3,584 (a prompt extended by a later turn then resumes there as well, U tokens short of the old tail).

Installed in every vLLM process at registration (the scheduler lives in the engine core), it acts only for our model
type and only on the vLLM releases whose prefix caching we serve (`PREFIX_CACHING_VERIFIED_ON`).
"""

from __future__ import annotations

from typing import Any

import vllm

from common_kernels.config import RingLinearConfig

from .compat import wrap_once
from .engine_config import PREFIX_CACHING_VERIFIED_ON


def replay_stop(
    start: int, num_new_tokens: int, num_tokens: int, block_size: int, hash_block_size: int | None = None
) -> int:
    """The chunk `[start, start + num_new_tokens)` cut at the first replay boundary inside it: the last block boundary
    before the request's last token and, with a finer `hash_block_size`, the last hash boundary before it."""
    last = num_tokens - 1
    stops = {last // block_size * block_size}
    if hash_block_size and hash_block_size < block_size:
        stops.add(last // hash_block_size * hash_block_size)
    inside = [stop for stop in stops if start < stop < start + num_new_tokens]
    return min(inside) - start if inside else num_new_tokens


def serves_ring_linear(scheduler: Any) -> bool:
    hf_config = getattr(scheduler.vllm_config.model_config, "hf_config", None)
    return getattr(hf_config, "model_type", None) == RingLinearConfig.model_type


class _ReplayTail:
    """A request seen by vLLM's partial-tail caching with one prompt token fewer, so the tail it registers is the last
    hash boundary before the prompt's last token (the prompt's end, for a length that is a multiple of the unit)."""

    def __init__(self, request: Any) -> None:
        self._request = request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)

    @property
    def num_prompt_tokens(self) -> int:
        return self._request.num_prompt_tokens - 1


def install() -> None:
    """Wrap vLLM's align-mode chunk split and partial-tail caching (idempotent; other releases, or one without these
    methods, are left alone)."""
    if not vllm.__version__.startswith(PREFIX_CACHING_VERIFIED_ON):
        return
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, MambaManager
    except ImportError:
        return

    def split_wrapper(original: Any) -> Any:
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
            n = replay_stop(start, n, request.num_tokens, self.cache_config.block_size)
            if getattr(self, "mamba_partial_cache_hit", False):  # the partial tail's stop alone (see _ReplayTail)
                n = replay_stop(start, n, request.num_prompt_tokens, self.hash_block_size)
            return n

        return _mamba_block_aligned_split

    def init_wrapper(original: Any) -> Any:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            if serves_ring_linear(self):  # the cache managers do not know the model: mark ours
                for manager in self.kv_cache_manager.coordinator.single_type_managers:
                    manager.ring_linear_replay_tail = True

        return __init__

    def tail_wrapper(original: Any) -> Any:
        def _cache_partial_tail_block(self: Any, request: Any, num_tokens: int) -> Any:
            replay = getattr(self, "ring_linear_replay_tail", False)
            return original(self, _ReplayTail(request) if replay else request, num_tokens)

        return _cache_partial_tail_block

    wrap_once(Scheduler, "_mamba_block_aligned_split", split_wrapper)
    wrap_once(Scheduler, "__init__", init_wrapper)
    for manager_class in (FullAttentionManager, MambaManager):
        wrap_once(manager_class, "_cache_partial_tail_block", tail_wrapper)
