// nf4_linear on the CPU where the GEMV does not go (past its 16 rows): W dequantized a chunk of rows
// at a time into one buffer, each chunk multiplied at once (at::mm / at::addmm).
//
// Note: W a chunk at a time. There the CPU used to dequantize all of W into a fresh tensor and
// call at::linear: 32 MiB at 4096 x 4096 in bf16, 112 MiB at 14336 x 4096, written once, read
// once, and a fresh allocation at every call whose first writes fault its pages in. With huge
// pages (bindings.cpp, Note: huge pages for the output) that is one fault a 2 MiB page, but one 32
// MiB output took 15-50 ms on the 2-core EPYC of docs/benchmarks.md while earlier ones were alive,
// against 1.6 ms freed (likely the kernel compacting memory for the huge pages: its THP defrag is
// "madvise" there, which may compact at the fault; not established further). Now a buffer of
// about kChunkBytes takes rows [n0, n1) of W, stays in the caches while at::mm reads it, and is
// reused for the next rows: y[:, n0:n1] = x W[n0:n1, :]^T (+ bias[n0:n1]), written in place into
// the columns of y (a strided output at::mm takes as it is). Each element of y comes whole from
// one product and is rounded once, as at::linear's; the order of the sums within a product is
// the library's, so the results are the reference's up to that order (tests/ops/bounds.py).
// Measured 2026-11-30 (docs/benchmarks.md, "C++ CPU kernels"): bf16, M = 17 / 64 / 512 at the
// three Llama shapes, 1.1-2.1x faster than the whole W, and never the 40 ms stalls. A chunk of
// 2 MiB was slower than 8 (more, smaller products); chunks of rows writing y^T and one transposing
// copy were slower at M = 17. nf4_linear_grad_input still dequantizes W whole: in chunks of
// columns (the only ones whose products are not summed) it was slower where N > K (14336 x 4096:
// a row of the chunk is a call of the dequantize kernel, 229k calls).
#include "nf4_cpu_chunks.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace lowrank {
namespace {

constexpr int64_t kChunkBytes = int64_t{8} << 20;  // a chunk of W in x's dtype: within the L3's share of a core

int64_t element_size(OutType type) { return type == OutType::kFloat32 ? 4 : 2; }

}  // namespace

// Each thread takes one contiguous range of blocks (at::parallel_for splits [b0, b1) into one chunk
// a thread), so each writes, and first touches, its own pages.
void dequantize_parallel(const NF4View& w, OutType type, void* out, int64_t b0, int64_t b1) {
  const int64_t size = element_size(type) * w.blocksize;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / w.blocksize);  // about 64k elements a task
  at::parallel_for(b0, b1, grain, [&](int64_t c0, int64_t c1) {
    nf4_dequantize_cpu_from(w, type, static_cast<char*>(out) + (c0 - b0) * size, c0, c1);
  });
}

at::Tensor chunked_linear(const at::Tensor& x, const NF4View& w, int64_t N, int64_t K, OutType type,
                          const std::optional<at::Tensor>& bias) {
  const int64_t M = x.numel() / K;
  const at::Tensor x2 = x.reshape({M, K});
  const int64_t rows = std::clamp<int64_t>(kChunkBytes / (K * element_size(type)), 1, N);
  at::Tensor buffer = at::empty({rows, K}, x.options());
  at::Tensor y = at::empty({M, N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += rows) {  // See Note: W a chunk at a time
    const int64_t n = std::min(rows, N - n0);
    at::Tensor chunk = buffer.narrow(0, 0, n);
    dequantize_parallel(w, type, chunk.data_ptr(), n0 * (K / w.blocksize), (n0 + n) * (K / w.blocksize));  // rows [n0, n0 + n)
    at::Tensor out = y.narrow(1, n0, n);
    if (bias.has_value())
      at::addmm_out(out, bias->narrow(0, n0, n), x2, chunk.t());
    else
      at::mm_out(out, x2, chunk.t());
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(N);
  return y.view(shape);
}

}  // namespace lowrank
