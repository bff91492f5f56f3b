import pytest
import torch

from common_kernels import RingLinearForCausalLM, tiny_config
from common_kernels.testing import assert_rel_rms, rel_rms_error


def tiny_model(dtype=torch.float64, seed=0, use_triton=None, **overrides) -> RingLinearForCausalLM:
    model = RingLinearForCausalLM(tiny_config(**overrides), dtype=dtype, use_triton=use_triton)
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="module")
def model64():
    return tiny_model()


def test_packed_equals_separate_sequences(model64):
    lengths = [1, 9, 0, 17, 4]
    seqs = [torch.randint(3, 64, (n,)) for n in lengths]
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    packed = model64(torch.cat(seqs), cu_seqlens=offsets)
    for n, s in enumerate(seqs):
        if len(s):
            assert_rel_rms(f"seq {n}", model64(s), packed[offsets[n] : offsets[n + 1]], 1e-12)


def test_padded_batches_equal_packed_and_zero_pads(model64):
    ids = torch.randint(3, 64, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 8:] = 0  # right padding
    padded = model64(ids, attention_mask=mask)
    assert padded.shape == (3, 12, 64)
    assert torch.equal(padded[0, :5], torch.zeros(5, 64, dtype=padded.dtype))
    assert_rel_rms("left", model64(ids[0, 5:]), padded[0, 5:], 1e-12)
    assert_rel_rms("right", model64(ids[1, :8]), padded[1, :8], 1e-12)
    assert_rel_rms("full", model64(ids[2]), padded[2], 1e-12)
    # a pad token's id never matters
    ids2 = ids.clone()
    ids2[0, :5] = 7
    assert torch.equal(model64(ids2, attention_mask=mask), padded)


def test_incremental_decode_equals_full_forward(model64):
    ids = torch.randint(3, 64, (2, 15))
    full = torch.stack([model64(ids[0]), model64(ids[1])])
    cache = model64.new_cache(2)
    steps = [model64(ids[:, :6].reshape(-1), cu_seqlens=[0, 6, 12], cache=cache).reshape(2, 6, -1)]
    steps.append(model64(ids[:, 6:9].reshape(-1), cu_seqlens=[0, 3, 6], cache=cache).reshape(2, 3, -1))  # multi-token
    for t in range(9, 15):
        steps.append(model64(ids[:, t], cu_seqlens=[0, 1, 2], cache=cache)[:, None])
    assert_rel_rms("incremental", full, torch.cat(steps, dim=1), 1e-12)
    assert cache.seq_lens.tolist() == [15, 15]


def test_ragged_cache_continuation(model64):
    a, b = torch.randint(3, 64, (7,)), torch.randint(3, 64, (3,))
    cache = model64.new_cache(2)
    model64(torch.cat([a[:4], b[:1]]), cu_seqlens=[0, 4, 5], cache=cache)
    out = model64(torch.cat([a[4:], b[1:]]), cu_seqlens=[0, 3, 5], cache=cache)
    assert_rel_rms("a", model64(a)[4:], out[:3], 1e-12)
    assert_rel_rms("b", model64(b)[1:], out[3:], 1e-12)


def test_explicit_positions_equal_default_positions(model64):
    ids = torch.randint(3, 64, (10,))
    assert torch.equal(model64(ids, position_ids=torch.arange(10)), model64(ids))
    # RoPE sees relative positions only: a uniform shift changes nothing, a gap does
    assert_rel_rms("shifted", model64(ids), model64(ids, position_ids=torch.arange(10) + 5), 1e-12)
    gap = torch.cat([torch.arange(5), torch.arange(5) + 20])
    assert not torch.allclose(model64(ids, position_ids=gap)[5:], model64(ids)[5:])


def test_token_logprobs(model64):
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    lp = model64.token_logprobs(ids, attention_mask=mask, chunk_size=4)
    for b, start in ((0, 0), (1, 3)):
        seq = ids[b, start:]
        ref = torch.log_softmax(model64(seq), -1)[:-1].gather(1, seq[1:, None])[:, 0]
        assert_rel_rms(f"row {b}", ref, lp[b, start + 1 :], 1e-12)
        assert lp[b, start] == 0 and (lp[b, :start] == 0).all()
    packed = model64.token_logprobs(torch.cat([ids[0], ids[1, 3:]]), cu_seqlens=[0, 9, 15], chunk_size=5)
    assert_rel_rms("packed", torch.cat([lp[0], lp[1, 3:]]), packed, 1e-12)


def test_greedy_generation_follows_argmax_of_the_full_forward(model64):
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14]]
    outputs = model64.generate(prompts, max_new_tokens=6)
    for prompt, out in zip(prompts, outputs, strict=False):
        seq = list(prompt)
        for token in out:
            assert token == int(model64(torch.tensor(seq))[-1].argmax())
            seq.append(token)


def test_generation_stops_at_eos():
    model = tiny_model()
    first = model.generate([[5, 6]], max_new_tokens=1)[0][0]
    out = model.generate([[5, 6]], max_new_tokens=5, eos_token_id=first)[0]
    assert out == [first]


def test_float32_matches_float64_within_1e5():
    m64 = tiny_model(seed=3)
    m32 = tiny_model(dtype=torch.float32, seed=3)
    ids = torch.randint(3, 64, (40,))
    ratio = rel_rms_error(m64(ids), m32(ids))
    assert ratio <= 1e-5, ratio


def test_bf16_model_runs_with_fp32_logits_and_fp32_router_bias():
    m32 = tiny_model(dtype=torch.float32, seed=4)
    m32.model.layers[1].mlp.gate.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8) + 1e-4)
    bias = m32.model.layers[1].mlp.gate.expert_bias.clone()
    m16 = m32.to(torch.bfloat16)
    assert m16.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32
    assert torch.equal(m16.model.layers[1].mlp.gate.expert_bias, bias)
    logits = m16(torch.randint(3, 64, (12,)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_hf_decay_convention_changes_the_linear_layers():
    ids = torch.randint(3, 64, (12,))
    a, b = tiny_model(seed=5), tiny_model(seed=5, linear_decay_convention="hf")
    assert not torch.allclose(a(ids), b(ids))


def test_gradients_through_the_whole_model():
    config = {
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_hidden_layers": 3,
        "layer_group_size": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "group_norm_size": 2,
        "moe_intermediate_size": 8,
        "moe_shared_expert_intermediate_size": 8,
        "num_experts": 4,
        "n_group": 2,
        "topk_group": 1,
        "vocab_size": 8,
    }
    model = tiny_model(seed=6, **config)
    embeds = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda e: model(inputs_embeds=e, attention_mask=mask), (embeds,))
    model(inputs_embeds=embeds.detach(), attention_mask=mask).pow(2).sum().backward()
    unreached = [n for n, p in model.named_parameters() if p.grad is None]
    # the embedding is bypassed by inputs_embeds; unrouted experts get no gradient by design
    assert all(n == "model.word_embeddings.weight" or ".experts." in n for n in unreached), unreached


def test_bad_inputs_are_refused(model64):
    ids = torch.randint(3, 64, (2, 5))
    with pytest.raises(ValueError, match="cu_seqlens describes packed"):
        model64(ids, cu_seqlens=[0, 5])
    with pytest.raises(ValueError, match="attention_mask describes padded"):
        model64(ids[0], attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="contiguous"):
        model64(ids, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="must start at 0"):
        model64(ids[0], cu_seqlens=[0, 3])
    with pytest.raises(ValueError, match="cache holds 3 sequences, input has 1"):
        model64(ids[0], cache=model64.new_cache(3))
    with pytest.raises(ValueError, match="prompt 0 is empty; every prompt needs a token"):
        model64.generate([[]], 2)
    with pytest.raises(ValueError, match="pass input_ids or inputs_embeds"):
        model64()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32])
def test_triton_and_pytorch_paths_agree(dtype):
    """The one flag that swaps the linear attention: same logits, gradients and cached decode."""
    reference = tiny_model(dtype=dtype, seed=7, use_triton=False)
    kernels = tiny_model(dtype=dtype, seed=7, use_triton=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference.to(device), kernels.to(device)
    ids = torch.randint(3, 64, (21,), device=device)
    offsets = [0, 6, 6, 21]
    # fp32 q/k/v (the policy) through tf32 tensor cores on a GPU; exact fp32 dots under the interpreter
    tol = 1e-5 if device == "cpu" else 3e-3
    assert_rel_rms("logits", reference(ids, cu_seqlens=offsets), kernels(ids, cu_seqlens=offsets), tol)
    grads = []
    for model in (reference, kernels):
        model.zero_grad()
        model.token_logprobs(ids, cu_seqlens=offsets).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    if dtype == torch.float32:
        for name in grads[0]:
            assert_rel_rms(name, grads[0][name], grads[1][name], 2e-5 if device == "cpu" else 5e-3)
    else:  # two bf16 paths round at different points: each is held to a float64 copy of the model instead
        exact = tiny_model(dtype=torch.float64, seed=7, use_triton=False).to(device)
        exact.load_state_dict({n: t.double() for n, t in reference.state_dict().items()})
        exact.token_logprobs(ids, cu_seqlens=offsets).sum().backward()
        for name, p in exact.named_parameters():
            if name in grads[0]:
                err_torch, err_triton = rel_rms_error(p.grad, grads[0][name]), rel_rms_error(p.grad, grads[1][name])
                assert err_triton <= 2 * err_torch + 1e-3, f"{name}: triton {err_triton:.2e} vs torch {err_torch:.2e}"
    cache = kernels.new_cache(1)
    steps = [kernels(ids[:9], cache=cache)] + [kernels(ids[t : t + 1], cache=cache) for t in range(9, 21)]
    assert_rel_rms("cached decode", reference(ids), torch.cat(steps), tol)


def test_use_triton_is_one_flag_resolved_per_forward(monkeypatch):
    import common_kernels.model.layers as layers

    calls = []
    real = layers.linear_attention_varlen_triton
    monkeypatch.setattr(layers, "linear_attention_varlen_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids = torch.randint(3, 64, (5,))
    tiny_model(dtype=torch.float32)(ids)  # CPU input: the PyTorch reference
    assert calls == []
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton needs CUDA tensors
    tiny_model(dtype=torch.float32, use_triton=True).to(device)(ids.to(device))
    assert len(calls) == 4  # one call per linear layer
    if device == "cuda":
        tiny_model(dtype=torch.float32).cuda()(ids.cuda())  # CUDA input, flag unset: the kernels
        assert len(calls) == 8


@pytest.fixture(scope="module")
def random_tiny():
    model = RingLinearForCausalLM(tiny_config())
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model


def test_empty_inputs_and_rows_without_tokens_give_zeros(random_tiny):
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    masked = random_tiny.token_logprobs(ids, attention_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))
    alone = random_tiny.token_logprobs(ids[:1, :2])
    assert torch.equal(masked[0, :2], alone[0]) and not masked[1].any() and masked[0, 2] == 0
    assert random_tiny.token_logprobs(ids, attention_mask=torch.zeros(2, 3)).eq(0).all()
    assert random_tiny.token_logprobs(torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert random_tiny(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, random_tiny.config.vocab_size)
    assert random_tiny.generate([], 4) == []
    assert random_tiny.generate([[3, 4]], 0) == [[]]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.token_logprobs(torch.tensor([3, m.config.vocab_size])), r"outside the vocabulary \[0, \d+\)"),
        (lambda m: m(torch.tensor([[3, -1]])), r"holds -1, outside the vocabulary"),
        (lambda m: m.generate([[3]], 2, temperature=-1.0), "temperature must be a finite number >= 0"),
        (lambda m: m.generate([[3]], 2, temperature=float("nan")), "temperature must be a finite number >= 0"),
        (lambda m: m.generate([[3]], 2, temperature=1.0, top_p=0.0), r"top_p must lie in \(0, 1\]"),
        (lambda m: m.generate([[3]], -1), "max_new_tokens must be an integer >= 0"),
        (lambda m: m.generate([[3], []], 2), "prompt 1 is empty"),
    ],
)
def test_bad_arguments_are_named(random_tiny, call, message):
    from common_kernels import InvalidInputError

    with pytest.raises(InvalidInputError, match=message):
        call(random_tiny)


def test_top_p_keeps_only_the_most_likely_tokens(random_tiny):
    prompts = [[3, 4, 5]] * 64
    logits = random_tiny(torch.tensor([3, 4, 5]))[-1]
    best = int(logits.argmax())
    sampled = random_tiny.generate(prompts, 1, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert {s[0] for s in sampled} == {best}


def test_automodel_for_causal_lm_returns_the_shim_without_remote_code(random_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    random_tiny.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert isinstance(loaded, RingLinearForCausalLM) and loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, random_tiny.lm_head.weight.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.token_logprobs([[1, 5, 6]]), "input_ids must be a torch.Tensor, got list"),
        (lambda m: m(torch.ones(1, 2, 4, dtype=torch.long)), r"shaped \[T\] \(packed\) or \[B, T\]"),
        (lambda m: m(torch.ones(4, dtype=torch.bool)), "input_ids must be integer token ids"),
        (lambda m: m(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 2, 1, 1]])), "only 0"),
        (lambda m: m(torch.ones(8, dtype=torch.long), cu_seqlens=[0, 2.5, 8]), "integer offsets"),
        (lambda m: m(torch.ones(8, dtype=torch.long), position_ids=torch.arange(3)), r"position_ids has shape \(3,\)"),
        (lambda m: m(inputs_embeds=torch.ones(4, 7)), r"inputs_embeds must be shaped \[T, 64\]"),
        (lambda m: m(torch.ones(3, dtype=torch.long), position_ids=torch.tensor([0, -1, 2])), "positions >= 0"),
        (lambda m: m.token_logprobs(torch.ones(4, dtype=torch.long), chunk_size=0), "chunk_size must be a positive"),
        (lambda m: m.token_logprobs(torch.ones(4, dtype=torch.long), chunk_size=True), "chunk_size must be a positive"),
        (lambda m: m.generate([1, 5, 6], 3), "prompts must be a list of token-id lists"),
        (lambda m: m.generate([[1, 99]], 3), r"prompt 0 holds an entry that is not a token id in \[0, 64\)"),
        (lambda m: m.generate([[1]], 3, temperature="0.7"), "temperature must be a finite number"),
        (lambda m: m.generate([[1]], True), "max_new_tokens must be an integer"),
    ],
)
def test_inputs_of_the_wrong_type_or_shape_are_named(random_tiny, call, message):
    from common_kernels import InvalidInputError

    with pytest.raises(InvalidInputError, match=message):
        call(random_tiny)


def test_several_eos_ids_each_stop_a_sequence(random_tiny):
    free = random_tiny.generate([[3, 4]], 6)[0]
    stopped = random_tiny.generate([[3, 4]], 6, eos_token_id=[free[1], 63])[0]
    assert stopped == free[: free.index(free[1]) + 1]


def test_tiny_temperatures_and_top_p_sample_the_most_likely_token(random_tiny):
    best = random_tiny.generate([[3, 4]], 1)[0]
    assert random_tiny.generate([[3, 4]], 1, temperature=1e-300) == [best]
    assert random_tiny.generate([[3, 4]], 1, temperature=1.0, top_p=1e-300) == [best]


def test_bad_dtypes_and_configs_are_named(random_tiny, tmp_path):
    from common_kernels import InvalidInputError

    random_tiny.save_pretrained(tmp_path)
    for dtype in ("bogus", torch.int64, 5):
        with pytest.raises(InvalidInputError, match="use one of float32, bfloat16, float16, float64"):
            RingLinearForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    with pytest.raises(InvalidInputError, match="config must be a RingLinearConfig, got dict"):
        RingLinearForCausalLM.from_pretrained(tmp_path, config={"vocab_size": 64})


def test_aligned_token_logprobs_decode_the_generated_tokens_as_an_engine_does(monkeypatch):
    """aligned=True runs the linear layers as an aligned engine (prompt prefilled, generated tokens decoded): the
    same function as the default to rounding, other bits (the switch does something), gradients flowing; the
    linear layers get the prompt lengths (a wrong one is named), each MoE layer routes through the engine's
    batch-invariant router GEMM, which also computes the projections and the LM head, every softmax layer attends
    with aligned mode's kernel and every RMSNorm runs aligned mode's."""
    from common_kernels.model import layers
    from common_kernels.ops.moe import router_gemm

    model = tiny_model(dtype=torch.float32, seed=7, use_triton=True)
    ids = torch.randint(3, 64, (21,))
    offsets = [0, 6, 21]
    seen, routed = [], []
    real = layers.linear_attention_as_served
    monkeypatch.setattr(layers, "linear_attention_as_served", lambda *a: seen.append(a[5]) or real(*a))
    real_router = router_gemm._launch_invariant
    monkeypatch.setattr(router_gemm, "_launch_invariant", lambda *a: routed.append(1) or real_router(*a))
    attended = []
    real_attention = layers.causal_attention_aligned
    monkeypatch.setattr(layers, "causal_attention_aligned", lambda *a: attended.append(1) or real_attention(*a))
    normed = []
    real_norm = layers.rms_norm_aligned
    monkeypatch.setattr(layers, "rms_norm_aligned", lambda *a: normed.append(1) or real_norm(*a))
    default = model.token_logprobs(ids, cu_seqlens=offsets)
    assert routed == [] and normed == [] and attended == []
    aligned = model.token_logprobs(ids, cu_seqlens=offsets, aligned=True)
    layer_kinds = [
        (model.config.is_softmax_layer(i), model.config.is_moe_layer(i)) for i in range(len(model.model.layers))
    ]
    assert seen == [offsets] * sum(not softmax for softmax, _ in layer_kinds)
    projections = sum(2 if softmax else 3 for softmax, _ in layer_kinds)  # qkv and dense, and a linear layer's gate
    assert len(routed) == sum(moe for _, moe in layer_kinds) + projections + 1  # and one LM-head chunk
    assert len(attended) == sum(softmax for softmax, _ in layer_kinds) > 0
    assert len(normed) == 2 * len(layer_kinds) + 1  # two per layer and the final norm
    assert_rel_rms("aligned logprobs", default.double(), aligned, 1e-5)
    assert not torch.equal(default, aligned)
    model.zero_grad()
    aligned.sum().backward()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in trained if p.grad is None or not torch.isfinite(p.grad).all()]
    assert trained and not missing, f"no finite gradient for {missing}"  # softmax attention, dense MLP, LM head too


def test_aligned_token_logprobs_refuse_the_reference_kernels_naming_the_fix():
    from common_kernels.errors import InvalidInputError

    model = tiny_model(dtype=torch.float32, use_triton=False)
    with pytest.raises(InvalidInputError, match=r"aligned=True runs the engine's Triton kernels: leave use_triton"):
        model.token_logprobs(torch.randint(3, 64, (10,)), cu_seqlens=[0, 4, 10], aligned=True)


def test_positions_past_the_context_are_refused_as_vllm_refuses_them():
    """A model built for 16 positions: 16 tokens run, a 17th position is refused by name, from every way in."""
    from common_kernels import InvalidInputError

    model = tiny_model(max_position_embeddings=16)
    ids = torch.randint(3, 64, (17,))
    model(ids[:16])
    model(ids, cu_seqlens=[0, 9, 17])  # positions restart with each packed sequence
    past = "position 16 is past the model's context \\(max_position_embeddings 16 in config.json\\)"
    with pytest.raises(InvalidInputError, match=past):
        model(ids)
    with pytest.raises(InvalidInputError, match="position 20 is past"):
        model(ids[:3], position_ids=torch.tensor([0, 1, 20]))
    with pytest.raises(InvalidInputError, match=past):
        model.token_logprobs(ids[None])
    cache = model.new_cache(1)
    model(ids[:16], cache=cache)
    with pytest.raises(InvalidInputError, match=past):  # a cached sequence continuing past its context
        model(ids[16:], cache=cache)
    assert len(model.generate([ids[:10].tolist()], 6)[0]) == 6
    with pytest.raises(InvalidInputError, match="max_new_tokens 7 with a 10-token prompt .* ask for at most 6"):
        model.generate([ids[:10].tolist()], 7)
