// out[i] = NF4[code(i)] * scale[i / blocksize], rounded once to float32 / float16 / bfloat16.
//   code(i): packed[i / 2], first element in the high nibble
//   scale[b] = absmax[b], or DYNAMIC[qabsmax[b]] * nested_absmax[b / 256] + offset (two roundings)
// Bit-exact with lowrank/quant/nf4.py (the contract in nf4_common.h).
//
// Design (Hopper first, runs on sm_80 too): one thread decodes one 128-bit load of packed codes,
// 16 bytes = 32 elements, all in one block (blocksize >= 32, a power of two), so a thread computes
// one scale: the 8-bit code and the nested scale from global memory, the 256-entry dynamic map
// from shared memory. The 16 NF4 values sit in shared memory too: 16 words in 16 distinct banks,
// so the 32 lanes' lookups never conflict. The 32 results leave as 128-bit stores. The last,
// partial group of 32 (odd numel, short last block, unaligned pointers) takes a per-element loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4_cuda.h"

namespace lowrank {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 32;  // elements: one 16-byte load of packed codes

__device__ const float g_dynamic[256] = {LOWRANK_DYNAMIC_VALUES};
__device__ const float g_nf4[16] = {LOWRANK_NF4_VALUES};

__device__ __forceinline__ float scale_of(const NF4View& w, int64_t b, const float* dynamic) {
  if (w.nested == nullptr) return static_cast<const float*>(w.absmax)[b];
  const float code = dynamic[static_cast<const uint8_t*>(w.absmax)[b]];
  return __fadd_rn(__fmul_rn(code, w.nested[b / kNestedBlocksize]), *w.offset);  // never fused
}

template <typename T>
__device__ __forceinline__ T convert(float v);
template <>
__device__ __forceinline__ float convert<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half convert<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 convert<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(NF4View w, T* __restrict__ out, bool vector_ok) {
  __shared__ float dynamic[256];
  __shared__ float nf4[16];
  static_assert(kThreads == 256, "one thread copies one entry of the dynamic map");
  dynamic[threadIdx.x] = g_dynamic[threadIdx.x];
  if (threadIdx.x < 16) nf4[threadIdx.x] = g_nf4[threadIdx.x];
  __syncthreads();

  const int64_t start = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kPerThread;
  if (start >= w.numel) return;
  if (vector_ok && start + kPerThread <= w.numel) {
    const float s = scale_of(w, start / w.blocksize, dynamic);
    const uint4 bytes = *reinterpret_cast<const uint4*>(w.packed + start / 2);  // 128-bit load
    const uint32_t word[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
    alignas(16) T v[kPerThread];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t byte = (word[i / 4] >> (8 * (i % 4))) & 0xFF;  // little-endian: byte i of the load
      v[2 * i] = convert<T>(__fmul_rn(nf4[byte >> 4], s));
      v[2 * i + 1] = convert<T>(__fmul_rn(nf4[byte & 0x0F], s));
    }
    uint4* dst = reinterpret_cast<uint4*>(out + start);
#pragma unroll
    for (int i = 0; i < kPerThread * int(sizeof(T)) / 16; ++i) dst[i] = reinterpret_cast<const uint4*>(v)[i];
    return;
  }
  const int64_t stop = start + kPerThread < w.numel ? start + kPerThread : w.numel;
  for (int64_t i = start; i < stop; ++i) {
    const uint8_t byte = w.packed[i / 2];
    const int code = (i % 2 == 0) ? (byte >> 4) : (byte & 0x0F);
    out[i] = convert<T>(__fmul_rn(nf4[code], scale_of(w, i / w.blocksize, dynamic)));
  }
}

template <typename T>
cudaError_t launch(const NF4View& w, T* out, cudaStream_t stream) {
  if (w.numel == 0) return cudaSuccess;
  const bool vector_ok = w.blocksize % kPerThread == 0 && reinterpret_cast<uintptr_t>(w.packed) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t threads = (w.numel + kPerThread - 1) / kPerThread;
  const int64_t grid = (threads + kThreads - 1) / kThreads;
  dequantize_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(w, out, vector_ok);
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_dequantize_cuda(const NF4View& w, CudaType type, void* out, cudaStream_t stream) {
  switch (type) {
    case CudaType::kFloat32: return launch(w, static_cast<float*>(out), stream);
    case CudaType::kFloat16: return launch(w, static_cast<__half*>(out), stream);
    case CudaType::kBFloat16: return launch(w, static_cast<__nv_bfloat16*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lowrank
