"""`ring-linear`: make, train and sample the tiny Ring-linear checkpoint; generate from any checkpoint.

Bad input (a config, checkpoint or argument) gets one line on stderr naming the file, field or argument, and
exit status 1 (2 for arguments argparse refuses, 130 for Ctrl-C); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import sys
import time
import traceback
from pathlib import Path

import torch

from .errors import InvalidInputError, RingLinearError

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _make_tiny(args: argparse.Namespace) -> None:
    from .tiny.train import make_tiny_checkpoint, refuse_to_overwrite

    if not args.overwrite:
        refuse_to_overwrite(args.out)
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
        save_every=args.save_every,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    print(
        f"{result.steps} steps in {result.seconds:.0f}s: loss {result.first_loss:.3f} -> {result.last_loss:.3f}; "
        f"saved to {args.out}"
    )
    if result.stopped_by_time:
        print(f"stopped by the {args.minutes:g}-minute cap (--minutes) before step {args.steps}; --resume continues")


def _generate(args: argparse.Namespace) -> None:
    from .model.modeling import RingLinearForCausalLM
    from .tiny.train import load_tokenizer

    model = RingLinearForCausalLM.from_pretrained(args.checkpoint, dtype=_dtype(args.dtype), report_all_errors=False)
    tokenizer = load_tokenizer(args.checkpoint)
    prompts = [_encode(tokenizer, p) for p in args.prompt]
    outputs = model.generate(
        prompts,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id,
        generator=torch.Generator().manual_seed(args.seed),
    )
    for prompt, out in zip(args.prompt, outputs, strict=False):
        print(f"{prompt!r} -> {tokenizer.decode(out, skip_special_tokens=True)!r}")


def _encode(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; text the tokenizer can only map to its unknown token is an error naming it."""
    unknown = tokenizer.unk_token_id
    plain = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    bad = sorted({prompt[a:b] for i, (a, b) in zip(plain.input_ids, plain.offset_mapping, strict=True) if i == unknown})
    if unknown is not None and bad:
        raise InvalidInputError(
            f"--prompt {prompt!r}: {', '.join(map(repr, bad))} is not in this tokenizer's vocabulary "
            f"(it would be read as {tokenizer.unk_token})"
        )
    return tokenizer(prompt).input_ids


def _demo(args: argparse.Namespace) -> None:
    from .model.modeling import RingLinearForCausalLM
    from .tiny.task import make_sample
    from .tiny.train import load_tokenizer, make_tiny_checkpoint, recall_accuracy, refuse_to_overwrite, train

    out = Path(args.out)
    if not args.overwrite:
        refuse_to_overwrite(out)
    start = time.time()
    make_tiny_checkpoint(out / "init", seed=args.seed)
    print(f"[1/3] random tiny checkpoint -> {out / 'init'}")
    tokenizer = load_tokenizer(out / "init")
    before = recall_accuracy(RingLinearForCausalLM.from_pretrained(out / "init"), tokenizer)
    print(f"[2/3] training on associative recall for up to {args.minutes} min (chance: 10%)")
    result = train(
        out / "init", out / "trained", steps=args.steps, minutes=args.minutes, seed=args.seed, overwrite=True
    )
    print(
        f"      {result.steps} steps in {result.seconds:.0f}s, loss {result.first_loss:.3f} -> {result.last_loss:.3f}"
    )
    if result.stopped_by_time:
        print(f"      stopped early: the {args.minutes:g}-minute cap (--minutes) came before step {args.steps}")
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


def _argument_type(parse, accept, rule: str):
    """An argparse `type` that parses with `parse` and refuses what `accept` rejects, naming `rule`."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    convert.__name__ = rule  # argparse names the type by it
    return convert


_positive_int = _argument_type(int, lambda v: v > 0, "a positive integer")
_non_negative_int = _argument_type(int, lambda v: v >= 0, "an integer >= 0")
_seed = _argument_type(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")
_positive_float = _argument_type(float, lambda v: 0 < v < math.inf, "a number > 0")
_non_negative_float = _argument_type(float, lambda v: 0 <= v < math.inf, "a number >= 0")
_probability = _argument_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ring-linear", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)  # also accepted after the subcommand
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    sub.add_parser = functools.partial(sub.add_parser, parents=[debug])
    overwrite = {"action": "store_true", "help": "replace what the output folder holds"}

    p = sub.add_parser("make-tiny", help="write a random tiny checkpoint (HF format, with tokenizer)")
    p.add_argument("out")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--overwrite", **overwrite)
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("train", help="train a tiny checkpoint on associative recall")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=_positive_int, default=1500)
    p.add_argument("--minutes", type=_positive_float, default=8.0, help="wall-time budget")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=_positive_float, default=3e-3)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--save-every", type=_positive_int, default=250, help="steps between saves (also saved on Ctrl-C)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", **overwrite)
    group.add_argument("--resume", action="store_true", help="continue the training saved in --out")
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="continue prompts with any Ring-linear checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=_non_negative_int, default=16)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("demo", help="make, train and evaluate the tiny model end to end (the README's main command)")
    p.add_argument("--out", default="runs/tiny")
    p.add_argument("--steps", type=_positive_int, default=1500)
    p.add_argument("--minutes", type=_positive_float, default=8.0)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--overwrite", **overwrite)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)  # exits with EXIT_USAGE on a refused argument
    try:
        args.func(args)
    except KeyboardInterrupt as interrupt:
        print(f"ring-linear: {interrupt or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # one line for every failure; the project's own errors name the fix
        if args.debug:
            traceback.print_exc()
        else:
            kind = "" if isinstance(error, RingLinearError | OSError) else f"{type(error).__name__}: "
            print(f"ring-linear {args.command}: error: {kind}{error} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
