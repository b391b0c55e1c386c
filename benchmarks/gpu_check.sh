#!/usr/bin/env bash
# One prepared run on a rented H100/H200 (torch, triton preinstalled; no internet;
# bitsandbytes carried as a wheel in .whl/). Builds lowrank._C with its CUDA kernels, runs
# the gpu-marked tests, then the GPU benchmarks (Triton and CUDA kernels against bf16 and
# bitsandbytes), and leaves at most 8 files under $OUT:
#   env.txt build_ext.log gpu_tests.log bench.log nf4_linear.{json,md,png} nf4_cuda.json qlora.{json,md}
# Budget (each step under `timeout`): 10 s wheels + 15 s env + 150 s build + 170 s tests
# + 210 s benchmarks, about 9 minutes. The 2026-11-27 session had 15 device minutes in all.
# Run from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD \
  || { echo "gpu_check: no usable wheel in .whl/: continuing without bitsandbytes"; export PYTHONPATH=$PWD; }
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/benchmarks/results}
mkdir -p "$OUT"
status=0

{
  timeout 15 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  timeout 15 python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  timeout 15 python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || echo "bitsandbytes: not importable"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== build lowrank._C with CUDA (150 s at most)"
MAX_JOBS=16 timeout 150 python3 setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1 \
  || { status=1; echo "gpu_check: lowrank._C build FAILED"; tail -20 "$OUT/build_ext.log"; }

echo "== gpu tests (170 s at most)"
timeout 170 python3 -m pytest -m gpu -x -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || { rc=${PIPESTATUS[0]}; status=1; echo "gpu_check: gpu tests FAILED or timed out (rc $rc)"; }

echo "== GPU benchmarks (210 s at most; results are written after every shape)"
{
  timeout 100 python3 benchmarks/bench_nf4_linear.py --out "$OUT/nf4_linear.json"
  timeout 50 python3 benchmarks/bench_nf4_cuda.py --out "$OUT/nf4_cuda.json"
  timeout 60 python3 benchmarks/bench_qlora.py --out "$OUT/qlora.json"  # needs peft and the carried bitsandbytes
} 2>&1 | tee "$OUT/bench.log" || { status=1; echo "gpu_check: a benchmark FAILED or timed out"; }

ls -l "$OUT"
exit $status
