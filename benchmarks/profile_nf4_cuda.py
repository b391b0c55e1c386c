"""One call of each lowrank CUDA kernel at 4096 x 14336 (Llama-3-8B's down projection), and of
mma-lut (the default GEMV) and mma-staged2 at 16 rows (mma-lut-deep at 1), for a profiler to read (a round of warm-up
calls first, then the profiled round):

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \\
        -k regex:"mma_kernel|staged_kernel|lut_kernel|simt_kernel|stream_kernel" -s 8 -c 8 python3 benchmarks/profile_nf4_cuda.py

On the H200 (2026-11-30) mma-lut at M = 1 moved its marginal bytes at 1.3-1.5 TB/s where bf16
cuBLAS moved 3.2-3.5 (docs/csrc.md, Why mma-lut is not yet 3x bf16): the memory sections say why.

Prints nothing of its own beyond what the kernels' checks raise: the numbers are ncu's.
"""

from __future__ import annotations

import torch

from lowrank import _C, nf4

N, K = 4096, 14336
MMA, SIMT, STAGED, STAGED2, LUT, DEEP = 1, 2, 3, 4, 5, 6  # csrc/nf4_cuda.h kGemvMma, kGemvSimt, kGemvMmaStaged, ..2, ..Lut, ..LutDeep


def main() -> None:
    q = nf4.quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16), 64, True)
    args = (q.packed, q.absmax, q.nested_absmax, q.offset, [N, K], 64)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    x16 = torch.randn(16, K, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # warm-up: the profiled calls are the second round (ncu -s skips the first)
        _C.nf4_linear_cuda(x, *args, None, kernel=MMA)
        _C.nf4_linear_cuda(x, *args, None, kernel=STAGED)
        _C.nf4_linear_cuda(x, *args, None, kernel=LUT)
        _C.nf4_linear_cuda(x, *args, None, kernel=DEEP)
        _C.nf4_linear_cuda(x, *args, None, kernel=SIMT)
        _C.nf4_dequantize_cuda(*args, torch.bfloat16)
        _C.nf4_linear_cuda(x16, *args, None, kernel=LUT)
        _C.nf4_linear_cuda(x16, *args, None, kernel=STAGED2)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
