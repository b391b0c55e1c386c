// AVX2 + FMA + F16C NF4 kernels: full blocks only, nf4_cpu.cpp does the rest.
//
//   out[i] = NF4[code(i)] * scale[i / blocksize]        (dequantize, bit-exact, see nf4_common.h)
//   y[M, N] = x[M, K] @ W[N, K]^T + bias[N]             (gemv, float32, M <= 16)
//
// Note: the codebook in two registers. vpermps on 8 floats picks with the low 3 bits of a
// code; the codebook's halves (times the block's scale) sit in two ymm registers and bit 3
// of the code, shifted into the sign bit, picks between the two lookups (vblendvps).
//
// Compiled for AVX2 whatever the compiler flags (the pragma below); runs only when the CPU
// has AVX2, FMA and F16C (nf4_cpu.cpp). No standard-library header is included here (see
// nf4_cpu_avx512.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#include "nf4_cpu_target.h"
#if defined(__clang__)
#include <immintrin.h>
LOWRANK_TARGET_PUSH("avx2,fma,f16c")
#else
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#endif

#include "nf4_cpu.h"

namespace lowrank::avx2 {
namespace {

struct Codebook {
  __m256 low, high;  // NF4[0..7] * scale, NF4[8..15] * scale
};

inline Codebook scaled_codebook(float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  return {_mm256_mul_ps(_mm256_load_ps(kNF4), s), _mm256_mul_ps(_mm256_load_ps(kNF4 + 8), s)};
}

inline __m256 lookup(__m256i codes, const Codebook& cb) {  // See Note: the codebook in two registers
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(cb.low, codes), _mm256_permutevar8x32_ps(cb.high, codes), bit3);
}

inline __m256i bf16_rounded(__m256 v) {  // 8 x int32 holding bf16 bits, as bf16_bits
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

// The codebook's values rounded to `type` and back (the weights as the reference holds them
// when it dequantizes W in x's dtype).
inline __m256 rounded_to(OutType type, __m256 v) {
  if (type == OutType::kFloat16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (type == OutType::kBFloat16) return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_rounded(v), 16));
  return v;
}

inline Codebook rounded_to(OutType type, Codebook cb) { return {rounded_to(type, cb.low), rounded_to(type, cb.high)}; }

template <OutType T>
inline void store16(void* out, int64_t i, __m256 v0, __m256 v1) {  // elements i .. i+15
  if constexpr (T == OutType::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(out) + i, v0);
    _mm256_storeu_ps(static_cast<float*>(out) + i + 8, v1);
  } else if constexpr (T == OutType::kFloat16) {
    const __m128i h0 = _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i h1 = _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), _mm256_set_m128i(h1, h0));
  } else {
    // packus works within 128-bit lanes: [v0 0..3, v1 0..3 | v0 4..7, v1 4..7]; the 64-bit
    // permute puts the four quarters back in order.
    const __m256i packed = _mm256_packus_epi32(bf16_rounded(v0), bf16_rounded(v1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                        _mm256_permute4x64_epi64(packed, 0xD8));
  }
}

template <OutType T>
void dequantize_blocks(const NF4View& w, void* out, int64_t b0, int64_t b1) {
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const int64_t bs = w.blocksize;
  for (int64_t b = b0; b < b1; ++b) {
    const Codebook cb = scaled_codebook(block_scale(w, b));
    const uint8_t* p = w.packed + b * bs / 2;
    for (int64_t j = 0; j < bs / 2; j += 8) {  // 8 bytes -> 16 elements
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j));
      const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), _mm_and_si128(bytes, nibble));
      const __m256 v0 = lookup(_mm256_cvtepu8_epi32(codes), cb);                     // elements 0..7
      const __m256 v1 = lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)), cb);  // elements 8..15
      store16<T>(out, (b - b0) * bs + 2 * j, v0, v1);
    }
  }
}

// One 8-byte step of a row of W: 8 high-nibble weights (even k) and 8 low-nibble weights (odd k)
// times MT rows of x. x points at this step's 8 even elements; the odd ones are 16 further on
// (the regrouping of kGemvGroup).
template <int MT>
inline void gemv_step(const uint8_t* p, const float* x, int64_t K, const Codebook& cb, __m256 (&acc)[MT][2]) {
  const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256 w_hi = lookup(_mm256_srli_epi32(codes, 4), cb);
  const __m256 w_lo = lookup(codes, cb);  // lookup reads bits 0..3 only: no mask
  for (int m = 0; m < MT; ++m) {
    acc[m][0] = _mm256_fmadd_ps(w_hi, _mm256_loadu_ps(x + m * K), acc[m][0]);
    acc[m][1] = _mm256_fmadd_ps(w_lo, _mm256_loadu_ps(x + m * K + 16), acc[m][1]);
  }
}

// Note: accumulators (AVX2). Two sums a row of x (high and low nibbles), and with MT == 1 a
// second set for the second 8 bytes of each 16; MT <= 4 keeps sums, codebook and temporaries
// within the 16 ymm registers. Sums are indexed by constants only.
template <int MT>
void gemv_rows(const NF4View& w, OutType wtype, int64_t N, int64_t K, const float* xd, const float* bias, float* y, int64_t n0,
               int64_t n1) {
  constexpr bool kTwoSets = MT == 1;
  const int64_t bs = w.blocksize, half = bs / 2;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MT][2], acc2[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = acc2[m][0] = acc2[m][1] = _mm256_setzero_ps();
    const uint8_t* row = w.packed + n * (K / 2);
    for (int64_t k0 = 0; k0 < K; k0 += bs) {
      const Codebook cb = rounded_to(wtype, scaled_codebook(block_scale(w, (n * K + k0) / bs)));
      const uint8_t* p = row + k0 / 2;
      if (k0 % 128 == 0)  // once a cache line of the row; See Note: prefetching the next rows (nf4_cpu.h)
        for (int64_t j = 0; j < (half > 64 ? half : 64); j += 64)
          _mm_prefetch(reinterpret_cast<const char*>(p + K / 2 + j), _MM_HINT_T0);
      const float* x = xd + k0;
      for (int64_t j = 0; j < half; j += 16) {  // 16 bytes: one group of 32 elements of x
        gemv_step<MT>(p + j, x + 2 * j, K, cb, acc);
        gemv_step<MT>(p + j + 8, x + 2 * j + 8, K, cb, kTwoSets ? acc2 : acc);
      }
    }
    for (int m = 0; m < MT; ++m) {
      __m256 sum = _mm256_add_ps(acc[m][0], acc[m][1]);
      if constexpr (kTwoSets) sum = _mm256_add_ps(sum, _mm256_add_ps(acc2[m][0], acc2[m][1]));
      const __m128 q = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
      const float total = _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
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
  // Rows of x in tiles of 4 (See Note: accumulators (AVX2)); 16 rows of W stay in L1 meanwhile.
  for (int64_t r0 = n0; r0 < n1; r0 += 16) {
    const int64_t r1 = r0 + 16 < n1 ? r0 + 16 : n1;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mt = M - m0 < 4 ? M - m0 : 4;
      gemv_tile<4>(w, wtype, N, K, xd + m0 * K, mt, bias, y + m0 * N, r0, r1);
    }
  }
}

}  // namespace lowrank::avx2
LOWRANK_TARGET_POP()
#endif  // x86-64
