"""Scalar-decay linear attention: references and Triton kernels (see README.md beside this file)."""

from .backward import linear_attention_varlen_triton
from .custom_ops import linear_attention_decode_op, linear_attention_prefill_op
from .decode import linear_attention_decode
from .naive import linear_attention_chunked, linear_attention_recurrent, linear_attention_varlen
from .prefill import SegmentPlan, linear_attention_prefill, plan_prefill
from .windowed import linear_attention_as_served

__all__ = [
    "linear_attention_as_served",
    "linear_attention_chunked",
    "linear_attention_decode",
    "linear_attention_decode_op",
    "linear_attention_prefill",
    "linear_attention_prefill_op",
    "linear_attention_recurrent",
    "linear_attention_varlen",
    "linear_attention_varlen_triton",
    "plan_prefill",
    "SegmentPlan",
]
