// What the C++ autograd of the 4-bit ops (autograd.cpp) shares with the fused QLoRA node
// (lora.cpp): the ops' handles in the dispatcher, and the packed weight kept by reference in an
// autograd context (Note: autograd in C++).
#pragma once

#include <torch/autograd.h>

#include <optional>
#include <vector>

namespace lowrank {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, c10::SymIntArrayRef, int64_t,
                             const std::optional<at::Tensor>&);
using GradInputSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                c10::SymIntArrayRef, int64_t);

// lowrank::nf4_linear and lowrank::nf4_linear_grad_input, called through the dispatcher (so
// below autograd they reach the device's kernel, and while torch.compile traces, the fake one)
const c10::TypedOperatorHandle<LinearSig>& linear_op();
const c10::TypedOperatorHandle<GradInputSig>& grad_input_op();

// The packed weight as kept in a context: its tensors and numbers (library.py's ctx.weight),
// plain references in saved_data, not saved tensors (activation checkpointing packs nothing of it).
struct Weight {
  at::Tensor packed, absmax;
  std::optional<at::Tensor> nested_absmax, offset;
  std::vector<c10::SymInt> shape;
  int64_t blocksize;
};

void save_weight(AutogradContext* ctx, const at::Tensor& packed, const at::Tensor& absmax,
                 const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                 c10::SymIntArrayRef shape, int64_t blocksize);
Weight saved_weight(AutogradContext* ctx);

// How many of nested_absmax, offset, bias are defined tensors: the edges of a Function's
// backward are the defined tensors among its arguments, in order, so each one present shifts
// the edges after it.
inline int64_t defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// (..., K) as the (M, K) matrix matmul folds it into for mm (a view when it can be one, as there)
inline at::Tensor rows(const at::Tensor& t, const c10::SymInt& m) { return t.reshape_symint({m, t.sym_size(-1)}); }

// M, the product of the leading sizes (not numel / K, which K = 0 would divide by)
inline c10::SymInt leading(const at::Tensor& t) {
  c10::SymInt m = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) m = m * t.sym_size(i);
  return m;
}

// A bias's gradient: grad (..., N) summed over every leading dimension (rows by `leading`, not
// by -1, which has nothing to divide when N = 0)
inline at::Tensor bias_grad(const at::Tensor& grad) { return rows(grad, leading(grad)).sum(0); }

}  // namespace lowrank
