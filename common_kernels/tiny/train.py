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

from ..config import is_integer, is_real
from ..errors import InvalidInputError, RingLinearError
from ..model.checkpoint import TRAINING_STATE, CheckpointError, check_writable
from ..model.modeling import RingLinearForCausalLM
from ..presets import tiny_config
from .task import make_sample
from .tokenizer import build_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one makes a loadable tokenizer
TINY_SHARD_SIZE = "1MB"  # small on purpose: the tiny checkpoint is sharded like the released ones


def load_tokenizer(checkpoint: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer; a missing or broken one is a `CheckpointError` naming the folder."""
    if not any((Path(checkpoint) / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{checkpoint}: no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the checkpoint's tokenizer files into it"
        )
    try:
        return AutoTokenizer.from_pretrained(checkpoint)
    except Exception as error:  # transformers raises many kinds for a damaged tokenizer file
        raise CheckpointError(f"{checkpoint}: unreadable tokenizer ({type(error).__name__}: {error})") from None


def refuse_to_overwrite(out: str | os.PathLike) -> None:
    """A folder that already holds files is not written over unless the caller says so."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out}: exists and is not a folder; choose another output path")
    if out.exists() and any(out.iterdir()):
        raise InvalidInputError(
            f"{out} already holds files; pass --overwrite to replace them (or, for train, --resume to continue "
            "the training saved there)"
        )


def make_tiny_checkpoint(path: str | os.PathLike, seed: int = 0) -> RingLinearForCausalLM:
    """Write a randomly initialised tiny checkpoint (config, shards, index, tokenizer) to `path`."""
    tokenizer = build_tokenizer()
    config = tiny_config(
        vocab_size=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    assert len(tokenizer) <= config.vocab_size
    model = RingLinearForCausalLM(config, dtype=torch.float32)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(path, max_shard_size=TINY_SHARD_SIZE, tokenizer=tokenizer)
    return model


class TrainingDiverged(RingLinearError):
    """The loss became NaN or infinite; nothing of that step is saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `train`, raised once the step reached is saved (a run stopped before its first step saves
    nothing)."""

    def __init__(self, step: int, steps: int, out: str | os.PathLike) -> None:
        saved = f"step {step} of {steps} saved to {out} (continue with --resume)" if step else "nothing saved"
        super().__init__(f"training interrupted: {saved}")
        self.step = step


@dataclass
class TrainResult:
    steps: int  # the step count reached, including steps of a resumed run
    first_loss: float
    last_loss: float
    seconds: float
    stopped_by_time: bool = False  # the `minutes` cap ended the run before `steps`


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
    save_every: int = 250,
    overwrite: bool = False,
    resume: bool = False,
) -> TrainResult:
    """Next-token training on recall samples with AdamW and a cosine schedule over `steps` steps.

    Stops after `steps` steps or `minutes` of wall time, whichever comes first. `out` is written every
    `save_every` steps, at the end and on Ctrl-C (then KeyboardInterrupt is raised again), each time atomically
    with the optimizer state, so `resume=True` continues from the last save exactly as if never stopped; Ctrl-C
    raises `TrainingInterrupted` after its save. An `out` that already holds files is refused unless `overwrite`
    or `resume`.
    """
    _check_training_arguments(steps, minutes, batch_size, lr, save_every)
    arguments = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    if resume:
        state = _read_training_state(Path(out), arguments)
        checkpoint = out
    elif not overwrite:
        refuse_to_overwrite(out)
    check_writable(out)  # before the first step, not after minutes of training
    model = RingLinearForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, report_all_errors=False)
    tokenizer = load_tokenizer(checkpoint)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, min(100, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    done, first_loss, loss_avg, seconds_before = 0, None, None, 0.0
    if resume:
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        done, first_loss, loss_avg = state["step"], state["first_loss"], state["loss_avg"]
        seconds_before = state["seconds"]
    start, last_saved = time.time(), done  # the step `out` holds (0: nothing of this run's)

    def save() -> None:
        nonlocal last_saved
        last_saved = done
        state = {
            "step": done, "optimizer": opt.state_dict(), "schedule": schedule.state_dict(), "first_loss": first_loss,
            "loss_avg": loss_avg, "seconds": seconds_before + time.time() - start, "arguments": arguments,
        }  # fmt: skip
        model.save_pretrained(
            out, max_shard_size=TINY_SHARD_SIZE, tokenizer=tokenizer,
            extra_files=lambda folder: torch.save(state, Path(folder) / TRAINING_STATE),
        )  # fmt: skip

    bar = tqdm(total=steps, initial=done, desc="train", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    stopped_by_time = False
    try:
        while done < steps:
            rng = random.Random(f"{seed}:{done}")  # per step: a resumed run draws the same samples
            ids, offsets = encode_batch(tokenizer, [make_sample(rng).text for _ in range(batch_size)])
            logits = model(ids, cu_seqlens=offsets)
            targets = ids.clone()
            targets[torch.tensor(offsets[:-1])] = -100  # a sequence's first token has no prefix
            loss = F.cross_entropy(logits[:-1], targets[1:], ignore_index=-100)
            if not torch.isfinite(loss):
                saved = f"the last save ({out}) is from step {last_saved}" if last_saved else "nothing was saved"
                raise TrainingDiverged(
                    f"training diverged at step {done + 1}: the loss is {loss.item()}; lower --lr (now {lr:g}). {saved}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            first_loss = loss.item() if first_loss is None else first_loss
            loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.3f}")
            if done < steps and time.time() - start > minutes * 60:
                stopped_by_time = True
                break
            if done % save_every == 0 and done < steps:
                save()
    except KeyboardInterrupt:
        bar.close()
        if done:
            save()
        raise TrainingInterrupted(done, steps, out) from None
    bar.close()
    save()
    seconds = seconds_before + time.time() - start
    return TrainResult(done, first_loss, loss_avg, seconds, stopped_by_time=stopped_by_time)


def _read_training_state(out: Path, arguments: dict) -> dict:
    """The saved trainer state of `out`, refused when it is missing, unreadable, or from other arguments (a
    resumed run continues exactly only with the same steps, batch size, learning rate and seed)."""
    file = out / TRAINING_STATE
    if not file.is_file():
        raise InvalidInputError(f"{out}: no {TRAINING_STATE} to resume from; train into it without --resume")
    try:
        state = torch.load(file, weights_only=True)
        saved = state["arguments"]
        state["optimizer"], state["schedule"], state["step"]  # noqa: B018 - present, or KeyError below
    except Exception as error:  # a truncated or foreign file: pickle, EOF, key and type errors alike
        raise CheckpointError(f"{file}: unreadable trainer state ({type(error).__name__}: {error})") from None
    changed = [f"--{name.replace('_', '-')} {arguments[name]} (saved: {saved.get(name)})" for name in arguments
               if saved.get(name) != arguments[name]]  # fmt: skip
    if changed:
        raise InvalidInputError(f"{out}: --resume needs the saved run's arguments; differing: {', '.join(changed)}")
    return state


def _check_training_arguments(steps: int, minutes: float, batch_size: int, lr: float, save_every: int) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("save_every", save_every)):
        if not (is_integer(value) and value > 0):
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("minutes", minutes), ("lr", lr)):
        if not (is_real(value) and 0 < value < float("inf")):  # also refuses NaN
            raise InvalidInputError(f"{name} must be a finite number > 0, got {value!r}")


def recall_accuracy(
    model: RingLinearForCausalLM, tokenizer: PreTrainedTokenizerBase, samples: int = 200, seed: int = 1234
) -> float:
    """Fraction of held-out recall prompts whose greedy next token is the right value."""
    rng = random.Random(seed)
    batch = [make_sample(rng) for _ in range(samples)]
    outputs = model.generate([tokenizer(s.prompt).input_ids for s in batch], max_new_tokens=1)
    return sum(tokenizer.decode(o) == s.answer for o, s in zip(outputs, batch, strict=False)) / samples
