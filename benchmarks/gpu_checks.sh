#!/usr/bin/env bash
# Every GPU check and benchmark of the project, one step at a time, each with a time limit and its whole log
# under OUTDIR (so a step that runs out of time still leaves its output). Run on the GPU machine from the
# repository root, with vLLM 0.26.0 on PYTHONPATH for the engine steps (shared/gpu-env) and fla-core for
# the kernel benchmark (the engines' kernel files it compares against are read from .bench-ext, as
# bench_linear_attn says: carry it):
#
#   bash benchmarks/gpu_checks.sh STEP [STEP ...]      (OUTDIR defaults to $OUT, else ./gpu-checks)
#
# The engine steps use RING_LINEAR_TINY_CHECKPOINT (the trained tiny model, e.g. a carried runs/tiny/trained)
# when it is set; otherwise the tests train one first (600 steps on the CPU).
#
# Steps:
#   kernels      pytest -m gpu: the Triton kernels and the shim at real shapes            (~2 min)
#   engine       pytest -m gpu: the vLLM engine tests on GPU 0 on the tiny model (vs the shim, concurrency, the server),
#                vLLM's step kernels warmed, in the cache layout the plugin picks for each (PYTEST_K picks; the whole
#                file in one step ran past 540 s: run AG)                                          (~5 min)
#   engine-mini  the same on Ring-mini dummy weights: a 32K prompt with CUDA graphs, FP8, no kernel compiled on live
#                traffic                                                                           (~4 min)
#   stacked      the engine tests that differ by cache layout (concurrency with caching on and off, no live compile,
#                the warm-up) with RING_LINEAR_STACKED_STATES=1: the stacked layout also where the plugin would not
#                choose it (whole-block prefix caching; PYTEST_K picks; ~6 min: run AH). RING_LINEAR_STACKED_STATES=1
#                in front of the prefix step sizes its blocks for that layout; SERVE_FLAGS=--unstacked-states on a
#                serve step serves one state an entry, named and paired with the default run and the twin
#                (SERVE_FLAGS=--fp32-router likewise serves the router's fp32 GEMM, the default before run AI)
#   flash        pytest -m gpu: Ring-flash FP8 dummy weights, a 32K prompt with CUDA graphs (RING_LINEAR_FLASH_LAYERS
#                serves fewer layers) (not yet run; issue 17)
#   faults       the vLLM engine under faults: preemption, aborts, chunk boundaries                (~6 min)
#   decode-2000  the 2,000-step fp32 greedy decode against the shim (a fault test of its own call)      (~2 min)
#   prefix       pytest -m gpu: vLLM prefix caching with the linear state, cache on vs off (PYTEST_K picks): the tiny
#                model's block-grained tests take ~8.5 min, more than one device call allows with the rest:
#                PYTEST_K="not ring_mini and not fine_grained", then PYTEST_K="ring_mini or fine_grained" (the
#                --prefix-match-unit tests, ~1.5 min each, and Ring-mini's block test, ~2 min) in the next call
#   aligned      pytest -m gpu: aligned mode, tiny model fp32 and bf16, chunked prefill and prefix caching on: a
#                request's bits alone = in a batch of 64 = resent through the cache = the aligned shim's; an eager fp32 case (~5 min)
#   aligned-mini the same on a random Ring-mini of one layer group (5 layers), bf16 (PYTEST_K picks; ~1.5 min a case)
#   aligned-probe  probe_aligned: where aligned mode's batch invariance breaks, first prompt / generated position
#                per request (PROBE_ARGS, e.g. "--eager --dtype bfloat16")                            (~2 min)
#   tp2          the tensor-parallel-2 engine test (needs 2 GPUs)                         (~4 min)
#   bench        bench_linear_attn: prefill (bf16 and fp32), decode, backward, H16 and H8 (over 9 min: the H16 prefill
#                and decode rows alone took 7; BENCH_ARGS, e.g. "--heads 8 --prefill 32K 128K", picks)
#   sweep        sweep_linear_attn: launch settings, bf16 and fp32 prefill                 (~8 min)
#   sweep-fp32   the same for the fp32 prefill alone, 4K, 2 x 4K, 32K and 128K (issue 11 item 4)   (~4.5 min)
#   tune-moe     tune_moe: vLLM's fused MoE tiles for Ring-mini's experts (bf16) on this GPU against vLLM's own choice,
#                written as vLLM's JSON to MOE_OUT (default OUTDIR/moe-configs); VLLM_TUNED_CONFIG_FOLDER=MOE_OUT in front
#                of a serve step serves it (not shipped: run AJ)                                     (~5 min)
#   e2e-prefill  bench_vllm_e2e: 4K and 16K prefill, ring-linear vs the softmax twin       (~6 min)
#   example      examples/vllm_rollout_logprobs.py on the tiny trained checkpoint            (~1 min)
#   serve-ring   bench_serve: `vllm serve` + `vllm bench serve`, ring-linear, every workload (~7 min)
#   serve-twin   the same for the softmax twin, caching off                                (~9 min)
#   serve-twin-cached  the twin with prefix caching (its warm pass hits the cache)          (~7 min)
#   serve-ring-cached  ring-linear with prefix caching (SERVE_WORKLOADS="prefix-4k prefix-32k", then the twin's
#                same; issue 13)                                          (~4 min with those two; both: ~8.5 min)
#   serve-ring-aligned  ring-linear in aligned mode (otherwise the same flags); the report sets it against
#                serve-ring's runs in the same SERVE_OUT: SERVE_WORKLOADS="chat reasoning" for both (issue 15's cost)    (untimed)
#   serve-report the ratio table of the serve steps' results (SERVE_OUT, default OUTDIR/serve)
#                (SERVE_WORKLOADS picks workloads, else bench_serve's four, which take longer than one 10-minute
#                device call; SERVE_PASSES=cold runs the cold pass alone; SERVE_SIZE=flash, SERVE_LAYERS=N and
#                SERVE_QUANT=fp8 pick Ring-flash, its depth and FP8, for ring-linear and twin alike; issue 17;
#                SERVE_PASSES="cold warm warm2" runs a third pass; SERVE_FLAGS="--probe --detailed" samples each server
#                process's CPU, GC and memory per pass and prints the token-gap distribution: why a pass slows;
#                SERVE_FLAGS="--py-spy /tmp/site/bin/py-spy" records the engine core with py-spy per pass and prints
#                where its host time goes: carry .whl with py-spy's wheel and `pip install --no-deps --target /tmp/site
#                .whl/py_spy-*.whl` first; SERVE_FLAGS=--sync-watch counts the server's calls that wait for the GPU, by
#                stack, from ready on; SERVE_FLAGS="--prefix-match-unit 16" gives a cached server hits inside a block)
#   soak         bench_serve's soak: concurrency 128 for 5 minutes or more, failed requests and GPU memory    (~7 min)
#   profile      compiled 4K and 128K prefill and 64 x 4K decode-step profiles, ring-linear and the twin (~9 min;
#                PROFILE_DECODE_LENGTH=16384 decodes 64 x 16K contexts, as long reasoning does;
#                PROFILE_CASES picks; RING_LINEAR_ROUTER_PRODUCTS=fp32 times the SIMT router GEMM;
#                RING_LINEAR_ALIGNED=1 VLLM_BATCH_INVARIANT=1 in front profiles aligned mode: where its decode goes)
#   default-gap  default_gap: default mode's shim-vs-engine logprob gap (mean/p99/max) and the share of tokens
#                routed to other experts, fp32 and bf16, the tiny trained checkpoint and a random Ring-mini layer group
#                (issue 15 item 2)                                                                  (untimed)
#   precision    precision_sweep: tf32 / tf32x3 / ieee / bf16 products vs float64 logprobs, 1K-32K (PRECISION_LENGTHS)
#                (issue 15)                                                                         (untimed)
#   second-pass  probe_second_pass: one engine, the same 128 x 4K/256 requests 3 times, ring-linear and the twin:
#                wall, kernel time and allocator counters per pass (why the served warm pass is slower) (untimed;
#                SECOND_PASS_VARIANTS picks)
#   mixed-step   probe_mixed_step: 64 decodes alone vs beside a 512-token prefill, wall and GPU time per step,
#                ring-linear and the twin (why the served warm pass decodes slower; MIXED_STEP_ARGS, e.g.
#                "--joins 2 --suffix 256"; RING_LINEAR_ONE_LAUNCH_MAX_TOKENS=1024 in front times the one-launch
#                prefill)                                                                       (untimed, ~2 x 3 min)
#   routing      probe_routing: distinct experts per MoE call, decode and prefill, on the served dummy weights against
#                uniform routing, ring-linear and the twin (whether the served decode steps read a trained model's
#                expert weights; ROUTING_ARGS, e.g. "--requests 64 --context 16384"; ROUTING=scaled in front counts
#                with the routers scaled to unit-deviation logits)                                 (untimed, ~2 x 2 min)
#   scheduler    probe_scheduler: vLLM's scheduler alone (no GPU needed), host ms per step, ring-linear and the twin,
#                caching off and on, three passes of the same prompts (this machine's CPU is the served one)     (~3 min)
#   serve-ring-sgl  bench_serve on SGLang: ring-linear through launch_server (SGLang staged, own call)    (~7 min, 3 workloads)
#   serve-twin-sgl  the same for the twin, SGLang's native BailingMoeV2ForCausalLM (~8 min, 3 workloads)
#   sgl-engine   pytest -m gpu: the SGLang adapter's engine tests (SGLang 0.5.17 staged in /tmp/gpu-site-sgl; PYTEST_K picks,
#                e.g. PYTEST_K=aligned for aligned mode on SGLang;
#                run it in its own call: it replaces vLLM's site on PYTHONPATH)                  (untimed)
#   aligned-moe  bench_aligned_moe: aligned mode's MoE experts vs vLLM's fused_experts at Ring-mini shapes, 1-16K tokens
#                (ALIGNED_MOE_TILES, e.g. "64,64,32 16,64,32,4,3,1 64,128,64", tries tile sets, a sixth field 1 for
#                transposed tiles; ALIGNED_MOE_ARGS, e.g. "--tokens 64 512 --router-tiles 64,64,64 16,32,64"; issue 15's cost) (~2 min)
#   aligned-attn bench_aligned_attention: aligned mode's softmax attention in a decode step (keys split over programs,
#                and in one program) against vLLM's FlashAttention, 1-64 sequences of 4K and 16K keys (issue 15's decode cost;
#                ALIGNED_ATTN_ARGS, e.g. "--batch 64 --context 16384 --page 1024 --variants 128,1024,4,3 64,1024,4,3,64 --prefill 8192",
#                times other key tiles, splits, warps, stages and query tiles, and says whether each keeps the shipped bits)
#   aligned-la   bench_aligned_linear_attn: aligned mode's linear attention in windows (served) and token by token (before),
#                against the default prefill and decode at Ring-mini's heads (issue 15's prefill cost; ALIGNED_LA_ARGS,
#                e.g. "--token-tiles 16,2 8,1 16,1 32,4", times the token-by-token kernel's V-tiles and warps;
#                "--window-launch 32,4,1 32,8,1,1,64" the window form's launches and output blocks, with their bits) (~1 min)
#   vllm-diff    vllm_layer_diff: per-module engine outputs against the shim, one prompt, bit for bit (DIFF_ARGS, e.g.
#                "--aligned --dtype bfloat16 --internals": where aligned mode's bitwise claim breaks; --internals adds
#                the first linear layer's steps; DIFF_CHECKPOINT=ring-mini diffs a random Ring-mini layer group)   (~1.5 min)
#   batch-diff   vllm_batch_diff: one request of the aligned test's 64-prompt batch (a random Ring-mini layer group, bf16,
#                eager, budget 1024) against the shim, module by module, over its prefill chunks (BATCH_DIFF_ARGS,
#                e.g. "--request 35 --caching")                                                   (~2 min)
#   sgl-diff     sglang_layer_diff: per-module engine outputs against the shim, one prompt (SGLang staged) (~2 min)
set -uo pipefail

out="${OUTDIR:-${OUT:-gpu-checks}}"
mkdir -p "$out"
# The plugin's entry point without pip (the GPU machine is offline): a dist-info that names it, and the
# checkout on the path, so every vLLM process (server, engine core, workers) loads register().
site=/tmp/ring-linear-site/ring_linear-0.1.0.dist-info
mkdir -p "$site"
printf 'Metadata-Version: 2.1\nName: ring-linear\nVersion: 0.1.0\n' >"$site/METADATA"
printf '[vllm.general_plugins]\nring_linear = ring_linear_vllm:register\n[sglang.srt.plugins]\nring_linear = ring_linear_sglang:register\n' \
  >"$site/entry_points.txt"
export PYTHONPATH="$PWD:${site%/*}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER="${VLLM_USE_FLASHINFER_SAMPLER:-0}"
# The engines' dummy weights send every token to the same 8 or 9 experts; every vLLM and SGLang process here zeroes
# the routers' bias after the dummy fill so tokens spread over the experts (benchmarks/server_hooks/spread_routing.py),
# unless ROUTING=dummy (the routing of every vLLM run before run V and every SGLang run before run Y)
ROUTING=${ROUTING:-spread}
if [[ $ROUTING == spread || $ROUTING == scaled ]]; then  # scaled: also unit-deviation router logits (spread_routing.py)
  export PYTHONPATH="$PWD/benchmarks/server_hooks:$PYTHONPATH" RING_LINEAR_SPREAD_ROUTING=$([[ $ROUTING == scaled ]] && echo scaled || echo 1)
fi

FAULTS="preemption or aborts or chunked_prefill_boundaries or 2000_step"  # test_engine_gpu.py's fault tests
MINI="(ring_mini or fp8 or no_kernel)"  # its tests on Ring-mini dummy weights (engine-mini)
# the SGLang steps: SGLang's site (staged by .gpu-sgl_*) in place of vLLM's, and no flashinfer (not in the bundle)
SGLANG_ENV=(env PYTHONPATH="$PWD:${site%/*}:/tmp/gpu-site-sgl" SGLANG_IS_FLASHINFER_AVAILABLE=false)

run() {  # run NAME LIMIT_S COMMAND...: the command's output to OUTDIR/NAME.log, its status to the summary
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc; $(grep -E 'passed|failed|error|skipped' "$out/$name.log" | tail -1)"
  return 0
}

ring_mini_group() {  # a random Ring-mini layer group (bf16), written once per machine; prints its folder
  local folder=/tmp/ring-mini-group
  [[ -d $folder ]] || python3 -m benchmarks.random_checkpoint "$folder" >&2
  echo "$folder"
}

for step in "$@"; do
  case "$step" in
    kernels) run kernels 300 python3 -m pytest -q -m gpu tests/common_kernels ;;
    engine) run engine 540 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -rf -m gpu tests/ring_linear_vllm/test_engine_gpu.py \
      tests/ring_linear_vllm/test_engine_warmup.py \
      -k "${PYTEST_K:-not tensor_parallel and not ring_flash and not $MINI and not ($FAULTS)}" ;;
    engine-mini) run engine-mini 540 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -rf -m gpu \
      tests/ring_linear_vllm/test_engine_gpu.py -k "($MINI) and not ring_flash" ;;
    stacked) run stacked 540 env CUDA_VISIBLE_DEVICES=0 RING_LINEAR_STACKED_STATES=1 python3 -m pytest -q -s -rf -m gpu \
      tests/ring_linear_vllm/test_engine_gpu.py tests/ring_linear_vllm/test_engine_warmup.py \
      -k "${PYTEST_K:-concurrent or no_kernel or warm}" ;;
    flash) run flash 570 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -m gpu tests/ring_linear_vllm/test_engine_gpu.py \
      -k ring_flash ;;
    faults) run faults 540 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -m gpu tests/ring_linear_vllm/test_engine_gpu.py \
      -k "($FAULTS) and not 2000_step" ;;
    decode-2000) run decode-2000 300 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -m gpu \
      tests/ring_linear_vllm/test_engine_gpu.py -k 2000_step ;;
    prefix) run prefix 570 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -m gpu \
      tests/ring_linear_vllm/test_prefix_caching_gpu.py ${PYTEST_K:+-k "$PYTEST_K"} ;;
    aligned) run aligned 540 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -m gpu \
      tests/ring_linear_vllm/test_aligned_gpu.py -k "not ring_mini" ;;
    aligned-mini) run aligned-mini 570 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -m gpu \
      tests/ring_linear_vllm/test_aligned_gpu.py -k "${PYTEST_K:-ring_mini}" ;;
    aligned-probe) run aligned-probe 240 env CUDA_VISIBLE_DEVICES=0 RING_LINEAR_ALIGNED=1 VLLM_BATCH_INVARIANT=1 \
      python3 -m benchmarks.probe_aligned "${RING_LINEAR_TINY_CHECKPOINT:-runs/tiny/trained}" ${PROBE_ARGS:-} ;;
    tp2) run tp2 420 python3 -m pytest -q -s -m gpu tests/ring_linear_vllm/test_engine_gpu.py -k tensor_parallel ;;
    bench) run bench 580 python3 -m benchmarks.bench_linear_attn --dtype bf16 fp32 --json "$out/bench.json" ${BENCH_ARGS:-} ;;
    sweep) run sweep 540 python3 -m benchmarks.sweep_linear_attn ;;
    sweep-fp32) run sweep-fp32 540 python3 -m benchmarks.sweep_linear_attn --fp32 ;;
    tune-moe) run tune-moe 560 python3 -m benchmarks.tune_moe --out "${MOE_OUT:-$out/moe-configs}" ;;
    e2e-prefill) run e2e-prefill 540 python3 -m benchmarks.bench_vllm_e2e --variants ring-linear softmax-twin \
      --prefill 4096 16384 --decode --json "$out/e2e-prefill.json" ;;
    example) run example 240 env CUDA_VISIBLE_DEVICES=0 python3 examples/vllm_rollout_logprobs.py \
      "${RING_LINEAR_TINY_CHECKPOINT:-runs/tiny/trained}" ;;
    serve-ring | serve-twin | serve-ring-cached | serve-twin-cached | serve-ring-aligned | serve-ring-sgl | serve-twin-sgl)
      model=${step#serve-}; engine=(--engine vllm --routing "$ROUTING"); prefix=()
      if [[ $model == *-sgl ]]; then model=${model%-sgl}; engine=(--engine sglang --routing "$ROUTING"); prefix=("${SGLANG_ENV[@]}"); fi
      model=${model/ring/ring-linear}; model=${model/twin/softmax-twin}
      run "$step" 580 "${prefix[@]}" python3 -m benchmarks.bench_serve run --model "$model" "${engine[@]}" \
        --out "${SERVE_OUT:-$out/serve}" ${SERVE_WORKLOADS:+--workloads $SERVE_WORKLOADS} \
        ${SERVE_PASSES:+--passes $SERVE_PASSES} ${SERVE_SIZE:+--size $SERVE_SIZE} \
        ${SERVE_LAYERS:+--layers $SERVE_LAYERS} ${SERVE_QUANT:+--quantization $SERVE_QUANT} ${SERVE_FLAGS:-} ;;
    soak) run soak 590 python3 -m benchmarks.bench_serve run --model ring-linear --out "${SERVE_OUT:-$out/serve}" \
      --workloads soak ;;
    serve-report) python3 -m benchmarks.bench_serve report "${SERVE_OUT:-$out/serve}" | tee "$out/serve-report.md" ;;
    sgl-engine) run sgl-engine 570 "${SGLANG_ENV[@]}" CUDA_VISIBLE_DEVICES=0 \
      python3 -m pytest -q -s -m gpu tests/ring_linear_sglang/test_engine_gpu.py ${PYTEST_K:+-k "$PYTEST_K"} ;;
    aligned-la) run aligned-la 300 python3 -m benchmarks.bench_aligned_linear_attn ${ALIGNED_LA_ARGS:-} ;;
    aligned-attn) run aligned-attn 300 python3 -m benchmarks.bench_aligned_attention ${ALIGNED_ATTN_ARGS:-} ;;
    aligned-moe) run aligned-moe 400 python3 -m benchmarks.bench_aligned_moe ${ALIGNED_MOE_TILES:+--tiles $ALIGNED_MOE_TILES} \
      ${ALIGNED_MOE_ARGS:-} ;;
    vllm-diff)
      checkpoint=${RING_LINEAR_TINY_CHECKPOINT:-runs/tiny/trained}
      [[ ${DIFF_CHECKPOINT:-} == ring-mini ]] && checkpoint=$(ring_mini_group)
      run vllm-diff 240 env CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.vllm_layer_diff "$checkpoint" ${DIFF_ARGS:-} ;;
    batch-diff) run batch-diff 300 env CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.vllm_batch_diff "$(ring_mini_group)" \
      ${BATCH_DIFF_ARGS:---request 10} ;;
    sgl-diff) run sgl-diff 300 "${SGLANG_ENV[@]}" CUDA_VISIBLE_DEVICES=0 \
      python3 -m benchmarks.sglang_layer_diff "${RING_LINEAR_TINY_CHECKPOINT:-runs/tiny/trained}" --save "$out/sgl-diff.pt" ;;
    profile)  # PROFILE_CASES picks, e.g. "ring-linear:4096x2 softmax-twin:decode" (default: all six; "128K" is
      # 131,000 tokens: the prompt and its sampled tokens must fit the released 131,072 positions)
      for case in ${PROFILE_CASES:-ring-linear:4096 ring-linear:131000 ring-linear:decode softmax-twin:4096 \
        softmax-twin:131000 softmax-twin:decode}; do
        variant=${case%%:*}; length=${case#*:}
        if [[ $length == decode ]]; then
          run "profile-$variant-decode" 240 python3 -m benchmarks.profile_vllm_prefill --variant "$variant" \
            --length "${PROFILE_DECODE_LENGTH:-4096}" --compiled --decode-batch 64 --decode-steps 32
        else  # LENGTH or LENGTHxPROMPTS
          run "profile-$variant-$length" 200 python3 -m benchmarks.profile_vllm_prefill --variant "$variant" \
            --length "${length%x*}" --prompts "$([[ $length == *x* ]] && echo "${length#*x}" || echo 1)" --compiled
        fi
      done ;;
    default-gap)
      run default-gap 400 env CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.default_gap \
        "${RING_LINEAR_TINY_CHECKPOINT:-runs/tiny/trained}"
      run default-gap-ring-mini 400 env CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.default_gap "$(ring_mini_group)" ;;
    precision) run precision 300 python3 -m benchmarks.precision_sweep "${RING_LINEAR_TINY_CHECKPOINT:-runs/tiny/trained}" \
      --lengths ${PRECISION_LENGTHS:-1024 4096 16384 32768} ;;
    mixed-step)  # decode-only steps against the same decodes beside a short prefill: wall and kernel time per step
      for variant in ${MIXED_STEP_VARIANTS:-ring-linear softmax-twin}; do
        run "mixed-step-$variant" 280 python3 -m benchmarks.probe_mixed_step --variant "$variant" ${MIXED_STEP_ARGS:-}
      done ;;
    routing)  # how many experts the served steps' MoE layers read, against uniform routing
      for variant in ring-linear softmax-twin; do
        run "routing-$variant" 280 python3 -m benchmarks.probe_routing --variant "$variant" ${ROUTING_ARGS:-}
      done ;;
    scheduler)  # the host side of a served step: vLLM's scheduler on the real layer specs, a stand-in runner
      for layout in ring-linear softmax-twin; do
        run "scheduler-$layout" 200 python3 -m benchmarks.probe_scheduler --layout "$layout"
        run "scheduler-$layout-cached" 200 python3 -m benchmarks.probe_scheduler --layout "$layout" --prefix-caching
      done ;;
    second-pass)  # one in-process engine, the same requests three times: host, GPU and allocator per pass
      for variant in ${SECOND_PASS_VARIANTS:-ring-linear softmax-twin}; do
        run "second-pass-$variant" 280 python3 -m benchmarks.probe_second_pass --variant "$variant"
      done ;;
    *) echo "unknown step: $step (see the header of $0)" >&2; exit 2 ;;
  esac
done
