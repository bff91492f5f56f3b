"""`RingLinearConfig`: the Hugging Face config of Ring-linear-2.0 (`model_type = "bailing_moe_linear"`).

Every field of the released `config.json` is a keyword argument with the Ring-mini-linear-2.0 value as
default. `validate()` checks the fields; it runs at construction and again whenever an engine has edited the
config. `check_field_kinds` checks their JSON types before transformers reads them (first thing at
construction, which `from_dict` goes through too). Errors name the field, its value and the fix.

Written in the classic `__init__` style so the same class works on transformers 4.56 (which the model
card pins) and on transformers 5.x (which vLLM >= 0.26 and SGLang >= 0.5.17 need). Transformers 5
folds `rope_theta` / `rope_scaling` into `rope_parameters`; `rope_settings()` reads either form.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PretrainedConfig
from transformers.utils import logging

from .errors import RingLinearError

logger = logging.get_logger(__name__)
DECAY_CONVENTIONS = ("engine", "hf")
SUPPORTED_ROPE_KINDS = ("default", "yarn")
SUPPORTED_SCORE_FUNCTIONS = ("sigmoid",)
SUPPORTED_ROUTER_DTYPES = ("fp32", "float32")
ARCHITECTURE = "BailingMoeLinearV2ForCausalLM"
# Fields a checkpoint's config.json must state: they fix the tensor shapes and the layer schedule, so a default
# (Ring-mini's) would silently describe another model.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "layer_group_size",
    "moe_intermediate_size",
    "num_experts",
    "num_experts_per_tok",
)
# The JSON type of each numeric field, checked before transformers' own checks compare them (a quoted "64"
# would fail there with a bare TypeError).
_INTEGER_FIELDS = (
    *REQUIRED_FIELDS, "head_dim", "group_norm_size", "moe_shared_expert_intermediate_size", "num_shared_experts",
    "n_group", "topk_group", "first_k_dense_replace", "num_nextn_predict_layers", "max_position_embeddings",
)  # fmt: skip
_REAL_FIELDS = ("routed_scaling_factor", "partial_rotary_factor", "rope_theta", "rms_norm_eps", "initializer_range")
# a quoted "false" is a non-empty string, which Python reads as true
_BOOLEAN_FIELDS = (
    "linear_silu", "moe_router_enable_expert_bias", "norm_topk_prob", "use_qk_norm", "use_bias", "use_qkv_bias",
    "use_rmsnorm", "tie_word_embeddings", "use_cache",
)  # fmt: skip
FIELD_KINDS = (
    dict.fromkeys(_INTEGER_FIELDS, "an integer")
    | dict.fromkeys(_REAL_FIELDS, "a number")
    | dict.fromkeys(_BOOLEAN_FIELDS, "true or false")
    | dict.fromkeys(("rope_scaling", "rope_parameters"), "an object")
)
# fields that change the model's arithmetic without changing a tensor shape: a config.json that leaves one out
# gets Ring-mini's value, said in a warning (the released configs state them all)
_MATH_FIELDS = (
    "head_dim", "group_norm_size", "linear_silu", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
    "score_function", "moe_router_enable_expert_bias", "first_k_dense_replace", "use_qk_norm", "partial_rotary_factor",
    "rms_norm_eps", "num_shared_experts",
)  # fmt: skip


def _has_kind(value: Any, kind: str) -> bool:
    if kind == "an object":
        return isinstance(value, dict)
    if kind == "true or false":
        return isinstance(value, bool)
    return is_integer(value) if kind == "an integer" else is_real(value)


def check_field_kinds(fields: dict[str, Any]) -> None:
    """Each field's JSON type, the rotary settings' keys and the weights' dtype, before transformers reads them
    (where a quoted number or a malformed `rope_scaling` fails deep inside, or a quoted boolean passes as true)."""
    for name, value in fields.items():
        kind = FIELD_KINDS.get(name)
        if kind is not None and value is not None and not _has_kind(value, kind):
            raise RingLinearConfigError(f"RingLinearConfig.{name}={value!r}: must be {kind} (JSON, without quotes).")
        if name in ("rope_scaling", "rope_parameters") and value:
            _check_rope_fields(name, value)
        if name in ("dtype", "torch_dtype") and value not in (None, "auto"):
            dtype = getattr(torch, value, None) if isinstance(value, str) else value
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise RingLinearConfigError(
                    f"RingLinearConfig.{name}={value!r}: must name a floating-point torch dtype, the checkpoint "
                    'weights\' (e.g. "bfloat16").'
                )


def _check_rope_fields(name: str, rope: dict[str, Any]) -> None:
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    _require(kind in SUPPORTED_ROPE_KINDS, name, rope, f"its type must be one of {SUPPORTED_ROPE_KINDS}")
    for key, check, rule in (
        ("factor", is_real, "a number >= 1"),
        ("original_max_position_embeddings", is_integer, "a positive integer"),
        ("rope_theta", is_real, "a positive number"),
    ):
        value = rope.get(key)
        _require(value is None or (check(value) and value > 0), name, rope, f"'{key}' must be {rule}")
    if kind == "yarn":
        _require(
            is_real(rope.get("factor")) and rope["factor"] >= 1 and rope.get("original_max_position_embeddings"),
            name,
            rope,
            "YaRN needs 'factor' (>= 1) and 'original_max_position_embeddings' (131072 for the released models)",
        )
    else:
        _require(rope.get("factor", 1.0) == 1.0, name, rope, '\'factor\' scales YaRN only: add "rope_type": "yarn"')


ARCHITECTURES = (
    "BailingMoeLinearV2ForCausalLM",  # the released Ring-mini/flash-linear-2.0 checkpoints
    "BailingMoeLinearForCausalLM",  # aliases the authors' own engine accepted
    "BailingMoELinearForCausalLM",
)


class RingLinearConfigError(RingLinearError):
    """A config field is missing or has a value this model cannot run with; the message names the field and the
    fix."""


@dataclass(frozen=True)
class RopeSettings:
    """Rotary settings resolved from either transformers 4 (`rope_scaling`) or 5 (`rope_parameters`)."""

    theta: float
    rotary_dim: int
    kind: Literal["default", "yarn"]
    factor: float = 1.0
    original_max_position_embeddings: int | None = None


class RingLinearConfig(PretrainedConfig):
    r"""Config of Ring-linear-2.0: hybrid linear / GQA-softmax attention with a sigmoid-routed MoE.

    Layer `l` (0-based) is softmax attention when `(l + 1) % layer_group_size == 0` or when it lies after
    the last whole group; every other layer is linear attention. Layers below `first_k_dense_replace`
    use a dense SwiGLU MLP, the rest the MoE.

    Fields that are not in the released configs:
        linear_decay_convention (`str`): which layer index the linear-attention decay uses.
            `"engine"` (default): factor `1 - l/(L-1) + 1e-5`, as in the authors' SGLang, upstream
            vLLM/SGLang and Megatron. `"hf"`: factor `1 - (l-1)/(L-1) + 1e-5`, as the HF remote code
            is quoted by third-party ports. See `common_kernels.slopes`.
    """

    model_type = "bailing_moe_linear"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int | None = 128,
        layer_group_size: int = 5,
        group_norm_size: int = 4,
        linear_silu: bool = False,
        linear_decay_convention: str = "engine",
        moe_intermediate_size: int = 512,
        moe_shared_expert_intermediate_size: int = 512,
        num_experts: int = 256,
        num_experts_per_tok: int = 8,
        num_shared_experts: int = 1,
        score_function: str = "sigmoid",
        moe_router_enable_expert_bias: bool = True,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        norm_topk_prob: bool = True,
        router_dtype: str = "fp32",
        first_k_dense_replace: int = 1,
        num_nextn_predict_layers: int = 0,
        use_qk_norm: bool = True,
        partial_rotary_factor: float = 0.5,
        rope_theta: float = 1_000_000.0,
        rope_scaling: dict[str, Any] | None = None,
        max_position_embeddings: int = 131072,
        rms_norm_eps: float = 1e-6,
        hidden_act: str = "silu",
        use_bias: bool = False,
        use_qkv_bias: bool = False,
        use_rmsnorm: bool = True,
        tie_word_embeddings: bool = False,
        embedding_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        output_dropout: float = 0.0,
        initializer_range: float = 0.006,
        use_cache: bool = True,
        pad_token_id: int | None = 156892,
        eos_token_id: int | list[int] | None = 156892,
        bos_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_field_kinds({name: value for name, value in locals().items() if name != "self"} | kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.layer_group_size = layer_group_size
        self.group_norm_size = group_norm_size
        self.linear_silu = linear_silu
        self.linear_decay_convention = linear_decay_convention
        self.moe_intermediate_size = moe_intermediate_size
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.score_function = score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob
        self.router_dtype = router_dtype
        self.first_k_dense_replace = first_k_dense_replace
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.use_qk_norm = use_qk_norm
        self.partial_rotary_factor = partial_rotary_factor
        self.rope_theta = rope_theta
        if rope_scaling is not None:  # transformers >= 5.2x warns on any assignment (it aliases rope_parameters)
            self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.use_bias = use_bias
        self.use_qkv_bias = use_qkv_bias
        self.use_rmsnorm = use_rmsnorm
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.output_dropout = output_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.setdefault("architectures", [ARCHITECTURE])
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            bos_token_id=bos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    # ----- derived layout -------------------------------------------------------------------------

    def is_softmax_layer(self, layer_idx: int) -> bool:
        """True for a GQA softmax layer: the last layer of each group, and any layer after the last whole group."""
        whole_groups_end = (self.num_hidden_layers // self.layer_group_size) * self.layer_group_size
        return (layer_idx + 1) % self.layer_group_size == 0 or layer_idx >= whole_groups_end

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def softmax_layer_ids(self) -> list[int]:
        return [l for l in range(self.num_hidden_layers) if self.is_softmax_layer(l)]

    @property
    def linear_layer_ids(self) -> list[int]:
        return [l for l in range(self.num_hidden_layers) if not self.is_softmax_layer(l)]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_state_shape(self) -> tuple[int, int, int]:
        """Per-sequence recurrent state of one linear layer, `[H, d_k, d_v]`, kept in fp32."""
        return (self.num_attention_heads, self.head_dim, self.head_dim)

    def checkpoint_dtype(self) -> torch.dtype | None:
        """The weights' dtype the config declares (`dtype` in transformers 5, `torch_dtype` in 4)."""
        value = self.__dict__.get("dtype") or self.__dict__.get("torch_dtype")
        return getattr(torch, value) if isinstance(value, str) else value

    def set_checkpoint_dtype(self, dtype: torch.dtype) -> None:
        self.__dict__["dtype" if "dtype" in self.__dict__ else "torch_dtype"] = dtype

    def rope_settings(self) -> RopeSettings:
        """Rotary settings from `rope_parameters` (transformers 5) or `rope_scaling` (transformers 4)."""
        params = dict(getattr(self, "rope_parameters", None) or getattr(self, "rope_scaling", None) or {})
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        factor = float(params.get("factor", 1.0) or 1.0)
        original = params.get("original_max_position_embeddings")
        return RopeSettings(
            theta=float(params.get("rope_theta", self.rope_theta)),
            rotary_dim=self.rotary_dim,
            kind=kind,
            factor=factor,
            original_max_position_embeddings=int(original) if original is not None else None,
        )

    def tensor_parallel_sizes(self) -> list[int]:
        """The TP sizes that can split this model.

        Linear layers shard whole heads and whole output-norm groups per rank (a group's RMS must not span
        ranks); softmax layers shard query heads (vLLM/SGLang replicate KV heads when tp > num_key_value_heads).
        """
        H, G = self.num_attention_heads, self.group_norm_size
        return [t for t in range(1, H + 1) if H % t == 0 and G % t == 0]

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise `RingLinearConfigError` if `tp_size` ranks cannot split this model, saying which TP sizes can."""
        H, G = self.num_attention_heads, self.group_norm_size
        ok = self.tensor_parallel_sizes()
        if not (isinstance(tp_size, int) and tp_size >= 1):
            raise RingLinearConfigError(f"tensor parallel size must be a positive integer, got {tp_size!r}")
        if tp_size not in ok:
            raise RingLinearConfigError(
                f"tensor parallel size {tp_size} cannot split this model: it must divide both "
                f"RingLinearConfig.num_attention_heads={H} (heads per rank) and "
                f"RingLinearConfig.group_norm_size={G} (output-norm groups per rank); use one of {ok}"
            )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> RingLinearConfig:
        """A config read from a file (transformers' and the engines' loading path): its `model_type` must be ours
        and it must state every field in `REQUIRED_FIELDS`; anything else defaults to Ring-mini's value."""
        if not isinstance(config_dict, dict):
            raise RingLinearConfigError(f"the config must be a JSON object of fields, got {type(config_dict).__name__}")
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise RingLinearConfigError(
                f"model_type {model_type!r} is not a Ring-linear config (expected {cls.model_type!r}): "
                "load this checkpoint with the class for its own model type"
            )
        missing = [name for name in REQUIRED_FIELDS if name not in config_dict]
        if missing:
            raise RingLinearConfigError(
                f"the config does not state {', '.join(missing)}: these fix the tensor shapes, so no default is "
                "taken; add them to config.json (the released Ring-linear configs have them)"
            )
        unread = sorted(name for name in set(config_dict) - cls._read_fields() if not name.startswith("_"))
        if unread:
            logger.warning(
                "ring-linear: the config states fields Ring-linear-2.0 does not read: %s (a misspelt field leaves the "
                "intended one at its default)",
                ", ".join(unread),
            )
        defaulted = [name for name in _MATH_FIELDS if name not in config_dict]
        if "rope_theta" not in config_dict and "rope_theta" not in (config_dict.get("rope_parameters") or {}):
            defaulted.append("rope_theta")
        if defaulted:
            defaults = {name: param.default for name, param in inspect.signature(cls.__init__).parameters.items()}
            logger.warning(
                "ring-linear: the config does not state %s; Ring-mini-linear-2.0's value is taken (%s): state them "
                "in config.json if the checkpoint was trained otherwise",
                ", ".join(defaulted),
                ", ".join(f"{name}={defaults[name]!r}" for name in defaulted),
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def _read_fields(cls) -> set[str]:
        """Fields a config.json may state: ours, transformers' own, and the metadata released configs carry."""
        ours = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        metadata = {"auto_map", "torch_dtype", "rope_parameters", "quantization_config"}
        return ours | set(PretrainedConfig().to_dict()) | metadata

    # ----- validation -----------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `RingLinearConfigError` naming the first field this model cannot run with, and the fix."""
        check_field_kinds({name: getattr(self, name, None) for name in FIELD_KINDS if name != "rope_parameters"})
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "layer_group_size",
            "group_norm_size",
            "max_position_embeddings",
        ):
            _require(
                is_integer(getattr(self, name)) and getattr(self, name) > 0,
                name,
                getattr(self, name),
                "must be a positive integer",
            )
        _require(
            2 <= self.layer_group_size <= self.num_hidden_layers,
            "layer_group_size",
            self.layer_group_size,
            f"must lie in [2, num_hidden_layers={self.num_hidden_layers}]: each group is layer_group_size-1 linear "
            "layers followed by one softmax layer (Ring-mini-linear-2.0: 5, Ring-flash-linear-2.0: 8)",
        )
        H, Hkv, d, L = self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.num_hidden_layers
        _require(
            H % Hkv == 0,
            "num_key_value_heads",
            Hkv,
            f"must divide num_attention_heads={H} (each KV head serves H/Hkv query heads)",
        )
        _require(
            (H * d) % self.group_norm_size == 0,
            "group_norm_size",
            self.group_norm_size,
            f"must divide num_attention_heads*head_dim={H * d} (the linear-attention output is normalised in "
            "that many equal groups); Ring-mini-linear-2.0 uses 4",
        )
        _require(d % 2 == 0, "head_dim", d, "must be even (rotary pairs)")
        _require(
            0.0 < self.partial_rotary_factor <= 1.0 and self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
            "partial_rotary_factor",
            self.partial_rotary_factor,
            f"must be in (0, 1] with head_dim*factor a positive even number (head_dim={d}); "
            "the released models use 0.5",
        )
        _require(
            0 <= self.first_k_dense_replace <= L,
            "first_k_dense_replace",
            self.first_k_dense_replace,
            f"must lie in [0, num_hidden_layers={L}]",
        )
        if self.first_k_dense_replace > 0:
            _require(
                is_integer(self.intermediate_size) and self.intermediate_size > 0,
                "intermediate_size",
                self.intermediate_size,
                "must be a positive integer (layers below first_k_dense_replace are dense)",
            )
        if self.first_k_dense_replace < L:
            self._validate_moe()
        _require(self.hidden_act == "silu", "hidden_act", self.hidden_act, "only 'silu' (SwiGLU) is implemented")
        _require(not self.use_bias, "use_bias", self.use_bias, "bias terms are not implemented; set it to false")
        _require(
            not self.use_qkv_bias, "use_qkv_bias", self.use_qkv_bias, "QKV bias is not implemented; set it to false"
        )
        _require(self.use_rmsnorm, "use_rmsnorm", self.use_rmsnorm, "only RMSNorm is implemented; set it to true")
        for name in ("embedding_dropout", "attention_dropout", "output_dropout"):
            _require(getattr(self, name) == 0.0, name, getattr(self, name), "dropout is not implemented; set it to 0.0")
        _require(
            self.linear_decay_convention in DECAY_CONVENTIONS,
            "linear_decay_convention",
            self.linear_decay_convention,
            f"must be one of {DECAY_CONVENTIONS}",
        )
        _require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "must be positive")
        _require(
            self.num_nextn_predict_layers >= 0,
            "num_nextn_predict_layers",
            self.num_nextn_predict_layers,
            "must be >= 0",
        )
        self._validate_rope()
        self._validate_token_ids()

    def _validate_token_ids(self) -> None:
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name, None)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            _require(
                all(i is None or (is_integer(i) and 0 <= i < self.vocab_size) for i in ids),
                name,
                value,
                f"must be null or a token id in [0, vocab_size={self.vocab_size})"
                + (" (or a list of them)" if name == "eos_token_id" else ""),
            )

    def _validate_moe(self) -> None:
        E, k = self.num_experts, self.num_experts_per_tok
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
            _require(
                is_integer(getattr(self, name)) and getattr(self, name) > 0,
                name,
                getattr(self, name),
                "must be a positive integer",
            )
        _require(self.num_shared_experts >= 0, "num_shared_experts", self.num_shared_experts, "must be >= 0")
        _require(
            self.routed_scaling_factor > 0,
            "routed_scaling_factor",
            self.routed_scaling_factor,
            "must be positive (it scales the routed experts' sum; 2.5 in the released models)",
        )
        if self.num_shared_experts > 0:
            _require(
                is_integer(self.moe_shared_expert_intermediate_size) and self.moe_shared_expert_intermediate_size > 0,
                "moe_shared_expert_intermediate_size",
                self.moe_shared_expert_intermediate_size,
                "must be a positive integer when num_shared_experts > 0",
            )
        _require(
            E % self.n_group == 0,
            "n_group",
            self.n_group,
            f"must divide num_experts={E} (experts are split into n_group contiguous groups)",
        )
        _require(self.topk_group <= self.n_group, "topk_group", self.topk_group, f"must be <= n_group={self.n_group}")
        reachable = self.topk_group * (E // self.n_group)
        _require(
            k <= reachable,
            "num_experts_per_tok",
            k,
            f"must be <= topk_group * num_experts / n_group = {reachable} (experts reachable after group selection)",
        )
        _require(
            self.score_function in SUPPORTED_SCORE_FUNCTIONS,
            "score_function",
            self.score_function,
            f"must be one of {SUPPORTED_SCORE_FUNCTIONS}",
        )
        _require(
            self.router_dtype in SUPPORTED_ROUTER_DTYPES,
            "router_dtype",
            self.router_dtype,
            f"must be one of {SUPPORTED_ROUTER_DTYPES}: the router runs in fp32",
        )

    def _validate_rope(self) -> None:
        rope = self.rope_settings()
        _require(
            rope.kind in SUPPORTED_ROPE_KINDS,
            "rope_scaling",
            rope.kind,
            f"rope type must be one of {SUPPORTED_ROPE_KINDS}; for 512K context use "
            '{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072}',
        )
        _require(rope.theta > 0, "rope_theta", rope.theta, "must be positive")
        if rope.kind == "yarn":
            _require(rope.factor >= 1.0, "rope_scaling", rope.factor, "YaRN 'factor' must be >= 1")
            _require(
                rope.original_max_position_embeddings is not None,
                "rope_scaling",
                None,
                "YaRN needs 'original_max_position_embeddings' (131072 for the released models)",
            )


def is_integer(value: Any) -> bool:
    """An int that is not a bool (JSON `true` and Python `True` are not sizes or counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require(ok: bool, field: str, value: Any, rule: str) -> None:
    if not ok:
        raise RingLinearConfigError(f"RingLinearConfig.{field}={value!r}: {rule}.")
