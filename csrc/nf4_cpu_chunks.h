// The CPU's nf4_linear where the GEMV does not go: W dequantized a chunk at a time (nf4_cpu_chunks.cpp,
// Note: W a chunk at a time). Needs K % blocksize == 0 (a chunk is whole blocks) and x's dtype = `type`.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "nf4_cpu.h"

namespace lowrank {

// x[..., K] @ W[N, K]^T (+ bias[N]) -> [..., N] in x's dtype.
at::Tensor chunked_linear(const at::Tensor& x, const NF4View& w, int64_t N, int64_t K, OutType type,
                          const std::optional<at::Tensor>& bias);

}  // namespace lowrank
