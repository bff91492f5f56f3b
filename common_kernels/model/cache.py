"""Generation state of the training shim: fp32 linear state per linear layer, K/V per softmax layer."""

from __future__ import annotations

import torch

from ..config import RingLinearConfig
from ..precision import STATE_DTYPE, compute_dtype


class RingLinearCache:
    """State of `batch_size` sequences, each continued independently.

    * linear layer `l`: `linear_states[l]`, `[N, H, d, d]` fp32 (float64 for a float64 model), zero for a
      fresh sequence;
    * softmax layer `l`: `keys[l][n]`, `values[l][n]`, `[len_n, Hkv, d]` in the model dtype (after
      qk-norm and RoPE, as the engines cache them);
    * `seq_lens[n]`: tokens already seen, which is also the position of sequence n's next token.
    """

    def __init__(
        self, config: RingLinearConfig, batch_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        state_dtype = compute_dtype(STATE_DTYPE, dtype)
        self.batch_size = batch_size
        self.seq_lens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.linear_states: dict[int, torch.Tensor] = {
            l: torch.zeros((batch_size, *config.linear_state_shape), dtype=state_dtype, device=device)
            for l in config.linear_layer_ids
        }
        empty = torch.zeros((0, config.num_key_value_heads, config.head_dim), dtype=dtype, device=device)
        self.keys: dict[int, list[torch.Tensor]] = {l: [empty] * batch_size for l in config.softmax_layer_ids}
        self.values: dict[int, list[torch.Tensor]] = {l: [empty] * batch_size for l in config.softmax_layer_ids}

    def append_kv(
        self, layer_idx: int, seq: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one sequence's new K/V of a softmax layer and return all of that sequence's K/V."""
        self.keys[layer_idx][seq] = torch.cat((self.keys[layer_idx][seq], k))
        self.values[layer_idx][seq] = torch.cat((self.values[layer_idx][seq], v))
        return self.keys[layer_idx][seq], self.values[layer_idx][seq]

    def advance(self, new_tokens: torch.Tensor) -> None:
        """Record that each sequence received `new_tokens[n]` tokens (after all layers ran)."""
        self.seq_lens = self.seq_lens + new_tokens.to(self.seq_lens.device)
