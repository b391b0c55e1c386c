// out[i] = NF4[code(i)] * scale[i / blocksize], rounded once to float32 / float16 / bfloat16.
//   code(i): packed[i / 2], first element in the high nibble
//   scale[b] = absmax[b], or DYNAMIC[qabsmax[b]] * nested_absmax[b / 256] + offset (two roundings)
// Bit-exact with lowrank/quant/nf4.py (the contract in nf4_common.h).
//
// Design (Hopper first, runs on sm_80 too). A thread decodes 8 elements: one 4-byte load of
// packed codes in, one 16-byte store of bf16/fp16 out, so each warp instruction reads 128
// contiguous bytes and writes 512: both fully coalesced. A thread takes kUnroll such items,
// kThreads apart, and issues all of their loads (codes, 8-bit scale codes, nested scales) before
// it waits for any, so that every SM keeps enough bytes in flight to stream at the copy
// bandwidth. 8 elements lie in one block (blocksize >= 32, a power of two): one scale per item.
// The NF4 values and the dynamic map sit in shared memory (the 16 NF4 words in 16 banks: lanes
// never conflict). Block and nested-block indices are shifts (blocksize is a power of two): a
// 64-bit division costs ~60 instructions.
//
// Measured on an H200 (docs/benchmarks.md, 2026-11-28): 78-91% of the device-to-device copy
// bandwidth at Llama shapes (68% at 1024 x 4096), where the first version (32 elements a thread,
// one 16-byte load, 128-bit stores 64 bytes apart across lanes) reached 47%.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4_cuda.h"
#include "nf4_cuda_device.h"

namespace lowrank {
namespace {

constexpr int kThreads = 256;
constexpr int kItem = 8;     // elements per item: 4 packed bytes
constexpr int kUnroll = 4;   // items per thread, their loads in flight together


struct Tables {
  float dynamic[256];
  float nf4[16];
};

// Every thread of the CTA copies its share; the caller syncs.
__device__ __forceinline__ void fill(Tables& s) {
  static_assert(kThreads == 256, "one thread copies one entry of the dynamic map");
  s.dynamic[threadIdx.x] = g_dynamic[threadIdx.x];
  if (threadIdx.x < 16) s.nf4[threadIdx.x] = g_nf4[threadIdx.x];
}

__device__ __forceinline__ float scale_of(const NF4View& w, int64_t b, const float* dynamic) {
  if (w.nested == nullptr) return static_cast<const float*>(w.absmax)[b];
  const float code = dynamic[static_cast<const uint8_t*>(w.absmax)[b]];
  return __fadd_rn(__fmul_rn(code, w.nested[b / kNestedBlocksize]), *w.offset);  // never fused
}

// Element i of W one at a time: tails, odd sizes, misaligned pointers.
template <typename T>
__device__ __forceinline__ void decode_one(const NF4View& w, int64_t i, const Tables& s, T* __restrict__ out) {
  const uint8_t byte = w.packed[i / 2];
  const int code = (i % 2 == 0) ? (byte >> 4) : (byte & 0x0F);
  out[i] = from_float<T>(__fmul_rn(s.nf4[code], scale_of(w, i / w.blocksize, s.dynamic)));
}

// 8 decoded values of one item -> out[0..7], as one 16-byte store (two for float32).
template <typename T>
__device__ __forceinline__ void store_item(const float (&v)[kItem], T* __restrict__ out) {
  alignas(16) T packed[kItem];
#pragma unroll
  for (int e = 0; e < kItem; ++e) packed[e] = from_float<T>(v[e]);
#pragma unroll
  for (int i = 0; i < kItem * int(sizeof(T)) / 16; ++i)
    reinterpret_cast<uint4*>(out)[i] = reinterpret_cast<const uint4*>(packed)[i];
}

// Needs packed 4-byte aligned and out 16-byte aligned (the launcher checks); item j of W is
// elements 8j .. 8j+7, its codes the 32-bit word j of packed (little-endian: byte 0 lowest).
template <typename T>
__global__ void __launch_bounds__(kThreads) stream_kernel(NF4View w, T* __restrict__ out, int shift) {
  __shared__ Tables s;
  const int64_t items = w.numel / kItem;  // whole items; the rest (< 8 elements) is the tail
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w.packed);
  const bool nested = w.nested != nullptr;

  // 1. every load of this thread's items, before any of them is used
  uint32_t code[kUnroll];
  uint32_t qscale[kUnroll];  // 8-bit code into the dynamic map (double quant) or the float32 scale's bits
  float nested_scale[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t j = first + u * kThreads;
    code[u] = 0, qscale[u] = 0, nested_scale[u] = 0.0f;
    if (j < items) {
      const int64_t b = (j * kItem) >> shift;  // blocksize = 2^shift
      code[u] = __ldg(words + j);
      if (nested) {
        qscale[u] = __ldg(static_cast<const uint8_t*>(w.absmax) + b);
        nested_scale[u] = __ldg(w.nested + (b >> 8));  // kNestedBlocksize = 256
      } else {
        qscale[u] = __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + b));
      }
    }
  }
  const float offset = nested ? __ldg(w.offset) : 0.0f;
  fill(s);
  __syncthreads();

  // 2. decode and store
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t j = first + u * kThreads;
    if (j >= items) break;
    const float scale = nested ? __fadd_rn(__fmul_rn(s.dynamic[qscale[u]], nested_scale[u]), offset)  // never fused
                               : __uint_as_float(qscale[u]);
    float v[kItem];
#pragma unroll
    for (int e = 0; e < kItem; ++e) {  // element e: byte e / 2, high nibble first
      const uint32_t c = (code[u] >> (8 * (e / 2) + 4 * (1 - e % 2))) & 0xF;
      v[e] = __fmul_rn(s.nf4[c], scale);
    }
    store_item(v, out + j * kItem);
  }

  // 3. the tail: the last numel % 8 elements, one thread each
  if (blockIdx.x == gridDim.x - 1 && threadIdx.x < w.numel - items * kItem)
    decode_one(w, items * kItem + threadIdx.x, s, out);
}

// Any alignment, one element a step (only when a pointer is misaligned: views at odd offsets).
template <typename T>
__global__ void __launch_bounds__(kThreads) scalar_kernel(NF4View w, T* __restrict__ out) {
  __shared__ Tables s;
  fill(s);
  __syncthreads();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < w.numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    decode_one(w, i, s, out);
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
cudaError_t launch(const NF4View& w, T* out, cudaStream_t stream) {
  static_assert(kNestedBlocksize == 256, "stream_kernel shifts by 8");
  if (w.numel == 0) return cudaSuccess;
  if (w.blocksize < kItem || (w.blocksize & (w.blocksize - 1)) != 0) return cudaErrorInvalidValue;  // 32..4096
  if (reinterpret_cast<uintptr_t>(w.packed) % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
    // at least one CTA, so that a W of fewer than 8 elements still gets its tail
    const int64_t grid = cdiv(w.numel / kItem, int64_t{kThreads} * kUnroll);
    LOWRANK_LAUNCH(stream_kernel<T>, static_cast<unsigned>(grid > 0 ? grid : 1), kThreads, 0, stream)(
        w, out, log2_of(w.blocksize));
  } else {
    const int64_t grid = cdiv(w.numel, kThreads);
    LOWRANK_LAUNCH(scalar_kernel<T>, static_cast<unsigned>(grid < 4096 ? grid : 4096), kThreads, 0, stream)(w, out);
  }
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
