// AVX-512 NF4 kernels (AVX512F/BW/VL): full blocks only, nf4_cpu.cpp does the rest.
//
//   out[i] = NF4[code(i)] * scale[i / blocksize]        (dequantize, bit-exact, see nf4_common.h)
//   y[M, N] = x[M, K] @ W[N, K]^T + bias[N]             (gemv, float32, M <= 16)
//
// and, at the end of the file, the GEMV of bf16 x with AVX512_BF16 (namespace avx512bf16).
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
#include "nf4_cpu_target.h"
#if defined(__clang__)
#include <immintrin.h>
LOWRANK_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
// GCC 12 warns about its own intrinsics (the undefined first operand of a zero-extend).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

#include "nf4_cpu.h"

namespace lowrank::avx512 {
namespace {

// kDynamic[q] for 16 codes q (0..255) without a gather (a zmm gather took ~5 ns on the EPYC of
// docs/csrc.md, 40% of the GEMV): vpermt2ps looks up 32 entries at a time, bits 5..7 of q pick
// which lookup each lane keeps. Pure lookups: the values are the table's bit for bit.
inline __m512 dynamic16(__m512i q) {
  const __m512i high = _mm512_srli_epi32(q, 5);
  __m512 r = _mm512_permutex2var_ps(_mm512_load_ps(kDynamic), q, _mm512_load_ps(kDynamic + 16));
  for (int h = 1; h < 8; ++h) {
    const __m512 v = _mm512_permutex2var_ps(_mm512_load_ps(kDynamic + 32 * h), q, _mm512_load_ps(kDynamic + 32 * h + 16));
    r = _mm512_mask_mov_ps(r, _mm512_cmpeq_epi32_mask(high, _mm512_set1_epi32(h)), v);
  }
  return r;
}

// The scales of the `count` (1..16) blocks from block b, as block_scale computes them: the two
// float32 roundings of the contract are the separate multiply and add below (-ffp-contract=off).
// The 16 blocks span at most two nested blocks of 256: two broadcasts and a blend, no gather.
inline __m512 scales16(const NF4View& w, int64_t b, int64_t count) {
  const __mmask16 mask = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  if (w.nested == nullptr) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w.absmax) + b);
  const __m512 code = dynamic16(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, static_cast<const uint8_t*>(w.absmax) + b)));
  const int64_t first = b / kNestedBlocksize, last = (b + (count >= 16 ? 16 : count) - 1) / kNestedBlocksize;
  __m512 nested = _mm512_set1_ps(w.nested[first]);
  if (last != first) {  // lanes from block (first + 1) * 256 on
    const __m512i block = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b - first * kNestedBlocksize)),
                                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __mmask16 second = _mm512_cmpge_epi32_mask(block, _mm512_set1_epi32(kNestedBlocksize));
    nested = _mm512_mask_mov_ps(nested, second, _mm512_set1_ps(w.nested[last]));
  }
  return _mm512_maskz_mov_ps(mask, _mm512_add_ps(_mm512_mul_ps(code, nested), _mm512_set1_ps(*w.offset)));
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

// Note: 16-bit outputs by word lookup. For bf16 and fp16 the block's 16 weights are rounded
// once (16 roundings a block instead of one per element) into the low 16 words of a zmm
// register, and vpermw turns 32 codes into 32 finished outputs: 16 packed bytes are
// zero-extended to 16 dwords, and one vpternlogd puts the high nibble of byte j in word 2j and
// its low nibble in word 2j + 1 (element order). Same values as rounding each element: the
// rounding of a value does not depend on where it is stored.
template <OutType T>
void dequantize_blocks_16bit(const NF4View& w, void* out, int64_t b0, int64_t b1) {
  const __m512 nf4 = _mm512_load_ps(kNF4);
  const __m512i low_nibble_up = _mm512_set1_epi32(0x000F0000);
  const int64_t bs = w.blocksize;
  uint16_t* o = static_cast<uint16_t*>(out);
  alignas(64) float scale[16];
  for (int64_t b = b0; b < b1; ++b) {
    if ((b - b0) % 16 == 0) _mm512_store_ps(scale, scales16(w, b, b1 - b));
    const __m512 codebook = _mm512_mul_ps(nf4, _mm512_set1_ps(scale[(b - b0) % 16]));  // See Note: one register
    __m256i rounded;
    if constexpr (T == OutType::kBFloat16) {
      rounded = to_bf16(codebook);
    } else {
      rounded = _mm512_cvtps_ph(codebook, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m512i table = _mm512_castsi256_si512(rounded);  // words 16..31 are never indexed
    const uint8_t* p = w.packed + b * bs / 2;
    for (int64_t j = 0; j < bs / 2; j += 16) {  // 16 bytes -> 32 elements
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)));
      // word 2j: byte >> 4 (the dword's high bits are zero); word 2j + 1: byte & 0xF. A | (B & C).
      const __m512i idx = _mm512_ternarylogic_epi32(_mm512_srli_epi32(bytes, 4), _mm512_slli_epi32(bytes, 16), low_nibble_up, 0xF8);
      _mm512_storeu_si512(o + (b - b0) * bs + 2 * j, _mm512_permutexvar_epi16(idx, table));
    }
  }
}

template <OutType T>
void dequantize_blocks(const NF4View& w, void* out, int64_t b0, int64_t b1) {
  if constexpr (T != OutType::kFloat32) return dequantize_blocks_16bit<T>(w, out, b0, b1);
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
      store16<T>(out, (b - b0) * bs + 2 * j, v0);
      store16<T>(out, (b - b0) * bs + 2 * j + 16, v1);
    }
  }
}

// One 16-byte step of a row of W: 16 high-nibble weights (even k) and 16 low-nibble weights
// (odd k), each multiplied into MT rows of x (regrouped, see kGemvGroup) and summed.
template <int MT>
inline void gemv_step(const uint8_t* p, const float* x, int64_t K, __m512 codebook, __m512 (&acc)[MT][2]) {
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512 w_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), codebook);
  const __m512 w_lo = _mm512_permutexvar_ps(codes, codebook);  // vpermps reads bits 0..3 only: no mask
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
      // See Note: prefetching the next rows (nf4_cpu.h), once a cache line of the row. Not at M = 1: there
      // this kernel reads one row at a time, as one stream, and ran 8% slower with W warm (no faster cold).
      if (MT > 1 && k0 % 128 == 0)
        for (int64_t j = 0; j < (half > 64 ? half : 64); j += 64)
          _mm_prefetch(reinterpret_cast<const char*>(p + K / 2 + j), _MM_HINT_T0);
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

// The GEMV of bf16 x for AVX-512 without AVX512_BF16: the kernel of the section below with the
// bf16 weights and x widened to float32 (exact) and FMA instead of vdpbf16ps (which also needs
// no subnormal fallback). Same layout of x (nf4_gemv_pack_x_bf16).
namespace lowrank::avx512 {
namespace bf16words {
namespace {
#define LOWRANK_GEMV_BF16_DOT 0
#include "nf4_cpu_avx512_gemv_bf16.h"
#undef LOWRANK_GEMV_BF16_DOT
}  // namespace
}  // namespace bf16words

void gemv_bf16(const NF4View& w, int64_t N, int64_t K, const uint16_t* xb, int64_t M, const float* bias, float* y, int64_t n0,
               int64_t n1) {
  bf16words::gemv_all(w, N, K, xb, M, bias, y, n0, n1, 0.0f);  // never false: no scale check
}
}  // namespace lowrank::avx512

// ---------------------------------------------------------------------------------------------
// The GEMV of bf16 x with AVX512_BF16 (vdpbf16ps): y[M, N] = x[M, K] @ W[N, K]^T + bias[N] for
// blocksize % 64 == 0. Compiled for AVX-512 + BF16 (the pragma below), run only when the CPU
// has AVX512_BF16 too (Isa::kAvx512Bf16, nf4_cpu.cpp). It lives in this file because setup.py
// lists the sources.
//
// Note: decoding to bfloat16. The reference dequantizes W in x's dtype, so with bf16 x the
// operands are bf16(NF4[c] * scale): per block the 16 products NF4 * scale (float32, as
// nf4_common.h) are rounded to bf16 once (vcvtneps2bf16, round to nearest even) into the low
// 16 words of a zmm register, and vpermw turns 32 codes (one per 16-bit word) into 32 finished
// bf16 weights. 32 packed bytes -> 64 weights: 1 zero-extending load (vpmovzxbw), a shift and a
// mask (high and low nibbles), 2 vpermw, and per row of x 2 vdpbf16ps (32 products each, summed
// in pairs into 16 float32 sums). x is regrouped per 64 elements as 32 even then 32 odd
// elements (nf4_gemv_pack_x_bf16), so the high and low nibbles meet their x without shuffles.
//
// Note: subnormals. vdpbf16ps and vcvtneps2bf16 treat subnormal inputs as zero and flush
// subnormal results (Intel SDM; unlike the FMA path, which follows MXCSR: no flushing). The
// products are exact and never subnormal when every nonzero |x| >= xmin (a normal number) and
// every nonzero |scale| >= scale_min = 2^-126 / (0.0625 * min(1, xmin)): the smallest nonzero
// |NF4| is code 8's 0.0796 (at least 0.0792 after the bf16 rounding; code 6's -0.0911 is the
// smallest negative), above 0.0625, so the weights and the products are normal.
// The caller checks x (nf4_gemv_pack_x_bf16); this kernel checks every scale and returns false,
// having written nothing it would keep, when one is below scale_min, and the caller then runs
// the FMA path. What remains: a sum of products that cancels to below 2^-126 (1.2e-38) is
// flushed to zero, an absolute error under 2^-126 in that output.
//
#if defined(__clang__)
LOWRANK_TARGET_POP()  // Clang's regions do not nest: the outer features would win
LOWRANK_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")
#endif
namespace lowrank::avx512bf16 {
namespace {

using avx512::scales16;

#define LOWRANK_GEMV_BF16_DOT 1
#include "nf4_cpu_avx512_gemv_bf16.h"
#undef LOWRANK_GEMV_BF16_DOT

}  // namespace
}  // namespace lowrank::avx512bf16
#if defined(__clang__)
LOWRANK_TARGET_POP()
LOWRANK_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#else
#pragma GCC pop_options
#endif

// Outside the pragma: a function declared in nf4_cpu.h must keep the file's target, or GCC
// would take the two for versions of one function.
bool lowrank::avx512bf16::gemv(const NF4View& w, int64_t N, int64_t K, const uint16_t* xb, int64_t M, const float* bias,
                               float* y, int64_t n0, int64_t n1, float scale_min) {
  return gemv_all(w, N, K, xb, M, bias, y, n0, n1, scale_min);
}
LOWRANK_TARGET_POP()
#endif  // x86-64
