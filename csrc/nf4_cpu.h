// CPU kernels for NF4 weights: dequantize, and the skinny matrix product y = x @ W^T for M <= 16.
//
//   dequantize:  out[i] = NF4[code(i)] * scale[i / blocksize]  for the blocks [b0, b1), rounded once
//                to float32 / float16 / bfloat16 (round to nearest even): bit-exact with
//                lowrank/quant/nf4.py (contract in nf4_common.h).
//   gemv:        y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]) for the rows [n0, n1), in float32, with
//                W dequantized in x's dtype (`wtype`: the reference's operands exactly), products
//                accumulated in float32 with FMA.
//
// The narrow interface: raw pointers and ranges, no torch. The caller (bindings.cpp) splits the
// range over threads with at::parallel_for. Each kernel runs with the widest instruction set this
// CPU has (chosen at run time: AVX-512, AVX2+FMA+F16C, or portable C++), see nf4_cpu.cpp.
#pragma once

#include <cstdint>

#include "nf4_common.h"

namespace lowrank {

enum class OutType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// kAvx512Bf16: AVX-512 plus AVX512_BF16, used by the GEMV of bf16 x (nf4_cpu_avx512bf16.cpp);
// everything else runs the kAvx512 kernels there.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// x is laid out for the gemv in groups of 32 elements along K: the 16 even-indexed elements of
// the group, then the 16 odd-indexed ones (the high and the low nibbles of 16 packed bytes), so
// that the decoded codes never need to be interleaved. K must be a multiple of 32.
constexpr int kGemvGroup = 32;
constexpr int kGemvMaxRows = 16;  // M = 1..16; larger M is a GEMM, which these kernels are not

// Note: prefetching the next rows. A GEMV reads each row of W once, K / 2 bytes (2 KiB at K = 4096),
// a few rows side by side (NR streams), and then the next few: many short streams, each
// ending before a hardware prefetcher has learnt it. When W comes from memory rather than the
// caches (a model's weights do not fit the L3 while decoding), the rows waited on DRAM: at M = 1
// the bf16 GEMV ran at 0.75 ms with W cold against 0.31 warm (one thread, 4096 x 4096, the EPYC
// of docs/benchmarks.md). So while a kernel reads a cache line of its rows it asks for the same
// line of the rows after them (_mm_prefetch, T0): one prefetch a line, a tile of rows ahead. A
// prefetch never faults, so rows past the end need no check. Cold, the bf16 GEMV then took
// 0.40 ms (docs/benchmarks.md, "C++ CPU kernels").

// Instruction set the kernels use; set_isa refuses (returns false) one this CPU lacks.
Isa best_isa();
Isa current_isa();
bool set_isa(Isa isa);
const char* isa_name(Isa isa);

// Blocks [b0, b1) of W into `out`, whose element 0 is block b0's first element (all of W from b0 = 0,
// or a buffer for part of it).
void nf4_dequantize_cpu_from(const NF4View& w, OutType type, void* out, int64_t b0, int64_t b1);

// xd[M, K] = x[M, K] regrouped as described above (kGemvGroup).
void nf4_gemv_pack_x(const float* x, int64_t M, int64_t K, float* xd);

// Needs K % 32 == 0, K % blocksize == 0 and 1 <= M <= 16; bias may be nullptr; y is [M, N].
// The weights are rounded to `wtype` (x's dtype), as the reference dequantizes W in x.dtype.
void nf4_gemv_cpu(const NF4View& w, OutType wtype, int64_t N, int64_t K, const float* xd, int64_t M, const float* bias,
                  float* y, int64_t n0, int64_t n1);

// The GEMV of bf16 x on AVX512_BF16 (vdpbf16ps, nf4_cpu_avx512bf16.cpp), when
// nf4_gemv_bf16_covers(w): x regrouped per 64 elements (32 even, then 32 odd ones) as bf16 bits
// by nf4_gemv_pack_x_bf16, which returns the smallest nonzero |scale| the kernel may take
// exactly, or a negative number when x holds a subnormal (then use nf4_gemv_cpu). The kernel
// returns false when a scale is below that bound (See Note: subnormals in that file); its y is
// then not complete and the caller runs nf4_gemv_cpu.
bool nf4_gemv_bf16_covers(const NF4View& w);
float nf4_gemv_pack_x_bf16(const uint16_t* x, int64_t M, int64_t K, uint16_t* xb);
bool nf4_gemv_bf16_cpu(const NF4View& w, int64_t N, int64_t K, const uint16_t* xb, int64_t M, const float* bias, float* y,
                       int64_t n0, int64_t n1, float scale_min);

// The per-instruction-set kernels (nf4_cpu_avx2.cpp, nf4_cpu_avx512.cpp). They see only full
// blocks of a blocksize that is a multiple of 32; nf4_cpu.cpp hands everything else to C++.
// dequantize writes block b0 at `out` (nf4_dequantize_cpu_from's contract).
namespace avx2 {
void dequantize(const NF4View& w, OutType type, void* out, int64_t b0, int64_t b1);
void gemv(const NF4View& w, OutType wtype, int64_t N, int64_t K, const float* xd, int64_t M, const float* bias, float* y,
          int64_t n0, int64_t n1);
}  // namespace avx2
namespace avx512 {
void dequantize(const NF4View& w, OutType type, void* out, int64_t b0, int64_t b1);
void gemv(const NF4View& w, OutType wtype, int64_t N, int64_t K, const float* xd, int64_t M, const float* bias, float* y,
          int64_t n0, int64_t n1);
void gemv_bf16(const NF4View& w, int64_t N, int64_t K, const uint16_t* xb, int64_t M, const float* bias, float* y, int64_t n0,
               int64_t n1);
}  // namespace avx512
namespace avx512bf16 {
bool gemv(const NF4View& w, int64_t N, int64_t K, const uint16_t* xb, int64_t M, const float* bias, float* y, int64_t n0,
          int64_t n1, float scale_min);
}  // namespace avx512bf16

}  // namespace lowrank
