#!/usr/bin/env bash
# One prepared run on a rented H100/H200 (torch, triton preinstalled; no internet;
# bitsandbytes carried as a wheel in .whl/). Runs the gpu-marked tests, then every
# benchmark, and leaves at most 7 files under $OUT:
#   env.txt  gpu_tests.log  bench.log  nf4_linear.{json,md,png}  (+ nf4_codec.json from bench_nf4_codec.py)
# Budget (each step under `timeout`): 10 s wheels + 15 s env + 170 s tests + 210 s benchmarks < 7 min.
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

echo "== gpu tests (170 s at most)"
timeout 170 python3 -m pytest -m gpu -x -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || { rc=${PIPESTATUS[0]}; status=1; echo "gpu_check: gpu tests FAILED or timed out (rc $rc)"; }

echo "== benchmarks (210 s at most; results are written after every shape)"
TRITON_PRINT_AUTOTUNING=1 timeout 210 python3 benchmarks/run.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" || { rc=${PIPESTATUS[0]}; status=1; echo "gpu_check: benchmarks FAILED or timed out (rc $rc)"; }

ls -l "$OUT"
exit $status
