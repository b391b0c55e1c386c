// The torch side of the CPU dequantize: over the threads, whole or a chunk of W at a time
// (nf4_cpu_chunks.cpp, Note: W a chunk at a time).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "nf4_cpu.h"

namespace lowrank {

// Blocks [b0, b1) of W into `out` (whose element 0 is block b0's first element), over the threads.
void dequantize_parallel(const NF4View& w, OutType type, void* out, int64_t b0, int64_t b1);

// x[..., K] @ W[N, K]^T (+ bias[N]) -> [..., N] in x's dtype = `type`; K % blocksize == 0 (a chunk is whole blocks).
at::Tensor chunked_linear(const at::Tensor& x, const NF4View& w, int64_t N, int64_t K, OutType type,
                          const std::optional<at::Tensor>& bias);

}  // namespace lowrank
