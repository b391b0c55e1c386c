// out[M, N] = x[M, K] @ W[N, K]^T + bias[N]      W: NF4 [N, K], x / bias / out: float32, float16 or bfloat16
//   for few rows M (decoding token by token, small batches); float32 sums, one rounding at the end.
//   The scale of each block is decoded in-kernel (nf4_common.h).
//
// Four kernels (nf4_cuda.h kGemv*; benchmarks/bench_nf4_cuda.py times each):
//
// kGemvMma, float16 / bfloat16, M <= 64 (the default for them). Tensor cores: mma.sync m16n8k16
// with W as the A operand (16 rows of W x 16 columns) and x^T as B (16 columns x 8 rows of x, zero
// beyond M), float32 accumulators. A CTA owns 16 rows of W; its 8 warps split K, each walking
// tiles of 128 columns, and add their partial sums in shared memory at the end (a fixed order:
// deterministic). See Note: the k permutation, for how a lane's one 16-byte load of codes becomes
// its share of eight mma steps without any shuffle. W enters the mma exactly as the reference
// dequantizes it: NF4[code] * scale rounded once to x's dtype. On the H200 (docs/benchmarks.md,
// 2026-11-28) it is bound by instruction issue (~4.5 instructions a weight, 25% occupancy), not
// by memory: 1.1-1.5x bf16 cuBLAS at M = 1.
//
// kGemvMmaStaged, float16 / bfloat16, M <= 64: the same products as kGemvMma with the block scales
// decoded into shared memory before the K loop and no predicate inside it (Note: staged scales):
// 25-32% fewer instructions a weight and 64 instead of 106 registers at M <= 8 (sm_90a SASS,
// benchmarks/sass_csrc.py). kGemvMmaStaged2, M <= 16: the same with two m16 row tiles a warp and
// 16 warps a CTA, so each x fragment feeds two row tiles and x is read half as often. Written
// without a GPU at hand: not the default until a GPU run has timed them against kGemvMma
// (benchmarks/gpu_check.sh).
//
// kGemvSimt, any type, M <= 16 (the default for float32, whose tensor-core path would be TF32).
// One warp per row n of W. A lane takes 16 bytes of the row (one 128-bit load: 32 weights in one
// block), decodes its block's scale, turns each nibble into NF4[c] * scale rounded to x's dtype,
// and multiplies it into the M rows of x (128-bit loads; x stays in L1/L2). A warp-shuffle sum
// ends the row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "nf4_cuda.h"
#include "nf4_cuda_device.h"

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
// kGemvMma
// ---------------------------------------------------------------------------------------------

// Note: the k permutation. A sum over k may visit k in any order, as long as A and B use the
// same one. In mma.sync m16n8k16 the lane with groupID g = lane / 4 and t = lane % 4 holds
//   A (W):  rows g and g + 8, logical columns 2t, 2t+1 (registers a0/a1 and a2/a3) and 2t+8, 2t+9 (a4..a7)
//   B (x^T): logical rows 2t, 2t+1 (b0, b1) and 2t+8, 2t+9 (b2, b3) of column g
// (PTX ISA, "Matrix fragments for mma.m16n8k16"). Within a tile of 128 columns we let lane t own
// the 32 physical columns 32t .. 32t+31 (one 16-byte load of codes per row) and feed step s
// (0..7) the physical columns 32t + 4s + {0, 1} as logical 2t + {0, 1}, and 32t + 4s + {2, 3}
// as logical 2t + 8 + {0, 1}. Over t, s and the four columns that is each of the 128 columns
// once, and A and B agree on every one, so the 8 mma steps sum exactly W[n, :] x[m, :] over the
// tile. Both operands come straight from the lane's own loads: bytes 2s and 2s+1 of its codes,
// 32-bit words 2s and 2s+1 of its 64 bytes of x.
constexpr int kMmaWarps = 8;   // warps of a CTA: they split K, all on the same 16 rows of W
constexpr int kTileK = 128;    // columns of W a warp covers per tile: 4 lanes x 32

// One mma.sync step in T (float16 or bfloat16), float32 accumulators, and T's packed pairs.
template <typename T>
struct Mma {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma takes float16 or bfloat16");
  static constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;

  // (lo, hi) rounded to nearest even, lo in the low 16 bits: the element of the smaller column
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    uint32_t bits;
    if constexpr (kBf16) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
      bits = *reinterpret_cast<const uint32_t*>(&v);
    } else {
      const __half2 v = __floats2half2_rn(lo, hi);
      bits = *reinterpret_cast<const uint32_t*>(&v);
    }
    return bits;
  }

  static __device__ __forceinline__ void step(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (kBf16)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// The 16 NF4 values in shared memory, 64-byte aligned: the address of entry c is base | 4c, so
// one LOP3 both masks the code out of the packed word and adds the base, and a lookup is
// SHF + LOP3 + LDS (plain indexing costs an extra add of the base a weight).
__shared__ __align__(64) float s_nf4[16];

// NF4[code] for the nibble at bits [shift, shift + 4) of word ((word >> (shift - 2)) & 0x3C is 4 x code).
__device__ __forceinline__ float nf4_at(uint32_t word, int shift, uint32_t base) {
  const uint32_t address = ((shift >= 2 ? word >> (shift - 2) : word << 2) & 0x3C) | base;
  float v;
  asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(address));
  return v;
}

// The two weights of byte j of a lane's 16 bytes, times the block's scale, as one packed pair.
template <typename T>
__device__ __forceinline__ uint32_t decode_pair(const uint4& bytes, int j, float scale, uint32_t base) {
  const uint32_t word = j < 4 ? bytes.x : j < 8 ? bytes.y : j < 12 ? bytes.z : bytes.w;  // j is a constant
  const int bit = 8 * (j % 4);  // the byte's lowest bit; its first weight is the high nibble
  return Mma<T>::pack(__fmul_rn(nf4_at(word, bit + 4, base), scale), __fmul_rn(nf4_at(word, bit, base), scale));
}

// The eight mma steps of one tile: the lane's codes of its two rows (16 bytes each) with their
// blocks' scales, times its x fragments (xs[j][s]: words 2s, 2s+1 of its 32 columns of row 8j + g).
template <typename T, int MT>
__device__ __forceinline__ void tile_mma(float (&acc)[MT][4], const uint4 (&codes)[2], const float (&scale)[2],
                                         const uint2 (&xs)[MT][8], uint32_t base) {
#pragma unroll
  for (int s = 0; s < 8; ++s) {  // See Note: the k permutation.
    const uint32_t a[4] = {decode_pair<T>(codes[0], 2 * s, scale[0], base),
                           decode_pair<T>(codes[1], 2 * s, scale[1], base),
                           decode_pair<T>(codes[0], 2 * s + 1, scale[0], base),
                           decode_pair<T>(codes[1], 2 * s + 1, scale[1], base)};
#pragma unroll
    for (int j = 0; j < MT; ++j) Mma<T>::step(acc[j], a, xs[j][s].x, xs[j][s].y);
  }
}

// The WARPS warps' partial sums of the CTA's 16 RT rows of W, added in warp order (deterministic),
// plus the bias, to y. partial: WARPS * RT * MT * 4 * 32 floats of shared memory.
//   D[n][m] of row tile rt and n8 tile j: c0 = (16 rt + g, 2t), c1 = (16 rt + g, 2t+1), c2 / c3 the
//   same for row 16 rt + g + 8.
template <typename T, int MT, int RT = 1, int WARPS = kMmaWarps>
__device__ __forceinline__ void reduce_store(float* partial, const float (&acc)[RT][MT][4], int64_t row0, int64_t N,
                                             int M, const T* __restrict__ bias, T* __restrict__ y) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kSlots = RT * MT * 4 * 32;  // floats a warp leaves
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp * kSlots + ((rt * MT + j) * 4 + i) * 32 + lane] = acc[rt][j][i];
  __syncthreads();
  for (int slot = threadIdx.x; slot < kSlots; slot += WARPS * 32) {
    const int rji = slot / 32, l = slot % 32;
    const int rt = rji / (4 * MT), j = rji / 4 % MT, i = rji % 4;
    const int64_t n = row0 + 16 * rt + l / 4 + (i >= 2 ? 8 : 0);
    const int m = 8 * j + 2 * (l % 4) + (i % 2);
    if (n >= N || m >= M) continue;
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < WARPS; ++v) sum += partial[v * kSlots + slot];
    if (bias != nullptr) sum += to_float(bias[n]);
    y[m * N + n] = from_float<T>(sum);
  }
}

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
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(s_nf4));  // a multiple of 64
  __syncthreads();

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

// ---------------------------------------------------------------------------------------------
// kGemvMmaStaged
// ---------------------------------------------------------------------------------------------

// Note: staged scales. mma_kernel spends about a third of its K loop on bookkeeping, not on
// decoding (sm_90a SASS, bf16, one n8 tile: 881 instructions for 128 weights a lane, of which
// ~630 decode and multiply): per row and tile a lane computes 64-bit addresses of its codes, its
// scale code and its nested scale, loads all three under predicates (row < N, k < K, tile in
// range), looks the code up in the dynamic map and multiplies and adds the scale. staged_kernel
// computes the same products with the same lanes, k permutation, operands and reduction, and
// takes that work out of the loop:
//   - a prologue decodes every block scale the CTA's rows use into shared memory (the rows are
//     contiguous in W, so their blocks are one range, ~16 RT K / blocksize scales); in the loop a
//     scale is one shift and one LDS;
//   - no predicate in the loop: a lane whose row is past N reads row N - 1, one whose row of x is
//     past M reads row M - 1. Their products land in rows / columns of D whose outputs are never
//     written (an mma output column depends on its own column of B only, a row on its row of A),
//     and all they read is finite. Only the last tile of K, when K % 128 != 0, runs a path that
//     zeroes the codes, scale and x of lanes past K;
//   - the loads of a batch of U tiles use immediate offsets from pointers advanced once a batch.
// The staged scales must fit in the 48 KiB of shared memory a CTA gets without opting in: 16 RT K /
// blocksize + 2 <= kStagedScales (RT row tiles a warp; K up to ~47000 at blocksize 64 and RT = 1);
// larger weights take mma_kernel.
constexpr int kStagedScales = 12 * 1024 - 512;  // floats: 48 KiB less the dynamic map, s_nf4 and some slack
constexpr int kStagedLoads = 8;  // scales a thread loads at once in the prologue (one round up to K = 16384 at blocksize 64)

// The lane's codes for U consecutive tiles: 16 bytes of each of its two rows in each of RT row tiles.
template <int U, int RT>
struct Codes {
  uint4 v[U][RT][2];
};

// RT: m16 row tiles a warp (16 RT rows of W a CTA; each x fragment feeds RT mma steps, so the CTAs
// read x 1 / RT as often); WARPS: warps a CTA, splitting K. See Note: staged scales.
template <typename T, int MT, int U, int RT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) staged_kernel(NF4View w, int64_t N, int64_t K, const T* __restrict__ x,
                                                            int M, const T* __restrict__ bias, T* __restrict__ y,
                                                            int shift) {
  static_assert(kNestedBlocksize == 256, "the prologue shifts by 8");
  static_assert(WARPS * 32 >= 256, "one thread copies one entry of the dynamic map");
  constexpr int kThreads = WARPS * 32, kRows = 16 * RT;
  extern __shared__ float staged[];  // the CTA's block scales; after the loop, the warps' partial sums
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = N - row0 < kRows ? static_cast<int>(N - row0) : kRows;
  int r[RT][2];  // the lane's rows within the CTA's, clamped to its last (See Note: staged scales)
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int i = 0; i < 2; ++i) r[rt][i] = 16 * rt + 8 * i + g < rows ? 16 * rt + 8 * i + g : rows - 1;
  const int64_t tiles = (K + kTileK - 1) / kTileK, full = K / kTileK;  // full: tiles all 4 lanes' columns are in
  const int64_t per_warp = (tiles + WARPS - 1) / WARPS;
  const int64_t tile_begin = warp * per_warp < tiles ? warp * per_warp : tiles;
  const int64_t tile_end = tile_begin + per_warp < tiles ? tile_begin + per_warp : tiles;
  const int64_t lean_end = tile_end < full ? tile_end : full;

  // The lane's pointers at tile_begin: codes of its rows, x of its row in each n8 tile. The scale of
  // row (rt, i) in the tile starting at column k: staged[(rel[rt][i] + k) >> shift], rel counted
  // from the start of the CTA's first block.
  const int64_t first = row0 * K;
  const int64_t b0 = first >> shift;
  const uint4* codes[RT][2];
  int rel[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      codes[rt][i] = reinterpret_cast<const uint4*>(w.packed + (((row0 + r[rt][i]) * K + 32 * t) >> 1)) + 4 * tile_begin;
      rel[rt][i] = static_cast<int>(first - (b0 << shift)) + r[rt][i] * static_cast<int>(K) + 32 * t;
    }
  const T* xrow[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) xrow[j] = x + (8 * j + g < M ? 8 * j + g : M - 1) * K + 32 * t + tile_begin * kTileK;

  // Whole batches of whole tiles, no predicate. The loads of the next batch are issued before this
  // one is decoded; after the last batch they read this batch again (cached, never used), so the
  // loop has no branch but its own.
  const int batches = lean_end > tile_begin ? static_cast<int>((lean_end - tile_begin) / U) : 0;
  Codes<U, RT> cur, next;
  if (batches > 0) {  // the first batch, in flight during the prologue
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int i = 0; i < 2; ++i) cur.v[u][rt][i] = __ldg(codes[rt][i] + 4 * u);
  }
  // The prologue: the dynamic map into shared memory, then each scale of the CTA's blocks; all of a
  // thread's loads are issued before it waits for any.
  __shared__ float dynamic[256];
  if (threadIdx.x < 256) dynamic[threadIdx.x] = g_dynamic[threadIdx.x];
  if (threadIdx.x < 16) s_nf4[threadIdx.x] = g_nf4[threadIdx.x];
  const int nblk = static_cast<int>(((first + rows * K - 1) >> shift) - b0 + 1);
  const bool nested = w.nested != nullptr;
  const float offset = nested ? __ldg(w.offset) : 0.0f;
  for (int i0 = 0; i0 < nblk; i0 += kStagedLoads * kThreads) {
    uint32_t q[kStagedLoads];  // scale codes, or float32 scales' bits
    float nested_scale[kStagedLoads];
#pragma unroll
    for (int p = 0; p < kStagedLoads; ++p) {
      const int i = i0 + p * kThreads + threadIdx.x;
      const int64_t b = b0 + (i < nblk ? i : nblk - 1);
      q[p] = nested ? __ldg(static_cast<const uint8_t*>(w.absmax) + b)
                    : __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + b));
      nested_scale[p] = nested ? __ldg(w.nested + (b >> 8)) : 0.0f;
    }
    if (i0 == 0) __syncthreads();  // the dynamic map is in place (i0 is the same for every thread)
#pragma unroll
    for (int p = 0; p < kStagedLoads; ++p) {
      const int i = i0 + p * kThreads + threadIdx.x;
      if (i < nblk) staged[i] = nested ? __fadd_rn(__fmul_rn(dynamic[q[p]], nested_scale[p]), offset)  // no FMA
                                       : __uint_as_float(q[p]);
    }
  }
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(s_nf4));  // a multiple of 64
  __syncthreads();

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < MT; ++j) acc[rt][j][0] = acc[rt][j][1] = acc[rt][j][2] = acc[rt][j][3] = 0.0f;

  int k = static_cast<int>(tile_begin) * kTileK;  // the first column of the tile at hand
  for (int batch = 0; batch < batches; ++batch) {
    const int ahead = batch + 1 < batches ? 4 * U : 0;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int i = 0; i < 2; ++i) next.v[u][rt][i] = __ldg(codes[rt][i] + ahead + 4 * u);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      uint2 xs[MT][8];
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int s = 0; s < 8; ++s) xs[j][s] = __ldg(reinterpret_cast<const uint2*>(xrow[j] + u * kTileK) + s);
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        const float scale[2] = {staged[(rel[rt][0] + k + u * kTileK) >> shift],
                                staged[(rel[rt][1] + k + u * kTileK) >> shift]};
        tile_mma<T, MT>(acc[rt], cur.v[u][rt], scale, xs, base);
      }
    }
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int i = 0; i < 2; ++i) codes[rt][i] += 4 * U;
#pragma unroll
    for (int j = 0; j < MT; ++j) xrow[j] += U * kTileK;
    k += U * kTileK;
    cur = next;
  }
  for (int64_t tt = tile_begin + static_cast<int64_t>(batches) * U; tt < tile_end; ++tt) {
    // the warp's last tiles one by one; past `full`, lanes past K add 0
    const bool in = tt < full || k + 32 * t < K;
    uint2 xs[MT][8];
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int s = 0; s < 8; ++s) xs[j][s] = in ? __ldg(reinterpret_cast<const uint2*>(xrow[j]) + s) : make_uint2(0, 0);
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      const uint4 zero = make_uint4(0, 0, 0, 0);
      const uint4 c[2] = {in ? __ldg(codes[rt][0]) : zero, in ? __ldg(codes[rt][1]) : zero};
      const float scale[2] = {in ? staged[(rel[rt][0] + k) >> shift] : 0.0f, in ? staged[(rel[rt][1] + k) >> shift] : 0.0f};
      tile_mma<T, MT>(acc[rt], c, scale, xs, base);
#pragma unroll
      for (int i = 0; i < 2; ++i) codes[rt][i] += 4;
    }
#pragma unroll
    for (int j = 0; j < MT; ++j) xrow[j] += kTileK;
    k += kTileK;
  }

  __syncthreads();  // every warp is done with the staged scales: their memory takes the partial sums
  reduce_store<T, MT, RT, WARPS>(staged, acc, row0, N, M, bias, y);
}

// Shared memory a staged_kernel CTA needs (floats), or 0 when the scales do not fit.
inline int staged_floats(int64_t K, int shift, int mt, int rt, int warps) {
  const int64_t scales = ((16 * rt * K) >> shift) + 2;  // 16 RT K consecutive weights span at most this many blocks
  const int64_t partial = static_cast<int64_t>(warps) * rt * mt * 4 * 32;
  if (scales > kStagedScales || partial > kStagedScales) return 0;
  return static_cast<int>(scales > partial ? scales : partial);
}

template <typename T, int MT>
void launch_mma(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y, cudaStream_t stream) {
  mma_kernel<T, MT, 2><<<static_cast<unsigned>((N + 15) / 16), kMmaWarps * 32, 0, stream>>>(w, N, K, x, M, bias, y,
                                                                                           log2_of(w.blocksize));
}

template <typename T, int MT, int U, int RT, int WARPS>
bool launch_staged_as(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y,
                      cudaStream_t stream) {
  const int shift = log2_of(w.blocksize);
  const int floats = staged_floats(K, shift, MT, RT, WARPS);
  if (floats == 0) return false;
  staged_kernel<T, MT, U, RT, WARPS><<<static_cast<unsigned>((N + 16 * RT - 1) / (16 * RT)), WARPS * 32,
                                       floats * sizeof(float), stream>>>(w, N, K, x, M, bias, y, shift);
  return true;
}

// kGemvMmaStaged: staged_kernel with one row tile a warp and 8 warps; kGemvMmaStaged2: two row tiles
// a warp and 16 warps (M <= 16: 32 rows a CTA, x read half as often). Either runs mma_kernel when its
// scales do not fit in shared memory.
template <typename T, int MT>
void launch_staged(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y, bool two_tiles,
                   cudaStream_t stream) {
  bool done = false;
  if constexpr (MT <= 2) {
    if (two_tiles) done = launch_staged_as<T, MT, 1, 2, 16>(w, N, K, x, M, bias, y, stream);
  }
  if (!done && !two_tiles) done = launch_staged_as<T, MT, 2, 1, kMmaWarps>(w, N, K, x, M, bias, y, stream);
  if (!done) launch_mma<T, MT>(w, N, K, x, M, bias, y, stream);
}

template <typename T>
cudaError_t launch_simt(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y,
                        cudaStream_t stream) {
  if (M > kCudaSimtMaxRows) return cudaErrorInvalidValue;
  const int shift = log2_of(w.blocksize);
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps)), block(kWarps * 32);
  if (M == 1) simt_kernel<T, 1><<<grid, block, 0, stream>>>(w, N, K, x, M, bias, y, shift);
  else if (M == 2) simt_kernel<T, 2><<<grid, block, 0, stream>>>(w, N, K, x, M, bias, y, shift);
  else if (M <= 4) simt_kernel<T, 4><<<grid, block, 0, stream>>>(w, N, K, x, M, bias, y, shift);
  else if (M <= 8) simt_kernel<T, 8><<<grid, block, 0, stream>>>(w, N, K, x, M, bias, y, shift);
  else simt_kernel<T, 16><<<grid, block, 0, stream>>>(w, N, K, x, M, bias, y, shift);
  return cudaGetLastError();
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
  if (kernel == kGemvAuto) kernel = has_mma ? kGemvMma : kGemvSimt;
  if (kernel == kGemvSimt) return launch_simt(w, N, K, x, m, bias, y, stream);
  if constexpr (has_mma) {
    if (kernel == kGemvMma) {
      if (m <= 8) launch_mma<T, 1>(w, N, K, x, m, bias, y, stream);
      else if (m <= 16) launch_mma<T, 2>(w, N, K, x, m, bias, y, stream);
      else if (m <= 32) launch_mma<T, 4>(w, N, K, x, m, bias, y, stream);
      else launch_mma<T, 8>(w, N, K, x, m, bias, y, stream);
      return cudaGetLastError();
    }
    if (kernel == kGemvMmaStaged || kernel == kGemvMmaStaged2) {
      if (kernel == kGemvMmaStaged2 && m > kCudaStaged2MaxRows) return cudaErrorInvalidValue;
      const bool two = kernel == kGemvMmaStaged2;
      if (m <= 8) launch_staged<T, 1>(w, N, K, x, m, bias, y, two, stream);
      else if (m <= 16) launch_staged<T, 2>(w, N, K, x, m, bias, y, two, stream);
      else if (m <= 32) launch_staged<T, 4>(w, N, K, x, m, bias, y, false, stream);
      else launch_staged<T, 8>(w, N, K, x, m, bias, y, false, stream);
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
