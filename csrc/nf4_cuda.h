// The narrow C++ interface of the CUDA NF4 kernels: device pointers, a stream, an error code.
// No torch headers: the .cu files compile with nvcc alone (make cuda-objects), and
// bindings_cuda.cpp turns tensors into these calls.
//
//   nf4_dequantize_cuda:  out[i] = NF4[code(i)] * scale[i / blocksize]   (bit-exact, nf4_common.h)
//   nf4_gemv_cuda:        y[M, N] = x[M, K] @ W[N, K]^T + bias[N]       (M = 1..16, float32 sums)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "nf4_common.h"

namespace lowrank {

enum class CudaType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// All of W (numel elements) into out, of type `type`; every pointer in `w` is in device memory.
cudaError_t nf4_dequantize_cuda(const NF4View& w, CudaType type, void* out, cudaStream_t stream);

// x [M, K] and y [M, N] contiguous, both of `type`; bias (N,) of `type` or nullptr.
// Needs K % 32 == 0, K % blocksize == 0, 1 <= M <= 16, and packed and x 16-byte aligned.
cudaError_t nf4_gemv_cuda(const NF4View& w, int64_t N, int64_t K, const void* x, int64_t M, const void* bias,
                          CudaType type, void* y, cudaStream_t stream);

constexpr int kCudaGemvMaxRows = 16;

}  // namespace lowrank
