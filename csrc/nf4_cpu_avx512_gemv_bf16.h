// The NF4 GEMV of bf16 x on 64-element groups (blocksize % 64 == 0), included twice by
// nf4_cpu_avx512.cpp: with LOWRANK_GEMV_BF16_DOT 1 under an AVX512_BF16 target (namespace
// avx512bf16: vdpbf16ps), with 0 under the plain AVX-512 target (avx512::bf16words, behind
// avx512::gemv_bf16: bf16 weights and x widened to float32 exactly, then FMA). The Notes it cites are in that
// file. No include guard on purpose; nothing else includes it.
//
//   y[M, N] = x[M, K] @ W[N, K]^T + bias[N]       (float32 sums, W rounded to bf16 as the reference)

#if !LOWRANK_GEMV_BF16_DOT
// Note: widening bf16 words. A bf16 value is the high half of its float32, so the dword lane i
// of a vector of 32 bf16 words gives word 2i as float32 by a shift left of 16 and word 2i + 1 by
// masking the low half: exact, and in the lane order of vdpbf16ps (which pairs words 2i, 2i + 1).
inline __m512 low_word(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 high_word(__m512i v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u)))); }
#endif

#if LOWRANK_GEMV_BF16_DOT
// Lanes whose scale is nonzero and below scale_min in magnitude (See Note: subnormals).
inline __mmask16 too_small(__m512 s, float scale_min) {
  const __m512 a = _mm512_abs_ps(s);
  return _mm512_cmp_ps_mask(a, _mm512_set1_ps(scale_min), _CMP_LT_OQ) &
         _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_OQ);
}

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }
#endif

// Note: tiles. NR rows of W at a time times MT rows of x (MT <= 4, tiles of 4 rows of x), SETS
// sums each. vdpbf16ps has a latency of ~1.5 ns here and several issue per ns, so 8 to 16
// independent sums are needed: M = 1 runs 4 rows of W with 2 sums each (high and low nibbles),
// M = 2 likewise (16 sums), M = 3, 4 with 1 sum each (12, 16 sums). Each group of x is loaded
// once per NR rows of W (x is 8 KiB a row for K = 4096: with 8 rows of x and 1 row of W a tile
// ran from L2 at 1.5 ms for M = 16, against 1.0 ms in tiles of 4 x 4). The codebooks, sums
// and decoded weights fit the 32 zmm registers. Sums are indexed by constants only, with the
// small loops unrolled by pragma, or GCC keeps them in memory (0.39 ms instead of 0.21 at M = 1).
// vpermw reads bits 0..4 of a word: with the table's 16 words twice, a zero-extended byte indexes
// its low nibble's weight as it is, one mask less for every 64 weights of a row.
constexpr bool kLowNibble = LOWRANK_GEMV_BF16_DOT;

template <int MT, int NR, int SETS>
bool gemv_rows(const NF4View& w, int64_t N, int64_t K, const uint16_t* xb, const float* bias, float* y, int64_t n0,
               int64_t n1, float scale_min) {
  const __m512 nf4 = _mm512_load_ps(kNF4);
  const __m512i nibble = _mm512_set1_epi16(0x0F);
  const int64_t nblocks = K / w.blocksize, groups = w.blocksize / 64;  // groups of 64 elements a block
  for (int64_t n = n0; n + NR <= n1; n += NR) {
    __m512 acc[NR][MT][SETS];
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r)
      _Pragma("GCC unroll 16") for (int m = 0; m < MT; ++m) {
        acc[r][m][0] = _mm512_setzero_ps();
        acc[r][m][SETS - 1] = _mm512_setzero_ps();
      }
    // One loop over the 64-element groups of the row (a nested loop over the groups of a block
    // made GCC keep the sums in memory); a block's codebooks are made at its first group.
    alignas(64) float scale[NR][16];
    __m512i table[NR];
    for (int64_t g = 0, i = -1, next = 0; g < K / 64; ++g) {
      if (g == next) {  // the first group of block i (a counter: no division in the loop)
        ++i;
        next += groups;
        if (i % 16 == 0) {
          _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {
            const __m512 s = scales16(w, (n + r) * nblocks + i, nblocks - i);
#if LOWRANK_GEMV_BF16_DOT
            if (too_small(s, scale_min)) return false;  // See Note: subnormals
#endif
            _mm512_store_ps(scale[r], s);
          }
        }
        _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {  // See Note: decoding to bfloat16
          const __m512 codebook = _mm512_mul_ps(nf4, _mm512_set1_ps(scale[r][i % 16]));
#if LOWRANK_GEMV_BF16_DOT
          // the 16 words twice (words 16..31 as 0..15): a byte's bit 4 may then stay in the index (See kLowNibble)
          table[r] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(codebook, codebook));
#else
          table[r] = _mm512_castsi256_si512(avx512::to_bf16(codebook));  // exact, NaN as torch; words 16..31 unused
#endif
        }
      }
      if (g % 2 == 0)  // See Note: prefetching the next rows (nf4_cpu.h): a cache line is 2 groups of a row
        _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w.packed + (n + NR + r) * (K / 2) + 32 * g), _MM_HINT_T0);
      const uint16_t* x = xb + 64 * g;
      __m512i w_hi[NR], w_lo[NR];  // 32 bytes of each row: 64 elements, one group of x
      _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {
        const uint8_t* p = w.packed + (n + r) * (K / 2) + 32 * g;
        const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        w_hi[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table[r]);     // even elements
        w_lo[r] = _mm512_permutexvar_epi16(kLowNibble ? bytes : _mm512_and_si512(bytes, nibble), table[r]);  // odd elements
      }
      _Pragma("GCC unroll 16") for (int m = 0; m < MT; ++m) {  // each group of x is loaded once
#if LOWRANK_GEMV_BF16_DOT
        const __m512bh x_even = as_bh(_mm512_loadu_si512(x + m * K)), x_odd = as_bh(_mm512_loadu_si512(x + m * K + 32));
        _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {
          acc[r][m][0] = _mm512_dpbf16_ps(acc[r][m][0], as_bh(w_hi[r]), x_even);
          acc[r][m][SETS - 1] = _mm512_dpbf16_ps(acc[r][m][SETS - 1], as_bh(w_lo[r]), x_odd);
        }
#else
        // See Note: widening bf16 words. Lane i: word 2i by a shift, word 2i + 1 by a mask.
        const __m512i x_even = _mm512_loadu_si512(x + m * K), x_odd = _mm512_loadu_si512(x + m * K + 32);
        _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {
          acc[r][m][0] = _mm512_fmadd_ps(low_word(w_hi[r]), low_word(x_even), acc[r][m][0]);
          acc[r][m][0] = _mm512_fmadd_ps(high_word(w_hi[r]), high_word(x_even), acc[r][m][0]);
          acc[r][m][SETS - 1] = _mm512_fmadd_ps(low_word(w_lo[r]), low_word(x_odd), acc[r][m][SETS - 1]);
          acc[r][m][SETS - 1] = _mm512_fmadd_ps(high_word(w_lo[r]), high_word(x_odd), acc[r][m][SETS - 1]);
        }
#endif
      }
    }
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r)
      _Pragma("GCC unroll 16") for (int m = 0; m < MT; ++m) {
        const __m512 sum = SETS == 2 ? _mm512_add_ps(acc[r][m][0], acc[r][m][SETS - 1]) : acc[r][m][0];
        const float total = _mm512_reduce_add_ps(sum);
        y[m * N + n + r] = bias ? total + bias[n + r] : total;
      }
  }
  return true;
}

template <int MT>  // MT <= 4
bool gemv_tile(const NF4View& w, int64_t N, int64_t K, const uint16_t* xb, int64_t M, const float* bias, float* y,
               int64_t n0, int64_t n1, float scale_min) {
  if constexpr (MT > 1) {
    if (M < MT) return gemv_tile<MT - 1>(w, N, K, xb, M, bias, y, n0, n1, scale_min);
  }
  // See Note: tiles. SETS: 2 sums per (row of W, row of x) up to 8 pairs, then 1.
  // Widened (no BF16), 4 x 3 and 4 x 4 spilled 46 times: 2 rows of W there.
  constexpr int NR = LOWRANK_GEMV_BF16_DOT || MT <= 2 ? 4 : 2;
  constexpr int SETS = MT * NR <= 8 ? 2 : 1;
  const int64_t whole = n0 + (n1 - n0) / NR * NR;
  if (!gemv_rows<MT, NR, SETS>(w, N, K, xb, bias, y, n0, whole, scale_min)) return false;
  return gemv_rows<MT, 1, 2>(w, N, K, xb, bias, y, whole, n1, scale_min);
}

bool gemv_all(const NF4View& w, int64_t N, int64_t K, const uint16_t* xb, int64_t M, const float* bias, float* y,
              int64_t n0, int64_t n1, float scale_min) {
  // Rows of x in tiles of 4 (See Note: tiles); a tile after the first decodes the same 16 rows
  // of W again, from L1.
  for (int64_t r0 = n0; r0 < n1; r0 += 16) {
    const int64_t r1 = r0 + 16 < n1 ? r0 + 16 : n1;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mt = M - m0 < 4 ? M - m0 : 4;
      if (!gemv_tile<4>(w, N, K, xb + m0 * K, mt, bias, y + m0 * N, r0, r1, scale_min)) return false;
    }
  }
  return true;
}

