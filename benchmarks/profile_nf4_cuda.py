"""One call of each lowrank CUDA kernel at 4096 x 14336 (Llama-3-8B's down projection), for a
profiler to read (a few warm-up calls first, then the profiled ones):

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \\
        -k regex:"mma_kernel|staged_kernel|lut_kernel|simt_kernel|stream_kernel" -s 5 -c 5 python3 benchmarks/profile_nf4_cuda.py

Prints nothing of its own beyond what the kernels' checks raise: the numbers are ncu's.
"""

from __future__ import annotations

import torch

from lowrank import _C, nf4

N, K = 4096, 14336
MMA, SIMT, STAGED, LUT = 1, 2, 3, 5  # csrc/nf4_cuda.h kGemvMma, kGemvSimt, kGemvMmaStaged, kGemvMmaLut


def main() -> None:
    q = nf4.quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16), 64, True)
    args = (q.packed, q.absmax, q.nested_absmax, q.offset, [N, K], 64)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # warm-up: the profiled calls are the second round (ncu -s skips the first)
        _C.nf4_linear_cuda(x, *args, None, kernel=MMA)
        _C.nf4_linear_cuda(x, *args, None, kernel=STAGED)
        _C.nf4_linear_cuda(x, *args, None, kernel=LUT)
        _C.nf4_linear_cuda(x, *args, None, kernel=SIMT)
        _C.nf4_dequantize_cuda(*args, torch.bfloat16)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
