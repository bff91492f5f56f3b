"""`RingLinearForCausalLM`: the training shim, an exact plain-PyTorch Ring-linear-2.0.

It is the oracle the engine adapters are tested against and the model an RL trainer runs to
recompute rollout logprobs. Inputs are packed sequences (`[T]` tokens plus `cu_seqlens`) or padded
batches (`[B, T]` plus an optional `attention_mask`); padded batches are unpadded into packed
sequences, so pad tokens never enter the linear state and positions restart at every sequence.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RingLinearConfig, is_integer, is_real
from ..errors import InvalidInputError
from ..ops.moe.router_gemm import router_logits
from ..ops.packing import is_partition
from ..ops.rope.naive import rotary_cos_sin, rotary_inv_freq
from ..precision import LOGITS_DTYPE, RESIDUAL_DTYPE, ROPE_DTYPE, compute_dtype
from .cache import RingLinearCache
from .checkpoint import atomic_directory, check_checkpoint, load_weights, read_config, save_weights
from .engine_invariance import check_engine, use_engine_invariance
from .layers import DecoderLayer, ForwardContext, RMSNorm


class RingLinearModel(nn.Module):
    """Embedding, decoder layers and the final norm (the `model.` prefix of the checkpoint)."""

    def __init__(self, config: RingLinearConfig, **factory) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(config, l, **factory) for l in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self._rotary: tuple[torch.Tensor, float] | None = None  # built at first use, never on the meta device
        self.use_triton: bool | None = None  # None: the kernels on CUDA (not float64), the references elsewhere

    @property
    def dtype(self) -> torch.dtype:
        return self.word_embeddings.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        cu_seqlens: list[int],
        cache: RingLinearCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        aligned: bool = False,
    ) -> torch.Tensor:
        """Packed tokens `[T]` (or embeddings `[T, D]`) -> final-norm hidden states `[T, D]` (model dtype).
        `aligned`: aligned mode (`RingLinearForCausalLM.token_logprobs` says what it covers)."""
        dtype = self.dtype
        h = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        h = h.to(compute_dtype(RESIDUAL_DTYPE, dtype))
        if self._rotary is None:
            self._rotary = rotary_inv_freq(self.config)
        cos, sin = rotary_cos_sin(positions, *self._rotary, compute_dtype(ROPE_DTYPE, dtype))
        # default: the kernels on CUDA, except for float64 models (the reference precision the kernels lack)
        use_triton = (h.is_cuda and dtype != torch.float64) if self.use_triton is None else self.use_triton
        ctx = ForwardContext(
            cu_seqlens=cu_seqlens,
            cu_seqlens_device=torch.tensor(cu_seqlens, device=h.device),
            cos=cos,
            sin=sin,
            cache=cache,
            use_triton=use_triton,
            aligned=aligned,
        )
        for layer in self.layers:
            h = layer(h, ctx, dtype)
        if cache is not None:
            cache.advance(torch.tensor(cu_seqlens[1:]) - torch.tensor(cu_seqlens[:-1]))
        return self.norm(h, dtype, ctx.aligned)


# What `AutoModelForCausalLM.from_pretrained` passes along that means nothing for a local folder.
_HUB_KWARGS = frozenset(
    {"cache_dir", "force_download", "local_files_only", "proxies", "resume_download", "revision", "subfolder", "token"}
)


class RingLinearForCausalLM(nn.Module):
    """Ring-linear-2.0 causal LM with HF-format I/O, packed/padded forward, logprobs and cached generation.

    `import common_kernels` registers it with `transformers.AutoModelForCausalLM` for `bailing_moe_linear`
    checkpoints, so `AutoModelForCausalLM.from_pretrained(folder)` returns it without remote code.
    """

    config_class = RingLinearConfig

    def __init__(
        self,
        config: RingLinearConfig,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        use_triton: bool | None = None,
    ) -> None:
        """`use_triton`: run qk-norm/RoPE, linear attention and norm/gate through the Triton kernels
        (forward and backward); the default None does so on CUDA for bf16/fp16/fp32 models and keeps the
        plain-PyTorch references on the CPU and for float64 models."""
        super().__init__()
        config.validate()
        self.config = config
        factory = {"dtype": dtype or torch.float32, "device": device}
        self.model = RingLinearModel(config, **factory)
        self.model.use_triton = use_triton
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        )

    # ----- construction and I/O -------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Random init for a fresh model: normal(0, std) matrices and embeddings, unit norms, zero router bias."""
        std = self.config.initializer_range if std is None else std
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)
        for name, buf in self.named_buffers():
            if name.endswith("expert_bias"):
                buf.zero_()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        report_all_errors: bool = True,
        use_triton: bool | None = None,
        config: RingLinearConfig | None = None,
        **kwargs,
    ) -> RingLinearForCausalLM:
        """Load an HF-format checkpoint directory.

        The config (`config.json`, or `config`) must be a Ring-linear one stating its shape fields, and the
        tensor names and shapes are checked against it before any data is read (all problems listed with
        `report_all_errors`, else the first); each error names the file. The model is built without
        initialising memory and filled shard by shard, so the weights exist once.

        Args:
            dtype: parameter dtype; default (or "auto") the config's `torch_dtype`, else float32.
            kwargs: what `AutoModelForCausalLM.from_pretrained` passes: `torch_dtype` (as `dtype`), `device_map`
                (one device, as `device`), and hub arguments, which a local folder does not need.
        """
        dtype = kwargs.pop("torch_dtype", dtype)
        device = _one_device(kwargs.pop("device_map", device))
        if kwargs.pop("adapter_kwargs", None):
            raise InvalidInputError(f"{path}: holds a PEFT adapter; the shim loads full checkpoints only")
        unknown = sorted(set(kwargs) - _HUB_KWARGS - {"_commit_hash", "trust_remote_code"})
        if unknown:
            raise InvalidInputError(f"RingLinearForCausalLM.from_pretrained: unknown argument(s) {', '.join(unknown)}")
        if config is not None and not isinstance(config, RingLinearConfig):
            raise InvalidInputError(f"config must be a RingLinearConfig, got {type(config).__name__}")
        config = read_config(path) if config is None else config
        check_checkpoint(config, path, report_all_errors=report_all_errors)
        dtype = _model_dtype(dtype) or config.checkpoint_dtype() or torch.float32
        with torch.device("meta"):
            model = cls(config, dtype=dtype, use_triton=use_triton)
        model.to_empty(device=device)
        load_weights(model, path)
        return model

    def save_pretrained(
        self, path: str | os.PathLike, max_shard_size: int | str = "5GB", tokenizer=None, extra_files=None
    ) -> None:
        """Write `config.json` and the safetensors shards (+ index) in the released layout, atomically: into a
        folder beside `path` that then replaces it, so an interrupted save leaves the previous checkpoint whole.

        Args:
            tokenizer: saved into the same folder (its `save_pretrained`), in the same swap.
            extra_files: `write(folder)` for anything else that belongs to this save (a trainer's state).
        """
        with atomic_directory(path) as folder:
            self.config.set_checkpoint_dtype(self.dtype)
            self.config.save_pretrained(folder)
            save_weights(self, self.config, folder, max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            if extra_files is not None:
                extra_files(folder)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.word_embeddings.weight.device

    # ----- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | list[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: RingLinearCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """fp32 logits for packed or padded input.

        Args:
            input_ids: packed `[T]` with `cu_seqlens`, or padded `[B, T]`.
            position_ids: same shape as `input_ids`; default: each sequence counts from its cached
                length (0 without a cache).
            cu_seqlens: `[N+1]` offsets of packed sequences (default: one sequence).
            attention_mask: `[B, T]` 1 for real tokens, 0 for padding; each row's real tokens must be
                contiguous (left or right padding).
            cache: continue the cached sequences (one per packed/batch row) and update the cache.
            inputs_embeds: `[T, D]` or `[B, T, D]` instead of `input_ids`.

        Returns:
            `[T, V]` or `[B, T, V]` fp32 logits; 0 at padded positions.
        """
        hidden, _, _, restore = self._hidden(input_ids, position_ids, cu_seqlens, attention_mask, cache, inputs_embeds)
        return restore(self.logits(hidden))

    def logits(self, hidden: torch.Tensor, aligned: bool = False) -> torch.Tensor:
        """LM head with fp32 accumulation (bf16 hidden and weight upcast exactly, fp32 GEMM); `aligned`: aligned
        mode's fixed-tile GEMM (the router's, `ops.moe.router_gemm`), which an aligned engine runs too."""
        weight = self.model.word_embeddings.weight if self.lm_head is None else self.lm_head.weight
        if aligned:
            return router_logits(hidden, weight, invariant=True)
        dtype = compute_dtype(LOGITS_DTYPE, hidden.dtype)
        return F.linear(hidden.to(dtype), weight.to(dtype))

    def token_logprobs(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | list[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int = 1024,
        aligned: bool = False,
        engine: str = "vllm",
    ) -> torch.Tensor:
        """`log p(x_t | x_<t)` of every token, in fp32, shaped like `input_ids`.

        The first token of each sequence has no prefix and gets 0, as do padded positions. The LM head
        and log-softmax run `chunk_size` tokens at a time, so `[T, V]` logits are never held at once.
        Differentiable.

        aligned: compute each token as an engine in aligned mode (`RING_LINEAR_ALIGNED=1`) does, the same bits
            whatever the batch and however the engine split the sequence into prefill chunks and decodes: the linear
            layers in the window form on the absolute grid (`common_kernels.ops.linear_attn.windowed`), the RMSNorms,
            the MoE layers (router, routed and shared experts) and softmax attention through the batch-invariant
            kernels an aligned engine runs (`ops.norm.rms`, `ops.moe.aligned`, `ops.attention.aligned`), the LM
            head and the projections through the aligned fixed-tile GEMM, and, on a GPU with the engine installed,
            the log-softmax under `engine`'s batch-invariant settings ("vllm" or "sglang"; `engine_invariance`:
            process-wide). Needs the Triton kernels.
        """
        if not (is_integer(chunk_size) and chunk_size > 0):
            raise InvalidInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if aligned and self.model.use_triton is False:
            raise InvalidInputError("aligned=True runs the engine's Triton kernels: leave use_triton unset (or True)")
        if aligned:
            check_engine(engine)
            if self.model.word_embeddings.weight.is_cuda:
                use_engine_invariance(engine)
        hidden, packed_ids, offsets, restore = self._hidden(
            input_ids, position_ids, cu_seqlens, attention_mask, None, None, aligned=aligned
        )  # fmt: skip
        T = hidden.shape[0]
        predicted = torch.ones(T, dtype=torch.bool, device=hidden.device)
        for a, b in zip(offsets[:-1], offsets[1:], strict=False):
            if b > a:
                predicted[a] = False  # a sequence's first token has no prefix
        source = (torch.arange(T, device=hidden.device) - 1).clamp(min=0)  # token t is predicted at t-1
        pieces = []
        for start in range(0, T, chunk_size):
            rows = source[start : start + chunk_size]
            logp = torch.log_softmax(self.logits(hidden[rows], aligned), dim=-1)
            pieces.append(logp.gather(1, packed_ids[start : start + chunk_size, None])[:, 0])
        out = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
        out = torch.where(predicted, out, torch.zeros_like(out))
        return restore(out[:, None])[..., 0]

    def _hidden(self, input_ids, position_ids, cu_seqlens, attention_mask, cache, inputs_embeds, aligned=False):
        """Pack the input and run the decoder: hidden `[T, D]`, packed ids, offsets, and a re-padding function."""
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None:
            raise ValueError("pass input_ids or inputs_embeds")
        _check_input_tensors(input_ids, inputs_embeds, attention_mask, position_ids, self.config.hidden_size)
        padded = source.dim() == (2 if input_ids is not None else 3)
        if padded:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens describes packed [T] input; padded [B, T] input uses attention_mask")
            ids, embeds, positions, offsets, restore = _unpad(input_ids, inputs_embeds, position_ids, attention_mask)
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask describes padded [B, T] input; packed [T] input uses cu_seqlens")
            ids, embeds, positions = input_ids, inputs_embeds, position_ids
            T = source.shape[0]
            offsets = [0, T] if cu_seqlens is None else _offsets(cu_seqlens)
            _check_offsets(offsets, T)

            def restore(x):
                return x

        if cache is not None and cache.batch_size != len(offsets) - 1:
            raise ValueError(f"cache holds {cache.batch_size} sequences, input has {len(offsets) - 1}")
        if ids is not None:
            _check_token_ids(ids, self.config.vocab_size)
        if positions is None:
            positions = _default_positions(offsets, cache)  # on the host: checked below without a device sync
        _check_context(positions, self.config.max_position_embeddings)
        if offsets[-1] == 0:  # nothing to run (empty input, or every row masked out)
            hidden = torch.zeros(0, self.config.hidden_size, dtype=self.dtype, device=source.device)
            return hidden, ids, offsets, restore
        hidden = self.model(ids, positions.to(source.device), offsets, cache, embeds, aligned)
        return hidden, ids, offsets, restore

    # ----- generation -------------------------------------------------------------------------------

    def new_cache(self, batch_size: int) -> RingLinearCache:
        return RingLinearCache(self.config, batch_size, self.dtype, self.device)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        top_p: float = 1.0,
    ) -> list[list[int]]:
        """Continue each prompt with the cache: one packed prefill, then one token per sequence per step.

        Greedy when `temperature == 0` (ties to the lowest token id), else sampled from
        `softmax(logits / temperature)`, restricted to the smallest set of most likely tokens whose
        probability reaches `top_p` (the most likely token always stays). A sequence stops after `eos_token_id`
        (one id or several). No prompts give no outputs.
        """
        _check_sampling(max_new_tokens, temperature, top_p)
        _check_prompts(prompts, self.config.vocab_size)
        if not prompts:
            return []
        longest, limit = max(len(p) for p in prompts), self.config.max_position_embeddings
        if longest + max_new_tokens > limit:  # vLLM's rule for a prompt and its max_tokens
            raise InvalidInputError(
                f"max_new_tokens {max_new_tokens} with a {longest}-token prompt runs past the model's context "
                f"(max_position_embeddings {limit} in config.json): ask for at most {max(limit - longest, 0)} tokens"
            )
        stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        cache = self.new_cache(len(prompts))
        ids = torch.tensor([t for p in prompts for t in p], device=self.device)
        offsets = [0]
        for p in prompts:
            offsets.append(offsets[-1] + len(p))
        logits = self(ids, cu_seqlens=offsets, cache=cache)[torch.tensor(offsets[1:]) - 1]
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in range(max_new_tokens):
            next_ids = _pick(logits, temperature, top_p, generator)
            for n, token in enumerate(next_ids.tolist()):
                if not done[n]:
                    outputs[n].append(token)
                    done[n] = token in stop
            if all(done) or step == max_new_tokens - 1:
                break
            logits = self(next_ids, cu_seqlens=list(range(len(prompts) + 1)), cache=cache)
        return outputs


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0.0:
        return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, 0]
    # in float64 with the max subtracted first: a tiny temperature sends the others to -inf, never the row to NaN
    logits = logits.double()
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        ranked, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        outside = ranked.cumsum(-1) - ranked >= top_p  # after the most likely tokens have reached top_p
        outside[:, 0] = False
        probs = probs.scatter(1, order, ranked.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


_MODEL_DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float64")}


def _model_dtype(dtype) -> torch.dtype | None:
    """A parameter dtype by name or value; None (and "auto") for the checkpoint's own."""
    if dtype is None or dtype == "auto":
        return None
    chosen = _MODEL_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if chosen not in _MODEL_DTYPES.values():
        raise InvalidInputError(f"dtype {dtype!r}: use one of {', '.join(_MODEL_DTYPES)} (or 'auto')")
    return chosen


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not (is_integer(max_new_tokens) and max_new_tokens >= 0):
        raise InvalidInputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (is_real(temperature) and 0 <= temperature < float("inf")):  # also refuses NaN
        raise InvalidInputError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if not (is_real(top_p) and 0 < top_p <= 1):
        raise InvalidInputError(f"top_p must lie in (0, 1] (1 keeps every token), got {top_p!r}")


def _check_prompts(prompts, vocab_size: int) -> None:
    if not isinstance(prompts, list | tuple) or not all(isinstance(p, list | tuple) for p in prompts):
        raise InvalidInputError("generate: prompts must be a list of token-id lists, e.g. [[1, 5, 9], [1, 7]]")
    for n, prompt in enumerate(prompts):
        if not prompt:
            raise InvalidInputError(f"generate: prompt {n} is empty; every prompt needs a token")
        if not all(is_integer(t) and 0 <= t < vocab_size for t in prompt):
            raise InvalidInputError(f"generate: prompt {n} holds an entry that is not a token id in [0, {vocab_size})")


def _check_input_tensors(input_ids, inputs_embeds, attention_mask, position_ids, hidden_size: int) -> None:
    """Types and shapes, named, before anything deep in the model trips over them."""
    for name, value in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds), ("attention_mask", attention_mask),
                        ("position_ids", position_ids)):  # fmt: skip
        if value is not None and not isinstance(value, torch.Tensor):
            raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input_ids is not None:
        if input_ids.dim() not in (1, 2) or input_ids.dtype == torch.bool or input_ids.is_floating_point():
            raise InvalidInputError(
                f"input_ids must be integer token ids shaped [T] (packed) or [B, T] (padded), got "
                f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
            )
    elif inputs_embeds.dim() not in (2, 3) or inputs_embeds.shape[-1] != hidden_size:
        raise InvalidInputError(
            f"inputs_embeds must be shaped [T, {hidden_size}] or [B, T, {hidden_size}], "
            f"got {tuple(inputs_embeds.shape)}"
        )
    source_shape = (input_ids if input_ids is not None else inputs_embeds).shape
    tokens_shape = source_shape if input_ids is not None else source_shape[:-1]
    if position_ids is not None and tuple(position_ids.shape) != tuple(tokens_shape):
        raise InvalidInputError(f"position_ids has shape {tuple(position_ids.shape)}, expected {tuple(tokens_shape)}")
    if position_ids is not None and (position_ids.is_floating_point() or bool((position_ids < 0).any())):
        raise InvalidInputError("position_ids must be integer positions >= 0")
    if attention_mask is not None and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise InvalidInputError("attention_mask must hold only 0 (padding) and 1 (token)")


def _offsets(cu_seqlens) -> list[int]:
    values = torch.as_tensor(cu_seqlens)
    if values.dim() != 1 or values.is_floating_point() or values.dtype == torch.bool:
        raise InvalidInputError(f"cu_seqlens must be a 1-D list or tensor of integer offsets, got {cu_seqlens!r}")
    return [int(x) for x in values.tolist()]


def _check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    if ids.numel() and not bool(((ids >= 0) & (ids < vocab_size)).all()):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise InvalidInputError(f"input_ids holds {bad}, outside the vocabulary [0, {vocab_size})")


def _one_device(device_map) -> torch.device | str:
    """`device_map` as transformers users pass it: one device ("cpu", "cuda:0", a torch.device), "auto" the
    first GPU if any; a per-module map is not supported (the shim lives on one device)."""
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, dict):
        raise InvalidInputError("device_map: the shim runs on one device; pass a device such as 'cuda:0'")
    return device_map


def _check_context(positions: torch.Tensor, limit: int) -> None:
    """Positions the model was not built for are refused, as vLLM refuses a prompt longer than its context: RoPE would
    rotate them anyway and the logprobs would be silently out of distribution."""
    last = int(positions.max()) if positions.numel() else -1
    if last >= limit:
        raise InvalidInputError(
            f"position {last} is past the model's context (max_position_embeddings {limit} in config.json): shorten "
            "the sequence, or give a model extended for longer contexts (rope_scaling) a larger max_position_embeddings"
        )


def _check_offsets(offsets: list[int], total: int) -> None:
    if not is_partition(offsets, total):
        raise ValueError(f"cu_seqlens {offsets} must start at 0, not decrease, and end at the token count {total}")


def _default_positions(offsets: list[int], cache: RingLinearCache | None) -> torch.Tensor:
    """Each sequence counting on from its cached length, on the host (the decoder takes them to the device)."""
    pieces = []
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=False)):
        start = 0 if cache is None else int(cache.seq_lens[n])
        pieces.append(torch.arange(start, start + b - a))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _unpad(input_ids, inputs_embeds, position_ids, attention_mask):
    """Padded `[B, T]` -> packed tokens, offsets, and a function mapping packed `[T', ...]` back to `[B, T, ...]`."""
    source = input_ids if input_ids is not None else inputs_embeds
    B, T = source.shape[:2]
    mask = torch.ones(B, T, dtype=torch.bool, device=source.device) if attention_mask is None else attention_mask.bool()
    if mask.shape != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected {(B, T)}")
    lengths = mask.sum(1)
    if T > 0:
        first = mask.float().argmax(1)
        contiguous = mask.cumsum(1).gather(1, (first + lengths - 1).clamp(min=0)[:, None])[:, 0] == lengths
        if not bool(contiguous.all()):
            raise ValueError("attention_mask: each row's real tokens must be contiguous (left or right padding)")
    flat = mask.reshape(-1)
    offsets = [0] + torch.cumsum(lengths, 0).tolist()
    ids = input_ids.reshape(-1)[flat] if input_ids is not None else None
    embeds = inputs_embeds.reshape(B * T, -1)[flat] if inputs_embeds is not None else None
    positions = None if position_ids is None else position_ids.reshape(-1)[flat]

    def restore(packed: torch.Tensor) -> torch.Tensor:
        out = packed.new_zeros((B * T, *packed.shape[1:]))
        out = out.index_copy(0, flat.nonzero(as_tuple=True)[0], packed)
        return out.reshape(B, T, *packed.shape[1:])

    return ids, embeds, positions, offsets, restore
