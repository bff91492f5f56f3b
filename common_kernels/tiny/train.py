"""Make, train and evaluate the tiny Ring-linear checkpoint on associative recall, on a CPU in minutes."""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..model.modeling import RingLinearForCausalLM
from ..presets import tiny_config
from .task import make_sample
from .tokenizer import save_tokenizer

TINY_SHARD_SIZE = "1MB"  # small on purpose: the tiny checkpoint is sharded like the released ones


def make_tiny_checkpoint(path: str | os.PathLike, seed: int = 0) -> RingLinearForCausalLM:
    """Write a randomly initialised tiny checkpoint (config, shards, index, tokenizer) to `path`."""
    tokenizer = save_tokenizer(path)
    config = tiny_config(
        vocab_size=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    assert len(tokenizer) <= config.vocab_size
    model = RingLinearForCausalLM(config, dtype=torch.float32)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(path, max_shard_size=TINY_SHARD_SIZE)
    return model


@dataclass
class TrainResult:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Pack `<bos> text <eos>` sequences into `[T]` ids and offsets."""
    seqs = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    return torch.tensor([t for s in seqs for t in s]), offsets


def train(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    steps: int = 1500,
    minutes: float = 8.0,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Next-token training on recall samples with AdamW and a cosine schedule; saves to `out`.

    Stops after `steps` steps or `minutes` of wall time, whichever comes first.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = RingLinearForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = min(100, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    start, first_loss, loss_avg, done = time.time(), None, None, 0
    bar = tqdm(range(steps), desc="train", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for _ in bar:
        ids, offsets = encode_batch(tokenizer, [make_sample(rng).text for _ in range(batch_size)])
        logits = model(ids, cu_seqlens=offsets)
        targets = ids.clone()
        targets[torch.tensor(offsets[:-1])] = -100  # a sequence's first token has no prefix
        loss = F.cross_entropy(logits[:-1], targets[1:], ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        first_loss = loss.item() if first_loss is None else first_loss
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        done += 1
        bar.set_postfix(loss=f"{loss_avg:.3f}")
        if time.time() - start > minutes * 60:
            break
    bar.close()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=TINY_SHARD_SIZE)
    tokenizer.save_pretrained(out)
    return TrainResult(steps=done, first_loss=first_loss, last_loss=loss_avg, seconds=time.time() - start)


def recall_accuracy(
    model: RingLinearForCausalLM, tokenizer: PreTrainedTokenizerBase, samples: int = 200, seed: int = 1234
) -> float:
    """Fraction of held-out recall prompts whose greedy next token is the right value."""
    rng = random.Random(seed)
    batch = [make_sample(rng) for _ in range(samples)]
    outputs = model.generate([tokenizer(s.prompt).input_ids for s in batch], max_new_tokens=1)
    return sum(tokenizer.decode(o) == s.answer for o, s in zip(outputs, batch, strict=False)) / samples
