"""The vLLM runs the GPU tests share: an engine on token ids, greedy generation, the reference run and the
comparison with it."""

from __future__ import annotations

import gc
import random
import shutil
from pathlib import Path

import torch

RELEASED_CONFIG = Path(__file__).parents[1] / "data" / "ring-mini-linear-2.0.config.json"


def make_llm(model: Path, **kwargs):
    """`vllm.LLM` on token ids: fp32, eager, small pool; `kwargs` override."""
    from vllm import LLM

    settings = {
        "model": str(model),
        "dtype": "float32",
        "max_model_len": 512,
        "max_num_seqs": 64,
        "gpu_memory_utilization": 0.25,
        "seed": 0,
        "skip_tokenizer_init": True,  # token ids in and out; the server test covers the tokenizer
        "enforce_eager": True,  # fast start-up; the CUDA-graph tests ask for graphs
        "disable_log_stats": False,  # `LLM` turns stats off, and `get_metrics()` (preemptions, cache hits) needs them
    } | kwargs
    return LLM(**settings)


def free(llm) -> None:
    """Shut the engine down and give its GPU memory back, so the next engine of a test starts clean."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def generate(llm, prompts: list[list[int]], max_tokens: int, **sampling) -> list:
    """Greedy, EOS ignored."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **sampling)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def make_ring_mini_dummy_llm(directory: Path, **kwargs):
    """The released Ring-mini-linear-2.0 config with dummy weights, bf16."""
    shutil.copy(RELEASED_CONFIG, directory / "config.json")
    return make_llm(directory, dtype="bfloat16", load_format="dummy", **kwargs)


def assert_finite_logprobs(output, num_tokens: int) -> None:
    """`num_tokens` generated, each with a log-probability that is a number (no NaN) and at most 0."""
    logprobs = [next(iter(d.values())).logprob for d in output.outputs[0].logprobs]
    assert len(output.outputs[0].token_ids) == num_tokens and len(logprobs) == num_tokens
    assert all(lp == lp and lp <= 0 for lp in logprobs), logprobs


def prompts_of(seed: int, lengths) -> list[list[int]]:
    """Random prompts of the tiny vocabulary's ordinary ids, one per length."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 64) for _ in range(n)] for n in lengths]


def tokens_and_logprobs(outputs) -> list[tuple[list[int], list[float]]]:
    """Each request's generated ids and their logprobs (asked with `logprobs=0`)."""
    return [
        (list(o.outputs[0].token_ids), [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]) for o in outputs
    ]


def clean_run(model, prompts, max_tokens, **settings) -> list[tuple[list[int], list[float]]]:
    """The reference: a fresh engine, default settings unless given, every prompt at once."""
    llm = make_llm(model, **settings)
    try:
        return tokens_and_logprobs(generate(llm, prompts, max_tokens, logprobs=0))
    finally:
        free(llm)


# A request whose prefill is split elsewhere (chunk budget, cache hit, preemption) runs the same kernels over other
# boundaries. Under the default TF32 products that moved logprobs by 3e-4 to 5e-3, and one token by 0.38 with every
# greedy token equal (a router near-tie; RESULTS.md, run M), so the split tests run exact fp32 products (the
# `exact_fp32_products` fixture), where a split changes only the summation order. Bounds: (max, mean) absolute
# logprob difference. The max leaves room for one router near-tie; a wrong or stale state moves most tokens, which
# the mean and the greedy tokens catch.
SPLIT_BOUNDS = (0.1, 1e-4)


def assert_same(got, want, what: str) -> None:
    """Token for token equal to the reference, logprobs within `SPLIT_BOUNDS`; the figures are printed."""
    differ = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g[0] != w[0]]
    gaps = [abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g[1], w[1], strict=False)]
    gap, mean = max(gaps, default=0.0), sum(gaps) / max(len(gaps), 1)
    print(
        f"\n[{what}] {len(got) - len(differ)}/{len(got)} token sequences equal; logprob difference max {gap:.2e}, "
        f"mean {mean:.2e} over {len(gaps)} tokens"
    )
    assert not differ, f"{what}: requests {differ} differ from the clean run"
    max_bound, mean_bound = SPLIT_BOUNDS
    assert gap <= max_bound and mean <= mean_bound, f"{what}: logprobs differ by max {gap:.2e}, mean {mean:.2e}"
