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

}  // namespace lowrank
