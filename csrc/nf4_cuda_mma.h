// The tensor-core pieces the tensor-core GEMVs share (nf4_cuda_gemv.cu: kGemvMma,
// nf4_cuda_gemv_staged.cu: kGemvMmaStaged and kGemvMmaStaged2, nf4_cuda_gemv_lut.cu: kGemvMmaLut,
// which takes the mma step, the staging prologue and the reduction only): the lane layout (Note: the k
// permutation), one mma.sync step, the NF4 lookup and decode, a tile's eight steps, and the
// reduction of the warps' sums. Device code in an unnamed namespace: each .cu file compiles its
// own copy (no relocatable device code). Included by the .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "nf4_cuda.h"
#include "nf4_cuda_device.h"

namespace lowrank {
namespace {

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
#ifdef LOWRANK_CUDA_EMULATOR
    emu::mma_m16n8k16<kBf16>(d, a, b0, b1);
#else
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
#endif
  }
};

// v, as a value the compiler must take as produced here. The table lookups are asm loads without a
// memory clobber (so that the compiler keeps their two-instruction addresses and schedules them
// freely); nothing tells it that they read what the CTA wrote before its barrier, so their base
// address goes through this volatile asm, placed after the barrier: no lookup can be hoisted above.
__device__ __forceinline__ uint32_t after_barrier(uint32_t v) {
#ifndef LOWRANK_CUDA_EMULATOR
  asm volatile("mov.b32 %0, %0;" : "+r"(v));
#endif
  return v;
}

// The 16 NF4 values in shared memory, 64-byte aligned: the address of entry c is base | 4c, so
// one LOP3 both masks the code out of the packed word and adds the base, and a lookup is
// SHF + LOP3 + LDS (plain indexing costs an extra add of the base a weight).
__shared__ __align__(64) float s_nf4[16];

// The 32 bits at a shared-memory address: the table lookups' load (an asm load: See after_barrier).
__device__ __forceinline__ uint32_t lds32(uint32_t address) {
#ifdef LOWRANK_CUDA_EMULATOR
  return emu::lds32(address);
#else
  uint32_t v;
  asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address));
  return v;
#endif
}

// NF4[code] for the nibble at bits [shift, shift + 4) of word ((word >> (shift - 2)) & 0x3C is 4 x code).
__device__ __forceinline__ float nf4_at(uint32_t word, int shift, uint32_t base) {
  return __uint_as_float(lds32(((shift >= 2 ? word >> (shift - 2) : word << 2) & 0x3C) | base));
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

// The warps' partial sums of the CTA's rows of W, added in warp order (deterministic), plus the bias,
// to y. Each warp holds RT row tiles (16 rows each); with RTW > 1 the CTA has RTW groups of them
// (warp w holds group w % RTW) and the WARPS / RTW warps of a group (which split K) add up; with
// RTW = 1 all warps hold the same RT row tiles. partial: WARPS * RT * MT * 4 * 32 floats of shared memory.
//   D[n][m] of row tile rt and n8 tile j: c0 = (16 rt + g, 2t), c1 = (16 rt + g, 2t+1), c2 / c3 the
//   same for row 16 rt + g + 8.
template <typename T, int MT, int RT = 1, int WARPS = kMmaWarps, int RTW = 1>
__device__ __forceinline__ void reduce_store(float* partial, const float (&acc)[RT][MT][4], int64_t row0, int64_t N,
                                             int M, const T* __restrict__ bias, T* __restrict__ y) {
  static_assert(WARPS % RTW == 0, "the row-tile groups split the warps evenly");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kSlots = RT * MT * 4 * 32;  // floats a warp leaves
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp * kSlots + ((rt * MT + j) * 4 + i) * 32 + lane] = acc[rt][j][i];
  __syncthreads();
  for (int slot = threadIdx.x; slot < RTW * kSlots; slot += WARPS * 32) {
    const int group = RTW == 1 ? 0 : slot / kSlots, own = RTW == 1 ? slot : slot % kSlots;
    const int rji = own / 32, l = own % 32;
    const int rt = rji / (4 * MT), j = rji / 4 % MT, i = rji % 4;
    const int64_t n = row0 + 16 * (group * RT + rt) + l / 4 + (i >= 2 ? 8 : 0);
    const int m = 8 * j + 2 * (l % 4) + (i % 2);
    if (n >= N || m >= M) continue;
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < WARPS / RTW; ++v) sum += partial[(v * RTW + group) * kSlots + own];
    if (bias != nullptr) sum += to_float(bias[n]);
    y[m * N + n] = from_float<T>(sum);
  }
}

// The prologue of the kernels that stage their block scales (Note: staged scales, in
// nf4_cuda_gemv_staged.cu): staged[i] = the scale of block block_of(i) of W, for i in [0, n), all of
// a thread's loads issued before it waits for any. `dynamic` is the dynamic map in shared memory,
// which the CTA's threads are writing when they call this: its first barrier is here (n >= 1).
constexpr int kStagedLoads = 8;  // scales a thread loads at once (one round up to K = 16384 at blocksize 64)

template <int THREADS, typename BlockOf>
__device__ __forceinline__ void stage_scales(float* staged, const float* dynamic, const NF4View& w, int n,
                                             BlockOf block_of) {
  static_assert(kNestedBlocksize == 256, "the nested scale of block b is b >> 8");
  const bool nested = w.nested != nullptr;
  const float offset = nested ? __ldg(w.offset) : 0.0f;
  for (int i0 = 0; i0 < n; i0 += kStagedLoads * THREADS) {
    uint32_t q[kStagedLoads];  // scale codes, or float32 scales' bits
    float nested_scale[kStagedLoads];
#pragma unroll
    for (int p = 0; p < kStagedLoads; ++p) {
      const int i = i0 + p * THREADS + threadIdx.x;
      const int64_t b = block_of(i < n ? i : n - 1);
      q[p] = nested ? __ldg(static_cast<const uint8_t*>(w.absmax) + b)
                    : __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + b));
      nested_scale[p] = nested ? __ldg(w.nested + (b >> 8)) : 0.0f;
    }
    if (i0 == 0) __syncthreads();  // the dynamic map is in place (i0 is the same for every thread)
#pragma unroll
    for (int p = 0; p < kStagedLoads; ++p) {
      const int i = i0 + p * THREADS + threadIdx.x;
      if (i < n) staged[i] = nested ? __fadd_rn(__fmul_rn(dynamic[q[p]], nested_scale[p]), offset)  // no FMA
                                       : __uint_as_float(q[p]);
    }
  }
}

}  // namespace

// nf4_cuda_gemv_staged.cu: runs kGemvMmaStaged (two_tiles false) or kGemvMmaStaged2 (true, M <= 16)
// for T = __half or __nv_bfloat16; false when its scales do not fit in shared memory (the caller
// then runs kGemvMma), and launches nothing.
template <typename T>
bool launch_staged(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y, bool two_tiles,
                   cudaStream_t stream);

// nf4_cuda_gemv_lut.cu: runs kGemvMmaLut (deep: kGemvMmaLutDeep) for T = __half or __nv_bfloat16; false
// when it cannot (K % 64 != 0, blocksize 32, scales over its shared memory: the caller then runs
// kGemvMmaStaged), and launches nothing.
template <typename T>
bool launch_lut(const NF4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y, bool deep,
                cudaStream_t stream);

}  // namespace lowrank
