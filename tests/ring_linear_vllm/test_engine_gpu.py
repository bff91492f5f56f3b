"""End to end on a GPU through `vllm.LLM` and `vllm serve`, against the training shim.

Run on the GPU machine (vLLM staged per shared/gpu-env) with `-m gpu` (`gpu_checks.sh engine` and, for the
tests of the engine under faults at the end, `gpu_checks.sh faults`). The tiny checkpoint is the trained
one from `ring-linear demo` when RING_LINEAR_TINY_CHECKPOINT points at it, else one trained here.
Measured differences are printed (pytest -s) as well as asserted.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import pytest
import torch

pytest.importorskip("vllm")

from vllm_runs import (  # noqa: E402
    assert_finite_logprobs,
    assert_same,
    clean_run,
    free,
    generate,
    make_llm,
    make_ring_mini_dummy_llm,
    prompts_of,
    tokens_and_logprobs,
)

from common_kernels import RingLinearForCausalLM  # noqa: E402
from common_kernels.testing import ENGINE_LOGPROB_BOUNDS, near_ties  # noqa: E402

pytestmark = pytest.mark.gpu
# the engine core must not fork a process whose parent may already hold a CUDA context (the shim runs here)
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_tokens_and_prompt_logprobs_match_the_shim(tiny_trained, recall_prompts, greedy_partings, dtype):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_trained)
    prompts = recall_prompts(tokenizer, 16)
    torch_dtype = getattr(torch, dtype)
    shim = RingLinearForCausalLM.from_pretrained(tiny_trained, dtype=torch_dtype, device="cuda")
    with torch.no_grad():
        want_tokens = shim.generate(prompts, max_new_tokens=12)
        want_logprobs = [shim.token_logprobs(torch.tensor(p, device="cuda")).cpu() for p in prompts]
    llm = make_llm(tiny_trained, dtype=dtype)  # the shim stays on the GPU: it explains a parting below
    outs = generate(llm, prompts, 12, prompt_logprobs=0)
    free(llm)
    diffs = []
    for out, want in zip(outs, want_logprobs, strict=True):
        got = [next(iter(d.values())).logprob if d else 0.0 for d in out.prompt_logprobs]
        diffs.append((torch.tensor(got[1:]) - want[1:]).abs())
    diffs = torch.cat(diffs)
    got_tokens = [list(o.outputs[0].token_ids) for o in outs]
    same = sum(g == w for g, w in zip(got_tokens, want_tokens, strict=True))
    print(
        f"\n[{dtype}] prompt logprobs vs shim over {diffs.numel()} tokens: max {diffs.max():.2e}, "
        f"mean {diffs.mean():.2e}; greedy continuations equal: {same}/{len(prompts)}"
    )
    max_bound, mean_bound = ENGINE_LOGPROB_BOUNDS[dtype]
    assert diffs.max() < max_bound and diffs.mean() < mean_bound
    # greedy decoding may part only at a near-tie (`near_ties` says which)
    partings = greedy_partings(shim, prompts, got_tokens, want_tokens)
    assert near_ties(partings, dtype)


@pytest.mark.usefixtures("exact_fp32_products")
@pytest.mark.parametrize("caching", [True, False], ids=["cache_on", "cache_off"])
def test_concurrent_mixed_lengths_equal_one_at_a_time(tiny_trained, caching):
    """64 requests of 1-400 tokens, chunked prefill of 64-token chunks, mixed prefill/decode steps; with caching on,
    the third pass resumes from states cached by the first two (vLLM 0.26 leaves caching off for hybrid models
    unless asked; the engine step runs both).
    Each pass splits a request's prefill elsewhere, so products are exact, as in the other split tests."""
    rng = random.Random(1)
    lengths = [1, 2, 63, 64, 65, 400] + [rng.randint(1, 300) for _ in range(58)]
    prompts = [[rng.randrange(3, 64) for _ in range(n)] for n in lengths]
    llm = make_llm(
        tiny_trained, max_num_batched_tokens=64, enable_chunked_prefill=True, enforce_eager=False,
        enable_prefix_caching=caching,
    )  # fmt: skip
    runs = {"together": generate(llm, prompts, 16)}
    runs["alone"] = [generate(llm, [p], 16)[0] for p in prompts]
    runs["again"] = generate(llm, prompts, 16)  # reused slots start clean (with caching on: resumed from cached states)
    free(llm)
    tokens = {name: [list(o.outputs[0].token_ids) for o in outputs] for name, outputs in runs.items()}
    for name in ("alone", "again"):
        differ = {
            i: (lengths[i], runs[name][i].num_cached_tokens or 0)
            for i in range(len(prompts))
            if tokens[name][i] != tokens["together"][i]
        }
        print(f"\n64 concurrent vs {name}: {64 - len(differ)}/64 equal; differing (request: length, hit) {differ}")
    assert tokens["alone"] == tokens["together"]
    assert tokens["again"] == tokens["together"]


def test_openai_server_smoke(tiny_trained, openai_completion):
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tiny_trained)]
    cmd += ["--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.25", "--enforce-eager"]
    choice = openai_completion(cmd, str(tiny_trained))
    print("\nserve reply:", choice["text"], choice["logprobs"]["token_logprobs"])
    assert choice["text"] and len(choice["logprobs"]["token_logprobs"]) == 4


def test_ring_mini_dummy_weights_serve_a_32k_prompt_with_cuda_graphs(tmp_path):
    """The real Ring-mini-linear-2.0 shapes (dummy weights), torch.compile + CUDA graphs, a 32K-token prompt."""
    llm = make_ring_mini_dummy_llm(
        tmp_path,
        max_model_len=32768 + 64,
        max_num_seqs=8,
        max_num_batched_tokens=8192,
        gpu_memory_utilization=0.85,
        enforce_eager=False,
    )
    rng = random.Random(2)
    prompt = [rng.randrange(1000, 150000) for _ in range(32768)]
    start = time.time()
    out = generate(llm, [prompt, prompt[:100]], 32, logprobs=1)
    elapsed = time.time() - start
    free(llm)
    for o in out:
        assert_finite_logprobs(o, 32)
    print(f"\nRing-mini dummy: 32K + 100-token prompts, 32 tokens each, {elapsed:.1f} s")


def test_ring_flash_fp8_dummy_weights_serve_a_32k_prompt_with_cuda_graphs(tmp_path):
    """Ring-flash-linear-2.0's shapes (its preset, dummy weights) with vLLM's online FP8 on one GPU, CUDA graphs,
    a 32K-token prompt; `RING_LINEAR_FLASH_LAYERS` serves fewer layers (a multiple of 8) where the bf16 weights
    vLLM creates before quantizing (208 GB at full depth) do not fit."""
    from common_kernels.presets import preset_json

    layers = int(os.environ.get("RING_LINEAR_FLASH_LAYERS", preset_json("ring-flash-linear-2.0")["num_hidden_layers"]))
    config = preset_json("ring-flash-linear-2.0", num_hidden_layers=layers)
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = make_llm(
        tmp_path, dtype="bfloat16", load_format="dummy", quantization="fp8", max_model_len=32768 + 64,
        max_num_seqs=8, max_num_batched_tokens=8192, gpu_memory_utilization=0.9, enforce_eager=False,
    )  # fmt: skip
    try:
        prompt = [random.Random(3).randrange(1000, 150000) for _ in range(32768)]
        start = time.time()
        out = generate(llm, [prompt, prompt[:100]], 32, logprobs=1)
        elapsed = time.time() - start
    finally:
        free(llm)
    for o in out:
        assert_finite_logprobs(o, 32)
    print(f"\nRing-flash dummy, FP8, {layers} layers: 32K + 100-token prompts, 32 tokens each, {elapsed:.1f} s")


def test_fp8_quantization_reaches_the_linear_layers(tmp_path, monkeypatch):
    """`--quantization fp8` on the real shapes (dummy weights): the linear layers' projections hold fp8 weights
    and generation gives finite log-probabilities."""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the worker
    llm = make_ring_mini_dummy_llm(
        tmp_path,
        quantization="fp8",
        max_model_len=2048,
        max_num_seqs=4,
        gpu_memory_utilization=0.6,
    )

    def projection_dtypes(model) -> dict[str, list[str]]:
        names = ("attention.query_key_value.weight", "attention.g_proj.weight", "attention.dense.weight")
        found: dict[str, set[str]] = {name: set() for name in names}
        for param_name, param in model.named_parameters():
            for name in names:
                if param_name.endswith(name):
                    found[name].add(str(param.dtype))
        return {name: sorted(dtypes) for name, dtypes in found.items()}

    dtypes = llm.apply_model(projection_dtypes)[0]
    rng = random.Random(3)
    out = generate(llm, [[rng.randrange(1000, 150000) for _ in range(300)]], 8, logprobs=1)
    free(llm)
    print(f"\nfp8 projection weight dtypes: {dtypes}")
    assert all(d == ["torch.float8_e4m3fn"] for d in dtypes.values()), dtypes
    assert_finite_logprobs(out[0], 8)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (the nvidia-h100-x2 kind)")
def test_tensor_parallel_2_gives_the_greedy_tokens_of_tp_1(tiny_trained, recall_prompts, tmp_path, vllm_tools):
    from transformers import AutoTokenizer

    prompts = recall_prompts(AutoTokenizer.from_pretrained(tiny_trained), 16, seed=4)
    # At TP 2 the tiny model keeps 1 KV head of 16 values per rank, on which vLLM's CUDA KV-cache write never
    # returns (both ranks spun in it on 2 x H200, fp32 and bf16): refused before any process starts. TP 2 then
    # serves the same function with its KV heads repeated per query head (2 x 16 values per rank).
    with pytest.raises(ValueError, match="reshape_and_cache_flash"):
        make_llm(tiny_trained, tensor_parallel_size=2)
    mha = vllm_tools.write_mha_equivalent(tiny_trained, tmp_path / "mha")
    results = {}
    for tp, model in ((2, mha), (1, tiny_trained)):  # TP 2 first: a start-up hang shows before anything else ran
        start = time.time()
        llm = make_llm(model, tensor_parallel_size=tp)
        print(f"\nTP {tp}: engine up in {time.time() - start:.0f} s", flush=True)
        results[tp] = [list(o.outputs[0].token_ids) for o in generate(llm, prompts, 12)]
        free(llm)
    same = sum(a == b for a, b in zip(results[1], results[2], strict=True))
    print(f"\nTP 2 (MHA equivalent) vs TP 1 greedy continuations equal: {same}/{len(prompts)}")
    assert results[2] == results[1]


def test_no_kernel_of_ours_compiles_while_serving(tmp_path, monkeypatch):
    """Start-up compiles every variant our linear layers launch: after the engine is up, prompts of every
    length class (1 token, short, chunked), mixed batches and decodes trigger no Triton compile of ours."""
    from triton import knobs

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: the hook sees it
    llm = make_ring_mini_dummy_llm(
        tmp_path,
        max_model_len=6144,
        max_num_seqs=32,
        max_num_batched_tokens=2048,
        gpu_memory_utilization=0.6,
        enforce_eager=False,
        hf_overrides={"num_hidden_layers": 5},
    )
    compiled: list[str] = []
    previous = knobs.runtime.jit_post_compile_hook

    def record(**kwargs):
        fn = kwargs["fn"].jit_function.fn
        if fn.__module__.startswith("common_kernels"):
            compiled.append(fn.__name__)
        return previous(**kwargs) if previous is not None else None

    knobs.runtime.jit_post_compile_hook = record
    try:
        rng = random.Random(5)
        prompts = [[rng.randrange(1000, 150000) for _ in range(n)] for n in (1, 2, 17, 300, 5000)]
        prompts += [[rng.randrange(1000, 150000) for _ in range(rng.randint(1, 3000))] for _ in range(32)]
        for prompt in prompts[:5]:
            generate(llm, [prompt], 4)
        generate(llm, prompts, 24)
    finally:
        knobs.runtime.jit_post_compile_hook = previous
        free(llm)
    print(f"\nour kernels compiled while serving: {compiled or 'none'}")
    assert compiled == []


# ----- the engine under faults: forced preemption, aborts with reused slots, chunked-prefill boundaries at
# every offset, a long decode; each surviving request's greedy tokens and logprobs equal a clean run's


@pytest.mark.usefixtures("exact_fp32_products")
def test_forced_preemption_under_64_concurrent_requests(tiny_trained):
    prompts = prompts_of(11, [random.Random(11).randint(50, 400) for _ in range(64)])
    want = clean_run(tiny_trained, prompts, 96)
    # 150 blocks of 16 tokens shared by the 3 KV-cache groups (a request holds one per 16 tokens plus a state block
    # per linear group). vLLM admits a request only when its whole prompt fits, so preemption needs several
    # running requests that then outgrow the pool: `benchmarks/simulate_preemption.py` (vLLM 0.26's scheduler on a
    # CPU) preempts 22 times here and never at 40 blocks, where one request runs at a time (0 on the GPU too, run N)
    llm = make_llm(tiny_trained, num_gpu_blocks_override=150, max_num_batched_tokens=256)
    try:
        got = tokens_and_logprobs(generate(llm, prompts, 96, logprobs=0))
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        free(llm)
    print(f"\npreemptions: {preemptions}")
    assert preemptions > 0, "no request was preempted: lower num_gpu_blocks_override"
    assert_same(got, want, "preemption")


@pytest.mark.usefixtures("exact_fp32_products")
def test_aborts_mid_prefill_and_mid_decode_then_reused_slots(tiny_trained):
    from vllm import SamplingParams, TokensPrompt

    prompts = prompts_of(12, [300, 5, 200, 1, 150, 64, 250, 33])
    late = prompts_of(13, [120, 7, 260, 40])
    want = clean_run(tiny_trained, prompts + late, 24)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    llm = make_llm(tiny_trained, max_num_batched_tokens=64, enable_chunked_prefill=True)
    engine = llm.llm_engine
    finished = {}
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params)
        engine.step()  # the first chunks: the 300- and 200-token prompts are mid-prefill
        engine.abort_request(["0", "2"])
        for _ in range(12):  # now the short ones are decoding
            finished |= {o.request_id: o for o in engine.step() if o.finished}
        engine.abort_request(["1", "3"])
        for j, prompt in enumerate(late):  # new requests take the freed slots
            engine.add_request(f"late{j}", TokensPrompt(prompt_token_ids=prompt), params)
        while engine.has_unfinished_requests():
            finished |= {o.request_id: o for o in engine.step() if o.finished}
    finally:
        free(llm)
    survivors = [str(i) for i in range(len(prompts)) if str(i) not in {"0", "1", "2", "3"}]
    survivors += [f"late{j}" for j in range(len(late))]
    got = tokens_and_logprobs([finished[r] for r in survivors])
    index = {str(i): i for i in range(len(prompts))} | {f"late{j}": len(prompts) + j for j in range(len(late))}
    assert_same(got, [want[index[r]] for r in survivors], "aborts")


@pytest.mark.usefixtures("exact_fp32_products")
@pytest.mark.parametrize("budget", [16, 17])
def test_chunked_prefill_boundaries_at_every_offset(tiny_trained, budget):
    rng = random.Random(14)
    prompts = prompts_of(
        14, [1, 2, budget - 1, budget, budget + 1, 2 * budget + 1, 300] + [rng.randint(1, 300) for _ in range(25)]
    )
    want = clean_run(tiny_trained, prompts, 8)
    llm = make_llm(tiny_trained, max_num_batched_tokens=budget, enable_chunked_prefill=True, max_num_seqs=16)
    try:
        got = tokens_and_logprobs(generate(llm, prompts, 8, logprobs=0))
    finally:
        free(llm)
    assert_same(got, want, f"chunked prefill, {budget}-token steps")


def test_a_2000_step_decode_follows_the_shim(tiny_trained, greedy_partings):
    """fp32 greedy over 2,000 steps: the engine's tokens equal the shim's, or part only at a near-tie (the rule of
    the greedy test above): a state that drifts over a long decode parts with wide margins."""
    prompt = prompts_of(15, [40])[0]
    shim = RingLinearForCausalLM.from_pretrained(tiny_trained, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        want = shim.generate([prompt], 2000)[0]
    llm = make_llm(tiny_trained, max_model_len=2048 + 64)  # the shim stays on the GPU: it explains a parting
    try:
        got = list(generate(llm, [prompt], 2000)[0].outputs[0].token_ids)
    finally:
        free(llm)
    partings = greedy_partings(shim, [prompt], [got], [want])
    print(f"\n2000-step decode: {'parted at step ' + str(partings[0][1]) if partings else 'no difference'}")
    assert near_ties(partings, "float32")
