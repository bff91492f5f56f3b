"""Engine-config checks vLLM runs for our architectures before it builds anything (`MODELS_CONFIG_MAP`), and
the linear state vLLM sizes its pool from (light: loaded in every process, before any model module)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import vllm
from vllm import platforms
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

from common_kernels.config import RingLinearConfig
from common_kernels.serving import (
    ALIGNED_MODE_SWITCH,
    STACKED_STATES_SWITCH,
    aligned_mode,
    aligned_products_note,
    check_serving_settings,
    linear_state_dtype,
    linear_state_shape,
    stacked_states,
    window_buffer_shapes,
)
from ring_linear_vllm.compat import check_kv_cache_write_width, splitting_op_name

# under `vllm.`: vLLM gives its handler, format and VLLM_LOGGING_LEVEL to the `vllm` logger alone (propagation off),
# so a logger of another name has no handler in a served engine and its info lines are dropped
logger = init_logger(f"vllm.{__name__}")
# the opt-in that kept prefix caching off until its GPU tests passed (run P); a user who still sets it is told
RETIRED_PREFIX_CACHING_SWITCH = "RING_LINEAR_PREFIX_CACHING"
# the vLLM minor version whose hybrid prefix caching passed our GPU tests (test_prefix_caching_gpu.py)
PREFIX_CACHING_VERIFIED_ON = "0.26."
BATCH_INVARIANT = "VLLM_BATCH_INVARIANT"  # vLLM's switch (`vllm.envs`)


def state_shapes(config: RingLinearConfig, tp_size: int, stack: int = 1) -> tuple[tuple[int, ...], ...]:
    """vLLM's state tuple for one cache entry: the `[H/tp, d, d]` linear state (no conv state), and in aligned mode
    the window buffer's keys and values (`serving.window_buffer_shapes`), each slot's tensors copied together; with
    `stack` layers to an entry (`states_per_entry`) each shape gains a leading axis, one row per layer."""
    state = linear_state_shape(config, tp_size)
    shapes = (state, *window_buffer_shapes(config, tp_size)) if aligned_mode() else (state,)
    assert len(shapes) == state_tensor_count()
    return shapes if stack == 1 else tuple((stack, *shape) for shape in shapes)


def states_per_entry(vllm_config) -> int:
    """How many linear layers keep their states in one vLLM cache entry. vLLM makes one KV-cache group per
    softmax-layer count of each layer kind and runs its scheduler bookkeeping and metadata building once per group
    and step: Ring-mini's 16 linear layers, one entry each, make 4 groups beside the softmax layers' one, and a 4K
    decode step waits on that host work (RESULTS.md runs AE to AH). Stacked as many to an entry as there are linear
    layers per softmax layer, they make one group, of blocks that many times larger (`stack_for` says when). With
    `STACKED_STATES_SWITCH` unset, a caching engine stacks only if its token budgets reach the larger block (align
    mode ends a prefill chunk on a block, and `check_prefix_caching` refuses a budget below it)."""
    config, cache = vllm_config.model_config.hf_config, vllm_config.cache_config
    stack = stack_for(config, vllm_config.parallel_config.pipeline_parallel_size, caching_grain(cache))
    if stack > 1 and cache.enable_prefix_caching and stacked_states() is None:
        block = block_tokens(vllm_config, stack)
        if any(0 < tokens < block for _, tokens in token_budgets(vllm_config)):
            return 1
    return stack


def caching_grain(cache_config) -> str:
    """'off', 'block' (prefix-cache hits of whole blocks) or 'fine' (`--prefix-match-unit`: hits inside a block)."""
    if not cache_config.enable_prefix_caching:
        return "off"
    return "fine" if getattr(cache_config, "prefix_match_unit", None) else "block"


def stack_for(config: RingLinearConfig, pipeline_parallel_size: int = 1, caching: str = "off") -> int:
    """`states_per_entry` from the model config, the pipeline size and the `caching_grain` (what a test knows before
    vLLM starts). `STACKED_STATES_SWITCH` unset stacks unless prefix caching hits whole blocks only: stacked blocks
    would make those hits that many times coarser (a resent 4K Ring-mini prompt would hit 2,048 tokens, not 3,584;
    with `--prefix-match-unit` only prefixes shared by different suffixes are cached at block ends alone);
    1 stacks there too, 0 never. One entry's layers must live on one pipeline rank, so pipeline parallelism keeps one
    state an entry; so does aligned mode, whose window buffers have not been tested stacked."""
    wanted = stacked_states()
    if wanted is False or (wanted is None and caching == "block") or aligned_mode():
        return 1
    linear, softmax = len(config.linear_layer_ids), len(config.softmax_layer_ids)
    if pipeline_parallel_size > 1 or not softmax or linear % softmax:
        return 1
    return linear // softmax


def note_stacked_states(vllm_config) -> None:
    """One line on the cache layout `states_per_entry` chose: a warning when the user asked for stacking
    (`STACKED_STATES_SWITCH=1`) and this engine cannot have it, an info line otherwise."""
    stack, wanted = states_per_entry(vllm_config), stacked_states()
    config, pipeline = vllm_config.model_config.hf_config, vllm_config.parallel_config.pipeline_parallel_size
    could = stack_for(config, pipeline, "fine")  # the stack this engine's shape allows
    if stack > 1:
        logger.info(
            "ring-linear: the linear layers' states are stacked %d to a cache entry (one KV-cache group for them, "
            "blocks %d times larger); %s=0 keeps one an entry",
            stack,
            stack,
            STACKED_STATES_SWITCH,
        )
    elif wanted is False:
        logger.info(
            "ring-linear: %s=0: each linear layer keeps its state in its own cache entry", STACKED_STATES_SWITCH
        )
    elif wanted is None and could > 1:
        if caching_grain(vllm_config.cache_config) == "block":
            why = "too coarse for prefix-cache hits of whole blocks (--prefix-match-unit 16 hits every 16 tokens)"
        else:
            budgets = ", ".join(f"{flag} {tokens}" for flag, tokens in token_budgets(vllm_config) if tokens)
            why = f"more than this token budget ({budgets}): raise it to stack them"
        logger.info(
            "ring-linear: each linear layer keeps its state in its own cache entry: stacked %d to an entry (fewer "
            "KV-cache groups to schedule) they make %d-token blocks, %s; %s=1 stacks them anyway",
            could,
            block_tokens(vllm_config, could),
            why,
            STACKED_STATES_SWITCH,
        )
    else:  # pipeline stages, aligned mode or an odd layer pattern: said, and warned when asked for
        (logger.warning if wanted else logger.info)(
            "ring-linear: the linear layers' states are not stacked: stacking (%s) needs pipeline parallelism 1, a "
            "whole number of linear layers per softmax layer, and aligned mode off",
            STACKED_STATES_SWITCH,
        )


def entry_state_shapes(vllm_config) -> tuple[tuple[int, ...], ...]:
    """`state_shapes` of one cache entry for this engine (its TP size and `states_per_entry`)."""
    config, tp = vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size
    return state_shapes(config, tp, states_per_entry(vllm_config))


def state_tensor_count() -> int:
    """A layer's state tensors in vLLM's tuple (`state_shapes`): the linear state, and in aligned mode the window
    buffer's keys and values."""
    return 3 if aligned_mode() else 1


def state_dtypes(cache_config) -> tuple[torch.dtype, ...]:
    """fp32 unless asked otherwise: `--mamba-ssm-cache-dtype` (this state is the "ssm" one), else
    `--mamba-cache-dtype`; "auto" means fp32 here, not the model dtype. float16 is refused at start-up. Aligned
    mode keeps the state and its window buffer in fp32 and refuses any other state dtype."""
    if cache_config.mamba_ssm_cache_dtype not in (None, "auto"):
        flag, requested = "--mamba-ssm-cache-dtype", cache_config.mamba_ssm_cache_dtype
    else:
        flag, requested = "--mamba-cache-dtype", cache_config.mamba_cache_dtype
    dtype = linear_state_dtype(requested, flag)
    if not aligned_mode():
        return (dtype,)
    if dtype != torch.float32:
        raise ValueError(
            f"ring-linear: aligned mode ({ALIGNED_MODE_SWITCH}=1) keeps the linear state in float32; drop {flag} "
            f"{requested}"
        )
    return (torch.float32,) * state_tensor_count()


class RingLinearEngineConfig(VerifyAndUpdateConfig):
    """Refuse what cannot run (a TP size the heads or norm groups cannot split, or that would hang vLLM's
    KV-cache write; speculative decoding; disaggregated prefill; a state dtype other than fp32/bf16), default the
    LM head to fp32, and serve hybrid prefix caching where it is exact (`check_prefix_caching`)."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        config = vllm_config.model_config.hf_config
        if not isinstance(config, RingLinearConfig):
            raise TypeError(
                f"ring-linear: expected the model config to parse as RingLinearConfig "
                f"(model_type 'bailing_moe_linear'), got {type(config).__name__}; is the plugin's register() loaded?"
            )
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        speculative = vllm_config.speculative_config is not None
        check_serving_settings(
            config,
            tp_size,
            speculative_flag="--speculative-config" if speculative else None,
            kv_transfer_flag="--kv-transfer-config" if vllm_config.kv_transfer_config is not None else None,
        )
        if platforms.current_platform.is_cuda():  # read now: the platform is resolved lazily
            check_kv_cache_write_width(config, tp_size)
        state_dtypes(vllm_config.cache_config)  # an unsupported state dtype is refused now, not at the first step
        check_context_parallel(vllm_config)
        if getattr(config, "head_dtype", None) is None:
            # an fp32 LM head, as trained (paper) and as the shim computes logprobs;
            # `--hf-overrides '{"head_dtype": "model"}'` restores vLLM's default
            config.head_dtype = "float32"
        check_head_dtype(config.head_dtype)
        splitting_ops = vllm_config.compilation_config.splitting_ops
        if splitting_ops and splitting_op_name() not in splitting_ops:
            # the default list has it (register()); a user's own list must split there too, or a CUDA graph
            # would replay one step's state slots in another
            splitting_ops.append(splitting_op_name())
            logger.warning("ring-linear: added %s to the given splitting_ops", splitting_op_name())
        check_prefix_caching(vllm_config)
        note_stacked_states(vllm_config)
        check_batch_invariance()
        if aligned_mode():
            check_aligned_layout(vllm_config)
            note_attention_backend(vllm_config)
            compile_without_inductor(vllm_config)
            note_product_precision()


def check_context_parallel(vllm_config) -> None:
    """vLLM's prefill context parallelism splits a prompt's tokens over ranks, which a recurrent state cannot
    follow (vLLM refuses it for hybrid models only after loading the weights, with a bare assert)."""
    size = getattr(vllm_config.parallel_config, "prefill_context_parallel_size", 1)
    if size > 1:
        raise ValueError(
            f"ring-linear: prefill context parallelism cannot split the linear-attention state over ranks; drop "
            f"--prefill-context-parallel-size {size}"
        )


def check_head_dtype(head_dtype: Any) -> None:
    """The LM head's dtype (`--hf-overrides '{"head_dtype": ...}'`): "model" or a floating-point dtype name."""
    dtype = getattr(torch, head_dtype, None) if isinstance(head_dtype, str) else None
    if head_dtype != "model" and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f'ring-linear: head_dtype {head_dtype!r} (--hf-overrides) is not a dtype: use "model" (the model\'s '
            'dtype) or "float32" (the default here, as the shim computes logprobs)'
        )


def min_block_tokens(vllm_config) -> int:
    """A lower bound on the block vLLM picks in align mode: one block's KV must be as large as a cache entry's state
    page (`Platform._align_hybrid_block_size` rounds it up further), so a prefill chunk ends on one only if the
    step's token budget reaches it."""
    return block_tokens(vllm_config, states_per_entry(vllm_config))


def block_tokens(vllm_config, stack: int) -> int:
    """`min_block_tokens` with `stack` states to a cache entry."""
    config, cache_config = vllm_config.model_config.hf_config, vllm_config.cache_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    state_bytes = sum(
        math.prod(shape) * dtype.itemsize
        for shape, dtype in zip(state_shapes(config, tp, stack), state_dtypes(cache_config), strict=True)
    )
    kv_itemsize = kv_cache_dtype_str_to_dtype(cache_config.cache_dtype, vllm_config.model_config).itemsize
    kv_bytes_per_token = 2 * max(1, config.num_key_value_heads // tp) * config.head_dim * kv_itemsize
    return -(-state_bytes // kv_bytes_per_token)


def token_budgets(vllm_config) -> list[tuple[str, int]]:
    """The scheduler's per-step token budgets, by flag (0: not set)."""
    scheduler_config = vllm_config.scheduler_config
    return [
        ("--max-num-batched-tokens", scheduler_config.max_num_batched_tokens),
        ("--long-prefill-token-threshold", getattr(scheduler_config, "long_prefill_token_threshold", 0)),
    ]


def check_prefix_caching(vllm_config) -> None:
    """vLLM's hybrid prefix caching ("align" mode: the linear state cached at each block's end, equal to caching off
    on the GPU: `tests/ring_linear_vllm/test_prefix_caching_gpu.py`, on vLLM 0.26; other versions keep it off with
    a warning until the tests have run on them) wherever it is exact. It needs chunked prefill
    (refused here, naming the flag, instead of vLLM's bare assert) and cannot run 'all' mode. Aligned mode caches
    too: a hit resumes the window form on its absolute grid (`ops.linear_attn.windowed`; a block's end is a grid
    point, and its window buffer is copied with the state), so the trainer's bits still hold."""
    if os.environ.get(RETIRED_PREFIX_CACHING_SWITCH) is not None:
        logger.warning(
            "ring-linear: %s is no longer read: prefix caching follows vLLM's --enable-prefix-caching / "
            "--no-enable-prefix-caching",
            RETIRED_PREFIX_CACHING_SWITCH,
        )
    cache_config = vllm_config.cache_config
    if not cache_config.enable_prefix_caching:
        return
    if not vllm.__version__.startswith(PREFIX_CACHING_VERIFIED_ON):
        logger.warning(
            "ring-linear: prefix caching is turned off: hybrid 'align' mode is verified exact on vLLM %sx only, and "
            "this is vLLM %s (vLLM 0.33 turns it on by default)",
            PREFIX_CACHING_VERIFIED_ON,
            vllm.__version__,
        )
        cache_config.enable_prefix_caching = False
        return
    if not vllm_config.scheduler_config.enable_chunked_prefill:
        raise ValueError(
            "ring-linear: prefix caching needs chunked prefill (vLLM's hybrid 'align' mode caches the linear state "
            "at chunk ends): drop --no-enable-chunked-prefill, or pass --no-enable-prefix-caching"
        )
    if cache_config.mamba_cache_mode == "all":
        raise ValueError(
            "ring-linear: --mamba-cache-mode all is not supported (it needs the state at every block, which the "
            "prefill does not write): use --mamba-cache-mode align"
        )
    stack = states_per_entry(vllm_config)
    block = block_tokens(vllm_config, stack)
    unit = getattr(cache_config, "prefix_match_unit", None)
    if unit and unit < block:  # ring_linear_vllm.prefix_replay moves vLLM's partial tail for our model
        logger.info(
            "ring-linear: --prefix-match-unit %d: a hit inside a %d-token block resumes from the linear state kept at "
            "the last %d-token boundary before the prompt's last token",
            unit,
            block,
            unit,
        )
    page = f"{stack} layers' state page, {STACKED_STATES_SWITCH}=1" if stack > 1 else "one layer's state page"
    unstack = f", or unset {STACKED_STATES_SWITCH}" if stack > 1 else ""
    for flag, tokens in token_budgets(vllm_config):
        if 0 < tokens < block:
            raise ValueError(
                f"ring-linear: prefix caching caches the linear state at block ends, and this model's blocks hold at "
                f"least {block} tokens ({page}), more than {flag} {tokens}: raise it to {block} or more{unstack}, "
                "or pass --no-enable-prefix-caching"
            )


def check_aligned_layout(vllm_config) -> None:
    """Aligned mode computes each layer as the trainer does (`ops.moe.aligned`, `ops.attention.aligned`): all experts
    on one rank, in unquantized weights, over a KV cache in the model dtype. Tensor or expert parallelism would split
    the sums across ranks and add them in another order; quantized weights or KV are not the trainer's values."""
    parallel = vllm_config.parallel_config
    refused = [
        (parallel.tensor_parallel_size > 1, f"--tensor-parallel-size {parallel.tensor_parallel_size}"),
        (getattr(parallel, "enable_expert_parallel", False), "--enable-expert-parallel"),
        (vllm_config.model_config.quantization is not None, f"--quantization {vllm_config.model_config.quantization}"),
        (vllm_config.cache_config.cache_dtype != "auto", f"--kv-cache-dtype {vllm_config.cache_config.cache_dtype}"),
        # vLLM's fused MoE shards the experts over data-parallel ranks too when expert parallelism is off
        (parallel.data_parallel_size > 1, f"--data-parallel-size {parallel.data_parallel_size}"),
    ]
    for is_set, flag in refused:
        if is_set:
            raise ValueError(
                f"ring-linear: {ALIGNED_MODE_SWITCH}=1 serves each layer unsharded and unquantized, as the trainer "
                f"computes it: drop {flag}, or unset {ALIGNED_MODE_SWITCH}"
            )


def compile_without_inductor(vllm_config) -> None:
    """Aligned mode: vLLM still traces the model into its piecewise CUDA graphs, but runs the traced ops as they are
    (`backend="eager"`) instead of inductor's generated kernels, with which a bf16 model's bits left the shim's eager
    forward (fp32 matched either way; measured in `benchmarks/RESULTS.md`). Aligned mode's layers are our own
    kernels, so inductor has little left to fuse there."""
    compilation = vllm_config.compilation_config
    if compilation.backend != "eager":
        logger.info(
            "ring-linear: aligned mode compiles with backend 'eager' (CUDA graphs kept, no inductor), was %r",
            compilation.backend,
        )
        compilation.backend = "eager"


def note_product_precision() -> None:
    """Name aligned mode's fp32 product setting once at start-up (`aligned_products_note`)."""
    logger.info(aligned_products_note())


def note_attention_backend(vllm_config) -> None:
    """Aligned mode runs softmax attention through its own kernel on vLLM's Triton KV-cache layout
    (`aligned_attention`), the shim's: FlashAttention 3 picks its kernel by the step's longest query (run N), and
    no backend of vLLM's computes the shim's bits. A backend the user chose is named as not used."""
    chosen = vllm_config.attention_config.backend
    if chosen is not None:
        logger.warning(
            "ring-linear: aligned mode (%s=1) runs softmax attention through its own kernel: --attention-backend %s "
            "is not used for this model's layers",
            ALIGNED_MODE_SWITCH,
            chosen.name,
        )


def check_batch_invariance() -> None:
    """Aligned mode and vLLM's batch invariance go together: ours without vLLM's would leave its GEMMs, fused MoE
    and attention batch-dependent, and vLLM's without ours our linear attention (`register()` turns vLLM's on
    with ours unless it was set)."""
    ours, vllms = aligned_mode(), os.environ.get(BATCH_INVARIANT, "0").strip() not in ("", "0")
    if ours and not vllms:
        raise ValueError(
            f"ring-linear: {ALIGNED_MODE_SWITCH}=1 needs {BATCH_INVARIANT}=1 (vLLM's batch-invariant "
            f"GEMMs, fused MoE and attention): drop {BATCH_INVARIANT}=0"
        )
    if vllms and not ours:
        raise ValueError(
            f"ring-linear: {BATCH_INVARIANT}=1 asks every layer to be batch-invariant, and the linear "
            f"attention is so in aligned mode only: set {ALIGNED_MODE_SWITCH}=1 too"
        )
