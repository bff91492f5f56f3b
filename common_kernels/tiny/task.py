"""Associative recall: a task that a model without working attention layers cannot solve.

A sample lists key/value pairs and then asks for the values of some keys:

    <bos>q4 c7 x0 m2|c:7|m:2|q:4<eos>

Keys are distinct letters, values random digits, so everything before the first `|` is unpredictable;
each answer is predictable only by looking its key up in the context.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass


@dataclass(frozen=True)
class RecallSample:
    prompt: str  # everything up to and including the last ':'
    answer: str  # the last value
    text: str  # prompt + answer: the full training text (without <bos>/<eos>)


def make_sample(rng: random.Random, num_pairs: int = 4, num_queries: int = 3) -> RecallSample:
    keys = rng.sample(string.ascii_lowercase, num_pairs)
    values = [rng.choice(string.digits) for _ in keys]
    context = " ".join(k + v for k, v in zip(keys, values, strict=False))
    asked = rng.sample(range(num_pairs), num_queries)
    queries = "".join(f"|{keys[i]}:{values[i]}" for i in asked)
    text = context + queries
    return RecallSample(prompt=text[:-1], answer=text[-1], text=text)
