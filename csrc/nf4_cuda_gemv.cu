// out[M, N] = x[M, K] @ W[N, K]^T + bias[N]      W: NF4 [N, K], x / bias / out: float32, float16 or bfloat16
//   for the skinny case M = 1..16 (decoding: token by token); float32 sums, one rounding at the end.
//   W[n, k] = NF4[code] * scale[(n * K + k) / blocksize] rounded to x's dtype (as the reference
//   dequantizes W in x.dtype), the scale decoded in-kernel (nf4_common.h).
//
// Design (Hopper first, runs on sm_80 too): one warp per row n of W. A lane takes 16 bytes of the
// row (one 128-bit load: 32 weights in one block, since blocksize >= 32), decodes its block's scale
// (8-bit code and nested scale from global memory, the dynamic map from shared memory), turns each
// nibble into NF4[c] * scale with the 16-value codebook in shared memory (16 banks, conflict-free),
// and multiplies it into the M rows of x, read as 128-bit loads (x is small and shared by every
// row: it stays in L1/L2). A warp-shuffle sum ends the row. The loads of a lane's chunks are
// unrolled 4 deep so that each lane has 4 x 16 bytes of W in flight.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4_cuda.h"

namespace lowrank {
namespace {

constexpr int kWarps = 4;  // rows of W per CTA
constexpr int kChunk = 32;  // weights per lane per step: one 16-byte load

__device__ const float g_dynamic[256] = {LOWRANK_DYNAMIC_VALUES};
__device__ const float g_nf4[16] = {LOWRANK_NF4_VALUES};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 32 consecutive elements of x as float32, with 128-bit loads (x is 16-byte aligned, k % 32 == 0).
template <typename T>
__device__ __forceinline__ void load_x(const T* __restrict__ x, float (&out)[kChunk]) {
  constexpr int kPerLoad = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < kChunk / kPerLoad; ++i) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x) + i);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPerLoad; ++j) out[i * kPerLoad + j] = to_float(v[j]);
  }
}

template <typename T, int MAX_M>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(NF4View w, int64_t N, int64_t K, const T* __restrict__ x,
                                                           int M, const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ float dynamic[256];
  __shared__ float nf4[16];
  for (int i = threadIdx.x; i < 256; i += kWarps * 32) dynamic[i] = g_dynamic[i];
  if (threadIdx.x < 16) nf4[threadIdx.x] = g_nf4[threadIdx.x];
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= N) return;
  const uint4* row = reinterpret_cast<const uint4*>(w.packed + n * (K / 2));
  float acc[MAX_M];
#pragma unroll
  for (int m = 0; m < MAX_M; ++m) acc[m] = 0.0f;

#pragma unroll 4
  for (int64_t c = lane; c < K / kChunk; c += 32) {  // chunk c: weights 32c .. 32c + 31 of row n
    const uint4 bytes = row[c];
    const int64_t b = (n * K + c * kChunk) / w.blocksize;
    float s;
    if (w.nested == nullptr) {
      s = static_cast<const float*>(w.absmax)[b];
    } else {
      const float code = dynamic[static_cast<const uint8_t*>(w.absmax)[b]];
      s = __fadd_rn(__fmul_rn(code, w.nested[b / kNestedBlocksize]), *w.offset);  // never fused
    }
    float wv[kChunk];
    const uint32_t word[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t byte = (word[i / 4] >> (8 * (i % 4))) & 0xFF;
      // W dequantized in x's dtype, as the reference does: one rounding of the float32 product to T.
      wv[2 * i] = to_float(from_float<T>(__fmul_rn(nf4[byte >> 4], s)));
      wv[2 * i + 1] = to_float(from_float<T>(__fmul_rn(nf4[byte & 0x0F], s)));
    }
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
      if (m < M) {
        float xv[kChunk];
        load_x(x + m * K + c * kChunk, xv);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) acc[m] = fmaf(wv[i], xv[i], acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MAX_M; ++m) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc[m] += __shfl_xor_sync(0xFFFFFFFFu, acc[m], offset);
  }
  if (lane == 0) {
    const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MAX_M; ++m)
      if (m < M) y[m * N + n] = from_float<T>(acc[m] + b);
  }
}

template <typename T>
cudaError_t launch(const NF4View& w, int64_t N, int64_t K, const T* x, int64_t M, const T* bias, T* y,
                   cudaStream_t stream) {
  if (K % kChunk != 0 || K % w.blocksize != 0 || w.blocksize % kChunk != 0 || M < 1 || M > kCudaGemvMaxRows ||
      reinterpret_cast<uintptr_t>(w.packed) % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps)), block(kWarps * 32);
  const int m = static_cast<int>(M);
  if (M == 1) gemv_kernel<T, 1><<<grid, block, 0, stream>>>(w, N, K, x, m, bias, y);
  else if (M == 2) gemv_kernel<T, 2><<<grid, block, 0, stream>>>(w, N, K, x, m, bias, y);
  else if (M <= 4) gemv_kernel<T, 4><<<grid, block, 0, stream>>>(w, N, K, x, m, bias, y);
  else if (M <= 8) gemv_kernel<T, 8><<<grid, block, 0, stream>>>(w, N, K, x, m, bias, y);
  else gemv_kernel<T, 16><<<grid, block, 0, stream>>>(w, N, K, x, m, bias, y);
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_gemv_cuda(const NF4View& w, int64_t N, int64_t K, const void* x, int64_t M, const void* bias,
                          CudaType type, void* y, cudaStream_t stream) {
  switch (type) {
    case CudaType::kFloat32:
      return launch(w, N, K, static_cast<const float*>(x), M, static_cast<const float*>(bias), static_cast<float*>(y), stream);
    case CudaType::kFloat16:
      return launch(w, N, K, static_cast<const __half*>(x), M, static_cast<const __half*>(bias), static_cast<__half*>(y), stream);
    case CudaType::kBFloat16:
      return launch(w, N, K, static_cast<const __nv_bfloat16*>(x), M, static_cast<const __nv_bfloat16*>(bias),
                    static_cast<__nv_bfloat16*>(y), stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lowrank
