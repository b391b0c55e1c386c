#!/usr/bin/env bash
# One prepared run on a rented H100/H200 (torch, triton, transformers, peft preinstalled; no
# internet; bitsandbytes carried as a wheel in .whl/). Builds lowrank._C with its CUDA kernels
# (sm_90a only: the quick build), then, most valuable first, each step under `timeout`:
#   csrc / LoRA op / optimizer / quantize gpu tests   (the new CUDA kernels must be right before they are timed;
#                                            531 passed on 2026-11-30; new since: mma-lut-deep equal to mma-lut bit for
#                                            bit, the op's GEMV up to 32 rows, float32 from 17 rows on cuBLAS)
#   bench_nf4_cuda.py                       (every CUDA kernel against bitsandbytes and bf16; csrc-mma-lut-deep, written
#                                            2026-11-30 without a GPU, first timed here: make it the default if faster)
#   bench_qlora.py --llama7b                (a QLoRA step of the Llama-2-7B shape: memory and tokens/s)
#   bench_qlora.py --llama7b --compile      (the same with each decoder layer torch.compiled, both sides)
#   bench_nf4_codec.py --device cuda        (quantize / dequantize on the GPU; table in bench.log)
#   Triton gpu tests, then bench_nf4_linear.py at two shapes and M in {1, 16} (the Triton route is dequantize +
#   cuBLAS at every M since 2026-11-30; -gemv times the split-K GEMV), then (PROFILE=1) ncu on the CUDA kernels,
#   with its memory sections: why mma-lut moves W at 1.45 TB/s where cuBLAS moves 3.5 (docs/csrc.md)
# and leaves at most 8 files under $OUT (the device tool's limit):
#   env.txt build.log tests.log bench.log nf4_cuda.json qlora.json qlora_compiled.json nf4_linear.json
#   (profile.log too with PROFILE=1, qlora_cudagraphs.json with CUDAGRAPHS=1: then a file fewer comes back;
#   PYOPS=1 adds the eager 7B step with LOWRANK_PYTHON_OPS=1, its table in bench.log; MMA=1 the op tests and
#   the op's back-to-back decode timing with mma (the default before 2026-11-30) as the ops' GEMV; OPTIM=1
#   bench_optim, PagedAdamW's 8-bit states against AdamW and AdamW8bit, its table in bench.log; DROPOUT=1 the eager
#   7B step with LoRA dropout 0.1 on both sides (the QLoRA recipes'), its table in bench.log; OPCALLS=1
#   bench_op_calls on CUDA, the CPU cost of one 4-bit layer's call with and without LoRA against PEFT's, then with
#   LoRA dropout 0.1; ADAPTERS=1 the eager 7B step like for like, both sides' adapters bf16 and then both float32
#   (bench_qlora --adapter-dtype compute / float32), their tables in bench.log; MOE=1 bench_qlora_moe, a Mixtral with
#   4-bit experts against PEFT + bitsandbytes, routed and dense path, also 32 experts top 4, and bench_experts4bit
#   with its compiled (gathered) forward, its tables in bench.log; DECODE=1 bench_decode on CUDA, a Llama of the
#   8B's layer shapes (8 layers) decoding with its decoder in 4 bits, lowrank against bitsandbytes and bf16, its table
#   in bench.log; KTIME=1 bench_nf4_linear at 4096x4096, M = 1 and 16, each provider also timed by its kernels alone
#   (torch.profiler): whether the Triton ops' 3-20x bf16's time is their kernels' or the host's, its table in bench.log)
# Budget at every limit (every command runs under `timeout`; tests/benchmarks/test_gpu_check_script.py
# sums the limits of a dry run and checks these): 10 s wheel + 5 s nvidia-smi + 15 s versions, then
# PART=1: 100 s build + 10 s _C check + 130 + 20 s tests + 85 + 80 + 135 s benchmarks = 590 s in all;
# PART=quick: the same without the compiled step, 455 s in all (415 s of them the steps' own);
# PART=2: 20 s codec benchmark + 80 s Triton tests + 60 s Triton benchmark = 190 s in all;
# PART=all: both, 750 s, over the device tool's 10 minutes a call. The steps are in
# the order they matter and usually end well before their limits (on 2026-11-30 PART=quick and two optional steps took
# 285 s, the machine's start not counted; 49 Triton tests took more than 45 s, so they have 80 s now).
# PART=1 / PART=2 split it in two calls of the device tool, each under its 10 minutes (PART=2
# needs no build: the Triton kernels compile on the spot, and bench_nf4_codec and bench_nf4_linear
# time lowrank._C only where the first part built it).
# Without lowrank._C's CUDA kernels (a failed build: build.log) the tests of those kernels are left
# out, said once in tests.log; the rest runs (the ops fall back to their Triton and Python kernels).
# First run on a GPU on 2026-11-30 (docs/benchmarks.md): the staged GEMVs (ids 3, 4), the pair-table GEMV
# mma-lut (id 5, the default since), the ops' CUDA kernels in C++ (csrc/dispatch.h) and their autograd in
# C++ (csrc/autograd.cpp). If one of those fails, LOWRANK_PYTHON_OPS=1 takes the ops back to their Python
# kernels and autograd for the rest (PYOPS=1 also times that), and LOWRANK_CUDA_GEMV=mma the GEMV back.
# PART=quick is PART=1 without the compiled step (415 s of step limits, 455 s in all: build, the CUDA tests,
# bench_nf4_cuda, the eager 7B step), for a session whose whole device time is 15 minutes, the machine's start
# included: one call with timeout_s ~480 leaves time for one rerun or for PART=2 while the machine is warm
# (it goes back 30 s after a call).
# PART=extras is the build alone, then only the optional steps switched on above (MOE=1, OPTIM=1, ...): with
# PART=all, 1 or quick in front of them they would not fit one call of 10 minutes, nor a 15-minute session.
# Run from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh   (or PART=quick / 1 / 2 / extras ...)
timeout 10 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD \
  || { echo "gpu_check: no usable wheel in .whl/: continuing without bitsandbytes"; export PYTHONPATH=$PWD; }
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/benchmarks/results}
mkdir -p "$OUT"
status=0
step() {  # step SECONDS LOG NAME COMMAND...: run, append to LOG, note a failure
  local seconds=$1 log=$2 name=$3
  shift 3
  echo "== $name (${seconds} s at most)" | tee -a "$log"
  local start=$SECONDS
  timeout "$seconds" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc after $((SECONDS - start)) s" | tee -a "$log"
  [ "$rc" = 0 ] || status=1
  rm -f "$OUT"/*.png "$OUT"/*.md  # after every step: a run cut short by the call's limit still leaves <= 8 files
}

{
  timeout 5 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  # each package on its own line: one that does not import (no bitsandbytes wheel) keeps the others' versions
  timeout 15 python3 -c "
import importlib
for name in ('torch', 'triton', 'bitsandbytes', 'peft', 'transformers'):
    try:
        module = importlib.import_module(name)
    except Exception as e:  # not installed, or a library it loads is missing
        print(name, 'does not import:', type(e).__name__, e)
    else:
        print(name, module.__version__, *(['cuda', module.version.cuda] if name == 'torch' else []))
"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

PART=${PART:-all}  # 1: build, CUDA tests and benchmarks, the 7B steps; 2: the codec benchmark, the Triton tests and
# benchmark; all: both; quick: 1 without the compiled 7B step; extras: the build, then only the optional steps
case "$PART" in all | 1 | 2 | quick | extras) ;; *) echo "gpu_check: PART must be all, 1, 2, quick or extras, got $PART"; exit 2 ;; esac
PYTEST="python3 -m pytest -m gpu -q -p no:cacheprovider -rfE"
CUDA_C=1  # 0: lowrank._C has no CUDA kernels (below), their tests are left out

if [ "$PART" != 2 ]; then
step 100 "$OUT/build.log" "build lowrank._C with CUDA" env LOWRANK_CUDA_ARCHS=90a MAX_JOBS=16 python3 setup.py build_ext --inplace
timeout 10 python3 -c "from lowrank import _C; print('lowrank._C with_cuda =', _C.with_cuda); raise SystemExit(0 if _C.with_cuda else 3)" \
  2>&1 | tee -a "$OUT/build.log" || CUDA_C=0
fi
CSRC_CUDA_TESTS=""  # tests/csrc/test_cuda_kernels.py would give an ImportError per test (401) without lowrank._C
if [ "$CUDA_C" = 0 ] && [ "$PART" != 2 ]; then
  CSRC_CUDA_TESTS="--ignore=tests/csrc/test_cuda_kernels.py"
  status=1  # the kernels this run is for were not built
  echo "gpu_check: lowrank._C has no CUDA kernels (build.log): tests/csrc/test_cuda_kernels.py is left out" >> "$OUT/tests.log"
fi
if [ "$PART" != 2 ] && [ "$PART" != extras ]; then
step 130 "$OUT/tests.log" "csrc, LoRA op, optimizer and quantize gpu tests" $PYTEST tests/csrc tests/ops/test_lora_add.py \
  tests/ops/test_nf4_lora_linear.py tests/ops/test_lora_dropout.py tests/ops/test_experts_ops.py tests/test_optim.py \
  tests/test_optim_as_adamw.py tests/quant \
  --deselect tests/csrc/test_cuda_kernels.py::test_cuda_gemv_refuses_too_many_rows $CSRC_CUDA_TESTS
# alone: a failing TORCH_CHECK that formats a number crashed the process on this machine before (docs/csrc.md)
[ "$CUDA_C" = 0 ] || step 20 "$OUT/tests.log" "csrc error messages" $PYTEST \
  tests/csrc/test_cuda_kernels.py::test_cuda_gemv_refuses_too_many_rows
step 85 "$OUT/bench.log" "bench_nf4_cuda" python3 benchmarks/bench_nf4_cuda.py --out "$OUT/nf4_cuda.json"
step 80 "$OUT/bench.log" "bench_qlora --llama7b" python3 benchmarks/bench_qlora.py --llama7b --reps 4 --profile --out "$OUT/qlora.json"
# the first (warm-up) step of each side compiles one decoder layer's forward and backward (a guess:
# 40-70 s a side on the GPU machine's 16 cores; the JSON is rewritten after each side)
[ "$PART" = quick ] || step 135 "$OUT/bench.log" "bench_qlora --llama7b --compile" python3 benchmarks/bench_qlora.py --llama7b --reps 3 --compile \
  --profile --out "$OUT/qlora_compiled.json"
fi

if [ "$PART" = all ] || [ "$PART" = 2 ]; then
# quantize and dequantize on the GPU against bitsandbytes and torchao (the table goes to bench.log only;
# here, not in PART=1, so that PART=1 fits 10 minutes at every limit)
step 20 "$OUT/bench.log" "bench_nf4_codec --device cuda" python3 benchmarks/bench_nf4_codec.py --device cuda \
  --out /tmp/nf4_codec.json
# TRITON_TESTS narrows the Triton tests (each autotunes, ~2 s a test); all of tests/ops/test_gpu.py by default
step 80 "$OUT/tests.log" "Triton gpu tests" $PYTEST tests/ops/test_gpu.py -k "${TRITON_TESTS:-}"
step 60 "$OUT/bench.log" "bench_nf4_linear (Triton and the rest) at two shapes" python3 benchmarks/bench_nf4_linear.py \
  --shapes 4096x4096,4096x14336 --ms 1,16 --out "$OUT/nf4_linear.json"
fi
if [ "${CUDAGRAPHS:-0}" = 1 ]; then  # untried: CUDA graphs of each compiled layer (cudagraph trees) under checkpointing
  step 200 "$OUT/bench.log" "bench_qlora --llama7b --compile-mode reduce-overhead" python3 benchmarks/bench_qlora.py \
    --llama7b --reps 3 --compile --compile-mode reduce-overhead --out "$OUT/qlora_cudagraphs.json"
fi
if [ "${PYOPS:-0}" = 1 ]; then  # the eager 7B step with the ops' Python kernels: the A/B of csrc/dispatch.h (no JSON kept)
  step 80 "$OUT/bench.log" "bench_qlora --llama7b, LOWRANK_PYTHON_OPS=1" env LOWRANK_PYTHON_OPS=1 python3 \
    benchmarks/bench_qlora.py --llama7b --reps 4 --out /tmp/qlora_python_ops.json
fi
if [ "${MMA:-0}" = 1 ]; then  # mma, the default before mma-lut (csrc/nf4_cuda_gemv.cu, Note: LOWRANK_CUDA_GEMV), as the ops' GEMV
  [ "$CUDA_C" = 0 ] || step 90 "$OUT/tests.log" "csrc op gpu tests, LOWRANK_CUDA_GEMV=mma" env LOWRANK_CUDA_GEMV=mma $PYTEST \
    tests/csrc/test_cuda_kernels.py -k "op_"
  step 40 "$OUT/bench.log" "bench_nf4_cuda --back-to-back, LOWRANK_CUDA_GEMV=mma" env LOWRANK_CUDA_GEMV=mma \
    python3 benchmarks/bench_nf4_cuda.py --back-to-back --out /tmp/nf4_cuda_mma.json
fi
if [ "${OPCALLS:-0}" = 1 ]; then  # what one call of a tiny 4-bit layer (with LoRA) costs on this machine: the 7B step's lever
  step 60 "$OUT/bench.log" "bench_op_calls --device cuda" python3 benchmarks/bench_op_calls.py --device cuda \
    --out /tmp/op_calls.json
  step 60 "$OUT/bench.log" "bench_op_calls --device cuda --dropout 0.1" python3 benchmarks/bench_op_calls.py \
    --device cuda --dropout 0.1 --out /tmp/op_calls_dropout.json
fi
if [ "${DROPOUT:-0}" = 1 ]; then  # the eager 7B step with LoRA dropout 0.1 on both sides (lowrank's inside nf4_lora_linear)
  step 80 "$OUT/bench.log" "bench_qlora --llama7b --dropout 0.1" python3 benchmarks/bench_qlora.py --llama7b --reps 4 \
    --dropout 0.1 --out /tmp/qlora_dropout.json
fi
if [ "${ADAPTERS:-0}" = 1 ]; then  # the 1.3x goal like for like: PEFT's adapters bf16 too, then lowrank's float32 too
  step 80 "$OUT/bench.log" "bench_qlora --llama7b --adapter-dtype compute" python3 benchmarks/bench_qlora.py --llama7b \
    --reps 4 --adapter-dtype compute --out /tmp/qlora_bf16_adapters.json
  step 80 "$OUT/bench.log" "bench_qlora --llama7b --adapter-dtype float32" python3 benchmarks/bench_qlora.py --llama7b \
    --reps 4 --adapter-dtype float32 --out /tmp/qlora_f32_adapters.json
fi
if [ "${MOE:-0}" = 1 ]; then  # QLoRA on a Mixtral with its experts in 4 bits (NF4Config.parameters) against PEFT + bnb
  step 120 "$OUT/bench.log" "bench_qlora_moe --compile-decode" python3 benchmarks/bench_qlora_moe.py --compile-decode \
    --out /tmp/qlora_moe.json
  step 60 "$OUT/bench.log" "bench_qlora_moe E32" python3 benchmarks/bench_qlora_moe.py --experts 32 --top-k 4 \
    --out /tmp/qlora_moe32.json
  step 90 "$OUT/bench.log" "bench_experts4bit --compile" python3 benchmarks/bench_experts4bit.py --compile \
    --out /tmp/experts4bit.json
fi
if [ "${DECODE:-0}" = 1 ]; then  # decoding a model, each token synchronized: the GEMV where a user meets it
  step 90 "$OUT/bench.log" "bench_decode --device cuda" python3 benchmarks/bench_decode.py --device cuda --hidden 4096 \
    --intermediate 14336 --layers 8 --vocab 32000 --tokens 64 --out /tmp/decode.json
fi
if [ "${KTIME:-0}" = 1 ]; then  # do_bench (CUDA events) beside the kernels' own time (benchmarks/_common.py, Note: kernel time)
  step 30 "$OUT/tests.log" "kernel time gpu test" $PYTEST tests/benchmarks/test_kernel_time.py
  step 90 "$OUT/bench.log" "bench_nf4_linear --kernel-time" python3 benchmarks/bench_nf4_linear.py --shapes 4096x4096 \
    --ms 1,16 --kernel-time --out /tmp/nf4_linear_ktime.json
fi
if [ "${OPTIM:-0}" = 1 ]; then  # an optimizer step over 4 layers of 7B LoRA adapters: AdamW, 8-bit states, AdamW8bit
  step 40 "$OUT/bench.log" "bench_optim" python3 benchmarks/bench_optim.py --out /tmp/optim.json
fi
if [ "${PROFILE:-0}" = 1 ]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  step 50 "$OUT/profile.log" "ncu: the CUDA kernels at 4096 x 14336" ${NCU:-ncu} --clock-control none --section SpeedOfLight \
    --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
    -k "regex:mma_kernel|staged_kernel|lut_kernel|simt_kernel|stream_kernel" -s 8 -c 8 \
    python3 benchmarks/profile_nf4_cuda.py
fi

rm -f "$OUT"/*.png "$OUT"/*.md  # the JSON rows hold the same; 8 files at most come back
ls -l "$OUT"
exit $status
