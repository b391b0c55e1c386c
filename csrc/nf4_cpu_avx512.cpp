// AVX-512 NF4 kernels (AVX512F/BW/VL): full blocks only, nf4_cpu.cpp does the rest.
//
//   out[i] = NF4[code(i)] * scale[i / blocksize]        (dequantize, bit-exact, see nf4_common.h)
//   y[M, N] = x[M, K] @ W[N, K]^T + bias[N]             (gemv, float32, M <= 16)
//
// Note: one register holds the codebook. The 16 NF4 values fit one zmm register; per block it
// is multiplied by the block's scale once (16 exact float32 products, the same roundings as
// NF4[c] * scale element by element), and vpermps then turns 16 codes into 16 finished
// weights in one instruction. 16 packed bytes -> 32 weights: 1 load, 2 zero-extends (or a
// shift and a mask), 2 permutes.
//
// This file is compiled for AVX-512 whatever the compiler flags (the pragma below) and runs
// only when the CPU has it (nf4_cpu.cpp). It includes no standard-library header that could
// emit an inline function compiled for AVX-512 for the rest of the program to share.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
// GCC 12 warns about its own intrinsics (the undefined first operand of a zero-extend).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "nf4_cpu.h"

namespace lowrank::avx512 {
namespace {

// The scales of the `count` (1..16) blocks from block b, as block_scale computes them: the two
// float32 roundings of the contract are the separate multiply and add below (-ffp-contract=off).
inline __m512 scales16(const NF4View& w, int64_t b, int64_t count) {
  const __mmask16 mask = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  if (w.nested == nullptr) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w.absmax) + b);
  const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, static_cast<const uint8_t*>(w.absmax) + b));
  const __m512 code = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, q, kDynamic, 4);
  const __m512i block = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i outer = _mm512_srli_epi32(block, 8);  // b / kNestedBlocksize
  const __m512 nested = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, outer, w.nested, 4);
  return _mm512_add_ps(_mm512_mul_ps(code, nested), _mm512_set1_ps(*w.offset));
}

// 32 weights of one block, in element order, from 16 packed bytes.
inline void decode32(const uint8_t* p, __m512 codebook, __m512& v0, __m512& v1) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
  const __m128i lo = _mm_and_si128(bytes, nibble);
  v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), codebook);  // elements 0..15
  v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), codebook);  // elements 16..31
}

inline __m256i to_bf16(__m512 v) {  // round to nearest even, NaN -> 0x7FC0 (as bf16_bits)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// The codebook's values rounded to `type` and back: the weights as the reference holds them
// when it dequantizes W in x's dtype.
inline __m512 rounded_to(OutType type, __m512 v) {
  if (type == OutType::kFloat16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (type == OutType::kBFloat16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
  return v;
}

template <OutType T>
inline void store16(void* out, int64_t i, __m512 v) {
  if constexpr (T == OutType::kFloat32) {
    _mm512_storeu_ps(static_cast<float*>(out) + i, v);
  } else if constexpr (T == OutType::kFloat16) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), h);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), to_bf16(v));
  }
}

template <OutType T>
void dequantize_blocks(const NF4View& w, void* out, int64_t b0, int64_t b1) {
  const __m512 nf4 = _mm512_load_ps(kNF4);
  const int64_t bs = w.blocksize;
  alignas(64) float scale[16];
  for (int64_t b = b0; b < b1; ++b) {
    if ((b - b0) % 16 == 0) _mm512_store_ps(scale, scales16(w, b, b1 - b));
    const __m512 codebook = _mm512_mul_ps(nf4, _mm512_set1_ps(scale[(b - b0) % 16]));  // See Note: one register
    const uint8_t* p = w.packed + b * bs / 2;
    for (int64_t j = 0; j < bs / 2; j += 16) {  // 16 bytes -> 32 elements
      __m512 v0, v1;
      decode32(p + j, codebook, v0, v1);
      store16<T>(out, b * bs + 2 * j, v0);
      store16<T>(out, b * bs + 2 * j + 16, v1);
    }
  }
}

// One 16-byte step of a row of W: 16 high-nibble weights (even k) and 16 low-nibble weights
// (odd k), each multiplied into MT rows of x (regrouped, see kGemvGroup) and summed.
template <int MT>
inline void gemv_step(const uint8_t* p, const float* x, int64_t K, __m512 codebook, __m512 (&acc)[MT][2]) {
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512 w_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), codebook);
  const __m512 w_lo = _mm512_permutexvar_ps(_mm512_and_si512(codes, _mm512_set1_epi32(0x0F)), codebook);
  for (int m = 0; m < MT; ++m) {
    acc[m][0] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(x + m * K), acc[m][0]);
    acc[m][1] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(x + m * K + 16), acc[m][1]);
  }
}

// Note: accumulators. An FMA takes 4 cycles and 2 issue per cycle, so 8 independent sums keep
// the units busy. Each row of x has two (high and low nibbles); with MT <= 2 rows a second set
// takes every other step. MT <= 8 keeps the 2 * MT sums, the codebook and the decoded weights
// within the 32 zmm registers. Sums are indexed by constants only, or they would live in memory.
template <int MT>
void gemv_rows(const NF4View& w, OutType wtype, int64_t N, int64_t K, const float* xd, const float* bias, float* y, int64_t n0,
               int64_t n1) {
  constexpr bool kTwoSets = MT <= 2;
  const __m512 nf4 = _mm512_load_ps(kNF4);
  const int64_t bs = w.blocksize, half = bs / 2;  // half: bytes a block
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MT][2], acc2[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = acc2[m][0] = acc2[m][1] = _mm512_setzero_ps();
    const uint8_t* row = w.packed + n * (K / 2);
    const int64_t row_block = n * (K / bs);
    alignas(64) float scale[16];
    for (int64_t k0 = 0; k0 < K; k0 += bs) {
      const int64_t i = k0 / bs;
      if (i % 16 == 0) _mm512_store_ps(scale, scales16(w, row_block + i, K / bs - i));
      // See Note: one register holds the codebook.
      const __m512 codebook = rounded_to(wtype, _mm512_mul_ps(nf4, _mm512_set1_ps(scale[i % 16])));
      const uint8_t* p = row + k0 / 2;
      const float* x = xd + k0;  // byte j of the block pairs with the group at x + 2 * (j & ~15)
      int64_t j = 0;
      if constexpr (kTwoSets) {
        for (; j + 32 <= half; j += 32) {
          gemv_step<MT>(p + j, x + 2 * j, K, codebook, acc);
          gemv_step<MT>(p + j + 16, x + 2 * j + 32, K, codebook, acc2);
        }
      }
      for (; j < half; j += 16) gemv_step<MT>(p + j, x + 2 * j, K, codebook, acc);
    }
    for (int m = 0; m < MT; ++m) {
      __m512 sum = _mm512_add_ps(acc[m][0], acc[m][1]);
      if constexpr (kTwoSets) sum = _mm512_add_ps(sum, _mm512_add_ps(acc2[m][0], acc2[m][1]));
      const float total = _mm512_reduce_add_ps(sum);
      y[m * N + n] = bias ? total + bias[n] : total;
    }
  }
}

template <int MT>
void gemv_tile(const NF4View& w, OutType wtype, int64_t N, int64_t K, const float* xd, int64_t M, const float* bias, float* y,
               int64_t n0, int64_t n1) {
  if constexpr (MT > 1) {
    if (M < MT) return gemv_tile<MT - 1>(w, wtype, N, K, xd, M, bias, y, n0, n1);
  }
  gemv_rows<MT>(w, wtype, N, K, xd, bias, y, n0, n1);
}

}  // namespace

void dequantize(const NF4View& w, OutType type, void* out, int64_t b0, int64_t b1) {
  switch (type) {
    case OutType::kFloat32: return dequantize_blocks<OutType::kFloat32>(w, out, b0, b1);
    case OutType::kFloat16: return dequantize_blocks<OutType::kFloat16>(w, out, b0, b1);
    case OutType::kBFloat16: return dequantize_blocks<OutType::kBFloat16>(w, out, b0, b1);
  }
}

void gemv(const NF4View& w, OutType wtype, int64_t N, int64_t K, const float* xd, int64_t M, const float* bias, float* y,
          int64_t n0, int64_t n1) {
  // Rows of x in tiles of 8 (See Note: accumulators). A tile after the first decodes the same
  // 16 rows of W again, from L1.
  for (int64_t r0 = n0; r0 < n1; r0 += 16) {
    const int64_t r1 = r0 + 16 < n1 ? r0 + 16 : n1;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mt = M - m0 < 8 ? M - m0 : 8;
      gemv_tile<8>(w, wtype, N, K, xd + m0 * K, mt, bias, y + m0 * N, r0, r1);
    }
  }
}

}  // namespace lowrank::avx512
#endif  // x86-64
