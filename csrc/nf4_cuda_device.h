// Device-side pieces both CUDA kernel files use (included by the .cu files only): the NF4 values
// and the dynamic map as __device__ tables (each file keeps its own copy: no relocatable device
// code), and float <-> the kernels' element types, rounding to nearest even like torch's casts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4_common.h"

// Note: the CPU emulator. tests/csrc/emulator compiles the .cu files with a host compiler,
// -DLOWRANK_CUDA_EMULATOR and its cuda_emulator.h force-included, and runs every CUDA thread as a
// fiber on the CPU (warps in lockstep at mma.sync and shuffles, CTAs at barriers). The few
// places that are not plain C++ to a host compiler go through these macros (kernel launches,
// dynamic shared memory) or an #ifdef beside their inline PTX (nf4_cuda_mma.h, nf4_cuda_gemv_lut.cu).
#ifndef LOWRANK_CUDA_EMULATOR
#define LOWRANK_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define LOWRANK_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace lowrank {
namespace {

__device__ const float g_dynamic[256] = {LOWRANK_DYNAMIC_VALUES};
__device__ const float g_nf4[16] = {LOWRANK_NF4_VALUES};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace
}  // namespace lowrank
