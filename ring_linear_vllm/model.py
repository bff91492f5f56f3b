"""Ring-linear-2.0 (`BailingMoeLinearV2ForCausalLM`) on vLLM's parallel layers.

Layer l is a GQA softmax layer when `config.is_softmax_layer(l)`, else a linear-attention layer
(`linear_attention.py`); MLPs are dense for `l < first_k_dense_replace`, else a fused MoE with a sigmoid
group-limited router, the expert-bias correction and shared experts. The numerics follow
`common_kernels.precision` (the training shim's table): fp32 residual stream with unfused add and RMSNorm,
fp32 RoPE, fp32 router logits, fp32 linear-attention path and state, fp32 LM head (vLLM's `head_dtype`).
Module names equal the HF checkpoint names; `load_weights` adds only vLLM's fused-parameter shard ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import fused_moe_make_expert_params_mapping
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    is_pp_missing_parameter,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from common_kernels.config import RingLinearConfig
from common_kernels.model.layers import RMSNorm
from common_kernels.ops.moe.aligned import aligned_dense_mlp, aligned_moe, engine_moe_weights
from common_kernels.ops.moe.router_gemm import router_logits
from common_kernels.ops.rope.fused import gqa_qk_norm_rope
from common_kernels.ops.rope.naive import qk_norm_rope, rotary_inv_freq, rotary_table
from common_kernels.precision import RESIDUAL_DTYPE, ROPE_DTYPE, ROUTER_DTYPE
from common_kernels.serving import (
    RouterGate,
    aligned_mode,
    load_checkpoint_tensors,
    place_tensor,
    use_aligned_projections,
    warm_up_expert_tiers,
)

from . import engine_warmup
from .compat import fused_moe, fused_moe_weight_paths
from .engine_config import entry_state_shapes, state_dtypes
from .linear_attention import (
    NormWeight,
    RingLinearAttention,
    linear_state_copy_funcs,
    norm_weight,
)


class RingMLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts (`gate_proj`/`up_proj` fused, `down_proj`)."""

    def __init__(self, config: RingLinearConfig, width: int, quant_config, reduce_results: bool, prefix: str) -> None:
        super().__init__()
        D = config.hidden_size
        self.gate_up_proj = MergedColumnParallelLinear(
            D, [width] * 2, bias=False, quant_config=quant_config, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            width, D, bias=False, quant_config=quant_config, reduce_results=reduce_results, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = SiluAndMul()
        self.aligned = aligned_mode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aligned:  # the shim's kernel: compiled, SiluAndMul would round silu(gate) * up once, eager twice
            return aligned_dense_mlp(x, self.gate_up_proj.weight, self.down_proj.weight)
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class RingMoE(nn.Module):
    def __init__(self, config: RingLinearConfig, quant_config, prefix: str) -> None:
        super().__init__()
        self.aligned = aligned_mode()
        self.gate = RouterGate(config, invariant=self.aligned)  # cuBLAS's choice of kernel follows the batch
        self.shared_experts = (
            RingMLP(
                config,
                config.moe_shared_expert_intermediate_size * config.num_shared_experts,
                quant_config,
                reduce_results=False,  # the fused MoE adds them and all-reduces once
                prefix=f"{prefix}.shared_experts",
            )
            if config.num_shared_experts > 0
            else None
        )
        grouped = config.n_group is not None and config.topk_group is not None
        self.experts = fused_moe(
            shared_experts=self.shared_experts,
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=config.norm_topk_prob,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
            scoring_func=config.score_function,
            e_score_correction_bias=self.gate.expert_bias,
            num_expert_group=config.n_group if grouped else None,
            topk_group=config.topk_group if grouped else None,
            use_grouped_topk=grouped,
            router_logits_dtype=ROUTER_DTYPE,
            routed_scaling_factor=config.routed_scaling_factor,
            apply_routed_scale_to_output=True,
        )
        self.expert_weight_paths = fused_moe_weight_paths(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aligned:  # the shim's MoE steps as one op, in place of vLLM's fused MoE and top-k
            return aligned_moe(x, self.gate.weight, self.gate.expert_bias, *self._aligned_weights(), *self.gate.routing)
        return self.experts(hidden_states=x, router_logits=self.gate(x))

    def _aligned_weights(self) -> tuple[torch.Tensor | None, ...]:
        w13, w2 = (self.experts.get_parameter(path) for path in self.expert_weight_paths)
        return engine_moe_weights(w13, w2, self.shared_experts)


def aligned_attention_backend() -> type:
    from .aligned_attention import RingAlignedAttentionBackend  # vLLM's Triton backend, imported in aligned mode only

    return RingAlignedAttentionBackend


class RingSoftmaxAttention(nn.Module):
    """`attention.*` of a softmax layer: GQA with qk-RMSNorm and partial RoPE, vLLM's paged attention."""

    def __init__(self, config: RingLinearConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        H, Hkv, d, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        quant_config = vllm_config.quant_config
        self.eps, self.aligned = config.rms_norm_eps, aligned_mode()
        self.num_heads, self.num_kv_heads, self.head_dim = H // tp_size, max(1, Hkv // tp_size), d
        self.query_key_value = QKVParallelLinear(
            D, d, H, Hkv, bias=False, quant_config=quant_config, prefix=f"{prefix}.query_key_value"
        )
        self.query_layernorm = NormWeight(d) if config.use_qk_norm else None
        self.key_layernorm = NormWeight(d) if config.use_qk_norm else None
        self.dense = RowParallelLinear(
            H * d, D, bias=False, quant_config=quant_config, reduce_results=True, prefix=f"{prefix}.dense"
        )
        if self.aligned:
            use_aligned_projections(self.query_key_value, self.dense)
        self.attn = Attention(
            self.num_heads,
            d,
            d**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            attn_backend=aligned_attention_backend() if self.aligned else None,
        )

    def forward(self, a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        T, d = a.shape[0], self.head_dim
        qkv, _ = self.query_key_value(a)
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        weights = norm_weight(self.query_layernorm), norm_weight(self.key_layernorm)
        if self.aligned:  # the shim's kernel (one launch over q and k), not the compiler's
            q, k = gqa_qk_norm_rope(qkv, self.num_heads, self.num_kv_heads, *weights, cos, sin, self.eps)
        else:
            q, k = qk_norm_rope(
                q.view(T, self.num_heads, d), k.view(T, self.num_kv_heads, d), *weights, cos, sin, self.eps
            )
        o = self.attn(q.reshape(T, -1), k.reshape(T, -1), v)
        out, _ = self.dense(o)
        return out


class RingDecoderLayer(nn.Module):
    """Pre-norm block on an fp32 residual: `h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h))` (unfused)."""

    def __init__(self, config: RingLinearConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        layer_idx = extract_layer_index(prefix)
        D, eps, quant_config = config.hidden_size, config.rms_norm_eps, vllm_config.quant_config
        self.dtype = vllm_config.model_config.dtype
        self.aligned = aligned_mode()  # the norms through aligned mode's kernel, as the shim runs them
        self.is_linear = not config.is_softmax_layer(layer_idx)
        self.input_layernorm = RMSNorm(D, eps)
        self.attention = (
            RingLinearAttention(config, vllm_config, layer_idx, prefix=f"{prefix}.attention")
            if self.is_linear
            else RingSoftmaxAttention(config, vllm_config, prefix=f"{prefix}.attention")
        )
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.mlp = (
            RingMoE(config, quant_config, prefix=f"{prefix}.mlp")
            if config.is_moe_layer(layer_idx)
            else RingMLP(config, config.intermediate_size, quant_config, reduce_results=True, prefix=f"{prefix}.mlp")
        )

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = self.input_layernorm(h, self.dtype, self.aligned)
        h = h + self.attention(a, cos, sin).to(h.dtype)
        return h + self.mlp(self.post_attention_layernorm(h, self.dtype, self.aligned)).to(h.dtype)


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class RingLinearModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: RingLinearConfig = vllm_config.model_config.hf_config
        self.config, self.dtype = config, vllm_config.model_config.dtype
        self.aligned = aligned_mode()
        pp = get_pp_group()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.word_embeddings = VocabParallelEmbedding(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=f"{prefix}.word_embeddings",
            )
        else:
            self.word_embeddings = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: RingDecoderLayer(config, vllm_config, prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        inv_freq, rope_scaling = rotary_inv_freq(config)
        cos, sin = rotary_table(
            vllm_config.model_config.max_model_len, inv_freq, rope_scaling, ROPE_DTYPE, torch.get_default_device()
        )
        self.register_buffer("rope_cos", cos, persistent=False)  # indexed in the graph, never recomputed there
        self.register_buffer("rope_sin", sin, persistent=False)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            h = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
            h = h.to(RESIDUAL_DTYPE)
        else:
            h = intermediate_tensors["hidden_states"]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            h = layer(h, cos, sin)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": h})
        return self.norm(h, self.dtype, self.aligned)


class RingLinearForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsPP):
    packed_modules_mapping = {"query_key_value": ["query_key_value"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if not isinstance(config, RingLinearConfig):
            raise TypeError(f"ring-linear: expected a RingLinearConfig, got {type(config).__name__}")
        config.check_tensor_parallel(vllm_config.parallel_config.tensor_parallel_size)
        self.config, self.quant_config, self.aligned = config, vllm_config.quant_config, aligned_mode()
        engine_warmup.install()  # vLLM's step kernels compiled for our cache layout at start-up, not on a request
        if self.aligned:  # the profiling forward (the first) compiles every expert tier a step can take
            warm_up_expert_tiers(vllm_config.scheduler_config.max_num_batched_tokens)
        self.model = RingLinearModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = (
                self.model.word_embeddings
                if config.tie_word_embeddings
                else ParallelLMHead(
                    config.vocab_size,
                    config.hidden_size,
                    quant_config=self.quant_config,
                    prefix=maybe_prefix(prefix, "lm_head"),
                )
            )
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.aligned:  # the shim's fixed-tile GEMM (`RingLinearForCausalLM.logits`), not cuBLAS's per-batch choice
            return router_logits(hidden_states, self.lm_head.weight, invariant=True)[:, : self.config.vocab_size]
        return self.logits_processor(self.lm_head, hidden_states)

    def make_empty_intermediate_tensors(
        self, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> IntermediateTensors:
        h = torch.zeros((batch_size, self.config.hidden_size), dtype=RESIDUAL_DTYPE, device=device)
        return IntermediateTensors({"hidden_states": h})

    # ----- hybrid state, declared before the model exists -------------------------------------------------

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        return entry_state_shapes(vllm_config)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype]:
        return state_dtypes(vllm_config.cache_config)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        return linear_state_copy_funcs()

    # ----- weights ------------------------------------------------------------------------------------

    def get_expert_mapping(self) -> list[tuple[str, str, int, str]]:
        return fused_moe_make_expert_params_mapping(
            self,
            ckpt_gate_proj_name="gate_proj",
            ckpt_down_proj_name="down_proj",
            ckpt_up_proj_name="up_proj",
            num_experts=self.config.num_experts,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors (any subset, so RL weight sync can call it again); returns the parameters set.

        A name the checkpoint format does not have, or a tensor of the wrong shape, raises `CheckpointError`
        naming it; vLLM's loader then reports any parameter left unloaded.
        """
        params = dict(self.named_parameters())
        experts = self.get_expert_mapping()

        def load_extra(name: str, tensor: torch.Tensor) -> str | None:  # a pre-quantized checkpoint's scales
            return _load(params, name, tensor) if self.quant_config is not None and name in params else None

        return load_checkpoint_tensors(
            weights,
            self.config,
            lambda name, tensor: place_tensor(params, experts, name, tensor, default_weight_loader),
            skip=lambda name: is_pp_missing_parameter(name, self),
            load_extra=load_extra,
        )


def _load(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> str:
    getattr(params[name], "weight_loader", default_weight_loader)(params[name], tensor)
    return name
