"""`ring-linear`: make, train and sample the tiny Ring-linear checkpoint; generate from any checkpoint."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch


def _make_tiny(args: argparse.Namespace) -> None:
    from .tiny.train import make_tiny_checkpoint

    make_tiny_checkpoint(args.out, seed=args.seed)
    print(f"wrote a random tiny Ring-linear checkpoint to {args.out}")


def _train(args: argparse.Namespace) -> None:
    from .tiny.train import train

    result = train(
        args.checkpoint,
        args.out,
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    print(
        f"{result.steps} steps in {result.seconds:.0f}s: loss {result.first_loss:.3f} -> {result.last_loss:.3f}; "
        f"saved to {args.out}"
    )


def _generate(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from .model.modeling import RingLinearForCausalLM

    model = RingLinearForCausalLM.from_pretrained(args.checkpoint, dtype=_dtype(args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    prompts = [tokenizer(p).input_ids for p in args.prompt]
    outputs = model.generate(
        prompts,
        args.max_new_tokens,
        temperature=args.temperature,
        eos_token_id=tokenizer.eos_token_id,
        generator=torch.Generator().manual_seed(args.seed),
    )
    for prompt, out in zip(args.prompt, outputs, strict=False):
        print(f"{prompt!r} -> {tokenizer.decode(out, skip_special_tokens=True)!r}")


def _demo(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from .model.modeling import RingLinearForCausalLM
    from .tiny.task import make_sample
    from .tiny.train import make_tiny_checkpoint, recall_accuracy, train

    out = Path(args.out)
    start = time.time()
    make_tiny_checkpoint(out / "init", seed=args.seed)
    print(f"[1/3] random tiny checkpoint -> {out / 'init'}")
    tokenizer = AutoTokenizer.from_pretrained(out / "init")
    before = recall_accuracy(RingLinearForCausalLM.from_pretrained(out / "init"), tokenizer)
    print(f"[2/3] training on associative recall for up to {args.minutes} min (chance: 10%)")
    result = train(out / "init", out / "trained", steps=args.steps, minutes=args.minutes, seed=args.seed)
    print(
        f"      {result.steps} steps in {result.seconds:.0f}s, loss {result.first_loss:.3f} -> {result.last_loss:.3f}"
    )
    model = RingLinearForCausalLM.from_pretrained(out / "trained")
    after = recall_accuracy(model, tokenizer)
    print(f"[3/3] recall accuracy on 200 held-out prompts: {before:.0%} before training, {after:.0%} after")
    rng = random.Random(7)
    samples = [make_sample(rng) for _ in range(4)]
    outputs = model.generate(
        [tokenizer(s.prompt).input_ids for s in samples], max_new_tokens=2, eos_token_id=tokenizer.eos_token_id
    )
    for s, o in zip(samples, outputs, strict=False):
        print(f"      {s.prompt!r} -> {tokenizer.decode(o, skip_special_tokens=True)!r} (expected {s.answer!r})")
    print(f"done in {time.time() - start:.0f}s; trained checkpoint: {out / 'trained'}")


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ring-linear", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a random tiny checkpoint (HF format, with tokenizer)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("train", help="train a tiny checkpoint on associative recall")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--minutes", type=float, default=8.0, help="wall-time budget")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="continue prompts with any Ring-linear checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("demo", help="make, train and evaluate the tiny model end to end (the README's main command)")
    p.add_argument("--out", default="runs/tiny")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
