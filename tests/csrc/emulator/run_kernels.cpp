// Runs lowrank's CUDA entry points (csrc/nf4_cuda.h: nf4_gemv_cuda, nf4_dequantize_cuda) on the
// CPU emulator, from their own source and launchers. tests/csrc/test_cuda_emulated.py writes the
// inputs and reads the output:
//
//   run_kernels IN OUT
//   IN:  int64 header [op (0 dequantize, 1 gemv), type (nf4_cuda.h CudaType), N, K, M, blocksize,
//        nested (0/1), kernel, has_bias], then packed (ceil(N K / 2) bytes), absmax (uint8 or
//        float32, one a block), nested_absmax and offset (float32, when nested), x (M K of the
//        type, gemv only), bias (N of the type, when has_bias)
//   OUT: the result (N K or M N elements of the type); exit status 3 when the call returned an error.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <vector>

#include "nf4_cuda.h"

namespace {

struct Reader {
  std::vector<char> bytes;
  size_t at = 0;
  const char* take(size_t n) {
    if (at + n > bytes.size()) {
      std::fprintf(stderr, "run_kernels: the input ends early\n");
      std::exit(2);
    }
    const char* p = bytes.data() + at;
    at += n;
    return p;
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: run_kernels IN OUT\n");
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  Reader r{std::vector<char>(std::istreambuf_iterator<char>(in), {})};
  int64_t h[9];
  std::memcpy(h, r.take(sizeof(h)), sizeof(h));
  const int64_t op = h[0], N = h[2], K = h[3], M = h[4], blocksize = h[5], nested = h[6], kernel = h[7], has_bias = h[8];
  const auto type = static_cast<lowrank::CudaType>(h[1]);
  const size_t elem = type == lowrank::CudaType::kFloat32 ? 4 : 2;
  const int64_t numel = N * K, blocks = (numel + blocksize - 1) / blocksize;
  // 16-byte aligned copies, as device allocations are (new[] of uint4-sized words), alive until exit
  std::vector<std::unique_ptr<uint64_t[]>> copies;
  auto aligned = [&copies](const char* src, size_t n) {
    copies.emplace_back(new uint64_t[(n + 15) / 8 + 2]());
    std::memcpy(copies.back().get(), src, n);
    return static_cast<const void*>(copies.back().get());
  };
  lowrank::NF4View w{};
  w.packed = static_cast<const uint8_t*>(aligned(r.take((numel + 1) / 2), (numel + 1) / 2));
  w.absmax = aligned(r.take(blocks * (nested ? 1 : 4)), blocks * (nested ? 1 : 4));
  if (nested) {
    const int64_t groups = (blocks + lowrank::kNestedBlocksize - 1) / lowrank::kNestedBlocksize;
    w.nested = static_cast<const float*>(aligned(r.take(groups * 4), groups * 4));
    w.offset = static_cast<const float*>(aligned(r.take(4), 4));
  }
  w.numel = numel, w.blocksize = blocksize;
  cudaError_t status;
  std::vector<uint64_t> out;
  if (op == 0) {
    out.assign((numel * elem + 7) / 8 + 2, 0);
    status = lowrank::nf4_dequantize_cuda(w, type, out.data(), nullptr);
  } else {
    const void* x = aligned(r.take(M * K * elem), M * K * elem);
    const void* bias = has_bias ? aligned(r.take(N * elem), N * elem) : nullptr;
    out.assign((M * N * elem + 7) / 8 + 2, 0);
    status = lowrank::nf4_gemv_cuda(w, N, K, x, M, bias, type, out.data(), static_cast<int>(kernel), nullptr);
  }
  if (status != cudaSuccess) {
    std::fprintf(stderr, "run_kernels: the call returned error %d\n", static_cast<int>(status));
    return 3;
  }
  std::ofstream(argv[2], std::ios::binary)
      .write(reinterpret_cast<const char*>(out.data()), (op == 0 ? numel : M * N) * static_cast<int64_t>(elem));
  return 0;
}
