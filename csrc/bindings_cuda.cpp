// The torch side of the CUDA kernels (compiled only when torch is a CUDA build, setup.py):
//
//   nf4_dequantize_cuda(packed, absmax, nested_absmax?, offset?, shape, blocksize, dtype) -> W[shape]
//   nf4_linear_cuda(x[..., K], packed, absmax, nested_absmax?, offset?, shape=[N, K], blocksize, bias?, kernel=0)
//       -> x @ W^T + bias, [..., N] in x.dtype     (1 <= M = x.numel() / K <= 64 for float16 / bfloat16, 16 float32)
//   kernel: which GEMV (nf4_cuda.h kGemv*); 0 picks by dtype
//
//   managed_prefetch(t): move the managed-memory pages of t to its device, on the current stream
//       (lowrank/optim.py; the allocator itself is paged.cu's lowrank_managed_alloc / _free)
//
// Same arguments as the lowrank:: ops; lowrank/ops/csrc.py sends CUDA tensors here.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "dispatch.h"
#include "message.h"
#include "nf4_cuda.h"
#include "paged.h"

namespace lowrank {

NF4View nf4_view(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                 const std::optional<at::Tensor>& offset, at::IntArrayRef shape, int64_t blocksize);  // bindings.cpp

namespace {

CudaType cuda_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return CudaType::kFloat32;
    case at::kHalf: return CudaType::kFloat16;
    case at::kBFloat16: return CudaType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_VALUE(false, message("dtype must be float32, float16 or bfloat16, got ", dtype));
  return CudaType::kFloat32;  // not reached
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, message(what, " failed: ", cudaGetErrorString(err)));
}

at::Tensor dequantize_cuda_op(const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                              at::IntArrayRef shape, int64_t blocksize, at::ScalarType dtype) {
  TORCH_CHECK(packed.is_cuda(), message("packed must be a CUDA tensor, got one on ", packed.device()));
  const c10::cuda::CUDAGuard guard(packed.device());
  const NF4View w = nf4_view(packed, absmax, nested_absmax, offset, shape, blocksize);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  check(nf4_dequantize_cuda(w, cuda_type(dtype), out.data_ptr(), at::cuda::getCurrentCUDAStream()),
        "nf4_dequantize_cuda");
  return out;
}

at::Tensor linear_cuda_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                          at::IntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias,
                          int64_t kernel) {
  TORCH_CHECK(x.is_cuda() && x.device() == packed.device(),
              message("x and packed must be on the same CUDA device, got ", x.device(), " and ", packed.device()));
  TORCH_CHECK(shape.size() == 2, message("the weight must be 2-d [N, K], got shape ", shape));
  const int64_t N = shape[0], K = shape[1];
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, message("x must be [..., K] with K = ", K, ", got ", x.sizes()));
  TORCH_CHECK(K > 0 && K % 32 == 0 && blocksize % 32 == 0,
              message("K must be a positive multiple of 32 and blocksize a multiple of 32; got K = ", K, ", blocksize ",
                      blocksize));
  const int64_t M = x.numel() / K;
  const bool simt = kernel == kGemvSimt || (kernel == kGemvAuto && x.scalar_type() == at::kFloat);
  TORCH_CHECK(kernel >= kGemvAuto && kernel <= kGemvMmaLutDeep,
              message("kernel must be ", kGemvAuto, " (auto), ", kGemvMma, " (mma), ", kGemvSimt, " (simt), ",
                      kGemvMmaStaged, " (mma-staged), ", kGemvMmaStaged2, " (mma-staged2), ", kGemvMmaLut,
                      " (mma-lut) or ", kGemvMmaLutDeep, " (mma-lut-deep), got ", kernel));
  TORCH_CHECK(!(kernel != kGemvAuto && kernel != kGemvSimt && x.scalar_type() == at::kFloat),
              "the mma kernels take float16 or bfloat16 x, got float32");
  const int64_t max_rows = simt ? kCudaSimtMaxRows : kernel == kGemvMmaStaged2 ? kCudaStaged2MaxRows : kCudaMmaMaxRows;
  TORCH_CHECK(M >= 1 && M <= max_rows, message("x must have 1 to ", max_rows, " rows for this kernel, got ", M));
  const c10::cuda::CUDAGuard guard(x.device());
  const NF4View w = nf4_view(packed, absmax, nested_absmax, offset, shape, blocksize);
  at::Tensor xc = x.reshape({M, K}).contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) xc = xc.clone();  // fresh storage is aligned
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0,
              "packed must start on a 16-byte boundary for the CUDA kernel (a view at an offset?); "
              "pass packed.clone()");
  at::Tensor bc;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, message("bias must hold N = ", N, " values, got ", bias->sizes()));
    bc = bias->to(x.scalar_type()).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  check(nf4_gemv_cuda(w, N, K, xc.data_ptr(), M, bc.defined() ? bc.data_ptr() : nullptr, cuda_type(x.scalar_type()),
                      y.data_ptr(), static_cast<int>(kernel), at::cuda::getCurrentCUDAStream()),
        "nf4_gemv_cuda");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  return y.reshape(out_shape);
}

// See Note: the ops in C++ (dispatch.h). The CUDA GEMV where csrc.py's _gemv_covers says it runs.
at::Tensor cuda_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                     at::IntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias) {
  const int64_t K = shape[1];
  if (K <= 0 || K % 32 != 0) return {};  // K = 0: the reference's empty product
  const int64_t M = x.numel() / K;
  if (M < 1 || M > (x.scalar_type() == at::kFloat ? kCudaSimtMaxRows : kCudaGemvOpMaxRows)) return {};
  // a view at an odd offset: the GEMV's 128-bit loads need 16-byte alignment
  const at::Tensor p = reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 != 0 ? packed.clone() : packed;
  return linear_cuda_op(x, p, absmax, nested_absmax, offset, shape, blocksize, bias, kGemvAuto);
}

void managed_prefetch_op(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), message("managed_prefetch takes a CUDA tensor in managed memory, got one on ", t.device()));
  // nbytes() spans the bytes of a contiguous tensor only (an expanded or strided view reaches others)
  TORCH_CHECK(t.is_contiguous(), message("managed_prefetch takes a contiguous tensor, got strides ", t.strides()));
  const c10::cuda::CUDAGuard guard(t.device());
  check(managed_prefetch(t.data_ptr(), t.nbytes(), t.device().index(), at::cuda::getCurrentCUDAStream()),
        "cudaMemPrefetchAsync");
}

}  // namespace

void register_cuda(pybind11::module& m) {
  namespace py = pybind11;
  m.def("nf4_dequantize_cuda", &dequantize_cuda_op);
  m.def("nf4_linear_cuda", &linear_cuda_op, py::arg("x"), py::arg("packed"), py::arg("absmax"),
        py::arg("nested_absmax"), py::arg("offset"), py::arg("shape"), py::arg("blocksize"), py::arg("bias"),
        py::arg("kernel") = kGemvAuto);
  m.attr("cuda_mma_max_rows") = kCudaMmaMaxRows;
  m.attr("cuda_simt_max_rows") = kCudaSimtMaxRows;
  m.attr("cuda_staged2_max_rows") = kCudaStaged2MaxRows;
  m.attr("cuda_gemv_op_max_rows") = kCudaGemvOpMaxRows;
  m.def("managed_prefetch", &managed_prefetch_op, "prefetch a managed-memory tensor to its device (PagedAdamW)");
}

}  // namespace lowrank

// See Note: the ops in C++ (dispatch.h).
LOWRANK_REGISTER_OPS(CUDA, &lowrank::dequantize_cuda_op, &lowrank::cuda_gemv)
