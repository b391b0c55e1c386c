// The lowrank:: ops' CPU and CUDA kernels as C++ dispatcher kernels (bindings.cpp, bindings_cuda.cpp).
//
// Note: the ops in C++. lowrank/ops/library.py defines the ops and their Python kernel
// (CompositeExplicitAutograd: checks, the backend table, then a backend). Called through that
// kernel, a no-grad nf4_linear at M = 1 took 17 us on the 2-core EPYC of docs/benchmarks.md, of
// which the GEMV (with its pybind call) was 4 us: the rest was the dispatcher boxing arguments for
// Python, the checks and the backend choice, and decoding token by token waited on it (so did the
// op calls of a compiled QLoRA step). When lowrank._C is loaded it registers these kernels for the
// CPU and CUDA keys, which the dispatcher prefers to the composite one for tensors there (the
// same call: 9.9 us). Each runs what the "csrc"
// backend would (lowrank/ops/csrc.py: the GEMV where it covers the call, else the csrc dequantize
// and at::linear / at::matmul), and hands the call back to the Python kernel (set_python_kernels)
// whenever that might do something else: LOWRANK_BACKEND names another backend, or the arguments
// fail the plain checks below (the Python kernel raises with its message, or makes tensors
// contiguous). So the ops behave as before, minus the Python, in the common case.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace lowrank {

// The csrc backend runs: LOWRANK_BACKEND is unset, empty or "csrc" (any case, spaces around), and
// LOWRANK_PYTHON_OPS is not "1" (which sends every call to the Python kernels: the A/B of this
// Note on one build, or a way around a fault in these kernels).
bool csrc_chosen();

// What library.py's _weight_ok / _linear_ok / _grad_input_ok accept, and contiguous weight tensors
// (lowrank._C's kernels read them as raw arrays; the Python kernel makes them contiguous).
bool weight_ok(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
               const std::optional<at::Tensor>& offset, at::IntArrayRef shape, int64_t blocksize);
bool linear_ok(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
               const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
               at::IntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias);
bool grad_input_ok(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                   const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                   at::IntArrayRef shape, int64_t blocksize);

// Registers the C++ autograd of nf4_linear and nf4_linear_grad_input (autograd.cpp, Note:
// autograd in C++); lowrank/ops/csrc.py calls it, once, instead of library.py's Python autograd.
// It registers lowrank::lora_add's and nf4_lora_linear's kernels and autograd too (lora.cpp).
void register_autograd();
void register_lora_ops();

// lowrank/ops/lora_ops.py's dropout_parts in C++ (lora.cpp): (dropped, keep, keep_scale) from the
// random numbers F.dropout(x, p, training=True) would draw; its caller checks 0 < p < 1, x non-empty
// on the CPU or CUDA.
std::tuple<at::Tensor, at::Tensor, double> dropout_parts(const at::Tensor& x, double p);

// The ops' Python kernels (library.py), for the calls the C++ kernels hand back.
at::Tensor python_dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                             c10::SymIntArrayRef shape, int64_t blocksize, at::ScalarType dtype);
at::Tensor python_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                         c10::SymIntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias);
at::Tensor python_grad_input(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                             c10::SymIntArrayRef shape, int64_t blocksize);

// ---------------------------------------------------------------------------------------------
// The three kernels of one device, from its dequantize and its GEMV (bindings.cpp: CPU,
// bindings_cuda.cpp: CUDA); the GEMV returns an undefined tensor for a call it does not cover.
// ---------------------------------------------------------------------------------------------
using DequantizeFn = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                    const std::optional<at::Tensor>&, at::IntArrayRef, int64_t, at::ScalarType);
using GemvFn = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, at::IntArrayRef,
                              int64_t, const std::optional<at::Tensor>&);

template <DequantizeFn Dequantize>
at::Tensor dequantize_kernel(const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                             c10::SymIntArrayRef sym_shape, int64_t blocksize, at::ScalarType dtype) {
  const at::IntArrayRef shape = C10_AS_INTARRAYREF_SLOW(sym_shape);
  const bool ok = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  if (!ok || !csrc_chosen() || !weight_ok(packed, absmax, nested_absmax, offset, shape, blocksize))
    return python_dequantize(packed, absmax, nested_absmax, offset, sym_shape, blocksize, dtype);
  return Dequantize(packed, absmax, nested_absmax, offset, shape, blocksize, dtype);
}

template <DequantizeFn Dequantize, GemvFn Gemv>
at::Tensor linear_kernel(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                         c10::SymIntArrayRef sym_shape, int64_t blocksize, const std::optional<at::Tensor>& bias) {
  const at::IntArrayRef shape = C10_AS_INTARRAYREF_SLOW(sym_shape);
  if (!csrc_chosen() || !linear_ok(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias))
    return python_linear(x, packed, absmax, nested_absmax, offset, sym_shape, blocksize, bias);
  at::Tensor y = Gemv(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias);
  if (y.defined()) return y;
  const at::Tensor w = Dequantize(packed, absmax, nested_absmax, offset, shape, blocksize, x.scalar_type());
  return at::linear(x, w, bias);  // (..., K) @ (K, N) -> (..., N), as the reference
}

template <DequantizeFn Dequantize>
at::Tensor grad_input_kernel(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                             c10::SymIntArrayRef sym_shape, int64_t blocksize) {
  const at::IntArrayRef shape = C10_AS_INTARRAYREF_SLOW(sym_shape);
  if (!csrc_chosen() || !grad_input_ok(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize))
    return python_grad_input(grad_y, packed, absmax, nested_absmax, offset, sym_shape, blocksize);
  const at::Tensor w = Dequantize(packed, absmax, nested_absmax, offset, shape, blocksize, grad_y.scalar_type());
  return at::matmul(grad_y, w);  // (..., N) @ (N, K) -> (..., K), as the reference
}

}  // namespace lowrank

// Registers a device's three kernels for dispatch key KEY (CPU, CUDA).
#define LOWRANK_REGISTER_OPS(KEY, DEQUANTIZE, GEMV)                                                         \
  TORCH_LIBRARY_IMPL(lowrank, KEY, m) {                                                                     \
    m.impl("nf4_dequantize", TORCH_FN(lowrank::dequantize_kernel<DEQUANTIZE>));                             \
    m.impl("nf4_linear", TORCH_FN((lowrank::linear_kernel<DEQUANTIZE, GEMV>)));                             \
    m.impl("nf4_linear_grad_input", TORCH_FN(lowrank::grad_input_kernel<DEQUANTIZE>));                      \
  }
