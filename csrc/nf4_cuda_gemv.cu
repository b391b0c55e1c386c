// out[M, N] = x[M, K] @ W[N, K]^T + bias[N]      W: NF4 [N, K], x / bias / out: float32, float16 or bfloat16
//   for few rows M (decoding token by token, small batches); float32 sums, one rounding at the end.
//   The scale of each block is decoded in-kernel (nf4_common.h).
//
// Four kernels (nf4_cuda.h kGemv*; benchmarks/bench_nf4_cuda.py times each):
//
// kGemvMma, float16 / bfloat16, M <= 64 (the default for them until 2026-11-30). Tensor cores: mma.sync m16n8k16
// with W as the A operand (16 rows of W x 16 columns) and x^T as B (16 columns x 8 rows of x, zero
// beyond M), float32 accumulators. A CTA owns 16 rows of W; its 8 warps split K, each walking
// tiles of 128 columns, and add their partial sums in shared memory at the end (a fixed order:
// deterministic). See Note: the k permutation, for how a lane's one 16-byte load of codes becomes
// its share of eight mma steps without any shuffle. W enters the mma exactly as the reference
// dequantizes it: NF4[code] * scale rounded once to x's dtype. On the H200 (docs/benchmarks.md,
// 2026-11-28) it is bound by instruction issue (~4.5 instructions a weight, 25% occupancy), not
// by memory: 1.1-1.5x bf16 cuBLAS at M = 1.
//
// kGemvMmaStaged, float16 / bfloat16, M <= 64 (nf4_cuda_gemv_staged.cu): the same products as
// kGemvMma with the block scales decoded into shared memory before the K loop and no predicate
// inside it (Note: staged scales, in that file):
// 25-32% fewer instructions a weight and 64 instead of 106 registers at M <= 8 (sm_90a SASS,
// benchmarks/sass_csrc.py). kGemvMmaStaged2, M <= 16: the same with two m16 row tiles a warp and
// 16 warps a CTA, so each x fragment feeds two row tiles and x is read half as often. Timed on the
// H200 (2026-11-30) up to 16 rows: staged 0.87-1.10x kGemvMma's speed, staged2 0.79-1.36x (the
// fastest of all at 16 rows of 4096 x 4096, 4096 x 11008 and 4096 x 14336).
// kGemvMmaLut (nf4_cuda_gemv_lut.cu), the default for float16 / bfloat16: see Note: LOWRANK_CUDA_GEMV;
// kGemvMmaLutDeep, the same with twice the codes in flight up to 8 rows (Note: deep batches, there).
//
// kGemvSimt, any type, M <= 16 (the default for float32, whose tensor-core path would be TF32).
// One warp per row n of W. A lane takes 16 bytes of the row (one 128-bit load: 32 weights in one
// block), decodes its block's scale, turns each nibble into NF4[c] * scale rounded to x's dtype,
// and multiplies it into the M rows of x (128-bit loads; x stays in L1/L2). A warp-shuffle sum
// ends the row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "nf4_cuda.h"
#include "nf4_cuda_device.h"
#include "nf4_cuda_mma.h"

namespace lowrank {
namespace {

constexpr int kWarps = 4;  // kGemvSimt: rows of W per CTA
constexpr int kChunk = 32;  // weights per lane per step: one 16-byte load


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
__global__ void __launch_bounds__(kWarps * 32) simt_kernel(NF4View w, int64_t N, int64_t K, const T* __restrict__ x,
                                                           int M, const T* __restrict__ bias, T* __restrict__ y,
                                                           int shift) {
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
    const int64_t b = (n * K + c * kChunk) >> shift;  // blocksize = 2^shift
    float s;
    if (w.nested == nullptr) {
      s = static_cast<const float*>(w.absmax)[b];
    } else {
      const float code = dynamic[static_cast<const uint8_t*>(w.absmax)[b]];
      s = __fadd_rn(__fmul_rn(code, w.nested[b >> 8]), *w.offset);  // never fused; kNestedBlocksize = 256
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


// ---------------------------------------------------------------------------------------------
// kGemvMma (with the tensor-core pieces of nf4_cuda_mma.h, which kGemvMmaStaged shares)
// ---------------------------------------------------------------------------------------------

// What one lane loads for U consecutive tiles: the 16 bytes of codes of each of its two rows,
// and their blocks' scale codes (the 8-bit code and the nested scale, or the float32 scale).
template <int U>
struct Batch {
  uint4 codes[U][2];
  uint32_t qscale[U][2];  // 8-bit code into the dynamic map (double quant) or the float32 scale's bits
  float nested_scale[U][2];
};

// Issue every load of tiles tile0 .. tile0 + U - 1 (none past tile_end or K, or for a row past N).
// first[r]: flat index of the lane's first weight of row r in tile 0 (a multiple of 32, so its 32
// weights lie in one block); shift = log2(blocksize): no 64-bit division in the loop.
template <int U>
__device__ __forceinline__ void load_batch(Batch<U>& b, const NF4View& w, const int64_t (&first)[2],
                                           const bool (&row_ok)[2], int64_t tile0, int64_t tile_end, int64_t k_lane,
                                           int64_t K, int shift) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const bool k_ok = tile0 + u < tile_end && (tile0 + u) * kTileK + k_lane < K;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      b.codes[u][r] = make_uint4(0, 0, 0, 0), b.qscale[u][r] = 0, b.nested_scale[u][r] = 0.0f;
      if (k_ok && row_ok[r]) {
        const int64_t i = first[r] + (tile0 + u) * kTileK;
        const int64_t blk = i >> shift;
        b.codes[u][r] = __ldg(reinterpret_cast<const uint4*>(w.packed + (i >> 1)));
        if (w.nested != nullptr) {
          b.qscale[u][r] = __ldg(static_cast<const uint8_t*>(w.absmax) + blk);
          b.nested_scale[u][r] = __ldg(w.nested + (blk >> 8));  // kNestedBlocksize = 256
        } else {
          b.qscale[u][r] = __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + blk));
        }
      }
    }
  }
}

// MT: n8 tiles of x's rows (M <= 8 MT); U: tiles a batch. # Note: two batches in flight. While a
// warp decodes and multiplies one batch of U tiles, the loads of the next are already issued
// (registers double-buffered), so memory latency hides behind the decode instead of adding to it.
template <typename T, int MT, int U>
__global__ void __launch_bounds__(kMmaWarps * 32) mma_kernel(NF4View w, int64_t N, int64_t K, const T* __restrict__ x,
                                                             int M, const T* __restrict__ bias, T* __restrict__ y,
                                                             int shift) {
  static_assert(kNestedBlocksize == 256, "load_batch shifts by 8");
  __shared__ float dynamic[256];
  __shared__ float partial[kMmaWarps * MT * 4 * 32];
  static_assert(kMmaWarps * 32 == 256, "one thread copies one entry of the dynamic map");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * 16;
  const bool row_ok[2] = {row0 + g < N, row0 + g + 8 < N};
  const int64_t k_lane = 32 * t;  // the lane's first column in a tile
  const int64_t first[2] = {(row0 + g) * K + k_lane, (row0 + g + 8) * K + k_lane};
  const int64_t tiles = (K + kTileK - 1) / kTileK;
  const int64_t per_warp = (tiles + kMmaWarps - 1) / kMmaWarps;
  const int64_t tile_begin = warp * per_warp;
  const int64_t tile_end = tile_begin + per_warp < tiles ? tile_begin + per_warp : tiles;
  const bool nested = w.nested != nullptr;
  const float offset = nested ? __ldg(w.offset) : 0.0f;

  Batch<U> cur, next;
  load_batch(cur, w, first, row_ok, tile_begin, tile_end, k_lane, K, shift);  // before the tables: overlaps them
  dynamic[threadIdx.x] = g_dynamic[threadIdx.x];
  if (threadIdx.x < 16) s_nf4[threadIdx.x] = g_nf4[threadIdx.x];
  __syncthreads();
  const uint32_t base = after_barrier(static_cast<uint32_t>(__cvta_generic_to_shared(s_nf4)));  // a multiple of 64

  float acc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  for (int64_t tile0 = tile_begin; tile0 < tile_end; tile0 += U) {
    load_batch(next, w, first, row_ok, tile0 + U, tile_end, k_lane, K, shift);  // See Note: two batches in flight.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = (tile0 + u) * kTileK + k_lane;
      const bool k_ok = tile0 + u < tile_end && k < K;
      uint2 xs[MT][8];  // the lane's 32 columns of row 8j + g of x: words 2s, 2s+1 feed step s
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const bool ok = k_ok && 8 * j + g < M;
        const uint2* src = reinterpret_cast<const uint2*>(x + (8 * j + g) * K + k);
#pragma unroll
        for (int s = 0; s < 8; ++s) xs[j][s] = ok ? __ldg(src + s) : make_uint2(0, 0);
      }
      float scale[2];
      // a lane without weights (row >= N, k >= K) still gets a finite scale: see Reduction.
#pragma unroll
      for (int r = 0; r < 2; ++r)
        scale[r] = nested ? __fadd_rn(__fmul_rn(dynamic[cur.qscale[u][r]], cur.nested_scale[u][r]), offset)  // no FMA
                          : __uint_as_float(cur.qscale[u][r]);
      tile_mma<T, MT>(acc, cur.codes[u], scale, xs, base);
    }
    cur = next;
  }

  // Reduction: lanes past K brought x = 0 (finite A times 0 adds 0); rows past N or M only reach
  // outputs that are not written.
  reduce_store<T, MT>(partial, reinterpret_cast<const float(&)[1][MT][4]>(acc), row0, N, M, bias, y);
}

template <typename T, int MT>
void launch_mma(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y, cudaStream_t stream) {
  const auto kernel = mma_kernel<T, MT, 2>;
  LOWRANK_LAUNCH(kernel, static_cast<unsigned>((N + 15) / 16), kMmaWarps * 32, 0, stream)(w, N, K, x, M, bias, y,
                                                                                        log2_of(w.blocksize));
}

template <typename T>
cudaError_t launch_simt(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y,
                        cudaStream_t stream) {
  if (M > kCudaSimtMaxRows) return cudaErrorInvalidValue;
  const int shift = log2_of(w.blocksize);
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps)), block(kWarps * 32);
  const auto kernel = M == 1 ? simt_kernel<T, 1> : M == 2 ? simt_kernel<T, 2> : M <= 4 ? simt_kernel<T, 4>
                    : M <= 8 ? simt_kernel<T, 8> : simt_kernel<T, 16>;
  LOWRANK_LAUNCH(kernel, grid, block, 0, stream)(w, N, K, x, M, bias, y, shift);
  return cudaGetLastError();
}

// Note: LOWRANK_CUDA_GEMV. The kernel kGemvAuto runs for float16 / bfloat16: kGemvMmaLut (since the H200 run
// of 2026-11-30, docs/benchmarks.md: the fastest of the four at 21 of bench_nf4_cuda.py's 30 shapes x rows;
// against kGemvMma 0.88-1.25x its speed at 1 and 4 rows, 0.97-1.51x at 16, 1.25-2.15x at 32 and 64), unless the
// environment variable names another (mma, mma-staged, mma-staged2, mma-lut, mma-lut-deep), read once a process.
// So a GPU run can put a kernel that has not been timed yet under every op, test and benchmark
// before it becomes the default. lowrank/ops/csrc.py checks the name when lowrank is imported; a
// name not in the list here makes every auto call fail rather than run a kernel nobody asked for.
int auto_half_kernel() {
  static const int kernel = [] {
    const char* name = std::getenv("LOWRANK_CUDA_GEMV");
    if (name == nullptr || name[0] == '\0') return kGemvMmaLut;
    const struct {
      const char* name;
      int id;
    } known[] = {{"mma", kGemvMma},         {"mma-staged", kGemvMmaStaged}, {"mma-staged2", kGemvMmaStaged2},
                 {"mma-lut", kGemvMmaLut}, {"mma-lut-deep", kGemvMmaLutDeep}};
    for (const auto& k : known)
      if (std::strcmp(name, k.name) == 0) return k.id;
    return -1;
  }();
  return kernel;
}

template <typename T>
cudaError_t launch(const NF4View& w, int64_t N, int64_t K, const T* x, int64_t M, const T* bias, T* y, int kernel,
                   cudaStream_t stream) {
  if (K % kChunk != 0 || w.blocksize % kChunk != 0 || M < 1 || M > kCudaMmaMaxRows ||
      reinterpret_cast<uintptr_t>(w.packed) % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const int m = static_cast<int>(M);
  constexpr bool has_mma = !std::is_same<T, float>::value;
  if (kernel == kGemvAuto) {  // See Note: LOWRANK_CUDA_GEMV.
    kernel = has_mma ? auto_half_kernel() : kGemvSimt;
    if (kernel < 0) return cudaErrorInvalidValue;
    if (kernel == kGemvMmaStaged2 && m > kCudaStaged2MaxRows) kernel = kGemvMmaStaged;
  }
  if (kernel == kGemvSimt) return launch_simt(w, N, K, x, m, bias, y, stream);
  if constexpr (has_mma) {
    if (kernel == kGemvMma || kernel == kGemvMmaStaged || kernel == kGemvMmaStaged2 || kernel == kGemvMmaLut ||
        kernel == kGemvMmaLutDeep) {
      if (kernel == kGemvMmaStaged2 && m > kCudaStaged2MaxRows) return cudaErrorInvalidValue;
      // mma-lut runs mma-staged where it cannot (K % 64, blocksize 32, shared memory); the staged
      // kernels run mma_kernel when their scales do not fit in shared memory
      const bool lut = kernel == kGemvMmaLut || kernel == kGemvMmaLutDeep;
      const bool done = lut && launch_lut(w, N, K, x, m, bias, y, kernel == kGemvMmaLutDeep, stream);
      if (!done && (kernel == kGemvMma || !launch_staged(w, N, K, x, m, bias, y, kernel == kGemvMmaStaged2, stream))) {
        if (m <= 8) launch_mma<T, 1>(w, N, K, x, m, bias, y, stream);
        else if (m <= 16) launch_mma<T, 2>(w, N, K, x, m, bias, y, stream);
        else if (m <= 32) launch_mma<T, 4>(w, N, K, x, m, bias, y, stream);
        else launch_mma<T, 8>(w, N, K, x, m, bias, y, stream);
      }
      return cudaGetLastError();
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t nf4_gemv_cuda(const NF4View& w, int64_t N, int64_t K, const void* x, int64_t M, const void* bias,
                          CudaType type, void* y, int kernel, cudaStream_t stream) {
  switch (type) {
    case CudaType::kFloat32:
      return launch(w, N, K, static_cast<const float*>(x), M, static_cast<const float*>(bias), static_cast<float*>(y),
                    kernel, stream);
    case CudaType::kFloat16:
      return launch(w, N, K, static_cast<const __half*>(x), M, static_cast<const __half*>(bias),
                    static_cast<__half*>(y), kernel, stream);
    case CudaType::kBFloat16:
      return launch(w, N, K, static_cast<const __nv_bfloat16*>(x), M, static_cast<const __nv_bfloat16*>(bias),
                    static_cast<__nv_bfloat16*>(y), kernel, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lowrank
