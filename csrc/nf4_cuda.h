// The narrow C++ interface of the CUDA NF4 kernels: device pointers, a stream, an error code.
// No torch headers: the .cu files compile with nvcc alone (make cuda-objects), and
// bindings_cuda.cpp turns tensors into these calls.
//
//   nf4_dequantize_cuda:  out[i] = NF4[code(i)] * scale[i / blocksize]   (bit-exact, nf4_common.h)
//   nf4_gemv_cuda:        y[M, N] = x[M, K] @ W[N, K]^T + bias[N]       (few rows M, float32 sums)
//
// `kernel` picks one of the GEMV's implementations (benchmarks compare them; the default picks by type).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "nf4_common.h"

namespace lowrank {

enum class CudaType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// All of W (numel elements) into out, of type `type`; every pointer in `w` is in device memory.
cudaError_t nf4_dequantize_cuda(const NF4View& w, CudaType type, void* out, cudaStream_t stream);

// nf4_gemv_cuda kernels (nf4_cuda_gemv.cu; the staged ones in nf4_cuda_gemv_staged.cu, the table one in
// nf4_cuda_gemv_lut.cu)
constexpr int kGemvAuto = 0;  // kGemvMmaLut for float16 / bfloat16 (or LOWRANK_CUDA_GEMV's), kGemvSimt for float32
constexpr int kGemvMma = 1;   // tensor cores (mma.sync m16n8k16), float16 / bfloat16, M <= kCudaMmaMaxRows
constexpr int kGemvSimt = 2;  // one warp a row on the CUDA cores, any type, M <= kCudaSimtMaxRows
constexpr int kGemvMmaStaged = 3;  // kGemvMma with its block scales staged in shared memory first, same limits
constexpr int kGemvMmaStaged2 = 4;  // kGemvMmaStaged with two m16 row tiles a warp and 16 warps, M <= kCudaStaged2MaxRows
constexpr int kGemvMmaLut = 5;  // tensor cores on T(NF4[code]) pairs from one table lookup, each block's sum scaled once;
                                // K % 64 == 0 and blocksize >= 64, else it runs kGemvMmaStaged; M <= kCudaMmaMaxRows
constexpr int kGemvMmaLutDeep = 6;  // kGemvMmaLut with batches of 8 tiles up to 8 rows of x (4 in kGemvMmaLut): twice
                                    // the codes in flight a warp, the same sums in the same order (bit for bit)

constexpr int kCudaMmaMaxRows = 64;

// log2 of a power of two (blocksizes 32..4096): the kernels index blocks by shifts, since a
// 64-bit division is a ~60-instruction subroutine on the GPU.
inline int log2_of(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}
constexpr int kCudaSimtMaxRows = 16;
constexpr int kCudaStaged2MaxRows = 16;
// Up to how many rows of float16 / bfloat16 x the lowrank::nf4_linear op runs the GEMV on CUDA (float32:
// kCudaSimtMaxRows); above, dequantize + cuBLAS (lowrank/ops/csrc.py, Note: GEMV or dequantize + cuBLAS on CUDA).
constexpr int kCudaGemvOpMaxRows = 32;

// x [M, K] and y [M, N] contiguous, both of `type`; bias (N,) of `type` or nullptr.
// Needs K % 32 == 0, 1 <= M <= the kernel's maximum, and packed and x 16-byte aligned.
cudaError_t nf4_gemv_cuda(const NF4View& w, int64_t N, int64_t K, const void* x, int64_t M, const void* bias,
                          CudaType type, void* y, int kernel, cudaStream_t stream);

}  // namespace lowrank
