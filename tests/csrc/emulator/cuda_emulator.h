// A CUDA device on the CPU, enough of one to run lowrank's kernels (csrc/nf4_cuda_*.cu) from
// their own source: force-included (g++ -include) before each .cu file, which is compiled with
// -DLOWRANK_CUDA_EMULATOR (csrc/nf4_cuda_device.h, Note: the CPU emulator).
//
// Every CUDA thread of a CTA is a fiber (ucontext) on one OS thread. A fiber runs until it reaches
// a point where it must meet others: __syncthreads (all live threads of the CTA), or a warp-wide
// operation, mma.sync or a shuffle (the 32 lanes of its warp); the scheduler (cuda_emulator.cpp)
// then runs the others and performs the meeting once everyone is there. CTAs run one after
// another, so a __shared__ variable is a plain static. What a real GPU would do and this does not:
// run CTAs concurrently, reorder memory, or time anything. What it checks: the kernels' indexing,
// lane layouts, barriers and results, executed, not modelled.
//
// mma.sync.m16n8k16 (row.col, f32 accumulators) follows the fragment layout of the PTX ISA
// ("Matrix fragments for mma.m16n8k16 with floating point type"): lane (g = lane / 4, t = lane % 4)
// holds A[g][2t..2t+1] (a0), A[g+8][2t..2t+1] (a1), A[g][2t+8..2t+9] (a2), A[g+8][2t+8..2t+9] (a3),
// B[2t..2t+1][g] (b0), B[2t+8..2t+9][g] (b1), and D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
// Products are exact in float64 and each D element is C + the sum, rounded once to float32 (the
// tensor cores' own order and truncation are within tests/ops/bounds.py's bound of that).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#undef __global__
#undef __device__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace emu {

struct Index {
  unsigned x, y, z;
};

struct Fiber;
extern Fiber* g_current;  // the fiber running now
extern Index g_block_idx, g_block_dim, g_grid_dim;
extern unsigned char g_anchor[];  // shared-memory addresses are offsets from here (see cvta)
const Index& thread_idx();

[[noreturn]] void misaligned(const char* what, const void* p, size_t alignment);

// One CTA's meeting points (cuda_emulator.cpp).
void syncthreads();
void mma(const uint32_t (&a)[4], uint32_t b0, uint32_t b1, float (&d)[4], bool bf16);
float shfl_xor(float v, int mask);
void* dynamic_shared();

// Runs kernel(args...) on every thread of every CTA of a 1-d grid; `smem`: dynamic shared bytes.
void run_grid(unsigned grid, unsigned block, size_t smem, const std::function<void()>& body);

template <bool BF16>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma(a, b0, b1, d, BF16);
}

// 32-bit shared-memory "addresses" (__cvta_generic_to_shared): the offset from g_anchor, signed;
// every static of the binary lies within 2 GiB of it and g_anchor is 4 KiB-aligned, so an
// address keeps its object's alignment (csrc/nf4_cuda_mma.h ORs table entries into it).
inline uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(reinterpret_cast<intptr_t>(p) - reinterpret_cast<intptr_t>(g_anchor));
}
inline const unsigned char* shared_pointer(uint32_t address) {
  return g_anchor + static_cast<int32_t>(address);
}
inline uint32_t lds32(uint32_t address) {
  if (address % 4 != 0) misaligned("ld.shared.u32", shared_pointer(address), 4);
  uint32_t v;
  std::memcpy(&v, shared_pointer(address), 4);
  return v;
}

// A grid or block size given as a number or a dim3 (1-d only).
inline unsigned extent(unsigned n) { return n; }
inline unsigned extent(const dim3& d) {
  if (d.y != 1 || d.z != 1) std::abort();
  return d.x;
}

template <typename F>
struct Launch {
  F kernel;
  unsigned grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args... args) const {
    run_grid(grid, block, smem, [&] { kernel(args...); });
  }
};

}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::g_block_idx)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)
#define LOWRANK_LAUNCH(kernel, grid, block, smem, stream) \
  emu::Launch<std::decay_t<decltype(kernel)>>{kernel, emu::extent(grid), emu::extent(block), static_cast<size_t>(smem)}
#define LOWRANK_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(emu::dynamic_shared())

inline void __syncthreads() { emu::syncthreads(); }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) {  // any size is granted
  return cudaSuccess;
}
inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu::shfl_xor(v, mask); }
// Loads fault on a GPU when misaligned (a uint4 needs 16 bytes, a uint2 8): so they abort here.
template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) emu::misaligned("__ldg", p, alignof(T));
  return *p;
}
inline uint32_t __cvta_generic_to_shared(const void* p) { return emu::shared_address(p); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  unsigned out = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 0x7;  // mode bit 3 (sign replication) is not used by lowrank
    out |= static_cast<unsigned>((bytes >> (8 * sel)) & 0xFF) << (8 * i);
  }
  return out;
}
// Compiled with -ffp-contract=off: a * b + c stays two roundings, as __fmul_rn / __fadd_rn promise.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
