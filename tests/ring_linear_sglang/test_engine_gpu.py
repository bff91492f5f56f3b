"""End to end on a GPU through `sglang.Engine` and `sglang.launch_server`, against the training shim.

Run on the GPU machine with SGLang 0.5.17 staged (shared/gpu-env) and the plugin's entry point installed
(`benchmarks/gpu_checks.sh sgl-engine` writes one): SGLang's scheduler processes register the adapter through
it. The triton attention backend (FlashAttention-3 is not in the GPU bundle). Measured differences are
printed (pytest -s) as well as asserted.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang")

from common_kernels import RingLinearForCausalLM  # noqa: E402
from common_kernels.testing import ENGINE_LOGPROB_BOUNDS, near_ties  # noqa: E402

pytestmark = pytest.mark.gpu
RELEASED_CONFIG = Path(__file__).parents[1] / "data" / "ring-mini-linear-2.0.config.json"


def make_engine(model: Path, **kwargs):
    import sglang

    settings = {
        "model_path": str(model),
        "dtype": "float32",
        "attention_backend": "triton",
        "skip_tokenizer_init": True,
        "mem_fraction_static": 0.3,
        "random_seed": 0,
    } | kwargs
    return sglang.Engine(**settings)


def generate(engine, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[dict]:
    params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    return engine.generate(input_ids=prompts, sampling_params=params, **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_tokens_and_prompt_logprobs_match_the_shim(tiny_trained, recall_prompts, greedy_partings, dtype):
    from transformers import AutoTokenizer

    prompts = recall_prompts(AutoTokenizer.from_pretrained(tiny_trained), 16)
    shim = RingLinearForCausalLM.from_pretrained(tiny_trained, dtype=getattr(torch, dtype), device="cuda")
    with torch.no_grad():
        want_tokens = shim.generate(prompts, max_new_tokens=12)
        want_logprobs = [shim.token_logprobs(torch.tensor(p, device="cuda")).cpu() for p in prompts]
    engine = make_engine(tiny_trained, dtype=dtype)
    try:
        outs = generate(engine, prompts, 12, return_logprob=True, logprob_start_len=0)
    finally:
        engine.shutdown()
    diffs = []
    for out, want in zip(outs, want_logprobs, strict=True):
        got = [entry[0] for entry in out["meta_info"]["input_token_logprobs"][1:]]  # the first token has none
        diffs.append((torch.tensor(got) - want[1:]).abs())
    diffs = torch.cat(diffs)
    got_tokens = [list(o["output_ids"]) for o in outs]
    same = sum(g == w for g, w in zip(got_tokens, want_tokens, strict=True))
    print(
        f"\n[SGLang {dtype}] prompt logprobs vs shim over {diffs.numel()} tokens: max {diffs.max():.2e}, "
        f"mean {diffs.mean():.2e}; greedy continuations equal: {same}/{len(prompts)}"
    )
    # what an RL trainer reproduces: the engine's logprobs of the tokens it decoded, against the shim's on the same
    # tokens (teacher-forced)
    decoded = []
    for prompt, out in zip(prompts, outs, strict=True):
        got = torch.tensor([entry[0] for entry in out["meta_info"]["output_token_logprobs"]])
        with torch.no_grad():
            want = shim.token_logprobs(torch.tensor(prompt + list(out["output_ids"]), device="cuda")).cpu()
        decoded.append((got - want[len(prompt) :]).abs())
    decoded = torch.stack(decoded)
    worst = divmod(decoded.argmax().item(), decoded.shape[1])
    print(
        f"[SGLang {dtype}] decoded-token logprobs vs shim over {decoded.numel()} tokens: max {decoded.max():.2e} "
        f"(prompt {worst[0]}, token {worst[1]}), mean {decoded.mean():.2e}; that prompt's, token by token: "
        + " ".join(f"{x:.0e}" for x in decoded[worst[0]].tolist())
    )
    # the bounds of the vLLM test (`ENGINE_LOGPROB_BOUNDS` says why); SGLang's fused MoE also rounds fp32 products
    # to fp16
    max_bound, mean_bound = ENGINE_LOGPROB_BOUNDS[dtype]
    assert diffs.max() < max_bound and diffs.mean() < mean_bound
    assert decoded.max() < max_bound and decoded.mean() < mean_bound
    # greedy decoding may part only at a near-tie (`near_ties` says which)
    partings = greedy_partings(shim, prompts, got_tokens, want_tokens)
    assert near_ties(partings, dtype)


def test_concurrent_mixed_lengths_equal_one_at_a_time(tiny_trained):
    """64 requests of 1-400 tokens, chunked prefill in 64-token chunks, decode CUDA graphs."""
    rng = random.Random(1)
    lengths = [1, 2, 63, 64, 65, 400] + [rng.randint(1, 300) for _ in range(58)]
    prompts = [[rng.randrange(3, 64) for _ in range(n)] for n in lengths]
    engine = make_engine(tiny_trained, chunked_prefill_size=64, disable_radix_cache=True)
    try:
        together = [o["output_ids"] for o in generate(engine, prompts, 16)]
        alone = [generate(engine, [p], 16)[0]["output_ids"] for p in prompts]
    finally:
        engine.shutdown()
    differ = [i for i in range(len(prompts)) if together[i] != alone[i]]
    print(f"\n[SGLang] 64 concurrent vs one at a time: {len(prompts) - len(differ)}/64 equal; differing {differ}")
    assert not differ


def test_radix_cache_on_equals_off_on_shared_prefixes(tiny_trained):
    """A long shared prefix with many suffixes, the same prompt again, and a turn that extends the last one: the
    cached prefix's state is restored from its slot (`no_buffer`), token for token the same as no cache."""
    rng = random.Random(2)
    prefix = [rng.randrange(3, 64) for _ in range(200)]
    prompts = [prefix + [rng.randrange(3, 64) for _ in range(rng.randint(1, 40))] for _ in range(16)]
    prompts += [prompts[0], prompts[0] + [5, 6, 7]]
    runs = {}
    for radix in (True, False):
        engine = make_engine(tiny_trained, disable_radix_cache=not radix)
        try:
            generate(engine, prompts[:1], 4)  # puts the prefix in the cache when it is on
            runs[radix] = [o["output_ids"] for o in generate(engine, prompts, 16)]
        finally:
            engine.shutdown()
    differ = [i for i in range(len(prompts)) if runs[True][i] != runs[False][i]]
    print(f"\n[SGLang] radix cache on vs off: {len(prompts) - len(differ)}/{len(prompts)} equal")
    assert not differ


def test_ring_mini_dummy_weights_serve_a_32k_prompt_with_cuda_graphs(tmp_path):
    shutil.copy(RELEASED_CONFIG, tmp_path / "config.json")
    engine = make_engine(
        tmp_path, dtype="bfloat16", load_format="dummy", context_length=32768 + 64, mem_fraction_static=0.85
    )
    rng = random.Random(3)
    prompt = [rng.randrange(1000, 150000) for _ in range(32768)]
    try:
        start = time.time()
        outs = generate(engine, [prompt, prompt[:100]], 32, return_logprob=True)
        elapsed = time.time() - start
    finally:
        engine.shutdown()
    for out in outs:
        logprobs = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        assert len(out["output_ids"]) == 32 and all(lp == lp and lp <= 0 for lp in logprobs)
    print(f"\n[SGLang] Ring-mini dummy: 32K + 100-token prompts, 32 tokens each, {elapsed:.1f} s")


def test_launch_server_answers_an_openai_completion_with_logprobs(tiny_trained, openai_completion):
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tiny_trained)]
    cmd += ["--dtype", "float32", "--attention-backend", "triton", "--mem-fraction-static", "0.3"]
    choice = openai_completion(cmd, str(tiny_trained))
    print("\n[SGLang] server reply:", choice["text"], choice["logprobs"])
    assert choice["text"] and len(choice["logprobs"]["token_logprobs"]) == 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_aligned_mode_alone_equals_in_a_batch_and_the_shim_bit_for_bit(tiny_trained, monkeypatch, dtype):
    """Issue 15 on SGLang: with `RING_LINEAR_ALIGNED=1` and deterministic inference, 64 mixed-length requests (CUDA
    graphs on), every 7th again alone: the same bits alone and in the batch, and every prompt and greedy
    sampled-token logprob equal to the shim's `token_logprobs(aligned=True, engine="sglang")`."""
    from benchmarks.probe_aligned import mixed_prompts, packed

    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")
    prompts = mixed_prompts()
    aligned = {
        "enable_deterministic_inference": True, "chunked_prefill_size": -1, "disable_radix_cache": True,
        "disable_prefill_cuda_graph": True,
    }  # fmt: skip
    engine = make_engine(tiny_trained, dtype=dtype, **aligned)
    try:
        batch = generate(engine, prompts, 16, return_logprob=True, logprob_start_len=0)
        alone = [generate(engine, [p], 16, return_logprob=True, logprob_start_len=0)[0] for p in prompts[::7]]
    finally:
        engine.shutdown()

    def served(out) -> list[float]:
        meta = out["meta_info"]
        return [e[0] for e in meta["input_token_logprobs"][1:]] + [e[0] for e in meta["output_token_logprobs"]]

    unequal_alone = sum(served(a) != served(b) for a, b in zip(alone, batch[::7], strict=True))
    shim = RingLinearForCausalLM.from_pretrained(tiny_trained, dtype=getattr(torch, dtype), device="cuda").eval()
    ids, offsets = packed([p + list(o["output_ids"]) for p, o in zip(prompts, batch, strict=True)])
    with torch.no_grad():
        mine = shim.token_logprobs(ids, cu_seqlens=offsets, aligned=True, engine="sglang").cpu()
    want = torch.cat([mine[a + 1 : b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
    got = torch.tensor([x for o in batch for x in served(o)])
    gap = (want.double() - got.double()).abs()
    print(
        f"\n[SGLang {dtype} aligned] {unequal_alone} of {len(alone)} requests differ alone vs in the batch; shim vs "
        f"engine over {gap.numel()} logprobs: unequal {(gap > 0).sum().item()}, max {gap.max():.2e}"
    )
    assert unequal_alone == 0
    assert (gap > 0).sum().item() == 0
