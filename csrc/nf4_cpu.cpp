// Portable C++ NF4 kernels and the run-time choice of instruction set.
//
//   out[i] = NF4[code(i)] * scale[i / blocksize]           (dequantize, see nf4_common.h)
//   y[M, N] = x[M, K] @ W[N, K]^T + bias[N]                (gemv, float32)
//
// The vector kernels (nf4_cpu_avx2.cpp, nf4_cpu_avx512.cpp) take the full blocks; this file
// takes the short last block, odd element counts, and every CPU without AVX2.
#include "nf4_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

namespace lowrank {
namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float32 -> IEEE binary16 bits, round to nearest even, subnormals kept, NaN -> quiet NaN.
// Note: the float32 arithmetic does the rounding. Multiplying |f| by 2^112 and then 2^-110
// overflows exactly what binary16 cannot hold; adding a power of two whose ulp equals the
// binary16 ulp at f's exponent (at least 2^-24, the subnormal ulp) makes the float32 adder
// round to nearest even at that ulp. Same method as the FP16 library (M. Dukhan).
uint16_t fp16_bits(float f) {
  float base = (std::abs(f) * 0x1p+112f) * 0x1p-110f;
  const uint32_t w = bits_of(f);
  const uint32_t shl1 = w + w;  // drops the sign
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1 & 0xFF000000u, 0x71000000u);
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_of(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign));
}

// binary16 bits -> float32, exactly (every binary16 value is a float32).
float fp16_value(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1F) return float_of(sign | 0x7F800000u | (mant << 13));  // inf, NaN
  if (exp == 0) return std::copysign(static_cast<float>(mant) * 0x1p-24f, sign ? -1.0f : 1.0f);  // 0, subnormal
  return float_of(sign | ((exp + 112) << 23) | (mant << 13));
}

// The weight as the reference holds it: dequantized in x's dtype (See nf4_cpu.h, gemv).
float rounded_to(OutType type, float v) {
  switch (type) {
    case OutType::kFloat16: return fp16_value(fp16_bits(v));
    case OutType::kBFloat16: return float_of(static_cast<uint32_t>(bf16_bits(v)) << 16);
    default: return v;
  }
}

int code_at(const uint8_t* packed, int64_t i) {
  const uint8_t byte = packed[i / 2];
  return (i % 2 == 0) ? (byte >> 4) : (byte & 0x0F);  // first element in the high nibble
}

// Block b into out, whose element 0 is element `first` of W.
void dequantize_block(const NF4View& w, OutType type, void* out, int64_t first, int64_t b) {
  const float s = block_scale(w, b);
  const int64_t start = b * w.blocksize, stop = std::min(start + w.blocksize, w.numel);
  for (int64_t i = start; i < stop; ++i) {
    const float v = kNF4[code_at(w.packed, i)] * s;
    switch (type) {
      case OutType::kFloat32: static_cast<float*>(out)[i - first] = v; break;
      case OutType::kFloat16: static_cast<uint16_t*>(out)[i - first] = fp16_bits(v); break;
      case OutType::kBFloat16: static_cast<uint16_t*>(out)[i - first] = bf16_bits(v); break;
    }
  }
}

// Position of element r (0..31) of a group in the regrouped x (see kGemvGroup).
int64_t grouped(int64_t k) {
  const int64_t r = k % kGemvGroup;
  return k - r + (r % 2 == 0 ? r / 2 : kGemvGroup / 2 + r / 2);
}

void gemv_scalar(const NF4View& w, OutType wtype, int64_t N, int64_t K, const float* xd, int64_t M, const float* bias, float* y,
                 int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xd + m * K;
      float acc = 0.0f;
      for (int64_t k0 = 0; k0 < K; k0 += w.blocksize) {
        const float s = block_scale(w, (n * K + k0) / w.blocksize);
        for (int64_t k = k0; k < k0 + w.blocksize; ++k) {
          const float wk = rounded_to(wtype, kNF4[code_at(w.packed, n * K + k)] * s);
          acc += wk * xm[grouped(k)];
        }
      }
      y[m * N + n] = bias ? acc + bias[n] : acc;
    }
  }
}

#if defined(__x86_64__) || defined(_M_X64)
// F16C from CPUID leaf 1 (ECX bit 29): Clang's __builtin_cpu_supports does not know "f16c".
bool has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

Isa detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

const Isa kBest = detect();
std::atomic<int> g_isa{static_cast<int>(kBest)};

}  // namespace

Isa best_isa() { return kBest; }
Isa current_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

bool set_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(kBest)) return false;
  g_isa.store(static_cast<int>(isa));
  return true;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

void nf4_dequantize_cpu_from(const NF4View& w, OutType type, void* out, int64_t b0, int64_t b1) {
  const Isa isa = current_isa();
  // The vector kernels take whole blocks of 32k elements; the short last block stays here.
  int64_t vec_end = b0;
  if (isa != Isa::kScalar && w.blocksize % 32 == 0) vec_end = std::max(b0, std::min(b1, w.numel / w.blocksize));
#if defined(__x86_64__) || defined(_M_X64)
  if (vec_end > b0 && isa >= Isa::kAvx512) avx512::dequantize(w, type, out, b0, vec_end);
  if (vec_end > b0 && isa == Isa::kAvx2) avx2::dequantize(w, type, out, b0, vec_end);
#endif
  for (int64_t b = vec_end; b < b1; ++b) dequantize_block(w, type, out, b0 * w.blocksize, b);
}

void nf4_gemv_pack_x(const float* x, int64_t M, int64_t K, float* xd) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xd[m * K + grouped(k)] = x[m * K + k];
}

void nf4_gemv_cpu(const NF4View& w, OutType wtype, int64_t N, int64_t K, const float* xd, int64_t M, const float* bias,
                  float* y, int64_t n0, int64_t n1) {
  const Isa isa = current_isa();
  const bool vectorizable = w.blocksize % 32 == 0;  // K % blocksize == 0 is the caller's contract
#if defined(__x86_64__) || defined(_M_X64)
  if (vectorizable && isa >= Isa::kAvx512) return avx512::gemv(w, wtype, N, K, xd, M, bias, y, n0, n1);
  if (vectorizable && isa == Isa::kAvx2) return avx2::gemv(w, wtype, N, K, xd, M, bias, y, n0, n1);
#endif
  (void)vectorizable;
  (void)isa;
  gemv_scalar(w, wtype, N, K, xd, M, bias, y, n0, n1);
}

bool nf4_gemv_bf16_covers(const NF4View& w) { return current_isa() >= Isa::kAvx512 && w.blocksize % 64 == 0; }

float nf4_gemv_pack_x_bf16(const uint16_t* x, int64_t M, int64_t K, uint16_t* xb) {
  uint16_t smallest = 0x7F80;  // |x| bits: the least nonzero one (inf when x is all zeros)
  bool subnormal = false;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const uint16_t v = x[m * K + k], a = v & 0x7FFF;
      const int64_t r = k % 64;  // 32 even elements of the group, then its 32 odd ones
      xb[m * K + k - r + (r % 2 == 0 ? r / 2 : 32 + r / 2)] = v;
      if (a != 0 && a < smallest) smallest = a;
      subnormal |= a != 0 && a < 0x0080;
    }
  if (subnormal) return -1.0f;
  // See Note: subnormals (nf4_cpu_avx512.cpp): scale_min = 2^-122 / min(1, xmin) = 2^-126 / (0.0625 * min(1, xmin)).
  const float xmin = std::min(1.0f, float_of(static_cast<uint32_t>(smallest) << 16));
  return 0x1p-122f / xmin;
}

bool nf4_gemv_bf16_cpu(const NF4View& w, int64_t N, int64_t K, const uint16_t* xb, int64_t M, const float* bias, float* y,
                       int64_t n0, int64_t n1, float scale_min) {
#if defined(__x86_64__) || defined(_M_X64)
  if (current_isa() == Isa::kAvx512) {  // no vdpbf16ps: widened to float32, FMA, nothing flushed
    avx512::gemv_bf16(w, N, K, xb, M, bias, y, n0, n1);
    return true;
  }
  return avx512bf16::gemv(w, N, K, xb, M, bias, y, n0, n1, scale_min);
#else
  return false;
#endif
}

}  // namespace lowrank
